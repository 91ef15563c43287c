//! On-disk encoding: the two superblocks and the map chunks (see the crate documentation).

use snap_core::{FormatError, FormatSpec, HEADER_LEN, Id};

use crate::meta::{Digest, Geometry, ParentRef};

/// Bytes of the superblock payload.
pub(crate) const SB_PAYLOAD: usize = 192;
/// Bytes of a whole superblock (header and payload); fits one sector.
pub(crate) const SB_LEN: usize = HEADER_LEN + SB_PAYLOAD;
/// File offset of superblock A (even generations) and B (odd generations).
pub(crate) const SB_OFFSETS: [u64; 2] = [0, 4096];
/// File offset of slot 0.
pub(crate) const DATA_OFFSET: u64 = 8192;
/// Bytes of a map chunk's fixed fields before its entries.
const CHUNK_FIXED: usize = 24;
/// Bytes of one map entry: block u64, slot u64, crc u32.
const ENTRY_LEN: usize = 20;

/// The superblock: header magic, version and checksum from snap-core.
pub(crate) const SB_FORMAT: FormatSpec = FormatSpec {
    name: "disk layer superblock",
    magic: *b"SNAPDLAY",
    version: 1,
    min_version: 1,
    max_payload: SB_PAYLOAD as u64,
};

/// A map chunk; its real payload cap is the slot size less the header (see [`chunk_format`]).
const MAP_FORMAT: FormatSpec = FormatSpec {
    name: "disk layer map chunk",
    magic: *b"SNAPDMAP",
    version: 1,
    min_version: 1,
    max_payload: 0,
};

/// The map chunk format for slots of `block_size` bytes.
pub(crate) fn chunk_format(block_size: u32) -> FormatSpec {
    FormatSpec {
        max_payload: u64::from(block_size) - HEADER_LEN as u64,
        ..MAP_FORMAT
    }
}

/// Map entries that fit one chunk.
pub(crate) fn entries_per_chunk(block_size: u32) -> usize {
    (block_size as usize - HEADER_LEN - CHUNK_FIXED) / ENTRY_LEN
}

const FLAG_SEALED: u32 = 1;
const FLAG_PARENT: u32 = 2;

/// Where a block's data is in its layer file, and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub slot: u64,
    pub crc: u32,
}

/// The fields of one superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub generation: u64,
    pub id: Id,
    pub geometry: Geometry,
    pub parent: Option<ParentRef>,
    /// Set iff the layer is sealed.
    pub digest: Option<Digest>,
    /// Slots the file holds (it is at least `DATA_OFFSET + slots * block_size` bytes).
    pub slots: u64,
    /// Newest map chunk.
    pub map_head: Option<u64>,
    /// Chunks in the chain from `map_head`.
    pub map_chunks: u64,
    /// Blocks in the map.
    pub map_entries: u64,
}

