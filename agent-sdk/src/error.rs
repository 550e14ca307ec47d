//! The one error type of the SDK, and the one place a `tonic::Status` becomes it.

use tonic::Code;

/// Why an SDK call failed. Match on the variant to decide what to do; the message
/// is the broker's (or the transport's) explanation, never a credential value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker refused the caller: its SVID is not allowed by the template, the
    /// task belongs to another identity (`PERMISSION_DENIED`), or the SVID was not
    /// accepted at all (`UNAUTHENTICATED`). Retrying will not help.
    #[error("denied: {0}")]
    Denied(String),
    /// A field of the request is malformed or out of bounds (`INVALID_ARGUMENT`);
    /// the message names the field.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Unknown template or task (`NOT_FOUND`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The task or lease is in a state that forbids the call (`FAILED_PRECONDITION`):
    /// it ended, its lease expired, its max lifetime is reached, or an idempotency
    /// key was reused for a different request.
    #[error("failed precondition: {0}")]
    Precondition(String),
    /// A size or rate limit was hit (`RESOURCE_EXHAUSTED`).
    #[error("limit reached: {0}")]
    Exhausted(String),
    /// The broker (or its store) could not be reached, and every retry the
    /// [`RetryPolicy`](crate::RetryPolicy) allowed failed the same way (`UNAVAILABLE`).
    /// Nothing was changed by the failed attempts.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The task's lease is lost: a renewal was refused, or the deadline passed
    /// without a successful renewal. Every credential of the task is (or is about
    /// to be) inactive; stop the work.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// The call did not complete for a transport reason other than an unreachable
    /// broker: the request timed out, the stream was reset, or the broker answered
    /// with a status the SDK does not expect (`INTERNAL`, `UNKNOWN`, ...). The
    /// outcome of the call is unknown.
    #[error("transport: {0}")]
    Transport(String),
    /// The client is misconfigured: bad broker address, unreadable or unusable
    /// SVID, key or bundle files.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// True when the same call may be tried again unchanged (only [`Error::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let msg = status.message().to_owned();
        match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => Self::Denied(msg),
            Code::InvalidArgument | Code::OutOfRange => Self::Invalid(msg),
            Code::NotFound => Self::NotFound(msg),
            Code::FailedPrecondition | Code::Aborted => Self::Precondition(msg),
            Code::ResourceExhausted => Self::Exhausted(msg),
            Code::Unavailable => Self::Unavailable(msg),
            code => Self::Transport(format!("{code:?}: {msg}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_variant_an_agent_matches() {
        let cases = [
            (tonic::Status::permission_denied("x"), "denied"),
            (tonic::Status::unauthenticated("x"), "denied"),
            (tonic::Status::invalid_argument("x"), "invalid"),
            (tonic::Status::not_found("x"), "not_found"),
            (tonic::Status::failed_precondition("x"), "precondition"),
            (tonic::Status::resource_exhausted("x"), "exhausted"),
            (tonic::Status::unavailable("x"), "unavailable"),
            (tonic::Status::cancelled("Timeout expired"), "transport"),
            (tonic::Status::internal("x"), "transport"),
        ];
        for (status, want) in cases {
            let e = Error::from(status);
            let got = match e {
                Error::Denied(_) => "denied",
                Error::Invalid(_) => "invalid",
                Error::NotFound(_) => "not_found",
                Error::Precondition(_) => "precondition",
                Error::Exhausted(_) => "exhausted",
                Error::Unavailable(_) => "unavailable",
                Error::Transport(_) => "transport",
                _ => "other",
            };
            assert_eq!(got, want, "{e}");
            assert_eq!(e.is_retryable(), want == "unavailable");
        }
    }
}
