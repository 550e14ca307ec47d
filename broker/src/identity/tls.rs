//! rustls configurations: the broker's mTLS server and a client for the CLI and tests.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    client::{WebPkiServerVerifier, danger::HandshakeSignatureValid},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::{
    bundle::TrustBundleSource,
    error::{IdentityError, SvidRule},
    files::{file_error, parse_pem_certs, read_stamped},
    serving::ServingCert,
    svid::verify_svid,
};

const ALPN_H2: &[u8] = b"h2";

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client-certificate verifier that accepts exactly the X509-SVIDs that
/// [`verify_svid`] accepts against the **current** bundles of a [`TrustBundleSource`],
/// so a bundle reload applies to the next handshake.
///
/// Guarantees: a client certificate is mandatory; a rejected peer fails the handshake
/// and is logged with `tracing::warn!` (its SPIFFE ID if parseable and the rule it
/// broke, never key material); handshake signatures are checked with ring.
#[derive(Debug)]
pub struct SvidClientVerifier {
    bundles: Arc<TrustBundleSource>,
    provider: Arc<CryptoProvider>,
    refusals: crate::audit::Refusals,
    /// False on the OAuth listener: a client without a certificate may
    /// connect (for the public metadata); one that presents a certificate
    /// must present a valid X509-SVID.
    mandatory: bool,
}

