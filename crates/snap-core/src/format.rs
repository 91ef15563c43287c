//! The versioned binary header shared by every file the project writes.
//!
//! # Layout
//!
//! Every file is a fixed [`HEADER_LEN`]-byte header followed by the payload.
//! All integers are little endian.
//!
//! | offset | size | field            | meaning                                      |
//! |-------:|-----:|------------------|----------------------------------------------|
//! |      0 |    8 | `magic`          | identifies the kind of file                  |
//! |      8 |    4 | `version`        | format version of the payload                |
//! |     12 |    4 | `flags`          | reserved, must be 0                          |
//! |     16 |    8 | `payload_len`    | payload length in bytes                      |
//! |     24 |    4 | `payload_crc32c` | CRC-32C of the payload                       |
//! |     28 |    4 | `header_crc32c`  | CRC-32C of header bytes `0..28`              |
//!
//! The payload must follow the header exactly: a file that is shorter or
//! longer than `HEADER_LEN + payload_len` is rejected.
//!
//! # Checks
//!
//! [`FormatSpec::decode`] and [`FormatSpec::read_file`] validate, in this
//! order: the header is complete, the magic matches, the header checksum
//! matches, the version is supported, no flags are set, the payload length is
//! within [`FormatSpec::max_payload`], the payload is complete, there are no
//! trailing bytes, and finally the payload checksum matches. The first failed
//! check is reported.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::atomic::AtomicFile;
use crate::checksum::crc32c;

/// Length in bytes of the header that starts every file.
pub const HEADER_LEN: usize = 32;

/// Number of header bytes covered by the header checksum (everything before it).
const HEADER_CRC_OFFSET: usize = 28;

/// Describes one kind of file the project writes.
///
/// A spec is plain data and is normally declared as a `const`:
///
/// ```
/// use snap_core::FormatSpec;
///
/// const VM_STATE: FormatSpec = FormatSpec {
///     name: "vm state",
///     magic: *b"SNAPVMST",
///     version: 2,
///     min_version: 1,
///     max_payload: 64 << 20,
/// };
///
/// let bytes = VM_STATE.encode(&[1, 2, 3]);
/// let decoded = VM_STATE.decode(&bytes)?;
/// assert_eq!(decoded.version, 2);
/// assert_eq!(decoded.payload, &[1, 2, 3]);
/// # Ok::<(), snap_core::FormatError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FormatSpec {
    /// Human-readable name of the file kind (e.g. `"vm state"`), used as
    /// the prefix of every error message.
    pub name: &'static str,
    /// Magic bytes at the start of the file identifying its kind.
    pub magic: [u8; 8],
    /// Version this build writes; also the newest version it reads.
    pub version: u32,
    /// Oldest version this build reads. Must be `<= version`.
    pub min_version: u32,
    /// Largest payload, in bytes, this build accepts when reading (and
    /// writes with [`FormatSpec::write_file`]). Protects against hostile or
    /// corrupt files claiming huge lengths.
    pub max_payload: u64,
}

/// A successfully decoded file: the version it was written with and a view
/// of its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Format version recorded in the header, within
    /// `min_version..=version` of the spec that decoded it.
    pub version: u32,
    /// The payload bytes, checksum-verified.
    pub payload: &'a [u8],
}

/// Header fields that passed every header-level check.
///
/// Returned by [`FormatSpec::decode_header`] for readers that stream a large
/// payload instead of holding it in memory; such a reader checks
/// `payload_crc` itself once it has read the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    /// Format version recorded in the header.
    pub version: u32,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// CRC-32C of the payload, as recorded in the header.
    pub payload_crc: u32,
}

type Header = HeaderInfo;

impl FormatSpec {
    /// Builds the header for `payload`, at this spec's current
    /// [`version`](FormatSpec::version) with no flags set.
    ///
    /// This does not enforce [`max_payload`](FormatSpec::max_payload); that
    /// is a reader-side limit (and [`write_file`](FormatSpec::write_file)
    /// checks it so it never writes a file it would refuse to read).
    #[must_use]
    pub fn header(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        self.header_for(payload.len() as u64, crc32c(payload))
    }

