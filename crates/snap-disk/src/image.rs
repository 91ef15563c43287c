//! Whole-disk conversions: import a raw image as a base layer, export a chain as a raw image,
//! flatten a chain into one base layer, create and describe single layers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use snap_core::{AtomicFile, Id};

use crate::build::{build_layer, create_empty};
use crate::disk::Disk;
use crate::error::DiskError;
use crate::layer::LayerFile;
use crate::meta::{Geometry, LayerInfo, NewLayer, SECTOR};

pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Creates an empty layer at `path` (atomically) and returns its summary; with a parent it is
/// the writable top over a sealed chain (what a revert puts on a snapshot's layers).
///
/// # Errors
/// [`DiskError::Options`] for a bad geometry, or the I/O error naming `path`.
pub fn create_layer(path: &Path, new: &NewLayer) -> Result<LayerInfo, DiskError> {
    create_empty(path, new).map(|l| l.info())
}

/// Opens the layer at `path` read-only, checks its superblocks and map, and returns its summary.
///
/// # Errors
/// The errors of opening a layer: format, corrupt, truncated, I/O.
pub fn layer_info(path: &Path) -> Result<LayerInfo, DiskError> {
    LayerFile::open(path, false).map(|l| l.info())
}

/// Imports the raw image at `raw` as a sealed base layer at `out`, holding its non-zero
/// blocks; the disk size is the image size (a multiple of 512).
///
/// # Errors
/// [`DiskError::Input`] for an image of a bad size, [`DiskError::Options`] for a bad block
/// size, or the I/O error naming the file.
pub fn import_raw(raw: &Path, out: &Path, block_size: u32) -> Result<LayerInfo, DiskError> {
    let file = File::open(raw).map_err(DiskError::io(raw, "open raw image"))?;
    import_raw_file(&file, raw, out, block_size, &mut || true)
}

/// Blocks [`import_raw_file`] reads between two calls of its `keep_going`.
const BLOCKS_PER_CHECK: u64 = 64;

/// Imports the raw image open as `file` (named `raw` in errors) as a sealed base layer at
/// `out`, like [`import_raw`]. `keep_going` is asked every few blocks (and before anything is
/// written); once it says no, the import stops, leaves no file at `out`, and fails with an
/// [`io::ErrorKind::Interrupted`](std::io::ErrorKind::Interrupted) I/O error.
///
/// # Errors
/// As [`import_raw`], or the interruption.
pub fn import_raw_file(
    file: &File,
    raw: &Path,
    out: &Path,
    block_size: u32,
    keep_going: &mut dyn FnMut() -> bool,
) -> Result<LayerInfo, DiskError> {
    let len = file
        .metadata()
        .map_err(DiskError::io(raw, "stat raw image"))?
        .len();
    if len == 0 || len % SECTOR != 0 {
        return Err(DiskError::Input {
            path: raw.to_path_buf(),
            problem: format!(
                "raw image of {len} bytes: the size must be a non-zero multiple of {SECTOR}"
            ),
        });
    }
    let geometry = Geometry {
        disk_bytes: len,
        block_size,
    };
    let new = NewLayer {
        id: Id::random(),
        parent: None,
        geometry,
    };
    let stopped = || {
        DiskError::io(raw, "read raw image")(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the import was cancelled",
        ))
    };
    if !keep_going() {
        return Err(stopped());
    }
    let layer = build_layer(out, &new, true, |layer| {
        let mut buf = vec![0u8; block_size as usize];
        for block in 0..geometry.blocks() {
            if block % BLOCKS_PER_CHECK == 0 && block > 0 && !keep_going() {
                return Err(stopped());
            }
            let data = &mut buf[..geometry.block_len(block)];
            file.read_exact_at(data, block * u64::from(block_size))
                .map_err(DiskError::io(raw, "read raw image"))?;
            if !is_zero(data) {
                layer.put_block(block, data)?;
            }
        }
        Ok(())
    })?;
    Ok(layer.info())
}

impl Disk {
    /// Writes what the disk reads as a raw image at `out` (sparse: blocks no layer holds and
    /// zero blocks are holes), atomically (temporary file, then rename). Every block read is
    /// checked against its CRC.
    ///
    /// # Errors
    /// A [`DiskError::BlockChecksum`] for damaged data, or the I/O error naming the file.
    pub fn export_raw(&self, out: &Path) -> Result<(), DiskError> {
        let tmp = AtomicFile::create(out).map_err(|e| DiskError::Io {
            path: out.to_path_buf(),
            op: e.op,
            error: e.source,
        })?;
        let geometry = self.geometry();
        tmp.file()
            .set_len(geometry.disk_bytes)
            .map_err(DiskError::io(out, "size raw image"))?;
        self.with_chain(|chain| {
            let mut buf = vec![0u8; geometry.block_size as usize];
            for block in chain.allocated_blocks() {
                let data = &mut buf[..geometry.block_len(block)];
                chain.read_block_checked(block, data)?;
                if !is_zero(data) {
                    tmp.file()
                        .write_all_at(data, block * u64::from(geometry.block_size))
                        .map_err(DiskError::io(out, "write raw image"))?;
                }
            }
            Ok(())
        })?;
        tmp.commit().map_err(|e| DiskError::Io {
            path: out.to_path_buf(),
            op: e.op,
            error: e.source,
        })
    }

    /// Writes what the disk reads as one sealed base layer at `out` (non-zero blocks only), with
    /// a new id, atomically. A chain's child can then be re-pointed at it with
    /// [`relink_parent`](crate::relink_parent) (the content is the same, the link is not).
    ///
    /// # Errors
    /// A [`DiskError::BlockChecksum`] for damaged data, or the I/O error naming the file.
    pub fn flatten(&self, out: &Path) -> Result<LayerInfo, DiskError> {
        let geometry = self.geometry();
        let new = NewLayer {
            id: Id::random(),
            parent: None,
            geometry,
        };
        let layer = self.with_chain(|chain| {
            build_layer(out, &new, true, |layer| {
                let mut buf = vec![0u8; geometry.block_size as usize];
                for block in chain.allocated_blocks() {
                    let data = &mut buf[..geometry.block_len(block)];
                    chain.read_block_checked(block, data)?;
                    if !is_zero(data) {
                        layer.put_block(block, data)?;
                    }
                }
                Ok(())
            })
        })?;
        Ok(layer.info())
    }
}
