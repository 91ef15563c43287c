//! snapctl's errors: a gRPC code and a message, printed as `<CODE>: <message>`.

use tonic::{Code, Status};

/// An error of a command: what the daemon answered, or what the command found itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CliError {
    pub code: Code,
    pub message: String,
}

impl CliError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", code_name(self.code), self.message)
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        Self::new(s.code(), s.message())
    }
}

/// The name of a gRPC code as the gRPC specification spells it (`NOT_FOUND`).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The error of an operation that failed (or was cancelled), if it did.
pub(crate) fn operation_error(op: &snap_api::v1::Operation) -> Option<CliError> {
    use snap_api::v1::OperationState;
    match op.state() {
        OperationState::Failed | OperationState::Cancelled => {
            let (code, message) = match &op.error {
                Some(e) => (Code::from_i32(e.code), e.message.clone()),
                None => (
                    Code::Unknown,
                    "the operation failed without an error".into(),
                ),
            };
            Some(CliError::new(
                code,
                format!("operation {} failed: {message}", op.id),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        for i in 0..=16 {
            let code = Code::from_i32(i);
            assert_eq!(code as i32, i);
            let name = code_name(code);
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
        assert_eq!(
            CliError::new(Code::NotFound, "no VM with id \"x\"").to_string(),
            "NOT_FOUND: no VM with id \"x\""
        );
    }
}
