//! Manifests: one per pushed snapshot, naming every chunk a restore of it reads.
//!
//! # Format (version 2)
//!
//! A manifest object is a snap-core file ([`MANIFEST`]: magic `SNAPMNFT`, version, CRC-32C of
//! the header and payload) whose payload is a zstd frame (level 3) holding the postcard
//! encoding of [`Manifest`], at most [`MAX_MANIFEST`] bytes decoded:
//!
//! - the snapshot: its id, name, VM (id and name), parent id, labels, creation time, memory
//!   size, vCPUs, guest program and pause;
//! - its memory chain, oldest layer first: each layer's id and [digest](MemoryLayer::digest)
//!   (the snap-mem layer digest, so a copy of the layer can be told from another layer with the
//!   same id), frame size and zstd level, and its frames: region, the present and data page
//!   bitmaps (snap-mem's frame table, see `snap_mem::layer`), and the chunk holding the frame's
//!   data pages decompressed, in page order (none when no page has data);
//! - its disks: name, size, block size, and each disk's chain of sealed layers, oldest first:
//!   id, digest, and the blocks the layer holds with the chunk holding each one's data and the
//!   CRC-32C of that data (the layer's own map entry: with it a host builds the layer's map,
//!   and so its digest, before it has any block, and fetches the blocks as they are read);
//! - its vCPU and device state, and its recorded working set if it has one, as [`Blob`]s
//!   (bytes cut into chunks of [`MAX_CHUNK`]).
//!
//! Version 1 had no block CRCs; its manifests are still read (their layers' `crcs` are empty,
//! and their disks are fetched whole before they are used).
//!
//! The encoding is deterministic: the same snapshot gives the same bytes, whoever pushes it.
//! The manifest's [`ManifestId`] is the BLAKE3 digest of the whole object: the snapshot's remote
//! identity. It is stored under `<prefix>/v1/snapshots/<snapshot id>/<manifest id>`, written
//! only once every chunk it names is in the store. A snapshot may have more than one manifest
//! (pushed from hosts whose chains were merged differently): each restores the same memory,
//! disks and state.
//!
//! [`decode`] checks everything a reader later relies on, before anything is fetched: the
//! format and CRC, the decoded size bound, and the structure (every bitmap shaped for its frame
//! size, regions increasing and inside memory, data pages a subset of present ones, a chunk
//! exactly where a frame has data, no zero entries in a layer without a parent, blocks increasing
//! and inside the disk, one chunk and one CRC per block, blobs cut into the right number of
//! chunks).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;

use serde::{Deserialize, Serialize};
use snap_core::FormatSpec;

use crate::chunk::{ChunkId, MAX_CHUNK};

/// Largest decoded manifest (about 3.5 MiB per 16 GiB of memory per layer at 256 KiB frames).
pub const MAX_MANIFEST: usize = 256 << 20;

/// The manifest object's file format.
pub const MANIFEST: FormatSpec = FormatSpec {
    name: "remote manifest",
    magic: *b"SNAPMNFT",
    version: 2,
    min_version: 1,
    max_payload: MAX_MANIFEST as u64,
};

/// Largest state or working-set blob.
pub const MAX_BLOB: u64 = 1 << 30;

/// Largest memory a manifest describes (snap-mem's limit).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Largest disk a manifest describes (snap-disk's limit).
pub const MAX_DISK: u64 = 1 << 44;

/// A manifest's name: the BLAKE3 digest of the manifest object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ManifestId(pub [u8; 32]);

impl fmt::Display for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&ChunkId(self.0), f)
    }
}

impl fmt::Debug for ManifestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManifestId({self})")
    }
}

impl std::str::FromStr for ManifestId {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, ManifestError> {
        s.parse::<ChunkId>()
            .map(|c| Self(c.0))
            .map_err(|_| ManifestError::BadName(s.chars().take(80).collect()))
    }
}

/// A 16-byte id (snapshot, VM, layer), as snap-core's `Id` holds it.
pub type RawId = [u8; 16];

