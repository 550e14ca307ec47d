//! The gRPC edge: protobuf ↔ domain types, and domain errors ↔ `tonic::Status`.
//!
//! The only module that knows tonic. Each handler: authenticate the caller from
//! its verified TLS peer certificate, translate the request, call
//! [`crate::lease::LeaseService`], translate the answer. [`status`] is the one
//! place a domain error becomes a status; an internal error becomes `INTERNAL`
//! with a generic message and a log line carrying the detail.

mod bearer;
mod broker;
mod convert;
mod verifier;

use tonic::{Request, Status};

pub use bearer::BearerAuth;
pub use broker::BrokerApi;
pub use verifier::VerifierApi;

use crate::{identity, lease::LeaseError};

/// Maps a domain error to the status a client can act on.
pub fn status(err: LeaseError) -> Status {
    match err {
        LeaseError::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
        LeaseError::TemplateNotFound(_) | LeaseError::TaskNotFound(_) => {
            Status::not_found(err.to_string())
        }
        LeaseError::PermissionDenied(m) => Status::permission_denied(m),
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
        LeaseError::TooSoon { retry_after_ms } => {
            let mut status = Status::resource_exhausted(err.to_string());
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

/// The caller's identity: on the JWT-SVID listener, the one [`BearerAuth`]
/// verified from this very call's token; elsewhere, from the client certificate
/// verified in the TLS handshake.
///
/// # Errors
/// `UNAUTHENTICATED` if the connection carried no client certificate or its
/// leaf is not a usable X509-SVID.
pub fn caller<T>(req: &Request<T>) -> Result<identity::Identity, Status> {
    // Only `BearerAuth` puts an identity here (nothing a client sends can), after
    // checking the token's `exp` with the configured leeway for this call.
    if let Some(identity) = req.extensions().get::<identity::Identity>() {
        return Ok(identity.clone());
    }
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client X509-SVID is required (mutual TLS)"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client X509-SVID is required (mutual TLS)"))?;
    let identity = identity::identity_of_leaf(leaf).map_err(|e| {
        tracing::warn!(reason = %e, "caller rejected");
        Status::unauthenticated(format!("client certificate is not a valid X509-SVID: {e}"))
    })?;
    // The handshake checked validity once; an HTTP/2 connection can outlive the
    // SVID, so every call checks it again.
    if identity.svid_not_after <= std::time::SystemTime::now() {
        tracing::warn!(spiffe_id = %identity.spiffe_id, "caller's SVID expired on an open connection");
        return Err(Status::unauthenticated(
            "client X509-SVID has expired; reconnect with a fresh SVID",
        ));
    }
    Ok(identity)
}
