//! One open layer file: its superblock, its block map, slot allocation and the commit protocol.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use snap_core::{HEADER_LEN, Id, crc32c};

use crate::error::DiskError;
use crate::fill::Attached;
use crate::format::{
    self, DATA_OFFSET, MapEntry, SB_LEN, SB_OFFSETS, Superblock, chunk_payload_len, decode_chunk,
    encode_chunk, entries_per_chunk, max_slots,
};
use crate::meta::{Digest, Geometry, LayerInfo, NewLayer, ParentRef};
use crate::space::{Allocated, allocate};

/// Delta chunks a map chain may hold beyond twice the size of a full checkpoint before the next
/// commit writes a checkpoint instead (keeps open time proportional to the map).
const CHECKPOINT_SLACK: u64 = 16;

/// File space is reserved ahead of the slots in use by an eighth of the file, at least this
/// many bytes (and at least one slot)...
const RESERVE_MIN: u64 = 2 << 20;
/// ... and at most this many.
const RESERVE_MAX: u64 = 32 << 20;

/// Who a layer is: what a commit writes into the superblock besides the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub id: Id,
    pub parent: Option<ParentRef>,
    pub sealed: bool,
}

/// An open layer file. In writable mode it also knows its free slots and the changes since the
/// last commit.
pub(crate) struct LayerFile {
    path: PathBuf,
    file: File,
    /// The superblock of the last commit.
    sb: Superblock,
    /// Every block the layer holds, committed or not.
    map: HashMap<u64, MapEntry>,
    /// Slots of the committed map chain, newest first.
    chain_slots: Vec<u64>,
    /// Blocks whose map entry changed since the last commit: their slots are fresh (no
    /// committed map names them), so they may be written in place.
    dirty: HashSet<u64>,
    /// Dirty blocks written in place since their CRC was computed.
    stale_crc: HashSet<u64>,
    /// Free slots (writable mode only).
    free: Option<BTreeSet<u64>>,
    /// Slots the committed map names but the next commit drops: free once it is durable.
    pending_free: Vec<u64>,
    /// Slots in use or allocated (at least `sb.slots`).
    slots: u64,
    /// Known file length.
    file_len: u64,
    /// Slots below this have file space: reserved with `fallocate` before anything is written
    /// into them, so a full filesystem fails the write that needs the space (writable mode).
    reserved: u64,
    /// Whether the filesystem reserves space ahead (`fallocate`); if not, writes allocate it.
    preallocate: bool,
    /// For a layer that does not change while open (sealed, or open read-only): the slots whose
    /// block has been read and checked against its CRC. `None` for a writable, unsealed layer,
    /// whose blocks reads do not check.
    verified: Option<SlotBits>,
    /// Names this layer's content while it is open: no two `LayerFile`s share one, and a layer
    /// whose checked blocks change (a merge writing into a sealed layer) takes a new one.
    uid: u64,
    /// Where blocks the file does not hold yet come from (see [`crate::fill`]).
    fill: Option<Arc<Attached>>,
}

fn next_uid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One bit per slot, shared by concurrent readers.
struct SlotBits(Box<[AtomicU64]>);