/// The guest program a snapshot's VM runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    /// Seed of its pseudo-random writes.
    pub seed: u64,
    /// Pages of its working set.
    pub working_set_pages: u64,
    /// Words written per tick.
    pub mutations_per_tick: u64,
    /// Ticks before it finishes.
    pub ticks: u64,
    /// Disk sectors written per tick.
    pub disk_sectors_per_tick: u64,
}

/// What the manifest says about the snapshot itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's id.
    pub id: RawId,
    /// Its name.
    pub name: String,
    /// The VM it was taken of.
    pub vm_id: RawId,
    /// That VM's name when it was pushed.
    pub vm_name: String,
    /// Its parent snapshot.
    pub parent_id: Option<RawId>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was taken, in Unix milliseconds.
    pub created_ms: i64,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest program.
    pub guest: Guest,
    /// How long the VM was paused to take it.
    pub pause_us: u64,
}

/// One frame of a memory layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFrame {
    /// Region number (pages `region * F / 4096 ..`).
    pub region: u64,
    /// Pages of the region the layer holds (snap-mem's bitmap words).
    pub present: Vec<u64>,
    /// Pages stored with data.
    pub data: Vec<u64>,
    /// The chunk holding the data pages, in page order; `None` when `data` is empty.
    pub chunk: Option<ChunkId>,
}

impl MemoryFrame {
    /// Pages stored with data.
    #[must_use]
    pub fn data_pages(&self) -> u64 {
        self.data.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// One memory layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayer {
    /// The layer's id.
    pub id: RawId,
    /// Its snap-mem digest where it was pushed from.
    pub digest: [u8; 32],
    /// Bytes of memory per frame.
    pub frame_size: u32,
    /// zstd level of its frames.
    pub zstd_level: i32,
    /// Its frames, regions increasing.
    pub frames: Vec<MemoryFrame>,
}

/// One sealed disk layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    /// The layer's id.
    pub id: RawId,
    /// Its snap-disk digest.
    pub digest: [u8; 32],
    /// The blocks it holds, increasing.
    pub blocks: Vec<u64>,
    /// The chunk of each block, in the same order.
    pub chunks: Vec<ChunkId>,
    /// The CRC-32C of each block's data, in the same order (empty in a version 1 manifest).
    pub crcs: Vec<u32>,
}

impl DiskLayer {
    /// The layer's map entries (block and CRC-32C), if the manifest records the CRCs.
    #[must_use]
    pub fn entries(&self) -> Option<Vec<(u64, u32)>> {
        (self.crcs.len() == self.blocks.len() && (!self.crcs.is_empty() || self.blocks.is_empty()))
            .then(|| {
                self.blocks
                    .iter()
                    .copied()
                    .zip(self.crcs.iter().copied())
                    .collect()
            })
    }
}