    /// Builds the header for a payload of `payload_len` bytes whose CRC-32C is
    /// `payload_crc`, for writers that stream the payload and compute its
    /// checksum as they go (see [`crc32c_append`](crate::checksum::crc32c_append)).
    ///
    /// ```
    /// use snap_core::{crc32c, FormatSpec};
    ///
    /// const SPEC: FormatSpec = FormatSpec {
    ///     name: "example",
    ///     magic: *b"EXAMPLE\0",
    ///     version: 1,
    ///     min_version: 1,
    ///     max_payload: 1024,
    /// };
    /// assert_eq!(SPEC.header_for(3, crc32c(b"abc")), SPEC.header(b"abc"));
    /// ```
    #[must_use]
    pub fn header_for(&self, payload_len: u64, payload_crc: u32) -> [u8; HEADER_LEN] {
        debug_assert!(
            self.min_version <= self.version,
            "{}: min_version {} > version {}",
            self.name,
            self.min_version,
            self.version
        );
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&self.magic);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&0u32.to_le_bytes());
        h[16..24].copy_from_slice(&payload_len.to_le_bytes());
        h[24..28].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c(&h[..HEADER_CRC_OFFSET]);
        h[28..32].copy_from_slice(&header_crc.to_le_bytes());
        h
    }

    /// Returns the complete encoding of `payload`: header followed by payload.
    ///
    /// ```
    /// use snap_core::{FormatSpec, HEADER_LEN};
    ///
    /// const SPEC: FormatSpec = FormatSpec {
    ///     name: "example",
    ///     magic: *b"EXAMPLE\0",
    ///     version: 1,
    ///     min_version: 1,
    ///     max_payload: 1024,
    /// };
    /// let bytes = SPEC.encode(b"abc");
    /// assert_eq!(&bytes[..HEADER_LEN], &SPEC.header(b"abc"));
    /// assert_eq!(&bytes[HEADER_LEN..], b"abc");
    /// assert_eq!(SPEC.decode(&bytes)?.payload, b"abc");
    /// # Ok::<(), snap_core::FormatError>(())
    /// ```
    #[must_use]
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&self.header(payload));
        out.extend_from_slice(payload);
        out
    }

    /// Validates `bytes` (a whole file) and returns its version and payload.
    ///
    /// See the [module documentation](self) for the order of checks; the
    /// first failing check determines the error.
    ///
    /// # Errors
    ///
    /// A [`FormatError`] naming this spec and the first check that failed.
    ///
    /// ```
    /// use snap_core::{FormatErrorKind, FormatSpec};
    ///
    /// const SPEC: FormatSpec = FormatSpec {
    ///     name: "example",
    ///     magic: *b"EXAMPLE\0",
    ///     version: 1,
    ///     min_version: 1,
    ///     max_payload: 1024,
    /// };
    /// let mut bytes = SPEC.encode(b"abc");
    /// bytes.push(0);
    /// let err = SPEC.decode(&bytes).unwrap_err();
    /// assert_eq!(err.kind(), &FormatErrorKind::TrailingBytes { extra: 1 });
    /// assert_eq!(err.to_string(), "example: 1 unexpected trailing byte(s) after the payload");
    /// ```
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Decoded<'a>, FormatError> {
        let header = &bytes[..bytes.len().min(HEADER_LEN)];
        let h = self.check_header(header, bytes.len() as u64)?;
        // `check_header` verified `bytes.len() == HEADER_LEN + payload_len`.
        let payload = &bytes[HEADER_LEN..];
        self.check_payload_crc(&h, payload)?;
        Ok(Decoded {
            version: h.version,
            payload,
        })
    }

    /// Atomically writes `payload` (with its header) to `path`.
    ///
    /// The data is written to a temporary file in the same directory, flushed
    /// to disk, renamed over `path`, and the directory is then synced, so
    /// after a crash `path` holds either the old or the new contents in full.
    /// On failure the temporary file is removed.
    ///
    /// Refuses (with [`FormatErrorKind::Oversized`]) to write a payload larger
    /// than [`max_payload`](FormatSpec::max_payload), since it could not be
    /// read back.
    ///
    /// # Errors
    ///
    /// [`FileErrorKind::Io`] if any filesystem operation fails (the
    /// destination is then left untouched unless only the final directory
    /// sync failed), or [`FileErrorKind::Format`] for an oversized payload.
    pub fn write_file(&self, path: &Path, payload: &[u8]) -> Result<(), FileError> {
        let fail = |source: FileErrorKind| FileError {
            op: FileOp::Write,
            path: path.to_path_buf(),
            source,
        };
        let len = payload.len() as u64;
        if len > self.max_payload {
            return Err(fail(FileErrorKind::Format(self.error(
                FormatErrorKind::Oversized {
                    len,
                    limit: self.max_payload,
                },
            ))));
        }
        let header = self.header(payload);
        write_atomic(path, &[&header, payload]).map_err(|e| fail(FileErrorKind::Io(e)))
    }

    /// Reads and validates the file at `path`, returning its payload.
    ///
    /// The header is read and checked first; the payload length it claims is
    /// compared with [`max_payload`](FormatSpec::max_payload) and with the
    /// actual file length before any payload buffer is allocated, so a
    /// hostile header cannot trigger a huge allocation.
    ///
    /// Use [`read_file_versioned`](FormatSpec::read_file_versioned) to also
    /// learn which version the file was written with.
    ///
    /// # Errors
    ///
    /// [`FileErrorKind::Io`] if the file cannot be opened or read, or
    /// [`FileErrorKind::Format`] with the same checks, in the same order, as
    /// [`decode`](FormatSpec::decode).
    pub fn read_file(&self, path: &Path) -> Result<Vec<u8>, FileError> {
        self.read_file_versioned(path).map(|(_, payload)| payload)
    }

    /// Like [`read_file`](FormatSpec::read_file), but also returns the
    /// format version recorded in the file's header.
    ///
    /// # Errors
    ///
    /// As for [`read_file`](FormatSpec::read_file).
    pub fn read_file_versioned(&self, path: &Path) -> Result<(u32, Vec<u8>), FileError> {
        let fail = |source: FileErrorKind| FileError {
            op: FileOp::Read,
            path: path.to_path_buf(),
            source,
        };
        let io = |e: io::Error| fail(FileErrorKind::Io(e));
        let format = |e: FormatError| fail(FileErrorKind::Format(e));

        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();

        let mut header = [0u8; HEADER_LEN];
        let got = read_up_to(&mut file, &mut header).map_err(io)?;
        let h = self
            .check_header(&header[..got], file_len)
            .map_err(format)?;

        // Bounded by `max_payload` and by the file length (checked above).
        let Ok(len) = usize::try_from(h.payload_len) else {
            return Err(format(self.error(FormatErrorKind::Oversized {
                len: h.payload_len,
                limit: usize::MAX as u64,
            })));
        };
        let mut payload = Vec::with_capacity(len);
        // Read one byte more than expected to notice a file that grew
        // after we looked at its length.
        (&mut file)
            .take(h.payload_len.saturating_add(1))
            .read_to_end(&mut payload)
            .map_err(io)?;
        let found = payload.len() as u64;
        if found < h.payload_len {
            return Err(format(self.error(FormatErrorKind::Truncated {
                what: "payload",
                expected: h.payload_len,
                found,
            })));
        }
        if found > h.payload_len {
            return Err(format(self.error(FormatErrorKind::TrailingBytes {
                extra: found - h.payload_len,
            })));
        }
        self.check_payload_crc(&h, &payload).map_err(format)?;
        Ok((h.version, payload))
    }

    /// Checks a header read from the start of a file of `total_len` bytes
    /// (header included): everything [`decode`](FormatSpec::decode) checks
    /// except the payload checksum, which a streaming reader computes itself
    /// and compares with [`HeaderInfo::payload_crc`].
    ///
    /// # Errors
    /// The first failed check, as for [`decode`](FormatSpec::decode).
    pub fn decode_header(&self, header: &[u8], total_len: u64) -> Result<HeaderInfo, FormatError> {
        self.check_header(header, total_len)
    }

    /// As [`decode_header`](FormatSpec::decode_header) for a blob at the start of a longer
    /// file of `total_len` bytes: bytes after the payload are allowed (they belong to the file's
    /// own layout), a payload running past the end is not.
    ///
    /// # Errors
    /// As [`decode_header`](FormatSpec::decode_header), without
    /// [`FormatErrorKind::TrailingBytes`].
    pub fn decode_header_prefix(
        &self,
        header: &[u8],
        total_len: u64,
    ) -> Result<HeaderInfo, FormatError> {
        let h = self.check_header_fields(header)?;
        self.check_available(&h, total_len, true)?;
        Ok(h)
    }

    /// Decodes the blob at the start of `bytes`, ignoring what follows its payload; returns it
    /// with the number of bytes it spans (header included).
    ///
    /// # Errors
    /// As [`decode`](FormatSpec::decode), without [`FormatErrorKind::TrailingBytes`].
    pub fn decode_prefix<'a>(&self, bytes: &'a [u8]) -> Result<(Decoded<'a>, usize), FormatError> {
        let header = &bytes[..bytes.len().min(HEADER_LEN)];
        let h = self.decode_header_prefix(header, bytes.len() as u64)?;
        // Checked above: the payload lies within `bytes`.
        let end = HEADER_LEN + h.payload_len as usize;
        let payload = &bytes[HEADER_LEN..end];
        self.check_payload_crc(&h, payload)?;
        Ok((
            Decoded {
                version: h.version,
                payload,
            },
            end,
        ))
    }

    /// Runs every check that needs only the header and the total length of
    /// the file (`total_len`, header included). `header` may be shorter than
    /// [`HEADER_LEN`] if that is all there is.
    fn check_header(&self, header: &[u8], total_len: u64) -> Result<Header, FormatError> {
        let h = self.check_header_fields(header)?;
        self.check_available(&h, total_len, false)?;
        Ok(h)
    }

    /// The checks of [`check_header`](Self::check_header) that need the header alone.
    fn check_header_fields(&self, header: &[u8]) -> Result<Header, FormatError> {
        let Ok(header) = <&[u8; HEADER_LEN]>::try_from(header) else {
            return Err(self.error(FormatErrorKind::Truncated {
                what: "header",
                expected: HEADER_LEN as u64,
                found: header.len() as u64,
            }));
        };
        let field4 = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };

        let mut magic = [0u8; 8];
        magic.copy_from_slice(&header[0..8]);
        if magic != self.magic {
            return Err(self.error(FormatErrorKind::BadMagic {
                expected: self.magic,
                found: magic,
            }));
        }

        let stored_header_crc = field4(28);
        let actual_header_crc = crc32c(&header[..HEADER_CRC_OFFSET]);
        if stored_header_crc != actual_header_crc {
            return Err(self.error(FormatErrorKind::HeaderChecksum {
                expected: stored_header_crc,
                found: actual_header_crc,
            }));
        }

        let version = field4(8);
        if version < self.min_version || version > self.version {
            return Err(self.error(FormatErrorKind::UnsupportedVersion {
                found: version,
                min: self.min_version,
                max: self.version,
            }));
        }

        let flags = field4(12);
        if flags != 0 {
            return Err(self.error(FormatErrorKind::UnknownFlags(flags)));
        }

        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&header[16..24]);
        let payload_len = u64::from_le_bytes(len_bytes);
        if payload_len > self.max_payload {
            return Err(self.error(FormatErrorKind::Oversized {
                len: payload_len,
                limit: self.max_payload,
            }));
        }

        Ok(Header {
            version,
            payload_len,
            payload_crc: field4(24),
        })
    }

    /// Checks that a file of `total_len` bytes holds the payload `h` announces (and, unless
    /// `trailing_ok`, nothing after it).
    fn check_available(
        &self,
        h: &Header,
        total_len: u64,
        trailing_ok: bool,
    ) -> Result<(), FormatError> {
        let available = total_len.saturating_sub(HEADER_LEN as u64);
        if available < h.payload_len {
            return Err(self.error(FormatErrorKind::Truncated {
                what: "payload",
                expected: h.payload_len,
                found: available,
            }));
        }
        if available > h.payload_len && !trailing_ok {
            return Err(self.error(FormatErrorKind::TrailingBytes {
                extra: available - h.payload_len,
            }));
        }
        Ok(())
    }

    fn check_payload_crc(&self, h: &Header, payload: &[u8]) -> Result<(), FormatError> {
        let actual = crc32c(payload);
        if actual != h.payload_crc {
            return Err(self.error(FormatErrorKind::PayloadChecksum {
                expected: h.payload_crc,
                found: actual,
            }));
        }
        Ok(())
    }

    fn error(&self, kind: FormatErrorKind) -> FormatError {
        FormatError::new(self.name, kind)
    }
}

