use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::danger::ClientCertVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::{
    Identity, ServingCert, SpiffeId, SvidClientVerifier, TrustBundleSource, client_tls_config,
    identity_of_leaf, pki::DevCa, server_tls_config,
};

const HOUR: Duration = Duration::from_secs(3600);

struct Fixture {
    _dir: tempfile::TempDir,
    bundle: PathBuf,
    server_config: Arc<rustls::ServerConfig>,
    dev: DevCa,
    dir: PathBuf,
}

fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    (cert, key)
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let dev = DevCa::generate("a.test", HOUR).unwrap();
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, dev.cert_pem()).unwrap();
    let server = dev.issue_server_cert(HOUR).unwrap();
    let (cert, key) = write_pair(&dir, "server", &server.cert_pem, &server.key_pem);
    let bundles = Arc::new(
        TrustBundleSource::from_files(&BTreeMap::from([("a.test".to_owned(), bundle.clone())]))
            .unwrap(),
    );
    let serving = Arc::new(ServingCert::from_files(cert, key).unwrap());
    let server_config =
        server_tls_config(bundles, serving, crate::audit::Refusals::default()).unwrap();
    Fixture {
        _dir: tmp,
        bundle,
        server_config,
        dev,
        dir,
    }
}

/// Runs one handshake; returns the server's view (the caller's identity, or the
/// handshake error) and whether the client could complete a round trip.
async fn handshake(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> (Result<(Identity, Option<Vec<u8>>), String>, bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server_config)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let leaf = conn.peer_certificates().unwrap()[0].clone();
        let identity = identity_of_leaf(&leaf).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.ok();
        Ok((identity, alpn))
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(client_config)
            .connect(name, tcp)
            .await
            .ok()?;
        tls.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.ok()?;
        (&buf == b"pong").then_some(())
    };
    let client_ok = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap()
        .is_some();
    let server_view = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    (server_view, client_ok)
}

#[tokio::test]
async fn good_client_is_accepted_and_identified() {
    let f = fixture();
    let id = SpiffeId::parse("spiffe://a.test/agent/1").unwrap();
    let svid = f.dev.issue_svid(&id, HOUR).unwrap();
    let (cert, key) = write_pair(&f.dir, "agent", &svid.cert_pem, &svid.key_pem);
    let client = client_tls_config(&f.bundle, &cert, &key).unwrap();
    let (server_view, client_ok) = handshake(f.server_config.clone(), client).await;
    let (identity, alpn) = server_view.unwrap();
    assert!(client_ok);
    assert_eq!(identity.spiffe_id, id);
    assert_eq!(alpn.as_deref(), Some(b"h2".as_slice()));
    let der = CertificateDer::from_pem_slice(svid.cert_pem.as_bytes()).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    assert_eq!(&identity.thumbprint_s256.unwrap()[..], digest.as_ref());
}

#[tokio::test]
async fn clients_with_bad_svids_fail_the_handshake() {
    let f = fixture();
    let id = SpiffeId::parse("spiffe://a.test/agent/1").unwrap();
    // Same trust domain name, but a CA the broker does not trust.
    let rogue = DevCa::generate("a.test", HOUR).unwrap();
    let rogue_svid = rogue.issue_svid(&id, HOUR).unwrap();
    // A server certificate (no URI SAN) used as a client certificate.
    let not_svid = f.dev.issue_server_cert(HOUR).unwrap();
    for (name, issued) in [("rogue CA", rogue_svid), ("no URI SAN", not_svid)] {
        let (cert, key) = write_pair(&f.dir, name, &issued.cert_pem, &issued.key_pem);
        let client = client_tls_config(&f.bundle, &cert, &key).unwrap();
        let (server_view, client_ok) = handshake(f.server_config.clone(), client).await;
        assert!(server_view.is_err(), "{name}: server accepted the client");
        assert!(!client_ok, "{name}: client completed a round trip");
    }
}

#[tokio::test]
async fn client_rejects_a_server_outside_its_bundle() {
    let f = fixture();
    let other = tempfile::tempdir().unwrap();
    let other_ca = DevCa::generate("a.test", HOUR).unwrap();
    let other_bundle = other.path().join("bundle.pem");
    std::fs::write(&other_bundle, other_ca.cert_pem()).unwrap();
    let id = SpiffeId::parse("spiffe://a.test/agent/1").unwrap();
    let svid = f.dev.issue_svid(&id, HOUR).unwrap();
    let (cert, key) = write_pair(&f.dir, "agent", &svid.cert_pem, &svid.key_pem);
    let client = client_tls_config(&other_bundle, &cert, &key).unwrap();
    let (server_view, client_ok) = handshake(f.server_config.clone(), client).await;
    assert!(server_view.is_err());
    assert!(!client_ok);
}

