//! The broker's serving SVID and trust bundles from the SPIFFE Workload API.
//!
//! The `spiffe` crate's [`X509Source`] holds the stream open, reconnects with
//! backoff and keeps the newest material; [`WorkloadIdentity::follow`] copies
//! every update into the same [`ServingCert`] and [`TrustBundleSource`] the file
//! mode uses, so the next handshake sees it and open connections are untouched.

use std::{sync::Arc, time::Duration};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use spiffe::{X509BundleSet, X509Source, X509Svid};
use tokio::sync::watch;

use super::{IdentityError, ServingCert, TrustBundleSource, TrustBundles};

/// The serving certificate and trust bundles of a broker whose identity comes
/// from the SPIFFE Workload API.
///
/// Guarantees: [`cert`](Self::cert) and [`bundles`](Self::bundles) start with the
/// Workload API's first complete answer (construction fails otherwise: the broker
/// never serves without an SVID); an update that cannot be used (a bundle with a
/// non-CA certificate, a key that does not fit) keeps the last good material and
/// is logged; a withdrawn SVID is logged and the last one is served until it
/// expires, after which clients refuse it — the broker never invents trust.
pub struct WorkloadIdentity {
    source: X509Source,
    /// The broker's serving certificate and key.
    pub cert: Arc<ServingCert>,
    /// The trust bundles (own and federated trust domains) agents are checked against.
    pub bundles: Arc<TrustBundleSource>,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("cert", &self.cert)
            .field("bundles", &self.bundles)
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    /// Connects to the Workload API at `endpoint` (`unix:///path`) and waits at
    /// most `timeout` for the first SVID and bundles.
    ///
    /// # Errors
    /// [`IdentityError::WorkloadApi`] when the endpoint is malformed, nothing
    /// answered in time, or the first material is unusable.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, IdentityError> {
        let source = X509Source::builder()
            .endpoint(endpoint)
            .initial_sync_timeout(timeout)
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5))
            .build()
            .await
            .map_err(|e| IdentityError::WorkloadApi(format!("{endpoint}: {e}")))?;
        let svid = source.svid().map_err(|e| {
            IdentityError::WorkloadApi(format!("{endpoint}: no SVID for the broker: {e}"))
        })?;
        let bundles = source
            .bundle_set()
            .map_err(|e| IdentityError::WorkloadApi(format!("{endpoint}: no bundles: {e}")))?;
        let cert = Arc::new(ServingCert::fixed(certified_key_of(&svid)?));
        let bundles = Arc::new(TrustBundleSource::fixed(trust_bundles_of(&bundles)?));
        tracing::info!(spiffe_id = %svid.spiffe_id(), "serving SVID from the SPIFFE Workload API");
        Ok(Self {
            source,
            cert,
            bundles,
        })
    }

    /// Copies every Workload API update into [`cert`](Self::cert) and
    /// [`bundles`](Self::bundles) until `shutdown` turns true, then closes the
    /// Workload API stream.
    pub async fn follow(self, mut shutdown: watch::Receiver<bool>) {
        let mut updates = self.source.updated();
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    if let Err(e) = changed {
                        tracing::warn!(error = %e, "SPIFFE Workload API source closed; keeping the last SVID and bundles");
                        // Serve on with them (they expire by themselves) until shutdown.
                        while !*shutdown.borrow() {
                            if shutdown.changed().await.is_err() {
                                break;
                            }
                        }
                        return;
                    }
                    self.apply();
                }
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                self.source.shutdown().await;
                return;
            }
        }
    }

    fn apply(&self) {
        match self.source.svid() {
            Ok(svid) => match certified_key_of(&svid) {
                Ok(key) => {
                    self.cert.replace(key);
                    tracing::info!(spiffe_id = %svid.spiffe_id(), "serving SVID rotated");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rotated serving SVID unusable; keeping the last one")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "Workload API withdrew the serving SVID; keeping the last one until it expires")
            }
        }
        match self
            .source
            .bundle_set()
            .map_err(|e| IdentityError::WorkloadApi(e.to_string()))
        {
            Ok(set) => match trust_bundles_of(&set) {
                Ok(bundles) => {
                    self.bundles.replace(bundles);
                    tracing::info!("trust bundles updated from the Workload API");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API bundles unusable; keeping the last good set")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "Workload API bundles withdrawn; keeping the last good set")
            }
        }
    }
}

/// The rustls certified key (chain leaf first, PKCS#8 key) of an X509-SVID.
///
/// # Errors
/// [`IdentityError::WorkloadApi`] when the key does not fit the leaf or is not
/// usable with ring.
pub fn certified_key_of(svid: &X509Svid) -> Result<CertifiedKey, IdentityError> {
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        IdentityError::WorkloadApi(format!(
            "SVID {}: key unusable with the certificate: {e}",
            svid.spiffe_id()
        ))
    })
}

/// A [`TrustBundles`] snapshot of every trust domain in a Workload API bundle set.
///
/// # Errors
/// As [`TrustBundles::from_der`]: a bad trust domain name or a non-CA authority.
pub fn trust_bundles_of(set: &X509BundleSet) -> Result<TrustBundles, IdentityError> {
    TrustBundles::from_der(set.iter().map(|(td, bundle)| {
        let certs = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        (td.to_string(), certs)
    }))
}
