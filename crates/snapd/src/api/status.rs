//! The one place that says which gRPC code each kind of error is sent as.

use snap_api::v1 as pb;
use tonic::{Code, Status};

use crate::error::{Error, ErrorKind};

/// The gRPC code of an error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Conflict => Code::Aborted,
        ErrorKind::Exhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Internal => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(code(e.kind), e.message)
    }
}

/// An operation's error as the API reports it (the code the call would have failed with).
pub fn operation_error(e: &Error) -> pb::OperationError {
    pb::OperationError {
        code: code(e.kind) as i32,
        message: e.message.clone(),
    }
}

/// A failure of the service itself (a worker thread that panicked).
pub fn worker_failed(e: &dyn std::fmt::Display) -> Status {
    Status::new(Code::Internal, format!("worker: {e}"))
}

/// A stream watcher that fell behind.
pub fn watcher_lagged(n: u64) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("the watcher fell {n} events behind: watch again from the last sequence seen"),
    )
}
