//! The one error type of the SDK, and the one place a `tonic::Status` becomes it.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt as _;

/// The longest retry-after hint the SDK honours; a longer one is cut to this, so
/// a broken hint cannot park a renewal past any sensible deadline.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

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
    /// A size or rate limit was hit (`RESOURCE_EXHAUSTED`), for example a lease
    /// renewed sooner than the template's minimum renew interval allows.
    #[error("limit reached: {message}")]
    Exhausted {
        /// The broker's explanation.
        message: String,
        /// How long the broker asks to wait before trying again (its
        /// `google.rpc.RetryInfo`, else its `retry-after-ms` header), at most
        /// [`MAX_RETRY_AFTER`]; `None` when waiting does not help.
        retry_after: Option<Duration>,
    },
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
    /// An approver denied the task's approval: the gated grants are never issued.
    /// The task itself stays live with its other grants until it ends.
    #[error("approval denied by {by}: {reason}")]
    ApprovalDenied {
        /// SPIFFE ID of the approver who decided.
        by: String,
        /// The approver's reason.
        reason: String,
    },
    /// No approver decided in time, or the approval went unused in time: the
    /// gated grants are never issued to this task.
    #[error("approval expired: no approver decided in time, or the approval went unused")]
    ApprovalExpired,
    /// A delegation token could not be read: it is not one made by
    /// [`Delegation::to_token`](crate::Delegation::to_token), or it is damaged
    /// or too long. The message never contains the token.
    #[error("bad delegation token: {0}")]
    BadDelegationToken(String),
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

    /// The wait the broker asked for before a retry ([`Error::Exhausted`] with a
    /// retry-after hint); `None` for every other error.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Exhausted { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The broker's retry-after hint on a status: `google.rpc.RetryInfo` in the
/// details first (the standard place), else the `retry-after-ms` header; capped
/// at [`MAX_RETRY_AFTER`].
fn retry_after(status: &tonic::Status) -> Option<Duration> {
    let from_details = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    let from_header = || {
        status
            .metadata()
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    from_details
        .or_else(from_header)
        .map(|d| d.min(MAX_RETRY_AFTER))
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let msg = status.message().to_owned();
        match status.code() {
            Code::PermissionDenied | Code::Unauthenticated => Self::Denied(msg),
            Code::InvalidArgument | Code::OutOfRange => Self::Invalid(msg),
            Code::NotFound => Self::NotFound(msg),
            Code::FailedPrecondition | Code::Aborted => Self::Precondition(msg),
            Code::ResourceExhausted => Self::Exhausted {
                retry_after: retry_after(&status),
                message: msg,
            },
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
                Error::Exhausted { .. } => "exhausted",
                Error::Unavailable(_) => "unavailable",
                Error::Transport(_) => "transport",
                _ => "other",
            };
            assert_eq!(got, want, "{e}");
            assert_eq!(e.is_retryable(), want == "unavailable");
        }
    }

    #[test]
    fn retry_after_comes_from_retry_info_or_the_header_and_is_capped() {
        use tonic_types::{ErrorDetails, StatusExt as _};

        let plain = Error::from(tonic::Status::resource_exhausted("too big"));
        assert_eq!(plain.retry_after(), None);

        let details = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "renewed too soon",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(750))),
        );
        let e = Error::from(details);
        assert_eq!(e.retry_after(), Some(Duration::from_millis(750)));
        assert_eq!(e.to_string(), "limit reached: renewed too soon");

        let mut header = tonic::Status::resource_exhausted("renewed too soon");
        header.metadata_mut().insert(
            "retry-after-ms",
            tonic::metadata::MetadataValue::from(1200u32),
        );
        assert_eq!(
            Error::from(header).retry_after(),
            Some(Duration::from_millis(1200))
        );

        let mut huge = tonic::Status::resource_exhausted("x");
        huge.metadata_mut().insert(
            "retry-after-ms",
            tonic::metadata::MetadataValue::from(u64::MAX / 2),
        );
        assert_eq!(Error::from(huge).retry_after(), Some(MAX_RETRY_AFTER));

        assert_eq!(Error::Unavailable("down".into()).retry_after(), None);
    }

    #[test]
    fn approval_errors_say_who_and_why() {
        let e = Error::ApprovalDenied {
            by: "spiffe://acme.test/human/alice".into(),
            reason: "not during the freeze".into(),
        };
        assert_eq!(
            e.to_string(),
            "approval denied by spiffe://acme.test/human/alice: not during the freeze"
        );
        assert!(!e.is_retryable());
        assert!(Error::ApprovalExpired.to_string().contains("expired"));
    }
}
