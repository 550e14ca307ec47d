//! The gRPC edge: protobuf ↔ domain types, and domain errors ↔ `tonic::Status`.
//!
//! The only module that knows tonic. Each handler: authenticate the caller from
//! its verified TLS peer certificate, translate the request, call
//! [`crate::lease::LeaseService`], translate the answer. [`status`] is the one
//! place a domain error becomes a status; an internal error becomes `INTERNAL`
//! with a generic message and a log line carrying the detail.

mod admin;
mod bearer;
mod broker;
mod convert;
pub mod oauth;
mod peer;
mod verifier;

use std::time::Duration;

use tonic::{Request, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

pub use admin::AdminApi;
pub use bearer::BearerAuth;
pub use broker::BrokerApi;
pub use oauth::OAuthApi;
pub use peer::{PeerConnection, SvidAuth};
pub use verifier::VerifierApi;

use crate::{identity, lease::LeaseError};

/// Maps a domain error to the status a client can act on. A refusal whose
/// code alone does not say why carries the reason in the `leash-reason`
/// header ([`crate::metrics::REASON_HEADER`]), which the metrics count by.
pub fn status(err: LeaseError) -> Status {
    let reason = match &err {
        LeaseError::TemplateNotFound(_) => Some("template_not_found"),
        LeaseError::TaskNotFound(_) => Some("task_not_found"),
        LeaseError::TooSoon { .. } => Some("too_soon"),
        LeaseError::QuotaExceeded { .. } => Some("quota_exceeded"),
        _ => None,
    };
    let mut status = status_of(err);
    if let Some(reason) = reason {
        status.metadata_mut().insert(
            crate::metrics::REASON_HEADER,
            tonic::metadata::MetadataValue::from_static(reason),
        );
    }
    status
}

fn status_of(err: LeaseError) -> Status {
    match err {
        LeaseError::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
        LeaseError::TemplateNotFound(_) | LeaseError::TaskNotFound(_) => {
            Status::not_found(err.to_string())
        }
        LeaseError::PermissionDenied(m) => Status::permission_denied(m),
        LeaseError::Exchange { refusal, message } => match refusal {
            crate::lease::ExchangeRefusal::InvalidGrant => Status::permission_denied(message),
            _ => Status::invalid_argument(message),
        },
        LeaseError::FailedPrecondition(m) => Status::failed_precondition(m),
        LeaseError::Unavailable(m) => {
            tracing::warn!(reason = %m, "store unavailable; request refused");
            Status::unavailable(format!("{m}; nothing was changed, retry with backoff"))
        }
        LeaseError::OutcomeUnknown(m) => {
            tracing::warn!(reason = %m, "store change not confirmed; outcome unknown");
            Status::unavailable(format!(
                "outcome unknown: {m}; retry the same call (BeginTask with the same idempotency_key; RenewLease and CompleteTask are safe to repeat)"
            ))
        }
        LeaseError::TooSoon { retry_after_ms }
        | LeaseError::QuotaExceeded { retry_after_ms, .. } => {
            // The standard place first (google.rpc.RetryInfo in the status
            // details, for any gRPC client), and a plain header beside it.
            let mut status = Status::with_error_details(
                tonic::Code::ResourceExhausted,
                err.to_string(),
                ErrorDetails::with_retry_info(Some(Duration::from_millis(retry_after_ms))),
            );
            if let Ok(v) = retry_after_ms.to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", v);
            }
            status
        }
        LeaseError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            Status::internal("internal error; the broker logged the detail")
        }
    }
}

/// The caller's identity, as the listener's interceptor verified it for this very
/// call: [`BearerAuth`] from the call's JWT-SVID on the JWT-SVID listener,
/// [`SvidAuth`] from the connection's X509-SVID chain (checked against the current
/// bundles) on the mTLS listener.
///
/// # Errors
/// `UNAUTHENTICATED` when no interceptor verified the caller: a service served
/// without one refuses every call rather than trust an unchecked certificate.
pub fn caller<T>(req: &Request<T>) -> Result<identity::Identity, Status> {
    // Only the interceptors put an identity here; nothing a client sends can.
    req.extensions()
        .get::<identity::Identity>()
        .cloned()
        .ok_or_else(|| {
            tracing::error!("a call reached a service without an authenticating interceptor");
            Status::unauthenticated("caller not authenticated on this listener")
        })
}
