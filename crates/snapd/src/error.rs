//! The daemon's errors: a gRPC code and a message that says what to fix. The lower crates'
//! errors are mapped here and nowhere else.

use snap_mem::memory::MemoryError;
use snap_vmm::VmError;
use snap_vmm::error::ConfigError;
use tonic::{Code, Status};

use crate::catalog::CatalogError;

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The gRPC code.
    pub code: Code,
    /// What was wrong, and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: &str, why: impl std::fmt::Display) -> Self {
        Self::new(Code::InvalidArgument, format!("{field}: {why}"))
    }

    /// NOT_FOUND for a `what` with id `id`.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(Code::NotFound, format!("no {what} with id {id:?}"))
    }

    /// FAILED_PRECONDITION.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    /// ABORTED: another operation holds the VM.
    pub fn busy(vm_id: &str) -> Self {
        Self::new(
            Code::Aborted,
            format!("VM {vm_id} is busy with another operation: retry when it has finished"),
        )
    }

    /// INTERNAL.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code, e.message)
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NameTaken(m) => Self::new(Code::AlreadyExists, m),
            CatalogError::Gone(m) => Self::new(Code::Aborted, m),
            e => Self::internal(e.to_string()),
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        let code = match &e {
            ConfigError::Memory(MemoryError::TooLarge { .. }) => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        };
        Self::new(code, e.to_string())
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Config(c) => c.into(),
            VmError::KvmUnavailable(e) => {
                Self::new(Code::Unavailable, format!("KVM is not available: {e}"))
            }
            VmError::NotPaused | VmError::Stopped(_) | VmError::Failed(_) => {
                Self::precondition(e.to_string())
            }
            VmError::Layer(_) | VmError::State(_) => Self::new(
                Code::FailedPrecondition,
                format!("the snapshot's files cannot be used: {e}"),
            ),
            e => Self::internal(e.to_string()),
        }
    }
}

/// Result with [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;
