//! Sealed layers whose blocks arrive on demand (a layer restored from a remote store): the file
//! is built with its whole map (every block's slot and CRC-32C, so its digest is the original's)
//! but with no data ([`build_sparse_layer`]); a [`BlockSource`] attached to its path
//! ([`attach`]) supplies each block the first time it is read, and the block is written into its
//! slot so that later reads find it in the file.
//!
//! # How a block arrives
//!
//! Reads of a sealed layer check every block against its CRC the first time it is read (see
//! [`Disk::read_at`](crate::Disk::read_at)). A slot never written reads as zeros and fails that
//! check (unless the block is zeros, which the hole then holds already). When a source is
//! attached, a block that fails its check is fetched from the source instead, checked against
//! the same CRC (a source that returns other bytes is refused, naming the block), written into
//! its slot, and handed to the reader. So the CRC in the map says both "present" and "intact",
//! and no other state is kept: a block torn by a crash part way through its write fails its
//! check and is fetched again. Every reader of a layer file (a disk's chain, a merge's source,
//! [`LayerBlocks`](crate::LayerBlocks), [`check_layer`](crate::check_layer)) goes through the
//! same check, so all of them see the whole layer while a source is attached.
//!
//! # The registry
//!
//! Sources are kept by path in one table per process; a layer file opened at that path takes
//! the source when its id and digest are the ones the source was attached for. A layer with a
//! source is never opened for writing (a merge into it is refused: its blocks would no longer
//! be the source's). [`complete`] reads every block (fetching what is missing), syncs the file
//! and reports how many blocks it fetched; once the caller has recorded that the layer is
//! whole, it [`detach`]es the source. After a restart nothing is attached: the caller attaches
//! the sources of the layers it knows are incomplete before their files are read.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use snap_core::Id;

use crate::build::build_layer;
use crate::error::DiskError;
use crate::format::MapEntry;
use crate::layer::LayerFile;
use crate::meta::{Digest, LayerInfo, NewLayer};

