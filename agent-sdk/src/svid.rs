//! Where the client's X.509-SVID and trust bundle come from: the seam a SPIFFE
//! Workload API source plugs into.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    RootCertStore,
    client::WebPkiServerVerifier,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
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
/// The SDK ships [`SvidFiles`]. A Workload API source (streaming SVID and bundle
/// updates from the SPIFFE agent's socket) implements this trait too; it is not
/// part of this release.
pub trait SvidSource: fmt::Debug + Send + Sync + 'static {
    /// A rustls client configuration presenting the current SVID and trusting the
    /// current bundle. It must use the ring provider and offer ALPN `h2`
    /// ([`client_config`] builds one from parsed material).
    ///
    /// # Errors
    /// [`Error::Config`] when the material cannot be read or used.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error>;
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
