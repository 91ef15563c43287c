//! The one error type of disk layer operations; each message names the file and what is wrong.

use std::io;
use std::path::PathBuf;

use snap_core::{FormatError, Id};

use crate::meta::ParentRef;

/// Why a disk layer or chain could not be created, opened, read, written, merged or exported.
///
/// Messages name the file and say what is wrong, e.g.
/// `disk layer /x/2.dlayer: wrong parent: the chain needs layer 5f.. (digest 9a..), the file
/// names layer 77.. (digest 01..)`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// Options (disk size, block size) are out of range.
    #[error("invalid disk options: {problem}")]
    Options {
        /// What is wrong and what is accepted.
        problem: String,
    },
    /// A file operation failed.
    #[error("disk layer {}: {op}: {error}", path.display())]
    Io {
        /// The file (or its directory).
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        error: io::Error,
    },
    /// A superblock or map chunk failed a snap-core format check (magic, checksum, version).
    #[error("disk layer {}: {what}: {error}", path.display())]
    Format {
        /// The layer file.
        path: PathBuf,
        /// Which structure: `"superblock A"`, `"superblock B"`, `"map chunk in slot 7"`, ...
        what: String,
        /// The failed check.
        error: FormatError,
    },
    /// The metadata is well formed but not consistent.
    #[error("disk layer {}: {problem}", path.display())]
    Corrupt {
        /// The layer file.
        path: PathBuf,
        /// What is inconsistent.
        problem: String,
    },
    /// The file is shorter than its superblock says.
    #[error(
        "disk layer {}: truncated: the file is {found} bytes, its superblock needs at least {needed} \
         (the file was cut short; restore it from a copy)",
        path.display()
    )]
    Truncated {
        /// The layer file.
        path: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// A block's data does not match the checksum its map entry records.
    #[error(
        "disk layer {}: block {block} (slot {slot}): checksum mismatch (map {expected:#010x}, data {found:#010x})",
        path.display()
    )]
    BlockChecksum {
        /// The layer file.
        path: PathBuf,
        /// Block number on the disk.
        block: u64,
        /// Slot in the file holding it.
        slot: u64,
        /// CRC-32C recorded in the map.
        expected: u32,
        /// CRC-32C of the bytes in the file.
        found: u32,
    },
    /// A layer does not name the layer before it in a chain as its parent.
    #[error(
        "disk layer {}: wrong parent: the chain needs {}, the file names {} \
         (the parent changed since this layer was written, or the chain is in the wrong order)",
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
    /// A layer's disk size or block size differs from the rest of its chain.
    #[error(
        "disk layer {}: {found_bytes} bytes in {found_block}-byte blocks, but the chain has \
         {expected_bytes} bytes in {expected_block}-byte blocks",
        path.display()
    )]
    Geometry {
        /// The layer file.
        path: PathBuf,
        /// Disk size of the chain.
        expected_bytes: u64,
        /// Block size of the chain.
        expected_block: u32,
        /// Disk size of this layer.
        found_bytes: u64,
        /// Block size of this layer.
        found_block: u32,
    },
    /// A write to a sealed layer (or to a chain opened read-only).
    #[error(
        "disk layer {}: read-only ({reason}); writes go to a new top layer (Disk::seal or create_layer)",
        path.display()
    )]
    ReadOnly {
        /// The top layer.
        path: PathBuf,
        /// `"sealed"` or `"chain opened read-only"`.
        reason: &'static str,
    },
    /// An operation needs a sealed layer (a parent in a chain, a merge input).
    #[error("disk layer {}: not sealed: {what}", path.display())]
    NotSealed {
        /// The layer file.
        path: PathBuf,
        /// Why it must be sealed.
        what: &'static str,
    },
    /// An I/O request is not aligned to 512 bytes.
    #[error("I/O at offset {offset} of {len} bytes: offset and length must be multiples of 512")]
    Unaligned {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
    },
    /// An I/O request reaches past the end of the disk.
    #[error("I/O at offset {offset} of {len} bytes reaches past the end of the {size}-byte disk")]
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A layer has no room for more slots (it never needs more than about three per block).
    #[error("disk layer {}: full: {slots} slots in use, the limit for this disk is {limit}", path.display())]
    LayerFull {
        /// The layer file.
        path: PathBuf,
        /// Slots in use.
        slots: u64,
        /// Largest slot count.
        limit: u64,
    },
    /// An input file (a raw image) is unusable.
    #[error("{}: {problem}", path.display())]
    Input {
        /// The input file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A chain needs at least one layer.
    #[error("a disk chain needs at least one layer")]
    EmptyChain,
    /// A layer id asked for is not in the chain, or not in the order asked.
    #[error("layer {id} is not in this chain{detail}")]
    NotInChain {
        /// The id asked for.
        id: Id,
        /// More context (empty or `" after layer ..."`).
        detail: String,
    },
    /// A layer index asked for is outside the chain or has no neighbour to merge with.
    #[error("no layer pair at index {index} in a chain of {layers} layer(s)")]
    BadIndex {
        /// The index asked for.
        index: usize,
        /// Layers in the chain.
        layers: usize,
    },
    /// An earlier write failed part way; the disk refuses writes and flushes so the partial
    /// write is never committed.
    #[error("disk layer {}: an earlier write failed ({reason}); reopen the disk", path.display())]
    Broken {
        /// The top layer.
        path: PathBuf,
        /// The first failure.
        reason: String,
    },
    /// A block of a layer whose blocks arrive on demand (see [`crate::fill`]) could not be had
    /// from its source.
    #[error("disk layer {}: block {block} could not be fetched: {problem}", path.display())]
    Fetch {
        /// The layer file.
        path: PathBuf,
        /// Block number on the disk.
        block: u64,
        /// Why: the source's error, or bytes that do not match the layer's map.
        problem: String,
    },
    /// A layer whose blocks are still arriving (see [`crate::fill`]) cannot be written into.
    #[error(
        "disk layer {}: its blocks are still arriving from their source: it cannot be written into until it is whole",
        path.display()
    )]
    Incomplete {
        /// The layer file.
        path: PathBuf,
    },
}