/// Fills as much of `buf` as the reader allows, returning the count read
/// (less than `buf.len()` only at end of file).
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes the concatenation of `parts` to `path` atomically (see [`AtomicFile`]).
fn write_atomic(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let tmp = AtomicFile::create(path).map_err(|e| e.source)?;
    for part in parts {
        tmp.file().write_all(part)?;
    }
    tmp.commit().map_err(|e| e.source)
}

/// Why a file's bytes were rejected, together with the name of the format
/// that rejected them.
///
/// Displays as `"{format}: {kind}"`, e.g.
/// `"vm state: unsupported format version 9 (this build reads 1..=1)"`.
/// Match on [`kind`](FormatError::kind) to react to a specific problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{format}: {kind}")]
pub struct FormatError {
    format: &'static str,
    kind: FormatErrorKind,
}

impl FormatError {
    /// Creates an error for the format named `format`.
    #[must_use]
    pub fn new(format: &'static str, kind: FormatErrorKind) -> Self {
        Self { format, kind }
    }

    /// Name of the format ([`FormatSpec::name`]) that rejected the bytes.
    #[must_use]
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// What exactly was wrong.
    #[must_use]
    pub fn kind(&self) -> &FormatErrorKind {
        &self.kind
    }

    /// Consumes the error, returning what was wrong.
    #[must_use]
    pub fn into_kind(self) -> FormatErrorKind {
        self.kind
    }
}

