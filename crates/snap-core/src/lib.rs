//! Core building blocks shared by every part of the snapshot system.
//!
//! The main item is [`FormatSpec`]: a description of one kind of file the
//! project writes (its magic bytes, the version this build writes, the oldest
//! version it still reads and a size cap). Every file starts with the same
//! 32-byte, checksummed header ([`HEADER_LEN`]), followed by an opaque payload.
//!
//! ```
//! use snap_core::{FormatSpec, HEADER_LEN};
//!
//! const NOTES: FormatSpec = FormatSpec {
//!     name: "notes",
//!     magic: *b"SNAPNOTE",
//!     version: 1,
//!     min_version: 1,
//!     max_payload: 1 << 20,
//! };
//!
//! let bytes = NOTES.encode(b"hello");
//! assert_eq!(bytes.len(), HEADER_LEN + 5);
//! let decoded = NOTES.decode(&bytes)?;
//! assert_eq!(decoded.version, 1);
//! assert_eq!(decoded.payload, b"hello");
//! # Ok::<(), snap_core::FormatError>(())
//! ```
#![forbid(unsafe_code)]

pub mod atomic;
pub mod checksum;
pub mod format;
pub mod id;
pub mod layer_ref;

pub use atomic::{AtomicFile, AtomicFileError};
pub use checksum::{crc32c, crc32c_append};
pub use format::{
    Decoded, FileError, FileErrorKind, FileOp, FormatError, FormatErrorKind, FormatSpec,
    HEADER_LEN, HeaderInfo,
};
pub use id::{Id, ParseIdError};
pub use layer_ref::{Digest, ParentRef};
