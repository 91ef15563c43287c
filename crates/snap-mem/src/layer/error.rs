//! Errors of memory layer operations; each names the file and, for frame data, the frame.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;

use snap_core::FormatError;

use super::meta::ParentRef;

/// Why a memory layer could not be written, opened, read, merged or restored.
///
/// Messages name the file (and the frame and its pages, for frame data), e.g.
/// `memory layer /x/3.mlayer: frame 17 (pages 4352..4416): checksum mismatch (index 0x1234abcd,
/// data 0x0badf00d)`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The writer's options are out of range.
    #[error("invalid memory layer options: {problem}")]
    Options {
        /// What is wrong.
        problem: String,
    },
    /// A file operation failed.
    #[error("memory layer {}: {op}: {error}", path.display())]
    Io {
        /// The layer file (or its directory).
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// The header, superblock or index section failed a snap-core format check.
    #[error("memory layer {}: {error}", path.display())]
    Format {
        /// The layer file.
        path: PathBuf,
        /// The failed check.
        error: FormatError,
    },
    /// The superblock or the index is well formed but not consistent.
    #[error("memory layer {}: {problem}", path.display())]
    Corrupt {
        /// The layer file.
        path: PathBuf,
        /// What is inconsistent.
        problem: String,
    },
    /// One frame's data is damaged.
    #[error("memory layer {}: frame {frame} (pages {}..{}): {problem}", path.display(), pages.start, pages.end)]
    Frame {
        /// The layer file.
        path: PathBuf,
        /// Index of the frame in the layer's frame table.
        frame: usize,
        /// The pages of memory the frame's region covers.
        pages: Range<u64>,
        /// What is wrong with it.
        problem: FrameProblem,
    },
    /// The pages given to the writer are not strictly increasing or lie outside memory.
    #[error("memory layer {}: bad page list: {problem}", path.display())]
    PageList {
        /// The layer file being written.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The page source failed while the layer was written.
    #[error("memory layer {}: reading pages {}..{} from the page source: {error}", path.display(), pages.start, pages.end)]
    Source {
        /// The layer file being written.
        path: PathBuf,
        /// The pages being read.
        pages: Range<u64>,
        /// The source's error.
        error: io::Error,
    },
    /// The target memory refused a write or a discard while a chain was restored.
    #[error("restoring pages {}..{} into memory: {error}", pages.start, pages.end)]
    Sink {
        /// The pages being written or zeroed.
        pages: Range<u64>,
        /// The target's error.
        error: io::Error,
    },
    /// A page number past the end of memory was asked for.
    #[error("memory layer {}: page {page} is outside memory ({pages} pages)", path.display())]
    PageOutOfRange {
        /// The layer file (the newest of a chain).
        path: PathBuf,
        /// The page asked for.
        page: u64,
        /// Pages of memory.
        pages: u64,
    },
    /// A layer does not name the layer before it in a chain as its parent.
    #[error(
        "memory layer {}: wrong parent: the chain needs {}, the file names {}",
        path.display(), show_parent(expected.as_ref()), show_parent(found.as_ref())
    )]
    WrongParent {
        /// The layer file.
        path: PathBuf,
        /// The reference it should carry (the previous layer's id and digest; none for the first).
        expected: Option<ParentRef>,
        /// The reference it carries.
        found: Option<ParentRef>,
    },
    /// The page source or the target memory is not the size of memory the layer describes.
    #[error("memory layer {}: describes {layer_bytes} bytes of memory, but the {what} has {other_bytes}", path.display())]
    MemorySize {
        /// The layer file (the newest of a chain).
        path: PathBuf,
        /// `"page source"` or `"target memory"`.
        what: &'static str,
        /// Memory size the layer describes.
        layer_bytes: u64,
        /// Size of the source or target.
        other_bytes: u64,
    },
    /// A layer's memory size differs from the rest of its chain.
    #[error("memory layer {}: memory size {found} bytes, but the chain has {expected} bytes", path.display())]
    SizeMismatch {
        /// The layer file.
        path: PathBuf,
        /// Memory size of the chain.
        expected: u64,
        /// Memory size of this layer.
        found: u64,
    },
    /// A chain needs at least one layer.
    #[error("a memory layer chain needs at least one layer")]
    EmptyChain,
}

fn show_parent(p: Option<&ParentRef>) -> String {
    p.map_or_else(|| "no parent".to_string(), ParentRef::to_string)
}

/// What is wrong with one frame's data.
#[derive(Debug)]
#[non_exhaustive]
pub enum FrameProblem {
    /// The compressed bytes do not match the checksum recorded in the index.
    Checksum {
        /// CRC-32C recorded in the index.
        expected: u32,
        /// CRC-32C of the bytes in the file.
        found: u32,
    },
    /// zstd refused the bytes.
    Decompress(io::Error),
    /// The frame decompressed to a different length than its data pages need.
    Length {
        /// Bytes the index's data bitmap implies.
        expected: usize,
        /// Bytes zstd produced.
        found: usize,
    },
    /// The frame's bytes could not be read.
    Read(io::Error),
}

impl fmt::Display for FrameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Checksum { expected, found } => write!(
                f,
                "checksum mismatch (index {expected:#010x}, data {found:#010x})"
            ),
            Self::Decompress(e) => write!(f, "cannot decompress: {e}"),
            Self::Length { expected, found } => write!(
                f,
                "decompressed to {found} bytes, the index says {expected}"
            ),
            Self::Read(e) => write!(f, "cannot read: {e}"),
        }
    }
}
