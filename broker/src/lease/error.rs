//! The errors of task and lease operations, one per client-actionable status.

use crate::{
    credentials::CredentialError, policy::FieldProblem, policy::PolicyError, store::StoreError,
};

/// Why a task or lease operation was refused or failed.
///
/// Each variant maps to one gRPC status in `api`; messages are safe to show the
/// caller (they never hold a credential value).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// One or more request fields are malformed or out of bounds.
    #[error("{}", describe(.0))]
    InvalidArgument(Vec<FieldProblem>),
    /// The named template does not exist.
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    /// The named task does not exist (or is past its retention).
    #[error("task {0} not found")]
    TaskNotFound(String),
    /// The caller is authenticated but not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The task's state forbids the call (ended, max lifetime reached, key reused).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The store could not be reached; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// A change was sent to the store but not confirmed (durably) applied: it
    /// may or may not have taken effect.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// The caller renews faster than the template allows.
    #[error(
        "renewed too soon: the template's min_renew_interval has not passed; retry in {retry_after_ms} ms"
    )]
    TooSoon {
        /// How long until a renewal is accepted.
        retry_after_ms: u64,
    },
    /// A quota of the caller's identity or actor class is used up (live tasks
    /// or begin rate); other identities are unaffected.
    #[error("{message}; retry in {retry_after_ms} ms")]
    QuotaExceeded {
        /// Which quota, in words.
        message: String,
        /// How long until a begin can succeed (a hint for live-task limits).
        retry_after_ms: u64,
    },
    /// A token exchange (RFC 8693) was refused; `refusal` is its OAuth error code.
    #[error("{message}")]
    Exchange {
        /// The OAuth error code (RFC 6749 section 5.2, RFC 8693 section 2.2.2).
        refusal: super::ExchangeRefusal,
        /// What was wrong, safe to show the caller.
        message: String,
    },
    /// An internal fault; the detail is logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

impl LeaseError {
    /// A single invalid field.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldProblem::new(field, reason)])
    }
}

impl From<StoreError> for LeaseError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::OutcomeUnknown(m) => Self::OutcomeUnknown(m),
            // Fail closed, and say why: an operator has to fix the store.
            e @ StoreError::Misconfigured(_) => Self::Unavailable(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<PolicyError> for LeaseError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::UnknownTemplate(t) => Self::TemplateNotFound(t),
            e @ PolicyError::NotAllowed { .. } => Self::PermissionDenied(e.to_string()),
            PolicyError::Invalid(ps) => Self::InvalidArgument(ps),
            e @ PolicyError::Forbidden { .. } => Self::PermissionDenied(e.to_string()),
            e @ PolicyError::Evaluation(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<CredentialError> for LeaseError {
    fn from(e: CredentialError) -> Self {
        match e {
            // A call in the lease's last fraction of a second (a late BeginTask
            // retry, a renewal capped by the max lifetime, a sub-second TTL):
            // the task's state forbids it, and the caller can act on that.
            e @ CredentialError::LeaseEndsTooSoon { .. } => Self::FailedPrecondition(format!(
                "{e} (JWT expiry is whole seconds): renew earlier, ask for a longer requested_ttl, or complete the task and begin a new one with a new idempotency_key"
            )),
            e => Self::Internal(e.to_string()),
        }
    }
}