/// Version 1 of the structures that changed since (no block CRCs).
mod v1 {
    use super::{Blob, ChunkId, MemoryLayer, RawId, SnapshotInfo};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct DiskLayer {
        id: RawId,
        digest: [u8; 32],
        blocks: Vec<u64>,
        chunks: Vec<ChunkId>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct DiskChain {
        name: String,
        size_bytes: u64,
        block_size: u32,
        layers: Vec<DiskLayer>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct Manifest {
        snapshot: SnapshotInfo,
        memory: Vec<MemoryLayer>,
        disks: Vec<DiskChain>,
        state: Blob,
        working_set: Option<Blob>,
    }

    /// `m` as a version 1 object (what an older daemon pushed), for tests.
    #[cfg(test)]
    pub fn encode(m: &super::Manifest) -> Vec<u8> {
        let old = Manifest {
            snapshot: m.snapshot.clone(),
            memory: m.memory.clone(),
            disks: m
                .disks
                .iter()
                .map(|d| DiskChain {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    block_size: d.block_size,
                    layers: d
                        .layers
                        .iter()
                        .map(|l| DiskLayer {
                            id: l.id,
                            digest: l.digest,
                            blocks: l.blocks.clone(),
                            chunks: l.chunks.clone(),
                        })
                        .collect(),
                })
                .collect(),
            state: m.state.clone(),
            working_set: m.working_set.clone(),
        };
        let plain = postcard::to_allocvec(&old).unwrap();
        let packed = zstd::bulk::compress(&plain, 3).unwrap();
        snap_core::FormatSpec {
            version: 1,
            ..super::MANIFEST
        }
        .encode(&packed)
    }

    impl From<Manifest> for super::Manifest {
        fn from(m: Manifest) -> Self {
            let disks = m
                .disks
                .into_iter()
                .map(|d| super::DiskChain {
                    name: d.name,
                    size_bytes: d.size_bytes,
                    block_size: d.block_size,
                    layers: d
                        .layers
                        .into_iter()
                        .map(|l| super::DiskLayer {
                            id: l.id,
                            digest: l.digest,
                            blocks: l.blocks,
                            chunks: l.chunks,
                            crcs: Vec::new(),
                        })
                        .collect(),
                })
                .collect();
            Self {
                snapshot: m.snapshot,
                memory: m.memory,
                disks,
                state: m.state,
                working_set: m.working_set,
            }
        }
    }
}

/// One disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChain {
    /// Its name in the VM.
    pub name: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Its block size.
    pub block_size: u32,
    /// Its sealed layers, oldest first.
    pub layers: Vec<DiskLayer>,
}

/// Bytes cut into chunks of [`MAX_CHUNK`] (the last one shorter).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// Length in bytes.
    pub len: u64,
    /// The chunks, in order.
    pub chunks: Vec<ChunkId>,
}

/// A pushed snapshot (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot.
    pub snapshot: SnapshotInfo,
    /// Its memory chain, oldest first.
    pub memory: Vec<MemoryLayer>,
    /// Its disks.
    pub disks: Vec<DiskChain>,
    /// Its vCPU and device state.
    pub state: Blob,
    /// Its recorded working set.
    pub working_set: Option<Blob>,
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not a manifest name.
    #[error("{0:?} is not a manifest name (64 hex digits)")]
    BadName(String),
    /// The object is not a well-formed manifest, or its content is inconsistent.
    #[error("manifest {id}: {problem}")]
    Damaged {
        /// The manifest.
        id: ManifestId,
        /// What is wrong.
        problem: String,
    },
    /// The object holds other bytes than its name says.
    #[error("manifest {id}: its digest is {found}, not its name: the object was overwritten")]
    WrongContent {
        /// The manifest.
        id: ManifestId,
        /// The digest of what the object holds.
        found: ManifestId,
    },
}

impl Manifest {
    /// Every chunk the manifest names, each once.
    #[must_use]
    pub fn chunks(&self) -> std::collections::BTreeSet<ChunkId> {
        let memory = self
            .memory
            .iter()
            .flat_map(|l| &l.frames)
            .filter_map(|f| f.chunk);
        let disks = self
            .disks
            .iter()
            .flat_map(|d| &d.layers)
            .flat_map(|l| l.chunks.iter().copied());
        let blobs = std::iter::once(&self.state)
            .chain(&self.working_set)
            .flat_map(|b| b.chunks.iter().copied());
        memory.chain(disks).chain(blobs).collect()
    }

    /// The key of this manifest's object under `prefix`, given its id.
    #[must_use]
    pub fn key(&self, prefix: &str, id: &ManifestId) -> String {
        format!("{}{id}", Self::snapshot_prefix(prefix, &self.snapshot.id))
    }

    /// The key prefix of every manifest of snapshot `snapshot` (ends with `/`).
    #[must_use]
    pub fn snapshot_prefix(prefix: &str, snapshot: &RawId) -> String {
        let mut hex = String::with_capacity(32);
        for b in snapshot {
            hex.push_str(&format!("{b:02x}"));
        }
        format!("{prefix}/v1/snapshots/{hex}/")
    }
}

/// Bitmap words per frame for `frame_size` (snap-mem's rule).
fn mask_words(frame_size: u32) -> usize {
    (frame_size as usize / 4096).div_ceil(64).max(1)
}

