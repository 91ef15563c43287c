//! The daemon's one error type: a kind (what the caller should do about it) and a message that
//! says what was wrong. The lower crates' errors become these here; which gRPC code each kind is
//! sent as is decided in one place, [`crate::api::status`].

use snap_mem::memory::MemoryError;
use snap_vmm::VmError;
use snap_vmm::error::ConfigError;

use crate::catalog::CatalogError;

/// What kind of failure, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A field of the request is malformed (the message names it).
    InvalidArgument,
    /// An id that does not exist.
    NotFound,
    /// A name in use, or a request id used for another request.
    AlreadyExists,
    /// The target is in the wrong state, or its files are damaged.
    FailedPrecondition,
    /// Another operation holds what this one needs: retry later.
    Conflict,
    /// Memory or disk space ran out.
    Exhausted,
    /// The daemon is shutting down, or KVM is missing.
    Unavailable,
    /// The client cancelled the operation.
    Cancelled,
    /// A bug or an I/O failure (the message names the file).
    Internal,
}

/// An error as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// What kind.
    pub kind: ErrorKind,
    /// What was wrong, and what to do.
    pub message: String,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A malformed `field`.
    pub fn invalid(field: &str, why: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidArgument, format!("{field}: {why}"))
    }

    /// No `what` with id `id`.
    pub fn not_found(what: &str, id: impl std::fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, format!("no {what} with id \"{id}\""))
    }

    /// A name in use.
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }

    /// The target is in the wrong state.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    /// Another operation holds what this one needs.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    /// A bug or an I/O failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Cancelled by the client.
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "cancelled by the client")
    }

    /// The data directory's filesystem is full while doing `what`.
    pub fn disk_full(what: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorKind::Exhausted,
            format!(
                "{what}: the data directory's filesystem is full: delete snapshots or VMs (or free \
                 space on it otherwise), then retry"
            ),
        )
    }

    /// `e` while doing `what`: [`Error::disk_full`] when the filesystem was full, else INTERNAL.
    pub fn io(what: impl std::fmt::Display, e: &(dyn std::error::Error + 'static)) -> Self {
        if is_disk_full(e) {
            Self::disk_full(format!("{what}: {e}"))
        } else {
            Self::internal(format!("{what}: {e}"))
        }
    }

    /// The same error with `context` in front of its message.
    #[must_use]
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Self::new(self.kind, format!("{context}: {}", self.message))
    }
}

/// Whether `e`, or an error it was caused by, says the filesystem is full (ENOSPC, EDQUOT, or
/// SQLite's "database or disk is full").
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) {
                return true;
            }
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = e.downcast_ref::<rusqlite::Error>() {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return true;
            }
        }
        next = e.source();
    }
    // Some lower errors keep the OS error in their message only.
    let text = e.to_string();
    [
        "No space left on device",
        "Disk quota exceeded",
        "database or disk is full",
    ]
    .iter()
    .any(|m| text.contains(m))
}

impl From<CatalogError> for Error {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NameTaken(m) => Self::exists(m),
            CatalogError::Changed(m) => Self::conflict(m),
            e if is_disk_full(&e) => Self::disk_full(format!("writing the catalog: {e}")),
            e => Self::internal(e.to_string()),
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        let kind = match &e {
            ConfigError::Memory(MemoryError::TooLarge { .. }) => ErrorKind::Exhausted,
            _ => ErrorKind::InvalidArgument,
        };
        // Like every INVALID_ARGUMENT, the message starts with the field of the request.
        let field = match &e {
            ConfigError::ZeroVcpus | ConfigError::TooManyVcpus { .. } => "vcpus",
            ConfigError::Memory(_)
            | ConfigError::MemoryTooSmall { .. }
            | ConfigError::MemoryAboveIdentityMap { .. } => "memory_bytes",
            ConfigError::Disks(_) => "disks",
            _ => "guest",
        };
        let message = e.to_string();
        if message.starts_with(field) {
            Self::new(kind, message)
        } else {
            Self::new(kind, format!("{field}: {message}"))
        }
    }
}

impl From<VmError> for Error {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Config(c) => c.into(),
            VmError::KvmUnavailable(e) => {
                Self::new(ErrorKind::Unavailable, format!("KVM is not available: {e}"))
            }
            VmError::NotPaused | VmError::Stopped(_) | VmError::Failed(_) => {
                Self::precondition(e.to_string())
            }
            e if is_disk_full(&e) => Self::disk_full(&e),
            VmError::Layer(_) | VmError::State(_) => {
                Self::precondition(format!("the snapshot's files cannot be used: {e}"))
            }
            e => Self::internal(e.to_string()),
        }
    }
}

/// A snap-disk error while doing `what`: disk full, damage (FAILED_PRECONDITION), or INTERNAL.
pub fn disk_error(what: &str, e: &snap_disk::DiskError) -> Error {
    match e {
        e if is_disk_full(e) => Error::disk_full(format!("{what}: {e}")),
        snap_disk::DiskError::Io { .. } => Error::internal(format!("{what}: {e}")),
        _ => Error::precondition(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_found_through_causes_and_messages() {
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_disk_full(&enospc));
        let wrapped = std::io::Error::other(enospc);
        assert!(is_disk_full(&wrapped));
        let e = Error::io("writing layers/x.mlayer", &wrapped);
        assert_eq!(e.kind, ErrorKind::Exhausted);
        assert!(e.message.contains("layers/x.mlayer"), "{e}");
        let other = std::io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(Error::io("x", &other).kind, ErrorKind::Internal);
        let sql = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(is_disk_full(&sql));
        assert_eq!(
            Error::from(CatalogError::Sql(sql)).kind,
            ErrorKind::Exhausted
        );
    }
}
