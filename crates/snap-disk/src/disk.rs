//! An open chain of layers: reads through a merged block index, writes into the top layer,
//! flush, seal, and merges of layers inside the chain.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use snap_core::Id;

use crate::build::create_empty;
use crate::error::DiskError;
use crate::layer::{CommitFailure, Identity, LayerFile};
use crate::merge::{MergeInto, blocks_to_copy, check_pair, copy_blocks};
use crate::meta::{Geometry, LayerInfo, NewLayer, SECTOR};

/// Where the newest data of a block is: which layer of the chain, which slot of its file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    pub layer: u32,
    pub slot: u64,
}

/// The layers and the merged index, behind the disk's lock.
pub(crate) struct Chain {
    pub layers: Vec<LayerFile>,
    /// Block -> the newest layer holding it. Built at open, kept up to date by writes, so a
    /// read costs one lookup whatever the depth of the chain.
    pub index: HashMap<u64, Loc>,
    broken: Option<String>,
    scratch: Vec<u8>,
}

impl Chain {
    fn build_index(layers: &[LayerFile]) -> HashMap<u64, Loc> {
        let mut index = HashMap::new();
        for (i, l) in layers.iter().enumerate() {
            for (block, e) in l.map() {
                index.insert(
                    *block,
                    Loc {
                        layer: i as u32,
                        slot: e.slot,
                    },
                );
            }
        }
        index
    }

    fn top(&self) -> &LayerFile {
        self.layers.last().expect("a chain is never empty")
    }

    /// Reads the whole of `block` as the chain sees it (zeros if no layer holds it), checking
    /// the CRC of the data read.
    pub fn read_block_checked(&self, block: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        match self.index.get(&block) {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(loc) => self.layers[loc.layer as usize].read_block_checked(block, buf),
        }
    }

    /// Blocks any layer holds, in order.
    pub fn allocated_blocks(&self) -> Vec<u64> {
        let mut blocks: Vec<u64> = self.index.keys().copied().collect();
        blocks.sort_unstable();
        blocks
    }
}

/// An open disk: a chain of layers, oldest first, whose top layer takes the writes unless it is
/// sealed. Every method takes `&self`; a reader-writer lock inside lets reads run in parallel
/// and orders writes, flushes and seals.
///
/// ```
/// use snap_disk::{Disk, Geometry};
/// let dir = tempfile::tempdir()?;
/// let disk = Disk::create(&dir.path().join("base"), Geometry::new(1 << 20))?;
/// disk.write_at(4096, &[7u8; 512])?;
/// disk.flush()?;
/// let snapshot = disk.seal(&dir.path().join("top"))?;
/// assert!(snapshot.sealed());
/// disk.write_at(4096, &[9u8; 512])?;
/// let mut buf = [0u8; 1024];
/// disk.read_at(4096, &mut buf)?;
/// assert_eq!((buf[0], buf[600]), (9, 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Disk {
    geometry: Geometry,
    read_only: bool,
    chain: RwLock<Chain>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("layers", &self.layers)
            .field("indexed_blocks", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// The result of merging two layers of a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeOutcome {
    /// The merged layer (it has the child's id, the parent's parent and a new digest).
    pub merged: LayerInfo,
    /// The file no longer in the chain; the caller deletes it once it has recorded the new
    /// chain (see the crate documentation for the order).
    pub unused: PathBuf,
}

impl Disk {
    /// Creates a new disk: an empty base layer at `path` (reads as zeros), writable.
    ///
    /// # Errors
    /// [`DiskError::Options`] for a bad geometry, or the I/O error naming `path`.
    pub fn create(path: &Path, geometry: Geometry) -> Result<Self, DiskError> {
        let layer = create_empty(
            path,
            &NewLayer {
                id: Id::random(),
                parent: None,
                geometry,
            },
        )?;
        Self::from_layers(vec![layer], false)
    }