/// Encodes `manifest` as its object; returns its id and bytes.
///
/// # Errors
/// A message if the manifest is inconsistent (the checks of [`decode`]) or too large.
pub fn encode(manifest: &Manifest) -> Result<(ManifestId, Vec<u8>), String> {
    check(manifest)?;
    let plain = postcard::to_allocvec(manifest).map_err(|e| format!("encoding: {e}"))?;
    if plain.len() > MAX_MANIFEST {
        return Err(format!(
            "the manifest would be {} bytes, over the {MAX_MANIFEST} a reader accepts",
            plain.len()
        ));
    }
    let packed = zstd::bulk::compress(&plain, 3).map_err(|e| format!("compressing: {e}"))?;
    let object = MANIFEST.encode(&packed);
    Ok((ManifestId(*blake3::hash(&object).as_bytes()), object))
}

/// The manifest `id` from its stored `object`, after every check (see the module docs).
///
/// # Errors
/// [`ManifestError::WrongContent`] if the object's digest is not `id`;
/// [`ManifestError::Damaged`] for everything else.
pub fn decode(id: &ManifestId, object: &[u8]) -> Result<Manifest, ManifestError> {
    let found = ManifestId(*blake3::hash(object).as_bytes());
    if found != *id {
        return Err(ManifestError::WrongContent { id: *id, found });
    }
    let damaged = |problem: String| ManifestError::Damaged { id: *id, problem };
    let decoded = MANIFEST
        .decode(object)
        .map_err(|e| damaged(e.to_string()))?;
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::new(decoded.payload)
        .map_err(|e| damaged(format!("zstd: {e}")))?
        .take(MAX_MANIFEST as u64 + 1)
        .read_to_end(&mut plain)
        .map_err(|e| damaged(format!("zstd: {e}")))?;
    if plain.len() > MAX_MANIFEST {
        return Err(damaged(format!("decodes to over {MAX_MANIFEST} bytes")));
    }
    let (manifest, rest): (Manifest, _) = if decoded.version == 1 {
        postcard::take_from_bytes::<v1::Manifest>(&plain).map(|(m, rest)| (m.into(), rest))
    } else {
        postcard::take_from_bytes(&plain)
    }
    .map_err(|e| damaged(format!("decoding: {e}")))?;
    if !rest.is_empty() {
        return Err(damaged(format!("{} bytes after the manifest", rest.len())));
    }
    check(&manifest).map_err(damaged)?;
    Ok(manifest)
}

