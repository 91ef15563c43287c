//! Copying one sealed layer elsewhere block by block (to a remote store and back): its blocks
//! are read and checked one at a time, and a copy is built from blocks that come from anywhere.

use std::path::Path;

use crate::build::build_layer;
use crate::error::DiskError;
use crate::layer::LayerFile;
use crate::meta::{LayerInfo, NewLayer};

/// A sealed layer open for reading its own blocks (not the chain's).
pub struct LayerBlocks {
    layer: LayerFile,
    blocks: Vec<u64>,
}

impl std::fmt::Debug for LayerBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBlocks")
            .field("path", &self.layer.path())
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl LayerBlocks {
    /// Opens the sealed layer at `path` read-only, checking its superblocks and map.
    ///
    /// # Errors
    /// The errors of opening a layer, or [`DiskError::NotSealed`] for a writable one (its
    /// blocks may still change).
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let layer = LayerFile::open(path, false)?;
        if !layer.sealed() {
            return Err(DiskError::NotSealed {
                path: path.to_path_buf(),
                what: "only a sealed layer's blocks can be copied",
            });
        }
        let mut blocks: Vec<u64> = layer.map().keys().copied().collect();
        blocks.sort_unstable();
        Ok(Self { layer, blocks })
    }

    /// The layer's summary.
    #[must_use]
    pub fn info(&self) -> LayerInfo {
        self.layer.info()
    }

    /// The blocks the layer holds, in increasing order.
    #[must_use]
    pub fn blocks(&self) -> &[u64] {
        &self.blocks
    }

    /// The whole of `block` (its block length), checked against its CRC.
    ///
    /// # Errors
    /// [`DiskError::OutOfRange`] if the layer does not hold `block`,
    /// [`DiskError::BlockChecksum`] if its data is damaged, or the I/O error.
    pub fn read_block(&self, block: u64) -> Result<Vec<u8>, DiskError> {
        let geometry = self.layer.geometry();
        if !self.layer.map().contains_key(&block) {
            return Err(DiskError::OutOfRange {
                offset: block.saturating_mul(u64::from(geometry.block_size)),
                len: u64::from(geometry.block_size),
                size: geometry.disk_bytes,
            });
        }
        let mut buf = vec![0u8; geometry.block_len(block)];
        self.layer.read_block_checked(block, &mut buf)?;
        Ok(buf)
    }
}

/// Builds the sealed layer `new` at `out` holding `blocks` (strictly increasing, inside the
/// disk), each one's data from `fetch` (its block length). The file appears complete or not at
/// all. A layer built from the same id, geometry and block contents has the same digest as the
/// one they were copied from, so the copy of a chain links like the original.
///
/// # Errors
/// [`DiskError::Input`] naming `out` for blocks out of order or outside the disk, or data of the
/// wrong length; `fetch`'s error as an I/O error; or the I/O error of writing.
pub fn build_sealed_layer(
    out: &Path,
    new: &NewLayer,
    blocks: &[u64],
    mut fetch: impl FnMut(u64) -> std::io::Result<Vec<u8>>,
) -> Result<LayerInfo, DiskError> {
    new.geometry.validate()?;
    let input = |problem: String| DiskError::Input {
        path: out.to_path_buf(),
        problem,
    };
    let total = new.geometry.blocks();
    for (i, &b) in blocks.iter().enumerate() {
        if b >= total {
            return Err(input(format!(
                "block {b} is outside the disk ({total} blocks)"
            )));
        }
        if i > 0 && blocks[i - 1] >= b {
            return Err(input(format!(
                "block {b} follows block {} (blocks must increase)",
                blocks[i - 1]
            )));
        }
    }
    let layer = build_layer(out, new, true, |layer| {
        for &b in blocks {
            let data = fetch(b).map_err(DiskError::io(out, "fetch block"))?;
            let want = new.geometry.block_len(b);
            if data.len() != want {
                return Err(input(format!(
                    "block {b}: {} bytes of data, its length is {want}",
                    data.len()
                )));
            }
            layer.put_block(b, &data)?;
        }
        Ok(())
    })?;
    Ok(layer.info())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Geometry};
    use snap_core::Id;

    #[test]
    fn a_chain_copied_block_by_block_links_and_reads_like_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let disk = Disk::create(&p("0"), Geometry::new(1 << 20)).unwrap();
        disk.write_at(0, &[1u8; 4096]).unwrap();
        disk.write_at(300 << 10, &[2u8; 512]).unwrap();
        let base = disk.seal(&p("1")).unwrap();
        disk.write_at(512, &[3u8; 512]).unwrap();
        let delta = disk.seal(&p("2")).unwrap();

        let mut copied = Vec::new();
        let mut parent = None;
        for (i, info) in [&base, &delta].into_iter().enumerate() {
            let src = LayerBlocks::open(&info.path).unwrap();
            assert_eq!(src.info().id, info.id);
            let out = p(&format!("copy{i}"));
            let new = NewLayer {
                id: info.id,
                parent,
                geometry: info.geometry,
            };
            let made =
                build_sealed_layer(&out, &new, src.blocks(), |b| Ok(src.read_block(b).unwrap()))
                    .unwrap();
            assert_eq!(made.digest, info.digest, "same content, same digest");
            parent = made.as_parent();
            copied.push(out);
        }
        let a = Disk::open_read_only(&[&base.path, &delta.path]).unwrap();
        let b = Disk::open_read_only(&copied).unwrap();
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        a.read_at(0, &mut x).unwrap();
        b.read_at(0, &mut y).unwrap();
        assert!(x == y);
        assert_eq!(&y[..2], &[1, 1]);
        assert_eq!(y[512], 3);
    }

    #[test]
    fn bad_block_lists_and_writable_layers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x");
        let new = NewLayer {
            id: Id::random(),
            parent: None,
            geometry: Geometry::new(1 << 20),
        };
        let zeros = |_| Ok(vec![0u8; 65536]);
        let e = build_sealed_layer(&out, &new, &[3, 2], zeros).unwrap_err();
        assert!(e.to_string().contains("must increase"), "{e}");
        let e = build_sealed_layer(&out, &new, &[16], zeros).unwrap_err();
        assert!(e.to_string().contains("outside the disk"), "{e}");
        let e = build_sealed_layer(&out, &new, &[1], |_| Ok(vec![0; 10])).unwrap_err();
        assert!(e.to_string().contains("10 bytes"), "{e}");
        assert!(!out.exists(), "nothing is left behind");

        let disk = Disk::create(&dir.path().join("top"), Geometry::new(1 << 20)).unwrap();
        drop(disk);
        let e = LayerBlocks::open(&dir.path().join("top")).unwrap_err();
        assert!(matches!(e, DiskError::NotSealed { .. }), "{e}");
    }
}