/// Where the blocks of an incomplete layer come from.
pub trait BlockSource: Send + Sync {
    /// Writes the whole of `block` (its block length: `buf.len()`) into `buf`.
    ///
    /// # Errors
    /// Why the block cannot be had; the reader's error names the layer and the block and
    /// carries this error's message.
    fn fetch(&self, block: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// A source attached to a layer file.
pub(crate) struct Attached {
    id: Id,
    digest: Digest,
    source: Arc<dyn BlockSource>,
    /// The file, open for writing fetched blocks into their slots.
    file: File,
    /// Blocks fetched from the source.
    fetched: AtomicU64,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("id", &self.id)
            .field("fetched", &self.fetched.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

static ATTACHED: LazyLock<Mutex<HashMap<PathBuf, Arc<Attached>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn table() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Arc<Attached>>> {
    ATTACHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Attaches `source` to the sealed layer at `path`: from now on every reader of that file in
/// this process fetches from `source` the blocks the file does not hold yet. Replaces a source
/// attached before.
///
/// # Errors
/// The errors of opening the layer, or [`DiskError::NotSealed`] for a writable layer.
pub fn attach(path: &Path, source: Arc<dyn BlockSource>) -> Result<(), DiskError> {
    // Opened without a source: this only reads the superblock and map.
    let layer = LayerFile::open_unfilled(path)?;
    let info = layer.info();
    let Some(digest) = info.digest else {
        return Err(DiskError::NotSealed {
            path: path.to_path_buf(),
            what: "only a sealed layer's blocks can arrive on demand",
        });
    };
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(DiskError::io(path, "open for filling"))?;
    table().insert(
        path.to_path_buf(),
        Arc::new(Attached {
            id: info.id,
            digest,
            source,
            file,
            fetched: AtomicU64::new(0),
        }),
    );
    Ok(())
}

/// Detaches the source of the layer at `path`, if one is attached.
pub fn detach(path: &Path) {
    table().remove(path);
}

/// Whether a source is attached to the layer at `path`.
#[must_use]
pub fn is_attached(path: &Path) -> bool {
    table().contains_key(path)
}

/// The source attached to `path` for the layer `id` with digest `digest`, if any.
pub(crate) fn lookup(path: &Path, id: Id, digest: Option<Digest>) -> Option<Arc<Attached>> {
    let t = table();
    let a = t.get(path)?;
    (a.id == id && Some(a.digest) == digest).then(|| Arc::clone(a))
}

impl Attached {
    /// Blocks fetched so far.
    pub(crate) fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Fetches `block` into `buf`, checks it against `e`'s CRC and writes it into its slot at
    /// `offset`. Returns whether the write reached the file (a failed write only means the
    /// block is fetched again next time).
    pub(crate) fn fetch(
        &self,
        path: &Path,
        block: u64,
        e: MapEntry,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool, DiskError> {
        self.source
            .fetch(block, buf)
            .map_err(|problem| DiskError::Fetch {
                path: path.to_path_buf(),
                block,
                problem,
            })?;
        let found = snap_core::crc32c(buf);
        if found != e.crc {
            return Err(DiskError::Fetch {
                path: path.to_path_buf(),
                block,
                problem: format!(
                    "the source gave other bytes than the layer's map records (map {:#010x}, fetched {found:#010x})",
                    e.crc
                ),
            });
        }
        self.fetched.fetch_add(1, Ordering::Relaxed);
        match self.file.write_all_at(buf, offset) {
            Ok(()) => Ok(true),
            Err(error) => {
                tracing::warn!(path = %path.display(), block, %error, "cannot keep a fetched block in its layer file; it is fetched again when read again");
                Ok(false)
            }
        }
    }
}

/// Builds the sealed layer `new` at `out` with the map `entries` (block and CRC-32C of its data,
/// blocks strictly increasing, inside the disk) and no data: its slots are reserved but hold
/// nothing until a source attached with [`attach`] supplies them. Its digest is the one of the
/// layer the entries describe. The file appears complete or not at all.
///
/// # Errors
/// [`DiskError::Input`] naming `out` for blocks out of order or outside the disk, or the I/O
/// error of writing.
pub fn build_sparse_layer(
    out: &Path,
    new: &NewLayer,
    entries: &[(u64, u32)],
) -> Result<LayerInfo, DiskError> {
    new.geometry.validate()?;
    let total = new.geometry.blocks();
    for (i, &(b, _)) in entries.iter().enumerate() {
        if b >= total || (i > 0 && entries[i - 1].0 >= b) {
            return Err(DiskError::Input {
                path: out.to_path_buf(),
                problem: format!(
                    "block {b}: blocks must increase and lie inside the disk ({total} blocks)"
                ),
            });
        }
    }
    let layer = build_layer(out, new, true, |layer| {
        for &(b, crc) in entries {
            layer.put_entry(b, crc)?;
        }
        Ok(())
    })?;
    Ok(layer.info())
}

/// What [`complete`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// Blocks the layer holds.
    pub blocks: u64,
    /// Blocks fetched from the source (the others were in the file already).
    pub fetched: u64,
}

/// Blocks [`complete`] reads at once (each a fetch from the source when the file lacks it).
const COMPLETE_THREADS: usize = 8;

/// Reads every block of the layer at `path` (in order, [`COMPLETE_THREADS`] at a time),
/// fetching from its attached source those the file does not hold, then syncs the file: once
/// this returns, the file holds the whole layer and the caller may record that and [`detach`]
/// the source. `progress` gets each block as it is started and stops the work by returning
/// `false`.
///
/// # Errors
/// The errors of opening the layer, [`DiskError::Fetch`] for a block the source cannot give,
/// [`DiskError::BlockChecksum`] for a damaged block when no source is attached, or
/// [`DiskError::Io`] with `op` `"stopped"` when `progress` stopped it. The first error stops
/// the other readers.
pub fn complete(
    path: &Path,
    progress: &(dyn Fn(u64) -> bool + Sync),
) -> Result<Completed, DiskError> {
    let layer = LayerFile::open(path, false)?;
    let mut blocks: Vec<u64> = layer.map().keys().copied().collect();
    blocks.sort_unstable();
    let before = layer.fetched();
    let geometry = layer.geometry();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed: Mutex<Option<DiskError>> = Mutex::new(None);
    let fail = |e: DiskError| {
        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    };
    let stopped = || failed.lock().unwrap_or_else(|p| p.into_inner()).is_some();
    std::thread::scope(|s| {
        for _ in 0..COMPLETE_THREADS.min(blocks.len()) {
            s.spawn(|| {
                let mut buf = vec![0u8; geometry.block_size as usize];
                while !stopped() {
                    let Some(&b) = blocks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    if !progress(b) {
                        fail(DiskError::Io {
                            path: path.to_path_buf(),
                            op: "stopped",
                            error: std::io::Error::other("the filling was stopped"),
                        });
                        return;
                    }
                    let len = geometry.block_len(b);
                    if let Err(e) = layer.read_block_checked(b, &mut buf[..len]) {
                        fail(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if let Some(a) = layer.source() {
        a.file
            .sync_data()
            .map_err(DiskError::io(path, "sync filled blocks"))?;
    }
    Ok(Completed {
        blocks: blocks.len() as u64,
        fetched: layer.fetched() - before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Geometry, LayerBlocks};
    use std::sync::atomic::AtomicUsize;

    /// Blocks from a copy of a layer, counting fetches; `lie` returns other bytes for a block.
    struct FromLayer {
        blocks: LayerBlocks,
        calls: AtomicUsize,
        lie: Option<u64>,
        fail: Option<u64>,
    }

    impl BlockSource for FromLayer {
        fn fetch(&self, block: u64, buf: &mut [u8]) -> Result<(), String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.fail == Some(block) {
                return Err("the store is unreachable".into());
            }
            let data = self.blocks.read_block(block).map_err(|e| e.to_string())?;
            buf.copy_from_slice(&data);
            if self.lie == Some(block) {
                buf[0] ^= 1;
            }
            Ok(())
        }
    }

    /// A disk of 1 MiB with some blocks written, sealed; returns the sealed layer.
    fn original(dir: &Path) -> LayerInfo {
        let disk = Disk::create(&dir.join("orig"), Geometry::new(1 << 20)).unwrap();
        disk.write_at(0, &[1u8; 4096]).unwrap();
        disk.write_at(300 << 10, &[2u8; 512]).unwrap();
        disk.write_at(512 << 10, &vec![0u8; 65536]).unwrap();
        disk.write_at(1000 << 10, &[3u8; 8192]).unwrap();
        disk.seal(&dir.join("orig-top")).unwrap()
    }

    fn sparse_copy(dir: &Path, orig: &LayerInfo, name: &str) -> PathBuf {
        let src = LayerBlocks::open(&orig.path).unwrap();
        let entries: Vec<(u64, u32)> = src
            .blocks()
            .iter()
            .map(|&b| (b, snap_core::crc32c(&src.read_block(b).unwrap())))
            .collect();
        let out = dir.join(name);
        let made = build_sparse_layer(
            &out,
            &NewLayer {
                id: orig.id,
                parent: None,
                geometry: orig.geometry,
            },
            &entries,
        )
        .unwrap();
        assert_eq!(made.digest, orig.digest, "the map alone gives the digest");
        out
    }

    fn source(orig: &LayerInfo) -> Arc<FromLayer> {
        Arc::new(FromLayer {
            blocks: LayerBlocks::open(&orig.path).unwrap(),
            calls: AtomicUsize::new(0),
            lie: None,
            fail: None,
        })
    }

    fn whole(paths: &[&Path]) -> Result<Vec<u8>, DiskError> {
        let d = Disk::open_read_only(paths)?;
        let mut buf = vec![0u8; 1 << 20];
        d.read_at(0, &mut buf)?;
        Ok(buf)
    }

    #[test]
    fn blocks_arrive_on_first_read_and_stay() {
        let dir = tempfile::tempdir().unwrap();
        let orig = original(dir.path());
        let sparse = sparse_copy(dir.path(), &orig, "sparse");
        let want = whole(&[&orig.path]).unwrap();

        // Without a source the missing blocks fail their check, naming the block.
        let e = whole(&[&sparse]).unwrap_err();
        assert!(matches!(e, DiskError::BlockChecksum { .. }), "{e}");

        let src = source(&orig);
        attach(&sparse, src.clone()).unwrap();
        assert!(is_attached(&sparse));
        // A layer with a source is not opened for writing (a merge into it).
        let e = Disk::open(&[&sparse]).unwrap_err();
        assert!(e.to_string().contains("arriving"), "{e}");
        // A part of a block, then the whole disk through a chain with a writable top over it.
        let d = Disk::open_read_only(&[&sparse]).unwrap();
        let mut part = vec![0u8; 512];
        d.read_at(300 << 10, &mut part).unwrap();
        assert_eq!(part, vec![2u8; 512]);
        drop(d);
        assert_eq!(whole(&[&sparse]).unwrap(), want);
        // Three blocks hold data; the zero block is in the hole already.
        assert_eq!(src.calls.load(Ordering::Relaxed), 3);
        assert_eq!(whole(&[&sparse]).unwrap(), want);
        assert_eq!(
            src.calls.load(Ordering::Relaxed),
            3,
            "read from the file now"
        );

        // Complete: nothing left to fetch; detached, the file alone reads whole.
        let done = complete(&sparse, &|_| true).unwrap();
        assert_eq!(
            done,
            Completed {
                blocks: 4,
                fetched: 0
            }
        );
        detach(&sparse);
        assert_eq!(whole(&[&sparse]).unwrap(), want);
        assert!(crate::check_layer(&sparse).unwrap().is_clean());
    }

    #[test]
    fn complete_fetches_what_is_missing_and_lies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let orig = original(dir.path());
        let want = whole(&[&orig.path]).unwrap();

        let sparse = sparse_copy(dir.path(), &orig, "a");
        attach(&sparse, source(&orig)).unwrap();
        let done = complete(&sparse, &|_| true).unwrap();
        assert_eq!(done.fetched, 3);
        detach(&sparse);
        assert_eq!(whole(&[&sparse]).unwrap(), want);

        // A source that gives other bytes, or none, is refused naming the block; nothing of
        // it is kept.
        let lying = sparse_copy(dir.path(), &orig, "b");
        let mut src = FromLayer {
            blocks: LayerBlocks::open(&orig.path).unwrap(),
            calls: AtomicUsize::new(0),
            lie: Some(0),
            fail: None,
        };
        attach(&lying, Arc::new(src)).unwrap();
        let e = complete(&lying, &|_| true).unwrap_err().to_string();
        assert!(e.contains("block 0") && e.contains("other bytes"), "{e}");
        src = FromLayer {
            blocks: LayerBlocks::open(&orig.path).unwrap(),
            calls: AtomicUsize::new(0),
            lie: None,
            fail: Some(15),
        };
        // On a copy of its own: the readers complete() ran beside the lie may have brought
        // block 15 into `lying` already.
        let unreachable = sparse_copy(dir.path(), &orig, "b2");
        attach(&unreachable, Arc::new(src)).unwrap();
        let e = whole(&[&unreachable]).unwrap_err().to_string();
        assert!(e.contains("block 15") && e.contains("unreachable"), "{e}");
        // A source attached for another layer is not used.
        let other = sparse_copy(dir.path(), &orig, "c");
        let d = Disk::create(&dir.path().join("x"), Geometry::new(1 << 20)).unwrap();
        let x = d.seal(&dir.path().join("x-top")).unwrap();
        attach(&other, source(&x)).unwrap();
        std::fs::copy(&x.path, &other).unwrap();
        assert_eq!(whole(&[&other]).unwrap(), vec![0u8; 1 << 20]);
        detach(&lying);
        detach(&unreachable);
        detach(&other);
    }
}