const NONE_SLOT: u64 = u64::MAX;

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut p = [0u8; SB_PAYLOAD];
        p[0..8].copy_from_slice(&self.generation.to_le_bytes());
        p[8..24].copy_from_slice(&self.id.0);
        p[24..32].copy_from_slice(&self.geometry.disk_bytes.to_le_bytes());
        p[32..36].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        let mut flags = 0;
        if self.digest.is_some() {
            flags |= FLAG_SEALED;
        }
        if let Some(parent) = self.parent {
            flags |= FLAG_PARENT;
            p[40..56].copy_from_slice(&parent.id.0);
            p[56..88].copy_from_slice(&parent.digest.0);
        }
        p[36..40].copy_from_slice(&flags.to_le_bytes());
        if let Some(d) = self.digest {
            p[88..120].copy_from_slice(&d.0);
        }
        p[120..128].copy_from_slice(&self.slots.to_le_bytes());
        p[128..136].copy_from_slice(&self.map_head.unwrap_or(NONE_SLOT).to_le_bytes());
        p[136..144].copy_from_slice(&self.map_chunks.to_le_bytes());
        p[144..152].copy_from_slice(&self.map_entries.to_le_bytes());
        SB_FORMAT.encode(&p)
    }

    /// Decodes the first [`SB_LEN`] bytes of a superblock area. Checks the header and that every
    /// field is in range; `Err(Ok(problem))` for a field out of range.
    pub fn decode(bytes: &[u8]) -> Result<Self, Result<String, FormatError>> {
        let d = SB_FORMAT
            .decode(&bytes[..SB_LEN.min(bytes.len())])
            .map_err(Err)?;
        let p = d.payload;
        // The header caps the payload, but a shorter one passes its checks too.
        if p.len() != SB_PAYLOAD {
            return Err(Ok(format!(
                "superblock payload of {} bytes (this build reads {SB_PAYLOAD})",
                p.len()
            )));
        }
        let u64_at = |at: usize| u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(p[at..at + 4].try_into().expect("4 bytes"));
        let id_at = |at: usize| Id(p[at..at + 16].try_into().expect("16 bytes"));
        let digest_at = |at: usize| Digest(p[at..at + 32].try_into().expect("32 bytes"));
        let geometry = Geometry {
            disk_bytes: u64_at(24),
            block_size: u32_at(32),
        };
        if let Some(problem) = geometry.problem() {
            return Err(Ok(problem));
        }
        let flags = u32_at(36);
        if flags & !(FLAG_SEALED | FLAG_PARENT) != 0 {
            return Err(Ok(format!("unknown superblock flags {flags:#x}")));
        }
        if p[152..].iter().any(|&b| b != 0) {
            return Err(Ok("reserved superblock bytes are not zero".into()));
        }
        let parent = (flags & FLAG_PARENT != 0).then(|| ParentRef {
            id: id_at(40),
            digest: digest_at(56),
        });
        let digest = (flags & FLAG_SEALED != 0).then(|| digest_at(88));
        let head = u64_at(128);
        let sb = Self {
            generation: u64_at(0),
            id: id_at(8),
            geometry,
            parent,
            digest,
            slots: u64_at(120),
            map_head: (head != NONE_SLOT).then_some(head),
            map_chunks: u64_at(136),
            map_entries: u64_at(144),
        };
        if sb.slots > max_slots(&geometry) {
            return Err(Ok(format!(
                "{} slots, more than the {} a disk of {} blocks can need",
                sb.slots,
                max_slots(&geometry),
                geometry.blocks()
            )));
        }
        if sb.map_head.is_some_and(|h| h >= sb.slots)
            || sb.map_chunks > sb.slots
            || (sb.map_head.is_none() && sb.map_chunks != 0)
        {
            return Err(Ok(format!(
                "map head {head:#x} with {} chunks does not fit {} slots",
                sb.map_chunks, sb.slots
            )));
        }
        if sb.map_entries > geometry.blocks() {
            return Err(Ok(format!(
                "{} map entries for a disk of {} blocks",
                sb.map_entries,
                geometry.blocks()
            )));
        }
        Ok(sb)
    }

    /// Bytes the file needs for its slots.
    pub fn needed_len(&self) -> u64 {
        DATA_OFFSET + self.slots * u64::from(self.geometry.block_size)
    }
}

/// Most slots a layer of this geometry may have: live blocks, superseded blocks waiting for a
/// commit, and map chunks (three per block is far beyond what the allocator reaches, since it
/// reuses free slots lowest first).
pub(crate) fn max_slots(g: &Geometry) -> u64 {
    g.blocks() * 3 + 4096
}

/// A decoded map chunk.
pub(crate) struct MapChunk {
    pub generation: u64,
    pub prev: Option<u64>,
    pub entries: Vec<(u64, MapEntry)>,
}

/// Encodes a chunk (header included); `entries.len() <= entries_per_chunk`.
pub(crate) fn encode_chunk(
    block_size: u32,
    generation: u64,
    prev: Option<u64>,
    entries: &[(u64, MapEntry)],
) -> Vec<u8> {
    debug_assert!(entries.len() <= entries_per_chunk(block_size));
    let mut p = Vec::with_capacity(CHUNK_FIXED + entries.len() * ENTRY_LEN);
    p.extend_from_slice(&generation.to_le_bytes());
    p.extend_from_slice(&prev.unwrap_or(NONE_SLOT).to_le_bytes());
    p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for (block, e) in entries {
        p.extend_from_slice(&block.to_le_bytes());
        p.extend_from_slice(&e.slot.to_le_bytes());
        p.extend_from_slice(&e.crc.to_le_bytes());
    }
    chunk_format(block_size).encode(&p)
}