    /// Opens the chain of layer files `paths`, oldest first. The top takes writes unless it is
    /// sealed.
    ///
    /// # Errors
    /// [`DiskError::EmptyChain`]; for any layer the errors of opening it (format, corrupt,
    /// truncated); [`DiskError::WrongParent`] if a layer does not name the one before it (id and
    /// digest), [`DiskError::NotSealed`] if a layer below the top is not sealed,
    /// [`DiskError::Geometry`] if the sizes differ.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, DiskError> {
        Self::open_mode(paths, false)
    }

    /// Opens a chain for reading only (writes are refused, nothing in the files changes).
    ///
    /// # Errors
    /// As for [`Disk::open`].
    pub fn open_read_only<P: AsRef<Path>>(paths: &[P]) -> Result<Self, DiskError> {
        Self::open_mode(paths, true)
    }

    fn open_mode<P: AsRef<Path>>(paths: &[P], read_only: bool) -> Result<Self, DiskError> {
        let n = paths.len();
        let layers = paths
            .iter()
            .enumerate()
            .map(|(i, p)| LayerFile::open(p.as_ref(), !read_only && i + 1 == n))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_layers(layers, read_only)
    }

    fn from_layers(layers: Vec<LayerFile>, read_only: bool) -> Result<Self, DiskError> {
        let first = layers.first().ok_or(DiskError::EmptyChain)?;
        let geometry = first.geometry();
        check_links(&layers, geometry)?;
        let index = Chain::build_index(&layers);
        tracing::debug!(layers = layers.len(), blocks = index.len(), top = %layers[layers.len() - 1].path().display(), "disk open");
        Ok(Self {
            geometry,
            read_only,
            chain: RwLock::new(Chain {
                layers,
                index,
                broken: None,
                scratch: Vec::new(),
            }),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Chain> {
        // A panic while holding the lock leaves the chain as consistent as an I/O error would.
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Chain> {
        self.chain.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Disk size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.geometry.disk_bytes
    }

    /// Block size in bytes.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.geometry.block_size
    }

    /// Disk size and block size.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Whether writes are accepted (the top is not sealed and the chain is not read-only).
    #[must_use]
    pub fn is_writable(&self) -> bool {
        !self.read_only && !self.read().top().sealed()
    }

    /// Summaries of the layers, oldest first.
    #[must_use]
    pub fn layers(&self) -> Vec<LayerInfo> {
        self.read().layers.iter().map(LayerFile::info).collect()
    }

    /// The layer files, oldest first.
    #[must_use]
    pub fn paths(&self) -> Vec<PathBuf> {
        self.read()
            .layers
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect()
    }

    fn check_io(&self, offset: u64, len: usize) -> Result<(), DiskError> {
        let len = len as u64;
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(DiskError::Unaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`: each block from the newest layer holding it, zeros
    /// where none does. Offset and length must be multiples of 512.
    ///
    /// A block held by a layer the disk does not write into (every layer below the top, and the
    /// top when it is sealed or the chain was opened read-only) is checked against the CRC-32C
    /// its map entry records the first time it is read through this `Disk`: the whole block is
    /// read and checked even when only part of it is asked for. Those layers never change, so
    /// a block that passed is not checked again. Blocks of the writable top are not checked
    /// (they are being written; [`check_layer`](crate::check_layer) checks them).
    ///
    /// # Errors
    /// [`DiskError::Unaligned`], [`DiskError::OutOfRange`], [`DiskError::BlockChecksum`] naming
    /// the layer file and the block whose data does not match its checksum (it fails every read
    /// that touches it, until a write replaces the block), or the I/O error naming the layer.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_io(offset, buf.len())?;
        let chain = self.read();
        let bs = u64::from(self.geometry.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let mut run = ((bs - in_block) as usize).min(buf.len() - done);
            match chain.index.get(&block) {
                None => {
                    // Runs of blocks no layer holds are zero-filled at once.
                    let mut next = block + 1;
                    while done + run < buf.len() && !chain.index.contains_key(&next) {
                        run += (bs as usize).min(buf.len() - done - run);
                        next += 1;
                    }
                    buf[done..done + run].fill(0);
                }
                Some(loc) => {
                    let layer = &chain.layers[loc.layer as usize];
                    let block_len = self.geometry.block_len(block);
                    if run < block_len && layer.checks_reads() {
                        let part = &mut buf[done..done + run];
                        if read_part_checked(layer, block, loc.slot, block_len, in_block, part)? {
                            done += run;
                            continue;
                        }
                    }
                    // Blocks in consecutive slots of one layer are read with one call, up to
                    // a block to be checked that the read covers only in part.
                    let (mut next, mut slot) = (block + 1, loc.slot + 1);
                    while done + run < buf.len() {
                        let more = (bs as usize).min(buf.len() - done - run);
                        match chain.index.get(&next) {
                            Some(l)
                                if l.layer == loc.layer
                                    && l.slot == slot
                                    && (more == self.geometry.block_len(next)
                                        || !layer.needs_check(slot)) =>
                            {
                                run += more;
                                next += 1;
                                slot += 1;
                            }
                            _ => break,
                        }
                    }
                    let dst = &mut buf[done..done + run];
                    layer.read_slot(loc.slot, in_block, dst)?;
                    if layer.checks_reads() {
                        self.check_run(layer, block..next, loc.slot, in_block as usize, dst)?;
                    }
                }
            }
            done += run;
        }
        Ok(())
    }

    /// Checks the blocks `blocks` (in consecutive slots from `slot`), just read into `dst`
    /// from `in_block` bytes into the first, that have not been checked yet. `read_at` ends a
    /// run before a block it would read only in part, unless that block needs no check.
    fn check_run(
        &self,
        layer: &LayerFile,
        blocks: Range<u64>,
        slot: u64,
        in_block: usize,
        dst: &mut [u8],
    ) -> Result<(), DiskError> {
        let mut at = 0;
        let mut skip = in_block;
        for (b, s) in blocks.zip(slot..) {
            let block_len = self.geometry.block_len(b);
            let len = (block_len - skip).min(dst.len() - at);
            if layer.needs_check(s) {
                if len == block_len {
                    layer.check_block(b, s, &mut dst[at..at + len])?;
                } else {
                    // Not reached (see above); read the whole block rather than trust a part
                    // (a block that arrives on demand lands in `whole`).
                    let mut whole = vec![0u8; block_len];
                    layer.read_block(b, s, &mut whole)?;
                    dst[at..at + len].copy_from_slice(&whole[skip..skip + len]);
                }
            }
            at += len;
            skip = 0;
        }
        Ok(())
    }

    fn writable_top(&self, chain: &Chain) -> Result<(), DiskError> {
        let top = chain.top();
        if let Some(reason) = &chain.broken {
            return Err(DiskError::Broken {
                path: top.path().to_path_buf(),
                reason: reason.clone(),
            });
        }
        if self.read_only || top.sealed() {
            return Err(DiskError::ReadOnly {
                path: top.path().to_path_buf(),
                reason: if self.read_only {
                    "chain opened read-only"
                } else {
                    "sealed"
                },
            });
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the top layer. Offset and length must be multiples of 512.
    /// The write is durable once a later [`flush`](Disk::flush) returns; until then a crash
    /// keeps all of it or none of it.
    ///
    /// A block the top does not hold yet (or holds from an earlier commit) gets a fresh slot
    /// holding the whole block (the rest copied from the layer below); a block already written
    /// since the last commit is written in place.
    ///
    /// A write that fails for lack of room (the filesystem is full, a quota is exceeded, see
    /// [`DiskError::io_kind`]) or because the rest of a partly written block cannot be copied
    /// up from a damaged layer below ([`DiskError::BlockChecksum`]) leaves the disk usable:
    /// each block of its range holds either all of its old data or all of the new, never
    /// anything else (the blocks before the one that failed may have been written), a later
    /// flush commits exactly what reads show, and the same write succeeds once there is room.
    /// File space for fresh slots is reserved (`fallocate`) before they are written, so a full
    /// filesystem fails the write, not the next flush. Any other failure breaks the disk: it
    /// refuses writes and flushes until it is reopened, which shows the last commit.
    ///
    /// # Errors
    /// [`DiskError::Unaligned`], [`DiskError::OutOfRange`], [`DiskError::ReadOnly`] for a sealed
    /// top, [`DiskError::Broken`] after an earlier failure that broke the disk, a
    /// [`DiskError::BlockChecksum`] for a damaged block below, [`DiskError::LayerFull`], or the
    /// I/O error.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_io(offset, data.len())?;
        let mut guard = self.write();
        let chain = &mut *guard;
        self.writable_top(chain)?;
        let mut scratch = std::mem::take(&mut chain.scratch);
        let result = self.write_blocks(chain, offset, data, &mut scratch);
        chain.scratch = scratch;
        result.map_err(|failed| {
            if !failed.usable {
                // The top may hold a torn block: never commit it.
                chain.broken = Some(failed.error.to_string());
            }
            failed.error
        })
    }

    fn write_blocks(
        &self,
        chain: &mut Chain,
        offset: u64,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), Box<WriteFailure>> {
        let bs = u64::from(self.geometry.block_size);
        let top = chain.layers.len() - 1;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let block_len = self.geometry.block_len(block);
            let n = (block_len - in_block as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            let slot = if chain.layers[top].is_dirty(block) {
                // In place: a failure may leave the block torn.
                chain.layers[top]
                    .patch_block(block, in_block, piece)
                    .map_err(WriteFailure::broken)?;
                None
            } else if n == block_len {
                Some(
                    chain.layers[top]
                        .put_block(block, piece)
                        .map_err(WriteFailure::fresh_slot)?,
                )
            } else {
                scratch.resize(block_len, 0);
                match chain.index.get(&block) {
                    None => scratch.fill(0),
                    Some(loc) => chain.layers[loc.layer as usize]
                        .read_block(block, loc.slot, scratch)
                        .map_err(|error| {
                            Box::new(WriteFailure {
                                // Nothing was written for this block.
                                usable: matches!(error, DiskError::BlockChecksum { .. }),
                                error,
                            })
                        })?,
                }
                scratch[in_block as usize..in_block as usize + n].copy_from_slice(piece);
                Some(
                    chain.layers[top]
                        .put_block(block, scratch)
                        .map_err(WriteFailure::fresh_slot)?,
                )
            };
            if let Some(slot) = slot {
                chain.index.insert(
                    block,
                    Loc {
                        layer: top as u32,
                        slot,
                    },
                );
            }
            done += n;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable (one commit of the top layer:
    /// data and map synced, then the superblock). Does nothing on a sealed or read-only chain.
    ///
    /// A flush that finds no room for the new map chunks (see [`DiskError::io_kind`]) changes
    /// nothing and leaves the disk usable: the last commit stays the durable state and the same
    /// flush succeeds once there is room. Any other failure breaks the disk (it refuses writes
    /// and flushes until reopened, which shows the last commit).
    ///
    /// # Errors
    /// [`DiskError::Broken`] after an earlier failure that broke the disk, or the I/O error.
    pub fn flush(&self) -> Result<(), DiskError> {
        let mut guard = self.write();
        let chain = &mut *guard;
        if self.read_only || chain.top().sealed() {
            return Ok(());
        }
        self.writable_top(chain)?;
        let identity = chain.top().identity();
        let result = chain
            .layers
            .last_mut()
            .expect("non-empty")
            .try_commit(identity);
        result.map_err(|failed| commit_failed(chain, *failed))
    }

    /// Seals the top layer (commits its writes, marks it read-only and records its digest) and
    /// puts a new empty top layer at `new_top` on it; writes then go to the new top. Costs one
    /// commit and one small file: no data is copied. Returns the sealed layer.
    ///
    /// If the new top cannot be created the old top is unsealed again and stays the top.
    ///
    /// # Errors
    /// [`DiskError::ReadOnly`] if the top is already sealed, or the I/O error naming the file.
    pub fn seal(&self, new_top: &Path) -> Result<LayerInfo, DiskError> {
        let mut chain = self.write();
        self.writable_top(&chain)?;
        let before = chain.top().identity();
        let top = chain.layers.last_mut().expect("non-empty");
        if let Err(failed) = top.try_commit(Identity {
            sealed: true,
            ..before
        }) {
            return Err(commit_failed(&mut chain, *failed));
        }
        let sealed = top.info();
        let new = NewLayer {
            id: Id::random(),
            parent: sealed.as_parent(),
            geometry: self.geometry,
        };
        match create_empty(new_top, &new) {
            Ok(layer) => {
                chain.layers.push(layer);
                tracing::info!(sealed = %sealed.id, top = %new_top.display(), "disk layer sealed");
                Ok(sealed)
            }
            Err(e) => {
                if let Err(undo) = top.commit(before) {
                    chain.broken = Some(undo.to_string());
                }
                Err(e)
            }
        }
    }

    /// Undoes the last [`seal`](Disk::seal) while nothing was written since: drops the empty
    /// top from the chain, unseals the layer below so it takes writes again, and returns the
    /// dropped file's path for the caller to delete (what a failed snapshot does).
    ///
    /// # Errors
    /// [`DiskError::Corrupt`] naming the top if it holds blocks or is the only layer (nothing
    /// to undo), or the I/O error.
    pub fn undo_seal(&self) -> Result<PathBuf, DiskError> {
        let mut chain = self.write();
        self.writable_top(&chain)?;
        let n = chain.layers.len();
        let top = chain.top();
        if n < 2 || !top.map().is_empty() {
            return Err(DiskError::corrupt(
                top.path(),
                "cannot undo a seal: the top layer has blocks or no layer below it",
            ));
        }
        let below = &mut chain.layers[n - 2];
        let identity = Identity {
            sealed: false,
            ..below.identity()
        };
        // Reopen writable (sealed layers are open read-only) and unseal.
        let mut reopened = LayerFile::open(below.path(), true)?;
        reopened.commit(identity)?;
        chain.layers[n - 2] = reopened;
        let dropped = chain.layers.pop().expect("two layers");
        Ok(dropped.path().to_path_buf())
    }

    /// Byte ranges (merged, in order) of the blocks written after layer `since` up to and
    /// including layer `until`: the blocks that differ between the two points for a backup. With
    /// `since` = `None`, every block held by a layer up to `until`. Ranges are clipped to the
    /// disk size.
    ///
    /// # Errors
    /// [`DiskError::NotInChain`] if a layer is not in the chain or `since` is not older than
    /// `until`.
    pub fn changed_ranges(
        &self,
        since: Option<Id>,
        until: Id,
    ) -> Result<Vec<Range<u64>>, DiskError> {
        let chain = self.read();
        let find = |id: Id| {
            chain
                .layers
                .iter()
                .position(|l| l.identity().id == id)
                .ok_or(DiskError::NotInChain {
                    id,
                    detail: String::new(),
                })
        };
        let end = find(until)?;
        let start = match since {
            None => 0,
            Some(id) => {
                let i = find(id)?;
                if i >= end {
                    return Err(DiskError::NotInChain {
                        id: until,
                        detail: format!(" after layer {id}"),
                    });
                }
                i + 1
            }
        };
        let blocks: BTreeSet<u64> = chain.layers[start..=end]
            .iter()
            .flat_map(|l| l.map().keys().copied())
            .collect();
        let bs = u64::from(self.geometry.block_size);
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for b in blocks {
            let r = b * bs..((b + 1) * bs).min(self.size());
            match ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => ranges.push(r),
            }
        }
        Ok(ranges)
    }

    /// Merges layers `index` and `index + 1` of the chain into one, in the file of the child
    /// ([`MergeInto::Child`]: the parent's blocks the child lacks are copied into it) or of the
    /// parent ([`MergeInto::Parent`]: the child's blocks are copied into it). Either way the
    /// merged layer reads as the child did, keeps the child's id and sealed state, names the
    /// parent's parent and gets a new digest; the layer above it (if any) is re-pointed at it.
    /// The write lock is held throughout: I/O to the disk waits.
    ///
    /// # Errors
    /// [`DiskError::BadIndex`], the errors of reading either layer (a damaged block is named),
    /// or of writing the target.
    pub fn merge(&self, index: usize, into: MergeInto) -> Result<MergeOutcome, DiskError> {
        let mut guard = self.write();
        let chain = &mut *guard;
        let n = chain.layers.len();
        if index + 1 >= n {
            return Err(DiskError::BadIndex { index, layers: n });
        }
        if let Some(reason) = &chain.broken {
            return Err(DiskError::Broken {
                path: chain.top().path().to_path_buf(),
                reason: reason.clone(),
            });
        }
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: chain.layers[index].path().to_path_buf(),
                reason: "chain opened read-only",
            });
        }
        let identity = check_pair(&chain.layers[index], &chain.layers[index + 1])?;
        let (source, target) = match into {
            MergeInto::Child => (index, index + 1),
            MergeInto::Parent => (index + 1, index),
        };
        let blocks = blocks_to_copy(&chain.layers[source], &chain.layers[target], into);
        // The writable top is merged into through the chain's own handle (it may hold writes
        // not committed yet); a sealed target is reopened for writing.
        let in_place = target + 1 == n && !chain.layers[target].sealed();
        if !in_place {
            chain.layers[target] = LayerFile::open(chain.layers[target].path(), true)?;
        }
        let (src, tgt) = if source < target {
            let (low, high) = chain.layers.split_at_mut(target);
            (&low[source], &mut high[0])
        } else {
            let (low, high) = chain.layers.split_at_mut(source);
            (&high[0], &mut low[target])
        };
        if let Err(e) = copy_blocks(src, tgt, &blocks).and_then(|()| tgt.commit(identity)) {
            if in_place {
                chain.broken = Some(e.to_string());
            } else if let Ok(clean) = LayerFile::open(tgt.path(), false) {
                // Drop the half-merged state: the file still holds its last commit.
                *tgt = clean;
            }
            return Err(e);
        }
        let unused = chain.layers.remove(source).path().to_path_buf();
        let merged = chain.layers[index].info();
        if let Some(above) = chain.layers.get_mut(index + 1) {
            let identity = Identity {
                parent: merged.as_parent(),
                ..above.identity()
            };
            if above.sealed() {
                let mut reopened = LayerFile::open(above.path(), true)?;
                reopened.commit(identity)?;
                *above = reopened;
            } else {
                above.commit(identity)?;
            }
        }
        chain.index = Chain::build_index(&chain.layers);
        tracing::info!(merged = %merged.id, unused = %unused.display(), ?into, "disk layers merged");
        Ok(MergeOutcome { merged, unused })
    }

    /// Runs `f` with the chain locked for reading (exports and flatten read through it).
    pub(crate) fn with_chain<T>(&self, f: impl FnOnce(&Chain) -> T) -> T {
        f(&self.read())
    }
}

impl Drop for Disk {
    /// Commits what was written since the last flush (best effort: an error is logged). A
    /// caller that needs to know calls [`Disk::flush`] first.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "disk closed without committing its last writes");
        }
    }
}

/// Blocks up to this size that a read checks while it wants only part of them are kept per
/// thread (the last one), so the reads of the rest of the block that tend to follow are served
/// from memory; larger ones are read into a buffer of their own and not kept.
const KEPT_BLOCK: usize = 256 << 10;

/// The last block a thread read whole to check it, and where it came from.
struct KeptBlock {
    data: Vec<u8>,
    /// The layer's uid and the slot, once `data` holds the checked block.
    holds: Option<(u64, u64)>,
}

thread_local! {
    static KEPT: RefCell<KeptBlock> = const {
        RefCell::new(KeptBlock {
            data: Vec::new(),
            holds: None,
        })
    };
}

/// Serves a read of `part` of `block` (in `slot` of `layer`, which checks reads), starting
/// `in_block` bytes into it, if the block must be checked first or this thread still holds it
/// from such a check: the whole block is read and checked, and kept. Returns `false` (and does
/// nothing) for a block already checked that the thread does not hold: the caller reads the
/// part from the file.
fn read_part_checked(
    layer: &LayerFile,
    block: u64,
    slot: u64,
    block_len: usize,
    in_block: u64,
    part: &mut [u8],
) -> Result<bool, DiskError> {
    let from = in_block as usize;
    let key = (layer.uid(), slot);
    if block_len > KEPT_BLOCK {
        if !layer.needs_check(slot) {
            return Ok(false);
        }
        let mut whole = vec![0u8; block_len];
        layer.read_block(block, slot, &mut whole)?;
        part.copy_from_slice(&whole[from..from + part.len()]);
        return Ok(true);
    }
    KEPT.with_borrow_mut(|kept| {
        if kept.holds != Some(key) {
            if !layer.needs_check(slot) {
                return Ok(false);
            }
            kept.holds = None;
            kept.data.resize(block_len, 0);
            layer.read_block(block, slot, &mut kept.data)?;
            kept.holds = Some(key);
        }
        part.copy_from_slice(&kept.data[from..from + part.len()]);
        Ok(true)
    })
}

/// A failed write, and whether the disk stays usable after it: the top layer holds no torn
/// block, and its map names exactly what its slots hold.
struct WriteFailure {
    error: DiskError,
    usable: bool,
}

impl WriteFailure {
    /// A failure that may have torn a block (or whose cause is unknown).
    fn broken(error: DiskError) -> Box<Self> {
        Box::new(Self {
            error,
            usable: false,
        })
    }

    /// A failure to write a block into a fresh slot, which the layer forgets (its map still
    /// names the old data). Lack of room keeps the disk usable; other errors break it.
    fn fresh_slot(error: DiskError) -> Box<Self> {
        Box::new(Self {
            usable: error.is_out_of_space(),
            error,
        })
    }
}

/// Whether a failed commit of the top leaves the disk usable (nothing changed, and it failed
/// for lack of room); if not, marks the disk broken. Returns the error.
fn commit_failed(chain: &mut Chain, failed: CommitFailure) -> DiskError {
    if !(failed.unchanged && failed.error.is_out_of_space()) {
        chain.broken = Some(failed.error.to_string());
    }
    failed.error
}

/// Checks that `layers` form a chain of one geometry.
fn check_links(layers: &[LayerFile], geometry: Geometry) -> Result<(), DiskError> {
    let mut expected = None;
    for (i, layer) in layers.iter().enumerate() {
        let info = layer.info();
        if info.geometry != geometry {
            return Err(DiskError::Geometry {
                path: info.path,
                expected_bytes: geometry.disk_bytes,
                expected_block: geometry.block_size,
                found_bytes: info.geometry.disk_bytes,
                found_block: info.geometry.block_size,
            });
        }
        if info.parent != expected {
            return Err(DiskError::WrongParent {
                path: info.path,
                expected,
                found: info.parent,
            });
        }
        if i + 1 < layers.len() && !info.sealed() {
            return Err(DiskError::NotSealed {
                path: info.path,
                what: "a layer below the top of a chain must be sealed",
            });
        }
        expected = info.as_parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_block_is_checked_once_and_whole_even_when_read_in_part() {
        const B: u64 = 65536;
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::create(&dir.path().join("0"), Geometry::new(4 * B)).unwrap();
        disk.write_at(0, &[1u8; 2 * B as usize]).unwrap();
        disk.seal(&dir.path().join("1")).unwrap();
        disk.write_at(2 * B, &[2u8; 512]).unwrap();
        let needs_check = |block: u64| {
            let chain = disk.read();
            let loc = chain.index[&block];
            chain.layers[loc.layer as usize].needs_check(loc.slot)
        };
        assert!(needs_check(0) && needs_check(1));
        disk.read_at(512, &mut [0u8; 1024]).unwrap();
        assert!(!needs_check(0) && needs_check(1));
        disk.read_at(B, &mut [0u8; B as usize]).unwrap();
        assert!(!needs_check(1));
        // The writable top is not checked on read.
        let chain = disk.read();
        assert!(!chain.layers[1].checks_reads());
        assert!(chain.layers[0].checks_reads());
    }
}