/// The structural checks of [`decode`].
fn check(m: &Manifest) -> Result<(), String> {
    let s = &m.snapshot;
    if s.memory_bytes == 0 || s.memory_bytes % 4096 != 0 || s.memory_bytes > MAX_MEMORY {
        return Err(format!(
            "memory of {} bytes: not a positive multiple of 4096 up to {MAX_MEMORY}",
            s.memory_bytes
        ));
    }
    if m.memory.is_empty() {
        return Err("no memory layer".into());
    }
    let pages = s.memory_bytes / 4096;
    for (l, layer) in m.memory.iter().enumerate() {
        let fs = layer.frame_size;
        if !fs.is_power_of_two() || !(64 << 10..=2 << 20).contains(&fs) {
            return Err(format!("memory layer {l}: frame size {fs}"));
        }
        let ppf = u64::from(fs / 4096);
        let words = mask_words(fs);
        let mut prev = None;
        for (i, f) in layer.frames.iter().enumerate() {
            let at =
                |what: &str| format!("memory layer {l}, frame {i} (region {}): {what}", f.region);
            if prev.is_some_and(|p| p >= f.region) {
                return Err(at("regions must increase"));
            }
            prev = Some(f.region);
            if f.present.len() != words || f.data.len() != words {
                return Err(at(&format!("bitmaps must have {words} words")));
            }
            let first = f.region.checked_mul(ppf).filter(|&p| p < pages);
            let Some(first) = first else {
                return Err(at("outside memory"));
            };
            let in_frame = (pages - first).min(ppf);
            for (w, (&p, &d)) in f.present.iter().zip(&f.data).enumerate() {
                let lo = w as u64 * 64;
                let allowed = match in_frame.saturating_sub(lo) {
                    0 => 0,
                    n if n >= 64 => u64::MAX,
                    n => (1u64 << n) - 1,
                };
                if p & !allowed != 0 {
                    return Err(at("pages outside its region or memory"));
                }
                if d & !p != 0 {
                    return Err(at("pages with data that are not present"));
                }
                if l == 0 && d != p {
                    return Err(at("zero entries in a layer without a parent"));
                }
            }
            if f.present.iter().all(|&w| w == 0) {
                return Err(at("no pages"));
            }
            if f.chunk.is_some() != (f.data_pages() > 0) {
                return Err(at("a chunk must name exactly the frames with data"));
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for d in &m.disks {
        let at = |what: String| format!("disk {:?}: {what}", d.name);
        if !names.insert(&d.name) {
            return Err(at("named twice".into()));
        }
        let bs = d.block_size;
        if !bs.is_power_of_two() || !(4096..=2 << 20).contains(&bs) {
            return Err(at(format!("block size {bs}")));
        }
        if d.size_bytes == 0 || d.size_bytes % 512 != 0 || d.size_bytes > MAX_DISK {
            return Err(at(format!("size {}", d.size_bytes)));
        }
        if d.layers.is_empty() {
            return Err(at("no layer".into()));
        }
        let blocks = d.size_bytes.div_ceil(u64::from(bs));
        for (l, layer) in d.layers.iter().enumerate() {
            if layer.blocks.len() != layer.chunks.len() {
                return Err(at(format!("layer {l}: one chunk per block")));
            }
            if !layer.crcs.is_empty() && layer.crcs.len() != layer.blocks.len() {
                return Err(at(format!("layer {l}: one CRC per block, or none")));
            }
            if layer.blocks.windows(2).any(|w| w[0] >= w[1])
                || layer.blocks.last().is_some_and(|&b| b >= blocks)
            {
                return Err(at(format!(
                    "layer {l}: blocks must increase and lie inside the disk"
                )));
            }
        }
    }
    for (what, blob) in [
        ("state", Some(&m.state)),
        ("working set", m.working_set.as_ref()),
    ] {
        let Some(b) = blob else { continue };
        let want = b.len.div_ceil(MAX_CHUNK as u64);
        if b.len > MAX_BLOB || b.chunks.len() as u64 != want {
            return Err(format!(
                "{what}: {} bytes in {} chunks (at most {MAX_BLOB} bytes, in chunks of {MAX_CHUNK})",
                b.len,
                b.chunks.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small, consistent manifest.
    pub(crate) fn sample() -> Manifest {
        let c = |b: u8| ChunkId([b; 32]);
        Manifest {
            snapshot: SnapshotInfo {
                id: [1; 16],
                name: "warm".into(),
                vm_id: [2; 16],
                vm_name: "web".into(),
                parent_id: Some([3; 16]),
                labels: [("tier".to_string(), "gold".to_string())].into(),
                created_ms: 1_700_000_000_000,
                memory_bytes: 1 << 20,
                vcpus: 2,
                guest: Guest {
                    seed: 7,
                    ticks: 9,
                    ..Guest::default()
                },
                pause_us: 1500,
            },
            memory: vec![
                MemoryLayer {
                    id: [4; 16],
                    digest: [5; 32],
                    frame_size: 256 << 10,
                    zstd_level: 3,
                    frames: vec![MemoryFrame {
                        region: 0,
                        present: vec![0b101],
                        data: vec![0b101],
                        chunk: Some(c(1)),
                    }],
                },
                MemoryLayer {
                    id: [6; 16],
                    digest: [7; 32],
                    frame_size: 256 << 10,
                    zstd_level: 3,
                    frames: vec![
                        MemoryFrame {
                            region: 1,
                            present: vec![3],
                            data: vec![0],
                            chunk: None,
                        },
                        MemoryFrame {
                            region: 3,
                            present: vec![u64::MAX],
                            data: vec![1],
                            chunk: Some(c(2)),
                        },
                    ],
                },
            ],
            disks: vec![DiskChain {
                name: "root".into(),
                size_bytes: 1 << 20,
                block_size: 65536,
                layers: vec![DiskLayer {
                    id: [8; 16],
                    digest: [9; 32],
                    blocks: vec![0, 15],
                    chunks: vec![c(3), c(1)],
                    crcs: vec![0x1234_5678, 7],
                }],
            }],
            state: Blob {
                len: 100,
                chunks: vec![c(4)],
            },
            working_set: None,
        }
    }

    #[test]
    fn manifests_round_trip_deterministically() {
        let m = sample();
        let (id, object) = encode(&m).unwrap();
        assert_eq!(encode(&m).unwrap().0, id, "same manifest, same bytes");
        assert_eq!(decode(&id, &object).unwrap(), m);
        assert_eq!(m.chunks().len(), 4);
        assert_eq!(id.to_string().parse::<ManifestId>().unwrap(), id);
        assert!(
            m.key("fleet", &id)
                .starts_with("fleet/v1/snapshots/01010101")
        );
        assert!(m.key("fleet", &id).ends_with(&id.to_string()));
    }

    #[test]
    fn version_1_manifests_are_read_without_block_crcs() {
        let m = sample();
        let object = v1::encode(&m);
        let id = ManifestId(*blake3::hash(&object).as_bytes());
        let read = decode(&id, &object).unwrap();
        assert!(read.disks[0].layers[0].crcs.is_empty());
        assert_eq!(read.disks[0].layers[0].entries(), None);
        assert_eq!(
            m.disks[0].layers[0].entries(),
            Some(vec![(0, 0x1234_5678), (15, 7)])
        );
        let mut without = m.clone();
        without.disks[0].layers[0].crcs.clear();
        assert_eq!(read, without);
    }

    #[test]
    fn overwritten_and_damaged_manifests_are_refused() {
        let (id, mut object) = encode(&sample()).unwrap();
        let (other, _) = encode(&Manifest {
            working_set: Some(Blob::default()),
            ..sample()
        })
        .unwrap();
        let e = decode(&other, &object).unwrap_err();
        assert!(matches!(e, ManifestError::WrongContent { .. }), "{e}");
        object[40] ^= 1;
        let e = decode(&ManifestId(*blake3::hash(&object).as_bytes()), &object).unwrap_err();
        assert!(matches!(e, ManifestError::Damaged { .. }), "{e}");
        let _ = id;
    }

    #[test]
    fn inconsistent_manifests_are_refused_by_what_is_wrong() {
        type Edit = fn(&mut Manifest);
        let cases: [(Edit, &str); 13] = [
            (|m| m.snapshot.memory_bytes = 4097, "multiple of 4096"),
            (|m| m.memory.clear(), "no memory layer"),
            (|m| m.memory[0].frame_size = 3 << 16, "frame size"),
            (|m| m.memory[1].frames.swap(0, 1), "must increase"),
            (|m| m.memory[1].frames[1].region = 4, "outside memory"),
            (|m| m.memory[0].frames[0].data = vec![0b111], "not present"),
            (|m| m.memory[0].frames[0].data = vec![1], "without a parent"),
            (
                |m| m.memory[1].frames[0].chunk = Some(ChunkId([0; 32])),
                "exactly the frames",
            ),
            (|m| m.memory[1].frames[0].present = vec![0, 0], "words"),
            (
                |m| m.disks[0].layers[0].blocks = vec![0, 16],
                "inside the disk",
            ),
            (
                |m| m.disks[0].layers[0].chunks.pop().map(drop).unwrap_or(()),
                "one chunk per block",
            ),
            (
                |m| m.disks[0].layers[0].crcs.truncate(1),
                "one CRC per block",
            ),
            (|m| m.state.len = 5 << 20, "state"),
        ];
        for (edit, want) in cases {
            let mut m = sample();
            edit(&mut m);
            let e = encode(&m).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        // A frame past the end of memory within its region.
        let mut m = sample();
        m.snapshot.memory_bytes = 3 * (256 << 10) + 4096;
        assert!(
            encode(&m)
                .unwrap_err()
                .contains("outside its region or memory")
        );
    }
}
