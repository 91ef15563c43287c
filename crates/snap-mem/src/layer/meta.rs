//! Plain data describing a layer: its parent reference, digest, writer options and summary.

use std::num::NonZeroUsize;

use snap_core::Id;

use super::error::LayerError;

/// Bytes per page.
pub const PAGE: usize = 4096;
/// Smallest frame size (bytes of guest memory per frame).
pub const MIN_FRAME_SIZE: u32 = 64 << 10;
/// Largest frame size.
pub const MAX_FRAME_SIZE: u32 = 2 << 20;
/// Frame size used unless the options say otherwise.
pub const DEFAULT_FRAME_SIZE: u32 = 256 << 10;
/// zstd level used unless the options say otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Largest memory a layer may describe (1 TiB); readers refuse larger claims.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;

pub use snap_core::{Digest, ParentRef};

/// How a layer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerOptions {
    /// Bytes of guest memory per frame: a power of two in
    /// [`MIN_FRAME_SIZE`]`..=`[`MAX_FRAME_SIZE`]. Match it to the restore unit.
    pub frame_size: u32,
    /// zstd compression level (zstd's range; 1 is fast and is the default).
    pub zstd_level: i32,
    /// Compression threads; `None` uses every core ([`std::thread::available_parallelism`]).
    pub threads: Option<NonZeroUsize>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        Self {
            frame_size: DEFAULT_FRAME_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            threads: None,
        }
    }
}

impl LayerOptions {
    /// Checks the frame size and the zstd level.
    ///
    /// ```
    /// use snap_mem::layer::LayerOptions;
    /// assert!(LayerOptions::default().validate().is_ok());
    /// let odd = LayerOptions { frame_size: 100_000, ..LayerOptions::default() };
    /// assert!(odd.validate().is_err());
    /// ```
    ///
    /// # Errors
    /// [`LayerError::Options`] naming the bad value.
    pub fn validate(&self) -> Result<(), LayerError> {
        check_frame_size(self.frame_size).map_err(|problem| LayerError::Options { problem })?;
        if !zstd::compression_level_range().contains(&self.zstd_level) {
            return Err(LayerError::Options {
                problem: format!(
                    "zstd level {} is outside {:?}",
                    self.zstd_level,
                    zstd::compression_level_range()
                ),
            });
        }
        Ok(())
    }

    /// The number of worker threads to use.
    #[must_use]
    pub fn thread_count(&self) -> usize {
        self.threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get)
    }
}

/// Checks a frame size; the error text says why it is refused.
pub(crate) fn check_frame_size(frame_size: u32) -> Result<(), String> {
    if !frame_size.is_power_of_two() || !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&frame_size) {
        return Err(format!(
            "frame size {frame_size} bytes is not a power of two in {MIN_FRAME_SIZE}..={MAX_FRAME_SIZE}"
        ));
    }
    Ok(())
}

/// Identity of a layer to write: what the index records besides the frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewLayer {
    /// The new layer's id.
    pub id: Id,
    /// The layer it applies on top of (`None` for a full layer).
    pub parent: Option<ParentRef>,
    /// Size of guest memory in bytes (a multiple of 4096).
    pub memory_bytes: u64,
}

/// Summary of a written or opened layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The layer's id.
    pub id: Id,
    /// The layer's digest (what a child's [`ParentRef`] names).
    pub digest: Digest,
    /// The layer it applies on top of.
    pub parent: Option<ParentRef>,
    /// Size of guest memory in bytes.
    pub memory_bytes: u64,
    /// Bytes of guest memory per frame.
    pub frame_size: u32,
    /// zstd level the frames were written with.
    pub zstd_level: i32,
    /// Entries in the frame table (regions holding at least one page of the layer).
    pub frames: usize,
    /// Pages the layer holds (zero entries included).
    pub pages_present: u64,
    /// Pages stored with data (non-zero pages).
    pub pages_stored: u64,
    /// Size of the layer file in bytes.
    pub stored_bytes: u64,
}

impl LayerInfo {
    /// The reference a child of this layer carries.
    #[must_use]
    pub fn as_parent(&self) -> ParentRef {
        ParentRef {
            id: self.id,
            digest: self.digest,
        }
    }

    /// Pages of guest memory.
    #[must_use]
    pub fn memory_pages(&self) -> u64 {
        self.memory_bytes / PAGE as u64
    }
}

/// One frame of a layer, as the index describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// The pages of memory the frame's region covers (clipped to the end of memory).
    pub pages: std::ops::Range<u64>,
    /// Pages of the region the layer holds (zero entries included).
    pub present_pages: usize,
    /// Pages stored with data in the frame.
    pub stored_pages: usize,
    /// File offset of the compressed bytes.
    pub offset: u64,
    /// Length of the compressed bytes (0 if the frame stores no data).
    pub compressed_len: u32,
    /// CRC-32C of the compressed bytes.
    pub crc: u32,
}

/// What a layer holds for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageEntry {
    /// The page is zero in this layer (overrides the parent).
    Zero,
    /// The page's bytes are slot `slot` of frame `frame`'s decompressed data.
    Data {
        /// Index in the frame table.
        frame: usize,
        /// Position among the frame's stored pages.
        slot: usize,
    },
}
