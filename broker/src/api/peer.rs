//! Authentication on the mTLS listener: the client's X509-SVID chain, checked
//! again at every call against the trust bundles current at that moment.

use std::{sync::Arc, time::SystemTime};

use tonic::{Request, Status, service::Interceptor};

use crate::identity::{self, TrustBundleSource};

/// A tonic interceptor that admits a call only if the client certificate chain of
/// its connection verifies now, as a whole, against the current bundles, and hands
/// the verified identity to the handler (request extensions).
///
/// The TLS handshake verified the chain once, but an HTTP/2 connection outlives
/// both the SVID and the bundle it was checked against: re-verifying per call means
/// a connection whose SVID expired, or whose trust anchor a bundle reload removed,
/// stops working at its next call. Guarantees: every refusal is `UNAUTHENTICATED`
/// naming the rule that failed, and is logged; no key material is logged.
#[derive(Debug, Clone)]
pub struct SvidAuth {
    bundles: Arc<TrustBundleSource>,
}

impl SvidAuth {
    /// Admits calls whose peer chain verifies against `bundles` (read at each call).
    pub fn new(bundles: Arc<TrustBundleSource>) -> Self {
        Self { bundles }
    }
}

impl Interceptor for SvidAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("a client X509-SVID is required (mutual TLS)")
        })?;
        let identity = identity::verify_svid(&certs, &self.bundles.current(), SystemTime::now())
            .map_err(|e| {
                tracing::warn!(reason = %e, "caller's X509-SVID no longer verifies on an open connection");
                Status::unauthenticated(format!(
                    "client X509-SVID does not verify against the current trust bundle: {e}; reconnect with a valid SVID"
                ))
            })?;
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}