fn show_parent(p: Option<&ParentRef>) -> String {
    p.map_or_else(|| "no parent".to_string(), ParentRef::to_string)
}

impl DiskError {
    /// The [`io::ErrorKind`] that says what happened, for callers that speak `std::io` (a
    /// virtio-blk backend, say):
    ///
    /// - [`StorageFull`](io::ErrorKind::StorageFull) when the filesystem is full (`ENOSPC`) or
    ///   the layer has no slot left ([`DiskError::LayerFull`]);
    ///   [`QuotaExceeded`](io::ErrorKind::QuotaExceeded) for an exceeded quota (`EDQUOT`). A
    ///   write or flush that fails so leaves the disk usable: it succeeds once there is room.
    /// - [`InvalidData`](io::ErrorKind::InvalidData) for damaged files: a block whose data fails
    ///   its checksum, corrupt or truncated metadata, a wrong parent or geometry.
    /// - [`InvalidInput`](io::ErrorKind::InvalidInput) for requests that can never succeed
    ///   (unaligned or out of range I/O, bad options, unknown layers).
    /// - [`ReadOnlyFilesystem`](io::ErrorKind::ReadOnlyFilesystem) for writes to a sealed or
    ///   read-only chain.
    /// - [`ResourceBusy`](io::ErrorKind::ResourceBusy) for a layer whose blocks are still
    ///   arriving, opened to be written into.
    /// - the OS error's own kind for other I/O errors, and
    ///   [`Other`](io::ErrorKind::Other) for a disk that refuses writes after an earlier failure
    ///   or a block its source could not give.
    #[must_use]
    pub fn io_kind(&self) -> io::ErrorKind {
        use io::ErrorKind as K;
        match self {
            Self::Io { error, .. } => error.kind(),
            Self::LayerFull { .. } => K::StorageFull,
            Self::Format { .. }
            | Self::Corrupt { .. }
            | Self::Truncated { .. }
            | Self::BlockChecksum { .. }
            | Self::WrongParent { .. }
            | Self::Geometry { .. } => K::InvalidData,
            Self::Options { .. }
            | Self::Unaligned { .. }
            | Self::OutOfRange { .. }
            | Self::NotSealed { .. }
            | Self::Input { .. }
            | Self::EmptyChain
            | Self::NotInChain { .. }
            | Self::BadIndex { .. } => K::InvalidInput,
            Self::ReadOnly { .. } => K::ReadOnlyFilesystem,
            Self::Broken { .. } | Self::Fetch { .. } => K::Other,
            Self::Incomplete { .. } => K::ResourceBusy,
        }
    }

    /// Whether this is a lack of room (a full filesystem, an exceeded quota, a full layer):
    /// something freeing space cures, not damage.
    pub(crate) fn is_out_of_space(&self) -> bool {
        matches!(
            self.io_kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
    }

    pub(crate) fn io(path: &std::path::Path, op: &'static str) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |error| Self::Io { path, op, error }
    }

    pub(crate) fn corrupt(path: &std::path::Path, problem: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// An [`io::Error`] of kind [`DiskError::io_kind`] whose message is the `DiskError`'s;
/// [`io::Error::get_ref`] gives the `DiskError` back.
impl From<DiskError> for io::Error {
    fn from(e: DiskError) -> Self {
        Self::new(e.io_kind(), e)
    }
}