#[test]
fn verifier_uses_the_current_bundles_after_reload() {
    let f = fixture();
    let bundles = Arc::new(
        TrustBundleSource::from_files(&BTreeMap::from([("a.test".to_owned(), f.bundle.clone())]))
            .unwrap(),
    );
    let verifier = SvidClientVerifier::new(Arc::clone(&bundles));
    assert!(verifier.client_auth_mandatory());
    assert!(verifier.root_hint_subjects().is_empty());
    assert!(!verifier.supported_verify_schemes().is_empty());

    let id = SpiffeId::parse("spiffe://a.test/agent/1").unwrap();
    let svid = f.dev.issue_svid(&id, HOUR).unwrap();
    let der = CertificateDer::from_pem_slice(svid.cert_pem.as_bytes()).unwrap();
    let now = UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
    assert!(verifier.verify_client_cert(&der, &[], now).is_ok());

    // Rotate the bundle to a new CA: the same verifier now rejects the old SVID.
    let next = DevCa::generate("a.test", HOUR).unwrap();
    std::fs::write(&f.bundle, next.cert_pem()).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f.bundle)
        .unwrap()
        .set_modified(SystemTime::now() + HOUR)
        .unwrap();
    assert!(bundles.reload().unwrap());
    let err = verifier.verify_client_cert(&der, &[], now).unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );
    let new_svid = next.issue_svid(&id, HOUR).unwrap();
    let new_der = CertificateDer::from_pem_slice(new_svid.cert_pem.as_bytes()).unwrap();
    assert!(verifier.verify_client_cert(&new_der, &[], now).is_ok());
}

#[test]
fn client_config_reports_bad_files() {
    let f = fixture();
    let missing = f.dir.join("missing.pem");
    let id = SpiffeId::parse("spiffe://a.test/agent/1").unwrap();
    let svid = f.dev.issue_svid(&id, HOUR).unwrap();
    let (cert, key) = write_pair(&f.dir, "agent", &svid.cert_pem, &svid.key_pem);
    let err = client_tls_config(&missing, &cert, &key).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // Key of another certificate.
    let other = f.dev.issue_svid(&id, HOUR).unwrap();
    let (_, other_key) = write_pair(&f.dir, "other", &other.cert_pem, &other.key_pem);
    let err = client_tls_config(&f.bundle, &cert, &other_key).unwrap_err();
    assert!(err.to_string().contains("key unusable"), "{err}");
}

#[tokio::test]
async fn tls12_clients_are_verified_the_same_way() {
    let f = fixture();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(f.dev.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let tls12_client = |cert_pem: &str, key_pem: &str| {
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    };
    let id = SpiffeId::parse("spiffe://a.test/agent/12").unwrap();
    let good = f.dev.issue_svid(&id, HOUR).unwrap();
    let (server_view, client_ok) = handshake(
        f.server_config.clone(),
        tls12_client(&good.cert_pem, &good.key_pem),
    )
    .await;
    assert_eq!(server_view.unwrap().0.spiffe_id, id);
    assert!(client_ok);

    let rogue = DevCa::generate("a.test", HOUR).unwrap();
    let bad = rogue.issue_svid(&id, HOUR).unwrap();
    let (server_view, client_ok) = handshake(
        f.server_config.clone(),
        tls12_client(&bad.cert_pem, &bad.key_pem),
    )
    .await;
    assert!(server_view.is_err());
    assert!(!client_ok);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let f = fixture();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(f.dev.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let (server_view, client_ok) = handshake(f.server_config.clone(), Arc::new(config)).await;
    assert!(server_view.is_err());
    assert!(!client_ok);
}

/// Two connections of one client configuration to one server configuration:
/// the server's view of each (how it was negotiated, whose chain it carries).
async fn two_connections(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> Vec<(rustls::HandshakeKind, Identity)> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(Arc::clone(&server_config))
                .accept(tcp)
                .await
                .unwrap();
            let (_, conn) = tls.get_ref();
            let kind = conn.handshake_kind().unwrap();
            let identity = identity_of_leaf(&conn.peer_certificates().unwrap()[0]).unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong").await.unwrap();
            tls.shutdown().await.ok();
            seen.push((kind, identity));
        }
        seen
    });
    for _ in 0..2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(Arc::clone(&client_config))
            .connect(name, tcp)
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        // Reading the reply also takes in the TLS 1.3 session ticket.
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_resumed_session_carries_the_client_chain_of_its_first_handshake() {
    let f = fixture();
    let id = SpiffeId::parse("spiffe://a.test/agent/resumes").unwrap();
    let svid = f.dev.issue_svid(&id, HOUR).unwrap();
    let (cert, key) = write_pair(&f.dir, "resumes", &svid.cert_pem, &svid.key_pem);
    let client = client_tls_config(&f.bundle, &cert, &key).unwrap();
    let seen = two_connections(f.server_config.clone(), client).await;
    assert_eq!(seen[0].0, rustls::HandshakeKind::Full);
    assert_eq!(
        seen[1].0,
        rustls::HandshakeKind::Resumed,
        "the second connection was not resumed"
    );
    // The chain (and so the identity the per-call check judges) is the same.
    assert_eq!(seen[0].1.spiffe_id, id);
    assert_eq!(seen[1].1.spiffe_id, id);

    // TLS 1.2 resumes by session id, with the same chain.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(f.dev.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(svid.cert_pem.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).unwrap();
    let mut tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls12.alpn_protocols = vec![b"h2".to_vec()];
    let seen = two_connections(f.server_config.clone(), Arc::new(tls12)).await;
    assert_eq!(seen[1].0, rustls::HandshakeKind::Resumed);
    assert_eq!(seen[1].1.spiffe_id, id);
}