/// The specific check that failed while decoding a file.
///
/// For checksum mismatches, `expected` is the value recorded in the header
/// and `found` is the value computed from the bytes actually present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatErrorKind {
    /// The data ended before the header or the payload was complete.
    #[error("truncated {what}: expected {expected} bytes, found {found}")]
    Truncated {
        /// `"header"` or `"payload"`.
        what: &'static str,
        /// Bytes required.
        expected: u64,
        /// Bytes actually present.
        found: u64,
    },
    /// The magic bytes identify a different kind of file (or garbage).
    #[error(
        "bad magic: expected \"{}\", found \"{}\" (wrong kind of file?)",
        expected.escape_ascii(),
        found.escape_ascii()
    )]
    BadMagic {
        /// Magic of the expected format.
        expected: [u8; 8],
        /// Magic found at the start of the data.
        found: [u8; 8],
    },
    /// The header does not match its own checksum.
    #[error("header checksum mismatch: header records {expected:#010x}, computed {found:#010x}")]
    HeaderChecksum {
        /// Checksum recorded in the header.
        expected: u32,
        /// Checksum computed over the header bytes.
        found: u32,
    },
    /// The file was written with a version this build cannot read.
    #[error("unsupported format version {found} (this build reads {min}..={max})")]
    UnsupportedVersion {
        /// Version recorded in the header.
        found: u32,
        /// Oldest version this build reads.
        min: u32,
        /// Newest version this build reads.
        max: u32,
    },
    /// The header sets flags this build does not understand (it understands none).
    #[error("unknown header flags {0:#010x} (this build supports none)")]
    UnknownFlags(u32),
    /// The header claims a payload larger than this build accepts.
    #[error("payload of {len} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Payload length claimed by the header.
        len: u64,
        /// Largest accepted payload length.
        limit: u64,
    },
    /// The payload does not match the checksum recorded in the header.
    #[error("payload checksum mismatch: header records {expected:#010x}, computed {found:#010x}")]
    PayloadChecksum {
        /// Checksum recorded in the header.
        expected: u32,
        /// Checksum computed over the payload.
        found: u32,
    },
    /// There is data after the end of the payload.
    #[error("{extra} unexpected trailing byte(s) after the payload")]
    TrailingBytes {
        /// Number of bytes beyond `HEADER_LEN + payload_len` (for a file
        /// that grew while being read, at least this many).
        extra: u64,
    },
}