impl SlotBits {
    fn new(slots: u64) -> Self {
        Self((0..slots.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn word(&self, slot: u64) -> Option<&AtomicU64> {
        self.0.get(usize::try_from(slot / 64).ok()?)
    }

    // Relaxed ordering is enough: a bit says the bytes in the file at that slot were checked,
    // and those bytes do not change while the layer is open; no memory is published with it.
    // Two readers racing on one block both check it, which is harmless.
    fn contains(&self, slot: u64) -> bool {
        self.word(slot)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (slot % 64)) != 0)
    }

    fn insert(&self, slot: u64) {
        if let Some(w) = self.word(slot) {
            w.fetch_or(1 << (slot % 64), Ordering::Relaxed);
        }
    }

    fn remove(&self, slot: u64) {
        if let Some(w) = self.word(slot) {
            w.fetch_and(!(1 << (slot % 64)), Ordering::Relaxed);
        }
    }
}

/// A commit that failed, and whether the layer is still exactly as it was before the commit
/// began (in memory and in every byte a commit names), so that the commit can be tried again.
#[derive(Debug)]
pub(crate) struct CommitFailure {
    pub error: DiskError,
    /// `false` once a sync or the superblock write failed: what reached the file is unknown.
    pub unchanged: bool,
}

impl std::fmt::Debug for LayerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerFile")
            .field("path", &self.path)
            .field("id", &self.sb.id)
            .field("blocks", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl LayerFile {
    /// Starts a layer in `file` (empty, the temporary file of a layer being built): writes both
    /// superblocks of an empty layer and returns it writable. `path` is the name the layer will
    /// have, used in messages.
    pub fn init(path: &Path, file: File, new: &NewLayer) -> Result<Self, DiskError> {
        new.geometry.validate()?;
        let sb = Superblock {
            generation: 2,
            id: new.id,
            geometry: new.geometry,
            parent: new.parent,
            digest: None,
            slots: 0,
            map_head: None,
            map_chunks: 0,
            map_entries: 0,
        };
        for generation in [1, 2] {
            let s = Superblock { generation, ..sb };
            file.write_all_at(&s.encode(), SB_OFFSETS[(generation % 2) as usize])
                .map_err(DiskError::io(path, "write superblock"))?;
        }
        file.set_len(DATA_OFFSET)
            .map_err(DiskError::io(path, "extend file"))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            sb,
            map: HashMap::new(),
            chain_slots: Vec::new(),
            dirty: HashSet::new(),
            stale_crc: HashSet::new(),
            free: Some(BTreeSet::new()),
            pending_free: Vec::new(),
            slots: 0,
            file_len: DATA_OFFSET,
            reserved: 0,
            preallocate: true,
            verified: None,
            uid: next_uid(),
            fill: None,
        })
    }

    /// Opens the layer at `path`, checking its superblocks and map. `writable` opens the file
    /// for writing and finds its free slots (for the top of a chain and for merge targets). A
    /// layer whose blocks are still arriving takes its source (see [`crate::fill`]), and is
    /// never opened for writing.
    pub fn open(path: &Path, writable: bool) -> Result<Self, DiskError> {
        let mut layer = Self::open_unfilled_mode(path, writable)?;
        layer.fill = crate::fill::lookup(path, layer.sb.id, layer.sb.digest);
        if writable && layer.fill.is_some() {
            return Err(DiskError::Incomplete {
                path: path.to_path_buf(),
            });
        }
        Ok(layer)
    }

    /// Opens the layer at `path` read-only, without a source for blocks still arriving.
    pub fn open_unfilled(path: &Path) -> Result<Self, DiskError> {
        Self::open_unfilled_mode(path, false)
    }

    fn open_unfilled_mode(path: &Path, writable: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(DiskError::io(path, "open"))?;
        let file_len = file.metadata().map_err(DiskError::io(path, "stat"))?.len();
        if file_len < DATA_OFFSET {
            return Err(DiskError::Truncated {
                path: path.to_path_buf(),
                needed: DATA_OFFSET,
                found: file_len,
            });
        }
        let sb = read_superblock(path, &file)?;
        if file_len < sb.needed_len() {
            return Err(DiskError::Truncated {
                path: path.to_path_buf(),
                needed: sb.needed_len(),
                found: file_len,
            });
        }
        let mut layer = Self {
            path: path.to_path_buf(),
            file,
            sb,
            map: HashMap::new(),
            chain_slots: Vec::new(),
            dirty: HashSet::new(),
            stale_crc: HashSet::new(),
            free: None,
            pending_free: Vec::new(),
            slots: sb.slots,
            file_len,
            reserved: sb.slots,
            preallocate: true,
            verified: (!writable || sb.digest.is_some()).then(|| SlotBits::new(sb.slots)),
            uid: next_uid(),
            fill: None,
        };
        layer.load_map()?;
        if let Some(stored) = sb.digest {
            let found = layer.compute_digest(sb.id);
            if found != stored {
                return Err(DiskError::corrupt(
                    path,
                    format!(
                        "the map does not match the digest in the superblock (superblock {stored}, map {found})"
                    ),
                ));
            }
        }
        if writable {
            let mut used: HashSet<u64> = layer.map.values().map(|e| e.slot).collect();
            used.extend(layer.chain_slots.iter().copied());
            layer.free = Some((0..sb.slots).filter(|s| !used.contains(s)).collect());
        }
        Ok(layer)
    }

