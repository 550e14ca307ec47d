//! Where the client's X.509-SVID and trust bundle come from: PEM files, or the
//! SPIFFE Workload API.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    RootCertStore,
    client::WebPkiServerVerifier,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
};

use crate::Error;

/// The largest PEM file the SDK reads (a chain or a bundle is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// A source of the TLS identity the client presents (its X.509-SVID and key) and
/// of the trust bundle the broker's certificate must chain to.
///
/// [`tls_config`](SvidSource::tls_config) is called for every new connection to the
/// broker, so a source whose SVID rotates (files rewritten by an agent sidecar,
/// or the SPIFFE Workload API) is picked up by the next connection.
///
/// The SDK ships [`SvidFiles`] and [`WorkloadApiSource`].
pub trait SvidSource: fmt::Debug + Send + Sync + 'static {
    /// A rustls client configuration presenting the current SVID and trusting the
    /// current bundle. It must use the ring provider and offer ALPN `h2`
    /// ([`client_config`] builds one from parsed material).
    ///
    /// # Errors
    /// [`Error::Config`] when the material cannot be read or used.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error>;

    /// A number that changes whenever the SVID or bundle changes. When it differs
    /// from the one the client's connection was opened with, the client opens a
    /// new connection for the calls that follow (calls in flight finish on the old
    /// one, so a rotation fails no call). Sources that cannot tell return a
    /// constant (the default), and rotation then applies at the next reconnection.
    fn generation(&self) -> u64 {
        0
    }
}

/// An SVID, its key and a trust bundle read from PEM files, re-read at every new
/// connection.
#[derive(Debug, Clone)]
pub struct SvidFiles {
    /// The X.509-SVID chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The SVID's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Certificates the broker's serving certificate must chain to (PEM).
    pub bundle: PathBuf,
}

impl SvidSource for SvidFiles {
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let bundle = certs(&self.bundle)?;
        let chain = certs(&self.cert)?;
        let key_pem = read(&self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            Error::Config(format!(
                "{}: no usable PRIVATE KEY block",
                self.key.display()
            ))
        })?;
        client_config(bundle, chain, key)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    let err = |e: String| Error::Config(format!("{}: {e}", path.display()));
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    if len > MAX_PEM_BYTES {
        return Err(err(format!("larger than {MAX_PEM_BYTES} bytes")));
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{}: no CERTIFICATE block",
            path.display()
        )));
    }
    Ok(certs)
}

/// Builds the client configuration the SDK uses: TLS 1.3 and 1.2 with the ring
/// provider, the broker's certificate verified (webpki, DNS or IP SAN) against
/// `bundle`, `chain`/`key` presented as the client certificate, ALPN `h2`.
///
/// # Errors
/// [`Error::Config`] when a bundle certificate is unusable as a trust anchor or
/// the key does not fit the chain.
pub fn client_config(
    bundle: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in bundle {
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("unusable trust anchor: {e}")))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Config(format!("trust bundle: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Error::Config(format!("SVID key unusable with its certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The agent's X.509-SVID and trust bundles from the SPIFFE Workload API (for
/// example a SPIRE agent's socket), following every rotation it pushes.
///
/// Guarantees: [`tls_config`](SvidSource::tls_config) always presents the newest
/// SVID the Workload API delivered and trusts the newest bundle of the SVID's
/// **own** trust domain for the broker's certificate (a federated domain's CA
/// cannot vouch for the broker); [`generation`](SvidSource::generation) changes at
/// every update, so a [`Client`](crate::Client) moves its calls to a connection
/// made with the new SVID. When the Workload API withdraws the SVID, new
/// connections fail with [`Error::Config`] instead of using stale material.
pub struct WorkloadApiSource {
    source: spiffe::X509Source,
    updates: spiffe::X509SourceUpdates,
}

impl WorkloadApiSource {
    /// Connects to the Workload API at `endpoint` (`unix:///path/to/socket`), or
    /// at `SPIFFE_ENDPOINT_SOCKET` when `None`, and waits (at most `timeout`) for
    /// the first SVID and bundles.
    ///
    /// # Errors
    /// [`Error::Config`] when no endpoint is given or set, it is malformed, or no
    /// SVID arrived within `timeout`.
    pub async fn connect(endpoint: Option<&str>, timeout: Duration) -> Result<Self, Error> {
        let mut builder = spiffe::X509Source::builder()
            .initial_sync_timeout(timeout)
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5));
        match endpoint {
            Some(e) => builder = builder.endpoint(e),
            None if std::env::var_os(spiffe::constants::SPIFFE_SOCKET_ENV).is_none() => {
                return Err(Error::Config(format!(
                    "no Workload API endpoint: pass one or set {}",
                    spiffe::constants::SPIFFE_SOCKET_ENV
                )));
            }
            None => {}
        }
        let source = builder
            .build()
            .await
            .map_err(|e| Error::Config(format!("SPIFFE Workload API: {e}")))?;
        let updates = source.updated();
        Ok(Self { source, updates })
    }

    /// The SPIFFE ID of the SVID currently held.
    ///
    /// # Errors
    /// [`Error::Config`] when the Workload API has withdrawn it.
    pub fn spiffe_id(&self) -> Result<String, Error> {
        Ok(self.svid()?.spiffe_id().to_string())
    }

    fn svid(&self) -> Result<Arc<spiffe::X509Svid>, Error> {
        self.source
            .svid()
            .map_err(|e| Error::Config(format!("SPIFFE Workload API: no SVID: {e}")))
    }
}

impl fmt::Debug for WorkloadApiSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadApiSource")
            .field("generation", &self.updates.last())
            .field("spiffe_id", &self.spiffe_id().ok())
            .finish_non_exhaustive()
    }
}

impl SvidSource for WorkloadApiSource {
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let svid = self.svid()?;
        let bundles = self
            .source
            .bundle_set()
            .map_err(|e| Error::Config(format!("SPIFFE Workload API: no bundles: {e}")))?;
        let own = svid.spiffe_id().trust_domain();
        let bundle = bundles.get(own).ok_or_else(|| {
            Error::Config(format!(
                "SPIFFE Workload API: no bundle for the SVID's trust domain {own}"
            ))
        })?;
        let roots = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        client_config(roots, chain, key)
    }

    fn generation(&self) -> u64 {
        self.updates.last()
    }
}