/// Whether a [`FileError`] happened while reading or writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileOp {
    /// [`FormatSpec::read_file`] / [`FormatSpec::read_file_versioned`].
    Read,
    /// [`FormatSpec::write_file`].
    Write,
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileOp::Read => "read",
            FileOp::Write => "write",
        })
    }
}

/// Failure to read or write a file in one of the project's formats.
///
/// Displays the operation, the path and the cause, e.g.
/// `"cannot read /x/y.state: vm state: payload checksum mismatch: ..."`.
///
/// Because the message already contains the cause, [`Error::source`]
/// skips it and returns the cause's own source (if any), so error-chain
/// printers do not repeat it. Inspect [`source`](FileError::source) (the
/// field) to match on the cause.
///
/// [`Error::source`]: std::error::Error::source
#[derive(Debug)]
pub struct FileError {
    /// Whether the file was being read or written.
    pub op: FileOp,
    /// The file concerned.
    pub path: PathBuf,
    /// What went wrong.
    pub source: FileErrorKind,
}

impl FileError {
    /// The format error, if the file was rejected for its contents.
    #[must_use]
    pub fn format_error(&self) -> Option<&FormatError> {
        match &self.source {
            FileErrorKind::Format(e) => Some(e),
            FileErrorKind::Io(_) => None,
        }
    }

    /// The I/O error, if the file could not be accessed.
    #[must_use]
    pub fn io_error(&self) -> Option<&io::Error> {
        match &self.source {
            FileErrorKind::Io(e) => Some(e),
            FileErrorKind::Format(_) => None,
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.op,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.source)
    }
}