impl SvidClientVerifier {
    /// A verifier reading `bundles` at every handshake.
    pub fn new(bundles: Arc<TrustBundleSource>) -> Self {
        Self {
            bundles,
            provider: ring_provider(),
            refusals: crate::audit::Refusals::default(),
            mandatory: true,
        }
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients present their one SVID anyway, and hints would have to
        // follow bundle reloads and would disclose our CA names to anyone who connects.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(intermediates.len() + 1);
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        match verify_svid(&chain, &self.bundles.current(), now) {
            Ok(identity) => {
                tracing::debug!(spiffe_id = %identity.spiffe_id, "client X509-SVID accepted");
                Ok(ClientCertVerified::assertion())
            }
            Err(err) => {
                tracing::warn!(error = %err, "client X509-SVID rejected");
                self.refusals
                    .authentication_refused(&trust_domain_of(&err), &err.to_string());
                Err(rustls::Error::InvalidCertificate(certificate_error(&err)))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The trust domain a rejected SVID named, or "" if it named none readable.
fn trust_domain_of(err: &IdentityError) -> String {
    match err {
        IdentityError::InvalidSvid {
            rule: SvidRule::UnknownTrustDomain(td),
            ..
        } => td.to_string(),
        IdentityError::InvalidSvid {
            spiffe_id: Some(id),
            ..
        } => id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

/// Chooses the TLS alert the rejected client sees; the detail stays in our log.
fn certificate_error(err: &IdentityError) -> CertificateError {
    match err {
        IdentityError::InvalidSvid { rule, .. } => match rule {
            SvidRule::Expired => CertificateError::Expired,
            SvidRule::NotYetValid => CertificateError::NotValidYet,
            SvidRule::UntrustedIssuer | SvidRule::UnknownTrustDomain(_) => {
                CertificateError::UnknownIssuer
            }
            SvidRule::Malformed(_) => CertificateError::BadEncoding,
            _ => CertificateError::ApplicationVerificationFailure,
        },
        _ => CertificateError::ApplicationVerificationFailure,
    }
}

/// The broker's mTLS server configuration.
///
/// Guarantees: TLS 1.3 and 1.2 only, ring provider; a client certificate is required
/// and verified by [`SvidClientVerifier`] on the current bundles of `bundles`; the
/// server certificate comes from `cert` at each handshake (so reloads apply); ALPN
/// offers only `h2`, as gRPC requires; sessions resume (see [`RESUMABLE_SESSIONS`]),
/// which is safe only because every call re-checks the chain it carries.
///
/// # Errors
///
/// [`IdentityError::Tls`] if rustls refuses the protocol versions for the provider
/// (which would be a build misconfiguration).
pub fn server_tls_config(
    bundles: Arc<TrustBundleSource>,
    cert: Arc<ServingCert>,
    refusals: crate::audit::Refusals,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    svid_server_config(bundles, cert, refusals, true, &[ALPN_H2])
}

/// The server configuration of the OAuth listener: as [`server_tls_config`],
/// but a client certificate is requested, not required (a client that
/// presents one must present a valid X509-SVID, or the handshake fails), and
/// ALPN offers `h2` and `http/1.1` for off-the-shelf HTTP clients.
///
/// # Errors
/// [`IdentityError::Tls`] as [`server_tls_config`].
pub fn oauth_tls_config(
    bundles: Arc<TrustBundleSource>,
    cert: Arc<ServingCert>,
    refusals: crate::audit::Refusals,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    svid_server_config(bundles, cert, refusals, false, &[ALPN_H2, b"http/1.1"])
}

/// A server configuration verifying client X509-SVIDs with
/// [`SvidClientVerifier`] (`mandatory`: whether one is required), offering `alpn`.
fn svid_server_config(
    bundles: Arc<TrustBundleSource>,
    cert: Arc<ServingCert>,
    refusals: crate::audit::Refusals,
    mandatory: bool,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let provider = ring_provider();
    let verifier = Arc::new(SvidClientVerifier {
        bundles,
        provider: Arc::clone(&provider),
        refusals,
        mandatory,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    enable_resumption(&mut config);
    Ok(Arc::new(config))
}

/// The server configuration of the JWT-SVID listener: the broker's certificate,
/// no client certificate requested (callers authenticate per request with a
/// bearer JWT-SVID), TLS 1.3/1.2 with ring, ALPN `h2`, session resumption as on the
/// agent listener.
///
/// # Errors
/// [`IdentityError::Tls`] if rustls refuses the configuration.
pub fn server_tls_config_without_client_auth(
    cert: Arc<ServingCert>,
) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    enable_resumption(&mut config);
    Ok(Arc::new(config))
}

/// Sessions the broker remembers for resumption (about 1 KiB each, in memory).
pub const RESUMABLE_SESSIONS: usize = 4096;

/// Stateful TLS session resumption: TLS 1.3 hands the client one ticket that
/// is only a key into this process's bounded in-memory cache (no ticket
/// encryption key exists to leak or rotate; sessions do not survive a
/// restart), TLS 1.2 uses session ids into the same cache. rustls resumes
/// TLS 1.3 with a fresh ECDHE exchange (psk_dhe_ke), so forward secrecy holds.
///
/// A resumed handshake does not run the client verifier again, but it carries
/// the client chain of the original handshake, and the agent listener judges
/// that chain at every call against the trust bundles and the clock of that
/// moment ([`PeerConnection`](crate::api::PeerConnection)): an SVID that
/// expired, or whose anchor a reload removed, is refused on its first call
/// whether its connection was fully negotiated or resumed.
fn enable_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(RESUMABLE_SESSIONS);
    config.send_tls13_tickets = 1;
}

/// A client configuration that presents an SVID and checks the broker's certificate.
///
/// Guarantees: TLS 1.3 and 1.2, ring provider, ALPN `h2`; the server certificate must
/// chain (webpki) to a certificate of `bundle_pem` and carry a DNS or IP SAN matching
/// the server name the caller connects with.
///
/// # Errors
///
/// [`IdentityError::File`] when a file cannot be read or parsed, or the key does not
/// fit the certificate; [`IdentityError::Tls`] when rustls rejects the material.
pub fn client_tls_config(
    bundle_pem: &Path,
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
    let provider = ring_provider();
    let (bundle, _) = read_stamped(bundle_pem)?;
    let mut roots = RootCertStore::empty();
    for cert in parse_pem_certs(bundle_pem, &bundle)? {
        roots
            .add(cert)
            .map_err(|e| file_error(bundle_pem, format!("unusable trust anchor: {e}")))?;
    }
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;

    let (chain_pem, _) = read_stamped(cert_pem)?;
    let chain = parse_pem_certs(cert_pem, &chain_pem)?;
    let (key_bytes, _) = read_stamped(key_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|_| file_error(key_pem, "no usable PRIVATE KEY block found"))?;

    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| file_error(key_pem, format!("key unusable with the certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
