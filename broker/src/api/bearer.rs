//! Authentication on the JWT-SVID listener: `authorization: Bearer <JWT-SVID>`.

use std::time::SystemTime;

use tonic::{Request, Status, service::Interceptor};

use crate::identity::jwt_svid::JwtSvidVerifier;

/// A tonic interceptor that admits a call only with a valid JWT-SVID bearer token
/// and hands the verified identity to the handler (request extensions).
///
/// Guarantees: every refusal is `UNAUTHENTICATED` with the rule that failed, and
/// is logged with that rule; the token is never logged or echoed.
#[derive(Debug, Clone)]
pub struct BearerAuth {
    verifier: JwtSvidVerifier,
}

impl BearerAuth {
    /// Admits calls carrying a token `verifier` accepts.
    pub fn new(verifier: JwtSvidVerifier) -> Self {
        Self { verifier }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated("authorization: Bearer <JWT-SVID> is required here")
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must use the Bearer scheme"))?
            .trim();
        let identity = self
            .verifier
            .verify(token, SystemTime::now())
            .map_err(|e| {
                tracing::warn!(reason = %e, "JWT-SVID caller rejected");
                Status::unauthenticated(e.to_string())
            })?;
        tracing::debug!(spiffe_id = %identity.spiffe_id, "JWT-SVID caller accepted");
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}