/// The cause of a [`FileError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileErrorKind {
    /// The file could not be opened, read, written, synced or renamed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The file's contents were rejected.
    #[error(transparent)]
    Format(#[from] FormatError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::fs;

    const SPEC: FormatSpec = FormatSpec {
        name: "vm state",
        magic: *b"SNAPVMST",
        version: 3,
        min_version: 2,
        max_payload: 1024,
    };

    /// Builds a header with arbitrary field values and a valid header checksum.
    fn raw_header(
        magic: [u8; 8],
        version: u32,
        flags: u32,
        payload_len: u64,
        payload_crc: u32,
    ) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&magic);
        h[8..12].copy_from_slice(&version.to_le_bytes());
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&payload_len.to_le_bytes());
        h[24..28].copy_from_slice(&payload_crc.to_le_bytes());
        let crc = crc32c(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn kind_of(bytes: &[u8]) -> FormatErrorKind {
        let err = SPEC.decode(bytes).unwrap_err();
        assert_eq!(err.format(), "vm state");
        err.into_kind()
    }

    #[test]
    fn header_layout() {
        let payload = b"payload!";
        let h = SPEC.header(payload);
        assert_eq!(&h[0..8], b"SNAPVMST");
        assert_eq!(h[8..12], 3u32.to_le_bytes());
        assert_eq!(h[12..16], [0; 4]);
        assert_eq!(h[16..24], 8u64.to_le_bytes());
        assert_eq!(h[24..28], crc32c(payload).to_le_bytes());
        assert_eq!(h[28..32], crc32c(&h[..28]).to_le_bytes());
        assert_eq!(h, raw_header(*b"SNAPVMST", 3, 0, 8, crc32c(payload)));
    }

    #[test]
    fn round_trip_including_empty_and_max() {
        for payload in [&b""[..], b"x", &[0xAB; 1024]] {
            let bytes = SPEC.encode(payload);
            assert_eq!(bytes.len(), HEADER_LEN + payload.len());
            assert_eq!(
                SPEC.decode(&bytes),
                Ok(Decoded {
                    version: 3,
                    payload
                })
            );
        }
    }

    #[test]
    fn older_supported_version_is_read() {
        let payload = b"old";
        let mut bytes = raw_header(SPEC.magic, 2, 0, 3, crc32c(payload)).to_vec();
        bytes.extend_from_slice(payload);
        let decoded = SPEC.decode(&bytes).unwrap();
        assert_eq!(decoded.version, 2);
        assert_eq!(decoded.payload, payload);
    }

    #[test]
    fn truncated_header() {
        let bytes = SPEC.encode(b"abc");
        assert_eq!(
            kind_of(&bytes[..31]),
            FormatErrorKind::Truncated {
                what: "header",
                expected: 32,
                found: 31
            }
        );
        assert_eq!(
            kind_of(&[]),
            FormatErrorKind::Truncated {
                what: "header",
                expected: 32,
                found: 0
            }
        );
        assert_eq!(
            SPEC.decode(&bytes[..5]).unwrap_err().to_string(),
            "vm state: truncated header: expected 32 bytes, found 5"
        );
    }

    #[test]
    fn truncated_payload() {
        let bytes = SPEC.encode(b"abcdef");
        assert_eq!(
            kind_of(&bytes[..HEADER_LEN + 2]),
            FormatErrorKind::Truncated {
                what: "payload",
                expected: 6,
                found: 2
            }
        );
        assert_eq!(
            kind_of(&bytes[..HEADER_LEN]),
            FormatErrorKind::Truncated {
                what: "payload",
                expected: 6,
                found: 0
            }
        );
    }

    #[test]
    fn bad_magic() {
        let mut bytes = SPEC.encode(b"abc");
        bytes[0..8].copy_from_slice(b"\x7fELF\x02\x01\x01\0");
        let err = SPEC.decode(&bytes).unwrap_err();
        assert_eq!(
            err.kind(),
            &FormatErrorKind::BadMagic {
                expected: *b"SNAPVMST",
                found: *b"\x7fELF\x02\x01\x01\0"
            }
        );
        assert_eq!(
            err.to_string(),
            "vm state: bad magic: expected \"SNAPVMST\", \
             found \"\\x7fELF\\x02\\x01\\x01\\x00\" (wrong kind of file?)"
        );
    }

    #[test]
    fn bad_magic_is_checked_before_header_checksum() {
        // Garbage: wrong magic and wrong checksum; magic is reported.
        let bytes = [0u8; 40];
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::BadMagic {
                expected: *b"SNAPVMST",
                found: [0; 8]
            }
        );
    }

    #[test]
    fn header_checksum() {
        let mut bytes = SPEC.encode(b"abc");
        let good_crc = u32::from_le_bytes(bytes[28..32].try_into().unwrap());
        bytes[8] ^= 0x01; // version 3 -> 2, but header crc no longer matches
        let computed = crc32c(&bytes[..28]);
        assert_ne!(computed, good_crc);
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::HeaderChecksum {
                expected: good_crc,
                found: computed
            }
        );

        let mut bytes = SPEC.encode(b"abc");
        bytes[28..32].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::HeaderChecksum {
                expected: 0xDEAD_BEEF,
                found: good_crc
            }
        );
        assert_eq!(
            SPEC.decode(&bytes).unwrap_err().to_string(),
            format!(
                "vm state: header checksum mismatch: header records 0xdeadbeef, computed {good_crc:#010x}"
            )
        );
    }

    #[test]
    fn unsupported_version() {
        for version in [0, 1, 4, 9, u32::MAX] {
            let bytes = raw_header(SPEC.magic, version, 0, 0, crc32c(b""));
            assert_eq!(
                kind_of(&bytes),
                FormatErrorKind::UnsupportedVersion {
                    found: version,
                    min: 2,
                    max: 3
                }
            );
        }
        let v1 = FormatSpec {
            version: 1,
            min_version: 1,
            ..SPEC
        };
        let bytes = raw_header(SPEC.magic, 9, 0, 0, crc32c(b""));
        assert_eq!(
            v1.decode(&bytes).unwrap_err().to_string(),
            "vm state: unsupported format version 9 (this build reads 1..=1)"
        );
    }

    #[test]
    fn unknown_flags() {
        let bytes = raw_header(SPEC.magic, 3, 0x8000_0001, 0, crc32c(b""));
        assert_eq!(kind_of(&bytes), FormatErrorKind::UnknownFlags(0x8000_0001));
        assert_eq!(
            SPEC.decode(&bytes).unwrap_err().to_string(),
            "vm state: unknown header flags 0x80000001 (this build supports none)"
        );
    }

    #[test]
    fn version_is_checked_before_flags() {
        let bytes = raw_header(SPEC.magic, 7, 1, 0, crc32c(b""));
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::UnsupportedVersion {
                found: 7,
                min: 2,
                max: 3
            }
        );
    }

    #[test]
    fn oversized() {
        // Claimed length beyond the cap; checked before the (missing) payload.
        let bytes = raw_header(SPEC.magic, 3, 0, u64::MAX, 0);
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::Oversized {
                len: u64::MAX,
                limit: 1024
            }
        );
        let bytes = SPEC.encode(&[0; 1025]);
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::Oversized {
                len: 1025,
                limit: 1024
            }
        );
        assert_eq!(
            SPEC.decode(&bytes).unwrap_err().to_string(),
            "vm state: payload of 1025 bytes exceeds the limit of 1024 bytes"
        );
    }

    #[test]
    fn payload_checksum() {
        let mut bytes = SPEC.encode(b"abc");
        let last = bytes.len() - 1;
        bytes[last] = b'd';
        assert_eq!(
            kind_of(&bytes),
            FormatErrorKind::PayloadChecksum {
                expected: crc32c(b"abc"),
                found: crc32c(b"abd")
            }
        );
        assert_eq!(
            SPEC.decode(&bytes).unwrap_err().to_string(),
            format!(
                "vm state: payload checksum mismatch: header records {:#010x}, computed {:#010x}",
                crc32c(b"abc"),
                crc32c(b"abd")
            )
        );
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = SPEC.encode(b"abc");
        bytes.extend_from_slice(b"xyz");
        assert_eq!(kind_of(&bytes), FormatErrorKind::TrailingBytes { extra: 3 });
    }

    #[test]
    fn trailing_bytes_checked_before_payload_checksum() {
        let mut bytes = SPEC.encode(b"abc");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        bytes.push(0);
        assert_eq!(kind_of(&bytes), FormatErrorKind::TrailingBytes { extra: 1 });
    }

    // ---- files ----

    fn file_kind(err: &FileError) -> FormatErrorKind {
        *err.format_error()
            .unwrap_or_else(|| panic!("expected a format error, got {err}"))
            .kind()
    }

    #[test]
    fn file_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        SPEC.write_file(&path, b"first").unwrap();
        assert_eq!(SPEC.read_file(&path).unwrap(), b"first");
        SPEC.write_file(&path, b"second, longer").unwrap();
        assert_eq!(
            SPEC.read_file_versioned(&path).unwrap(),
            (3, b"second, longer".to_vec())
        );
        SPEC.write_file(&path, b"").unwrap();
        assert_eq!(SPEC.read_file(&path).unwrap(), b"");
        assert_eq!(fs::read(&path).unwrap(), SPEC.encode(b""));
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("vm.state")]);
    }

    #[test]
    fn write_to_path_without_file_name() {
        let err = SPEC.write_file(Path::new(".."), b"x").unwrap_err();
        assert_eq!(err.op, FileOp::Write);
        assert_eq!(
            err.io_error().map(io::Error::kind),
            Some(io::ErrorKind::InvalidInput)
        );
    }

    #[test]
    fn file_truncated_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        let bytes = SPEC.encode(b"0123456789");

        fs::write(&path, &bytes[..HEADER_LEN + 4]).unwrap();
        let err = SPEC.read_file(&path).unwrap_err();
        assert_eq!(err.op, FileOp::Read);
        assert_eq!(err.path, path);
        assert_eq!(
            file_kind(&err),
            FormatErrorKind::Truncated {
                what: "payload",
                expected: 10,
                found: 4
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read {}: vm state: truncated payload: expected 10 bytes, found 4",
                path.display()
            )
        );

        fs::write(&path, &bytes[..20]).unwrap();
        let err = SPEC.read_file(&path).unwrap_err();
        assert_eq!(
            file_kind(&err),
            FormatErrorKind::Truncated {
                what: "header",
                expected: 32,
                found: 20
            }
        );
    }

    #[test]
    fn file_trailing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        let mut bytes = SPEC.encode(b"abc");
        bytes.extend_from_slice(b"!!");
        fs::write(&path, &bytes).unwrap();
        let err = SPEC.read_file(&path).unwrap_err();
        assert_eq!(file_kind(&err), FormatErrorKind::TrailingBytes { extra: 2 });

        let mut bytes = SPEC.encode(b"abc");
        bytes[HEADER_LEN] = b'x';
        fs::write(&path, &bytes).unwrap();
        let err = SPEC.read_file(&path).unwrap_err();
        assert_eq!(
            file_kind(&err),
            FormatErrorKind::PayloadChecksum {
                expected: crc32c(b"abc"),
                found: crc32c(b"xbc")
            }
        );
        assert!(
            err.to_string().starts_with(&format!(
                "cannot read {}: vm state: payload checksum mismatch",
                path.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn file_oversized_header_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostile.state");

        // Beyond the cap: refused as oversized.
        fs::write(&path, raw_header(SPEC.magic, 3, 0, 1 << 40, 0)).unwrap();
        let err = SPEC.read_file(&path).unwrap_err();
        assert_eq!(
            file_kind(&err),
            FormatErrorKind::Oversized {
                len: 1 << 40,
                limit: 1024
            }
        );

        // Within an (unbounded) cap but far beyond the file's length: if the
        // reader trusted the header it would try to allocate 4 EiB and abort.
        let unbounded = FormatSpec {
            max_payload: u64::MAX,
            ..SPEC
        };
        let mut bytes = raw_header(SPEC.magic, 3, 0, 1 << 62, 0).to_vec();
        bytes.extend_from_slice(b"tiny");
        fs::write(&path, &bytes).unwrap();
        let err = unbounded.read_file(&path).unwrap_err();
        assert_eq!(
            file_kind(&err),
            FormatErrorKind::Truncated {
                what: "payload",
                expected: 1 << 62,
                found: 4
            }
        );
    }

    #[test]
    fn write_refuses_oversized_payload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        let err = SPEC.write_file(&path, &[0; 1025]).unwrap_err();
        assert_eq!(err.op, FileOp::Write);
        assert_eq!(
            file_kind(&err),
            FormatErrorKind::Oversized {
                len: 1025,
                limit: 1024
            }
        );
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn missing_file_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.state");
        let err = SPEC.read_file(&path).unwrap_err();
        assert_eq!(
            err.io_error().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}: ", path.display()))
        );
    }

    #[test]
    fn write_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/vm.state");
        let err = SPEC.write_file(&path, b"abc").unwrap_err();
        assert_eq!(
            err.io_error().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
        assert!(
            err.to_string()
                .starts_with(&format!("cannot write {}: ", path.display()))
        );
    }

    #[test]
    fn failed_rename_removes_temp_file() {
        // Renaming a file over a non-empty directory fails after the temp
        // file has been written; it must be cleaned up.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("occupied");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"x").unwrap();
        let err = SPEC.write_file(&target, b"abc").unwrap_err();
        assert!(err.io_error().is_some(), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("occupied")]);
    }

    #[test]
    fn file_error_source_does_not_repeat_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        fs::write(&path, b"short").unwrap();
        let err = SPEC.read_file(&path).unwrap_err();
        assert!(std::error::Error::source(&err).is_none());
    }
}