    /// Walks the map chain from the head, newest first; the first entry seen for a block wins.
    fn load_map(&mut self) -> Result<(), DiskError> {
        let sb = self.sb;
        let bs = sb.geometry.block_size;
        let blocks = sb.geometry.blocks();
        let mut at = sb.map_head;
        let mut newest = sb.generation;
        let mut header = [0u8; HEADER_LEN];
        let mut buf = Vec::new();
        while let Some(slot) = at {
            let what = || format!("map chunk in slot {slot}");
            if self.chain_slots.len() as u64 >= sb.map_chunks || slot >= sb.slots {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!(
                        "{}: the map chain is longer than the {} chunks the superblock records, or leaves the file",
                        what(),
                        sb.map_chunks
                    ),
                ));
            }
            let offset = self.slot_offset(slot);
            self.file
                .read_exact_at(&mut header, offset)
                .map_err(DiskError::io(&self.path, "read map chunk"))?;
            // The claim is capped by the slot before anything is allocated for it.
            let len = chunk_payload_len(&header).min(u64::from(bs) - HEADER_LEN as u64) as usize;
            buf.clear();
            buf.extend_from_slice(&header);
            buf.resize(HEADER_LEN + len, 0);
            self.file
                .read_exact_at(&mut buf[HEADER_LEN..], offset + HEADER_LEN as u64)
                .map_err(DiskError::io(&self.path, "read map chunk"))?;
            let chunk = decode_chunk(bs, &buf).map_err(|e| match e {
                Err(error) => DiskError::Format {
                    path: self.path.clone(),
                    what: what(),
                    error,
                },
                Ok(problem) => DiskError::corrupt(&self.path, format!("{}: {problem}", what())),
            })?;
            if chunk.generation > newest {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!(
                        "{}: generation {} is newer than the chunk or superblock after it ({newest})",
                        what(),
                        chunk.generation
                    ),
                ));
            }
            newest = chunk.generation;
            for (block, e) in chunk.entries {
                if block >= blocks || e.slot >= sb.slots {
                    return Err(DiskError::corrupt(
                        &self.path,
                        format!(
                            "{}: entry for block {block} in slot {} lies outside the disk ({blocks} blocks) or the file ({} slots)",
                            what(),
                            e.slot,
                            sb.slots
                        ),
                    ));
                }
                self.map.entry(block).or_insert(e);
            }
            self.chain_slots.push(slot);
            at = chunk.prev;
        }
        if self.chain_slots.len() as u64 != sb.map_chunks || self.map.len() as u64 != sb.map_entries
        {
            return Err(DiskError::corrupt(
                &self.path,
                format!(
                    "the map has {} chunks and {} blocks, the superblock records {} and {}",
                    self.chain_slots.len(),
                    self.map.len(),
                    sb.map_chunks,
                    sb.map_entries
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(self.map.len() + self.chain_slots.len());
        for slot in self
            .map
            .values()
            .map(|e| e.slot)
            .chain(self.chain_slots.iter().copied())
        {
            if !seen.insert(slot) {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!("slot {slot} is used twice by the map"),
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn geometry(&self) -> Geometry {
        self.sb.geometry
    }

    pub fn identity(&self) -> Identity {
        Identity {
            id: self.sb.id,
            parent: self.sb.parent,
            sealed: self.sb.digest.is_some(),
        }
    }

    pub fn sealed(&self) -> bool {
        self.sb.digest.is_some()
    }

    pub fn map(&self) -> &HashMap<u64, MapEntry> {
        &self.map
    }

    pub fn info(&self) -> LayerInfo {
        LayerInfo {
            path: self.path.clone(),
            id: self.sb.id,
            parent: self.sb.parent,
            digest: self.sb.digest,
            geometry: self.sb.geometry,
            blocks: self.map.len() as u64,
            slots: self.slots,
            generation: self.sb.generation,
        }
    }

    /// The map chain's slots (committed), newest first.
    pub fn chain_slots(&self) -> &[u64] {
        &self.chain_slots
    }

    pub fn slot_offset(&self, slot: u64) -> u64 {
        DATA_OFFSET + slot * u64::from(self.sb.geometry.block_size)
    }

    /// Reads `buf.len()` bytes at `offset` inside the block held in `slot`.
    pub fn read_slot(&self, slot: u64, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.file
            .read_exact_at(buf, self.slot_offset(slot) + offset)
            .map_err(DiskError::io(&self.path, "read block"))
    }

    /// Reads the whole of `block` into `buf` (its block length) and checks its CRC (fetching
    /// it from the layer's source if it has one and the file does not hold the block yet).
    pub fn read_block_checked(&self, block: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let e = self.map[&block];
        self.read_slot(e.slot, 0, buf)?;
        if !self.stale_crc.contains(&block) {
            self.check_or_fetch(block, e, buf)?;
        }
        Ok(())
    }

    /// Checks `data`, the whole of `block` as read from its slot, against its CRC. A block that
    /// fails the check in a layer with a source is fetched from it into `data` instead (and
    /// written into its slot). Returns whether the file now holds the block as checked.
    fn check_or_fetch(&self, block: u64, e: MapEntry, data: &mut [u8]) -> Result<bool, DiskError> {
        match (self.check_crc(block, e, data), &self.fill) {
            (Ok(()), _) => Ok(true),
            (Err(DiskError::BlockChecksum { .. }), Some(fill)) => {
                fill.fetch(&self.path, block, e, self.slot_offset(e.slot), data)
            }
            (Err(err), _) => Err(err),
        }
    }

    /// Blocks fetched from this layer's source so far (by every reader of the file).
    pub fn fetched(&self) -> u64 {
        self.fill.as_ref().map_or(0, |f| f.fetched())
    }

    /// The source the layer took when it was opened, if its blocks are still arriving.
    pub fn source(&self) -> Option<&Arc<Attached>> {
        self.fill.as_ref()
    }

    fn check_crc(&self, block: u64, e: MapEntry, data: &[u8]) -> Result<(), DiskError> {
        let found = crc32c(data);
        if found != e.crc {
            return Err(DiskError::BlockChecksum {
                path: self.path.clone(),
                block,
                slot: e.slot,
                expected: e.crc,
                found,
            });
        }
        Ok(())
    }

    /// Names the layer's content: blocks read from a layer with the same uid are the same.
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// Whether reads check blocks against their CRC: the layer does not change while open
    /// (sealed, or open read-only).
    pub fn checks_reads(&self) -> bool {
        self.verified.is_some()
    }

    /// Whether the block in `slot` must be checked against its CRC when it is read: the layer
    /// does not change while open (sealed, or open read-only) and the block has not been
    /// checked since it was opened.
    pub fn needs_check(&self, slot: u64) -> bool {
        self.verified.as_ref().is_some_and(|v| !v.contains(slot))
    }

    /// Checks `data`, the whole of `block` as just read from `slot`, against the CRC its map
    /// entry records (fetching it into `data` if the layer has a source and the file does not
    /// hold it yet), and remembers the slot as checked.
    pub fn check_block(&self, block: u64, slot: u64, data: &mut [u8]) -> Result<(), DiskError> {
        let e = match self.map.get(&block) {
            Some(e) if e.slot == slot => *e,
            _ => {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!("block {block} is not in slot {slot} of this layer's map"),
                ));
            }
        };
        if self.check_or_fetch(block, e, data)?
            && let Some(v) = &self.verified
        {
            v.insert(slot);
        }
        Ok(())
    }

    /// Reads the whole of `block`, held in `slot`, into `buf` (its block length); checks it
    /// against its CRC if [`needs_check`](Self::needs_check) says so.
    pub fn read_block(&self, block: u64, slot: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.read_slot(slot, 0, buf)?;
        if self.needs_check(slot) {
            self.check_block(block, slot, buf)?;
        }
        Ok(())
    }

    /// Whether `block` was written since the last commit (its slot may be written in place).
    pub fn is_dirty(&self, block: u64) -> bool {
        self.dirty.contains(&block)
    }

    fn alloc_slot(&mut self) -> Result<u64, DiskError> {
        let free = self
            .free
            .as_mut()
            .expect("slots are allocated only in writable layers");
        if let Some(slot) = free.pop_first() {
            return Ok(slot);
        }
        let limit = max_slots(&self.sb.geometry);
        if self.slots >= limit {
            return Err(DiskError::LayerFull {
                path: self.path.clone(),
                slots: self.slots,
                limit,
            });
        }
        let slot = self.slots;
        self.reserve(slot, limit)?;
        self.slots += 1;
        Ok(slot)
    }

    /// Makes sure `slot` (the first slot past those in use) has file space. Space is reserved
    /// ahead in one extent (an eighth of the file, 2 to 32 MiB, never past `limit` slots), so
    /// most writes make no extra call; when the filesystem cannot give the whole extent, just
    /// the one slot is asked for. Fails with the OS error (`ENOSPC`, `EDQUOT`) when even that is
    /// not there; nothing has changed then.
    fn reserve(&mut self, slot: u64, limit: u64) -> Result<(), DiskError> {
        if !self.preallocate || slot < self.reserved {
            return Ok(());
        }
        let bs = u64::from(self.sb.geometry.block_size);
        let ahead = (self.reserved * bs / 8).clamp(RESERVE_MIN, RESERVE_MAX) / bs;
        let start = self.reserved.min(slot);
        let end = (slot + ahead).min(limit).max(slot + 1);
        let result = match self.allocate_slots(start, end) {
            Err(e)
                if end > slot + 1
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                    ) =>
            {
                self.allocate_slots(start, slot + 1)
            }
            other => other,
        };
        result.map_err(DiskError::io(&self.path, "allocate space"))
    }

    /// Reserves file space for slots `start..end`.
    fn allocate_slots(&mut self, start: u64, end: u64) -> std::io::Result<()> {
        let (from, to) = (self.slot_offset(start), self.slot_offset(end));
        match allocate(&self.file, from, to - from)? {
            Allocated::Yes => {
                self.reserved = end;
                self.file_len = self.file_len.max(to);
            }
            Allocated::Unsupported => {
                tracing::debug!(path = %self.path.display(),
                    "the filesystem cannot reserve space ahead (fallocate); writes allocate it");
                self.preallocate = false;
            }
        }
        Ok(())
    }

    fn write_at(&mut self, bytes: &[u8], offset: u64, op: &'static str) -> Result<(), DiskError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(DiskError::io(&self.path, op))?;
        self.file_len = self.file_len.max(offset + bytes.len() as u64);
        Ok(())
    }

    /// Writes the whole of `block` (`data` is its block length) into a fresh slot and maps it.
    /// The slot it replaces is freed now if no commit named it, else after the next commit.
    pub fn put_block(&mut self, block: u64, data: &[u8]) -> Result<u64, DiskError> {
        debug_assert_eq!(data.len(), self.sb.geometry.block_len(block));
        let slot = self.alloc_slot()?;
        if let Some(v) = &self.verified {
            v.remove(slot);
            self.uid = next_uid();
        }
        if let Err(e) = self.write_at(data, self.slot_offset(slot), "write block") {
            self.free.as_mut().expect("writable").insert(slot);
            return Err(e);
        }
        let entry = MapEntry {
            slot,
            crc: crc32c(data),
        };
        if let Some(old) = self.map.insert(block, entry) {
            if self.dirty.contains(&block) {
                self.free.as_mut().expect("writable").insert(old.slot);
            } else {
                self.pending_free.push(old.slot);
            }
        }
        self.dirty.insert(block);
        self.stale_crc.remove(&block);
        Ok(slot)
    }

    /// Maps `block` to a fresh slot holding nothing yet, with `crc` as its data's CRC (a layer
    /// whose blocks arrive later, see [`crate::fill`]).
    pub fn put_entry(&mut self, block: u64, crc: u32) -> Result<(), DiskError> {
        let slot = self.alloc_slot()?;
        if let Some(old) = self.map.insert(block, MapEntry { slot, crc }) {
            self.free.as_mut().expect("writable").insert(old.slot);
        }
        self.dirty.insert(block);
        Ok(())
    }

    /// Writes `data` at `offset` inside `block`, in place. Only for dirty blocks: their slot is
    /// named by no commit, so a crash part way through cannot show.
    pub fn patch_block(&mut self, block: u64, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        debug_assert!(self.dirty.contains(&block));
        let e = self.map[&block];
        if let Some(v) = &self.verified {
            v.remove(e.slot);
            self.uid = next_uid();
        }
        self.write_at(data, self.slot_offset(e.slot) + offset, "write block")?;
        if offset == 0 && data.len() == self.sb.geometry.block_len(block) {
            self.map.insert(
                block,
                MapEntry {
                    slot: e.slot,
                    crc: crc32c(data),
                },
            );
            self.stale_crc.remove(&block);
        } else {
            self.stale_crc.insert(block);
        }
        Ok(())
    }

    /// The digest of the current map under `id`.
    pub fn compute_digest(&self, id: Id) -> Digest {
        let mut sorted: Vec<(u64, u32)> = self.map.iter().map(|(b, e)| (*b, e.crc)).collect();
        sorted.sort_unstable();
        format::digest(id, &self.sb.geometry, &sorted)
    }

    /// Makes every change since the last commit durable, under `identity`, all or nothing:
    /// fresh data and map chunks are written and synced first, then the superblock of the next
    /// generation goes into the other superblock area and is synced. Only then are the slots the
    /// commit superseded freed for reuse. A sealing commit then gives back the file space
    /// reserved past the last slot.
    pub fn commit(&mut self, identity: Identity) -> Result<(), DiskError> {
        self.try_commit(identity).map_err(|f| f.error)
    }

    /// [`commit`](Self::commit), saying on failure whether the layer is unchanged: a failure
    /// while writing map chunks (a full filesystem, say) leaves the layer as it was, and the
    /// same commit can be tried again; a failed sync or superblock write does not.
    pub fn try_commit(&mut self, identity: Identity) -> Result<(), Box<CommitFailure>> {
        let unchanged = |error| {
            Box::new(CommitFailure {
                error,
                unchanged: true,
            })
        };
        let stale: Vec<u64> = self.stale_crc.iter().copied().collect();
        let mut buf = Vec::new();
        for block in stale {
            buf.resize(self.sb.geometry.block_len(block), 0);
            let slot = self.map[&block].slot;
            self.read_slot(slot, 0, &mut buf).map_err(unchanged)?;
            self.map.insert(
                block,
                MapEntry {
                    slot,
                    crc: crc32c(&buf),
                },
            );
            self.stale_crc.remove(&block);
        }
        if self.dirty.is_empty() && identity == self.identity() {
            return Ok(());
        }
        let bs = self.sb.geometry.block_size;
        let per_chunk = entries_per_chunk(bs) as u64;
        let delta_chunks = (self.dirty.len() as u64).div_ceil(per_chunk);
        let full_chunks = (self.map.len() as u64).div_ceil(per_chunk);
        let checkpoint = self.sb.map_chunks + delta_chunks > CHECKPOINT_SLACK + 2 * full_chunks;
        let mut entries: Vec<(u64, MapEntry)> = if checkpoint {
            self.map.iter().map(|(b, e)| (*b, *e)).collect()
        } else {
            self.dirty.iter().map(|b| (*b, self.map[b])).collect()
        };
        entries.sort_unstable_by_key(|(b, _)| *b);
        let generation = self.sb.generation + 1;
        let (mut head, mut chain, retired) = if checkpoint {
            (None, Vec::new(), self.chain_slots.clone())
        } else {
            (self.sb.map_head, self.chain_slots.clone(), Vec::new())
        };
        let mut fresh = Vec::new();
        let written = (|| {
            for piece in entries.chunks(per_chunk as usize) {
                let slot = self.alloc_slot()?;
                fresh.push(slot);
                let bytes = encode_chunk(bs, generation, head, piece);
                self.write_at(&bytes, self.slot_offset(slot), "write map chunk")?;
                head = Some(slot);
                chain.insert(0, slot);
            }
            Ok(())
        })();
        if let Err(e) = written {
            // The chunks are garbage: no superblock names them.
            self.free.as_mut().expect("writable").extend(fresh);
            return Err(unchanged(e));
        }
        let digest = identity.sealed.then(|| self.compute_digest(identity.id));
        let sb = Superblock {
            generation,
            id: identity.id,
            geometry: self.sb.geometry,
            parent: identity.parent,
            digest,
            slots: self.slots,
            map_head: head,
            map_chunks: chain.len() as u64,
            map_entries: self.map.len() as u64,
        };
        if self.file_len < sb.needed_len() {
            if let Err(e) = self.file.set_len(sb.needed_len()) {
                self.free.as_mut().expect("writable").extend(fresh);
                return Err(unchanged(DiskError::io(&self.path, "extend file")(e)));
            }
            self.file_len = sb.needed_len();
        }
        let changed = |error| {
            Box::new(CommitFailure {
                error,
                unchanged: false,
            })
        };
        self.file
            .sync_data()
            .map_err(|e| changed(DiskError::io(&self.path, "sync data")(e)))?;
        self.file
            .write_all_at(&sb.encode(), SB_OFFSETS[(generation % 2) as usize])
            .map_err(|e| changed(DiskError::io(&self.path, "write superblock")(e)))?;
        self.file
            .sync_data()
            .map_err(|e| changed(DiskError::io(&self.path, "sync superblock")(e)))?;
        self.sb = sb;
        self.chain_slots = chain;
        self.dirty.clear();
        let free = self.free.as_mut().expect("writable");
        free.extend(self.pending_free.drain(..));
        free.extend(retired);
        // Reads check the blocks of a sealed layer; slots may hold other blocks than before.
        self.verified = identity.sealed.then(|| SlotBits::new(self.slots));
        self.uid = next_uid();
        if identity.sealed {
            self.give_back_reserve();
        }
        Ok(())
    }

    /// Shrinks the file of a sealed layer to its slots, giving back the space reserved ahead
    /// for writes (a sealed layer takes none). Only bytes no superblock names go, so a crash
    /// at any point is harmless; a failure is logged and costs only the space.
    fn give_back_reserve(&mut self) {
        let needed = self.sb.needed_len();
        if self.file_len <= needed {
            return;
        }
        match self.file.set_len(needed) {
            Ok(()) => {
                self.file_len = needed;
                self.reserved = self.slots;
            }
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e,
                "could not give back the space reserved past a sealed layer's slots"),
        }
    }
}

/// Reads both superblocks and returns the valid one of the newest generation. A damaged area
/// is expected only for the one a crash interrupted; it is logged.
fn read_superblock(path: &Path, file: &File) -> Result<Superblock, DiskError> {
    let mut found = Vec::with_capacity(2);
    let mut errors = Vec::with_capacity(2);
    for (i, offset) in SB_OFFSETS.iter().enumerate() {
        let name = ["superblock A", "superblock B"][i];
        let mut bytes = [0u8; SB_LEN];
        file.read_exact_at(&mut bytes, *offset)
            .map_err(DiskError::io(path, "read superblock"))?;
        match Superblock::decode(&bytes) {
            Ok(sb) if sb.generation % 2 == i as u64 => found.push(sb),
            Ok(sb) => errors.push(DiskError::corrupt(
                path,
                format!(
                    "{name}: generation {} belongs in the other area",
                    sb.generation
                ),
            )),
            Err(Err(error)) => errors.push(DiskError::Format {
                path: path.to_path_buf(),
                what: name.to_string(),
                error,
            }),
            Err(Ok(problem)) => errors.push(DiskError::corrupt(path, format!("{name}: {problem}"))),
        }
    }
    match found.into_iter().max_by_key(|sb| sb.generation) {
        Some(sb) => {
            if let Some(e) = errors.first() {
                tracing::warn!(path = %path.display(), error = %e, generation = sb.generation,
                    "one superblock is damaged (a commit was interrupted?); using the other");
            }
            Ok(sb)
        }
        None => Err(errors.swap_remove(0)),
    }
}

/// Describes a superblock area for the checker: `Ok(generation)` or the problem.
pub(crate) fn superblock_areas(
    path: &Path,
    file: &File,
) -> Result<[Result<u64, String>; 2], DiskError> {
    let mut out = [Err(String::new()), Err(String::new())];
    for (i, offset) in SB_OFFSETS.iter().enumerate() {
        let mut bytes = [0u8; SB_LEN];
        file.read_exact_at(&mut bytes, *offset)
            .map_err(DiskError::io(path, "read superblock"))?;
        out[i] = match Superblock::decode(&bytes) {
            Ok(sb) => Ok(sb.generation),
            Err(Err(e)) => Err(e.to_string()),
            Err(Ok(p)) => Err(p),
        };
    }
    Ok(out)
}