/// The payload length a chunk header claims (to read exactly that much), if the header is
/// complete; the claim is checked by [`decode_chunk`].
pub(crate) fn chunk_payload_len(header: &[u8; HEADER_LEN]) -> u64 {
    u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"))
}

/// Decodes a whole chunk (header and payload). `Err(Ok(problem))` for bad fields.
pub(crate) fn decode_chunk(
    block_size: u32,
    bytes: &[u8],
) -> Result<MapChunk, Result<String, FormatError>> {
    let d = chunk_format(block_size).decode(bytes).map_err(Err)?;
    let p = d.payload;
    if p.len() < CHUNK_FIXED {
        return Err(Ok(format!(
            "map chunk payload of {} bytes is too short",
            p.len()
        )));
    }
    let u64_at = |at: usize| u64::from_le_bytes(p[at..at + 8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(p[16..20].try_into().expect("4 bytes")) as usize;
    if p.len() != CHUNK_FIXED + count * ENTRY_LEN {
        return Err(Ok(format!(
            "map chunk of {} bytes cannot hold the {count} entries it claims",
            p.len()
        )));
    }
    let entries = p[CHUNK_FIXED..]
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            (
                u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
                MapEntry {
                    slot: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
                    crc: u32::from_le_bytes(e[16..20].try_into().expect("4 bytes")),
                },
            )
        })
        .collect();
    let prev = u64_at(8);
    Ok(MapChunk {
        generation: u64_at(0),
        prev: (prev != NONE_SLOT).then_some(prev),
        entries,
    })
}

/// The digest of a layer: its id, geometry and sorted `(block, crc)` map.
pub(crate) fn digest(id: Id, geometry: &Geometry, sorted_map: &[(u64, u32)]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"snap-disk layer digest v1\0");
    h.update(&id.0);
    h.update(&geometry.disk_bytes.to_le_bytes());
    h.update(&geometry.block_size.to_le_bytes());
    for (block, crc) in sorted_map {
        h.update(&block.to_le_bytes());
        h.update(&crc.to_le_bytes());
    }
    Digest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            generation: 7,
            id: Id([3; 16]),
            geometry: Geometry::new(1 << 30),
            parent: Some(ParentRef {
                id: Id([1; 16]),
                digest: Digest([2; 32]),
            }),
            digest: Some(Digest([9; 32])),
            slots: 40,
            map_head: Some(39),
            map_chunks: 2,
            map_entries: 30,
        }
    }

    #[test]
    fn superblock_round_trips_and_fits_a_sector() {
        let bytes = sb().encode();
        assert!(bytes.len() <= 512);
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb());
        let plain = Superblock {
            parent: None,
            digest: None,
            map_head: None,
            map_chunks: 0,
            ..sb()
        };
        assert_eq!(Superblock::decode(&plain.encode()).unwrap(), plain);
    }

    #[test]
    fn a_short_superblock_payload_is_refused() {
        // A blob that passes the header checks with less than a whole superblock.
        for len in [0, 8, SB_PAYLOAD - 1] {
            let bytes = SB_FORMAT.encode(&sb().encode()[HEADER_LEN..HEADER_LEN + len]);
            let problem = Superblock::decode(&bytes).unwrap_err().unwrap();
            assert!(
                problem.contains(&format!("payload of {len} bytes")),
                "{problem}"
            );
        }
    }

    #[test]
    fn chunk_round_trips() {
        let entries: Vec<_> = (0..5)
            .map(|i| (i * 3, MapEntry { slot: i, crc: 77 }))
            .collect();
        let bytes = encode_chunk(4096, 5, Some(9), &entries);
        let c = decode_chunk(4096, &bytes).unwrap();
        assert_eq!((c.generation, c.prev, c.entries), (5, Some(9), entries));
        assert!(entries_per_chunk(4096) >= 200);
    }
}
