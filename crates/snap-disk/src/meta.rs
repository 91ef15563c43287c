//! Plain data describing layers: geometry limits, digests, parent references and summaries.

use std::path::PathBuf;

use snap_core::Id;

use crate::error::DiskError;

/// I/O granularity: offsets and lengths of reads and writes are multiples of this.
pub const SECTOR: u64 = 512;
/// Smallest block size.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 2 << 20;
/// Block size used unless the options say otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Largest disk a layer may describe (16 TiB); readers refuse larger claims.
pub const MAX_DISK_BYTES: u64 = 1 << 44;

pub use snap_core::{Digest, ParentRef};

/// Size and block size of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Disk size in bytes: a multiple of [`SECTOR`], at most [`MAX_DISK_BYTES`].
    pub disk_bytes: u64,
    /// Block size in bytes: a power of two in [`MIN_BLOCK_SIZE`]`..=`[`MAX_BLOCK_SIZE`].
    pub block_size: u32,
}

impl Geometry {
    /// A disk of `disk_bytes` in [`DEFAULT_BLOCK_SIZE`] blocks.
    #[must_use]
    pub fn new(disk_bytes: u64) -> Self {
        Self {
            disk_bytes,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }

    /// Checks both sizes.
    ///
    /// ```
    /// use snap_disk::Geometry;
    /// assert!(Geometry::new(1 << 30).validate().is_ok());
    /// assert!(Geometry { disk_bytes: 1000, block_size: 65536 }.validate().is_err());
    /// assert!(Geometry { disk_bytes: 1 << 20, block_size: 3000 }.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`DiskError::Options`] naming the bad value and the accepted range.
    pub fn validate(&self) -> Result<(), DiskError> {
        self.problem()
            .map_or(Ok(()), |problem| Err(DiskError::Options { problem }))
    }

    pub(crate) fn problem(&self) -> Option<String> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Some(format!(
                "block size {bs} bytes is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            ));
        }
        let n = self.disk_bytes;
        if n == 0 || n % SECTOR != 0 || n > MAX_DISK_BYTES {
            return Some(format!(
                "disk size {n} bytes is not a non-zero multiple of {SECTOR} up to {MAX_DISK_BYTES}"
            ));
        }
        None
    }

    /// Blocks of the disk (the last one may be partial).
    #[must_use]
    pub fn blocks(&self) -> u64 {
        self.disk_bytes.div_ceil(u64::from(self.block_size))
    }

    /// Bytes of `block` inside the disk (the block size, or less for a partial last block).
    #[must_use]
    pub fn block_len(&self, block: u64) -> usize {
        let bs = u64::from(self.block_size);
        (self.disk_bytes - block * bs).min(bs) as usize
    }
}

/// Identity of a layer to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewLayer {
    /// The new layer's id.
    pub id: Id,
    /// The sealed layer it applies on top of (`None` for a base).
    pub parent: Option<ParentRef>,
    /// Disk size and block size (a child's must equal its parent's).
    pub geometry: Geometry,
}

/// Summary of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The layer file.
    pub path: PathBuf,
    /// The layer's id.
    pub id: Id,
    /// The layer it applies on top of.
    pub parent: Option<ParentRef>,
    /// The layer's digest; `None` while the layer is writable.
    pub digest: Option<Digest>,
    /// Disk size and block size.
    pub geometry: Geometry,
    /// Blocks the layer holds.
    pub blocks: u64,
    /// Slots the file has room for (data, map chunks, free).
    pub slots: u64,
    /// Commit generation of the superblock in use.
    pub generation: u64,
}

impl LayerInfo {
    /// Whether the layer is sealed (read-only, with a digest).
    #[must_use]
    pub fn sealed(&self) -> bool {
        self.digest.is_some()
    }

    /// The reference a child of this layer carries; `None` while it is not sealed.
    #[must_use]
    pub fn as_parent(&self) -> Option<ParentRef> {
        self.digest.map(|digest| ParentRef {
            id: self.id,
            digest,
        })
    }
}
