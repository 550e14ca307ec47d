//! Authentication on the mTLS listener: the client's X509-SVID chain, checked
//! again at every call against the trust bundles current at that moment.

use std::{
    sync::{Arc, PoisonError, RwLock},
    time::SystemTime,
};

use rustls::pki_types::CertificateDer;
use tonic::{Request, Status, service::Interceptor};

use crate::identity::{self, Identity, TrustBundleSource, TrustBundles};

/// What the server knows of one mTLS connection: the peer's certificate chain
/// as the handshake presented it, and the last verdict on it.
///
/// Built once per connection by the listener and handed to every call of the
/// connection (request extensions), so the chain is parsed and verified once
/// per connection and per trust-bundle snapshot, not once per call.
#[derive(Clone)]
pub struct PeerConnection {
    certs: Arc<[CertificateDer<'static>]>,
    verdict: Arc<RwLock<Option<Verdict>>>,
}

impl std::fmt::Debug for PeerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnection")
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

/// A successful verification: valid while the bundle snapshot it was checked
/// against is still the current one and the clock is within `[at, until)`.
struct Verdict {
    bundles: Arc<TrustBundles>,
    identity: Identity,
    at: SystemTime,
    until: SystemTime,
}

impl PeerConnection {
    /// The connection of a peer that presented `certs` (leaf first; empty when
    /// it presented none).
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Self {
        Self {
            certs: certs.into(),
            verdict: Arc::new(RwLock::new(None)),
        }
    }

    /// The peer's identity at `now` against `bundles`: the cached verdict when
    /// `bundles` is the very snapshot it was reached with and every certificate
    /// of the chain is still valid, else a full [`identity::verify_svid`] (whose
    /// success is cached). A verdict is never reused across a bundle reload or
    /// past the earliest notAfter of the chain, nor when the clock went back.
    ///
    /// # Errors
    /// What [`identity::verify_svid`] refuses.
    pub fn identity(
        &self,
        bundles: &Arc<TrustBundles>,
        now: SystemTime,
    ) -> Result<Identity, identity::IdentityError> {
        {
            let cached = self.verdict.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(v) = cached.as_ref()
                && Arc::ptr_eq(&v.bundles, bundles)
                && v.at <= now
                && now < v.until
            {
                return Ok(v.identity.clone());
            }
        }
        let verified = identity::verify_svid(&self.certs, bundles, now);
        let mut cached = self.verdict.write().unwrap_or_else(PoisonError::into_inner);
        match &verified {
            Ok(id) => {
                *cached = identity::chain_valid_until(&self.certs).map(|until| Verdict {
                    bundles: Arc::clone(bundles),
                    identity: id.clone(),
                    at: now,
                    until,
                });
            }
            Err(_) => *cached = None,
        }
        verified
    }

    /// Whether the peer presented any certificate.
    pub fn has_certs(&self) -> bool {
        !self.certs.is_empty()
    }
}

/// A tonic interceptor that admits a call only if the client certificate chain of
/// its connection verifies now, as a whole, against the current bundles, and hands
/// the verified identity to the handler (request extensions).
///
/// The TLS handshake verified the chain once, but an HTTP/2 connection outlives
/// both the SVID and the bundle it was checked against: checking per call means
/// a connection whose SVID expired, or whose trust anchor a bundle reload removed,
/// stops working at its next call. The full chain verification runs once per
/// connection and bundle snapshot ([`PeerConnection::identity`]); each call
/// compares the snapshot and the chain's earliest notAfter with now.
/// Guarantees: every refusal is `UNAUTHENTICATED` naming the rule that failed,
/// and is logged; no key material is logged.
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
        let unauthenticated =
            || Status::unauthenticated("a client X509-SVID is required (mutual TLS)");
        let peer = request
            .extensions()
            .get::<PeerConnection>()
            .filter(|p| p.has_certs())
            .ok_or_else(unauthenticated)?;
        let identity = peer
            .identity(&self.bundles.current(), SystemTime::now())
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject as _;

    use super::*;
    use crate::identity::{SpiffeId, pki::DevCa};

    fn chain_of(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("pem")
    }

    fn bundles_of(ca: &DevCa) -> Arc<TrustBundles> {
        Arc::new(
            TrustBundles::from_pem([(ca.trust_domain(), ca.cert_pem().as_bytes())])
                .expect("bundle"),
        )
    }

    #[test]
    fn a_verdict_is_reused_only_within_the_chain_validity_and_the_same_bundle_snapshot() {
        let ca = DevCa::generate("acme.test", Duration::from_secs(3600)).expect("ca");
        let id = SpiffeId::parse("spiffe://acme.test/agent/a").expect("id");
        // Issued valid from five minutes ago until ten minutes from now.
        let svid = ca.issue_svid(&id, Duration::from_secs(600)).expect("svid");
        let peer = PeerConnection::new(chain_of(&svid.cert_pem));
        let bundles = bundles_of(&ca);
        let now = SystemTime::now();
        let first = peer.identity(&bundles, now).expect("verifies");
        assert_eq!(first.spiffe_id, id);
        // Cached: the same answer while valid.
        assert_eq!(
            peer.identity(&bundles, now + Duration::from_secs(60))
                .expect("cached"),
            first
        );
        // Past the leaf's notAfter the cache does not answer: refused.
        assert!(
            peer.identity(&bundles, now + Duration::from_secs(700))
                .is_err()
        );
        // A clock that went back before the verdict re-verifies (and passes).
        assert!(peer.identity(&bundles, now).is_ok());
        assert!(
            peer.identity(&bundles, now - Duration::from_secs(30))
                .is_ok()
        );
        // A new bundle snapshot without this CA refuses at once, although
        // the old snapshot's verdict is still within its validity.
        let other = DevCa::generate("acme.test", Duration::from_secs(3600)).expect("ca");
        assert!(peer.identity(&bundles_of(&other), now).is_err());
        // And a reload back to an equal bundle (a new snapshot) verifies again.
        assert!(peer.identity(&bundles_of(&ca), now).is_ok());
    }

    #[test]
    fn a_chain_that_never_verified_is_refused_every_time() {
        let ca = DevCa::generate("acme.test", Duration::from_secs(3600)).expect("ca");
        let rogue = DevCa::generate("acme.test", Duration::from_secs(3600)).expect("ca");
        let id = SpiffeId::parse("spiffe://acme.test/agent/a").expect("id");
        let svid = rogue
            .issue_svid(&id, Duration::from_secs(600))
            .expect("svid");
        let peer = PeerConnection::new(chain_of(&svid.cert_pem));
        let bundles = bundles_of(&ca);
        for _ in 0..3 {
            assert!(peer.identity(&bundles, SystemTime::now()).is_err());
        }
        assert!(!PeerConnection::new(Vec::new()).has_certs());
    }
}
