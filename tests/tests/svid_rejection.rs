//! Real mutual TLS against a real broker: every client certificate that breaks an
//! X509-SVID rule is refused at the handshake, and the broker logs which rule.
//!
//! The bad certificates are built with `rcgen` from a CA this test controls. That CA
//! is appended to the broker's `acme.test` bundle file before the broker starts (a
//! bundle file may hold several CA certificates), so a rejection is always due to the
//! rule under test and never to an unknown issuer — which the good certificate from the
//! same CA proves. Table-driven: one row per rule.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use leash_broker::{cli::client, identity::client_tls_config};
use leash_e2e::{BrokerOptions, TestBroker, TestPki, eventually, logs, pb};
use pb::verifier_client::VerifierClient;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

const HOUR: Duration = Duration::from_secs(3_600);

// ---------------------------------------------------------------- a CA we control

/// A CA whose key this test holds, so it can sign anything.
struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A SPIFFE signing CA for `acme.test` (cA=true, keyCertSign + cRLSign, URI SAN of the domain).
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("e2e CA {name}"));
        params.not_before = (SystemTime::now() - 24 * HOUR).into();
        params.not_after = (SystemTime::now() + 24 * HOUR).into();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri("spiffe://acme.test")];
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Signs `params` for a fresh key; returns (certificate PEM, key PEM).
    fn sign(&self, params: &CertificateParams) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Signs an intermediate CA from `params` and returns it as a CA that can sign.
    fn sign_ca(&self, params: CertificateParams) -> Self {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }
}

/// The parameters of a valid intermediate signing CA for `acme.test` (cA=true,
/// keyCertSign, the trust domain's SPIFFE ID without a path). Rows break one thing.
fn intermediate_params(change: impl FnOnce(&mut CertificateParams)) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "e2e intermediate");
    params.not_before = (SystemTime::now() - HOUR).into();
    params.not_after = (SystemTime::now() + HOUR).into();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri("spiffe://acme.test")];
    params.use_authority_key_identifier_extension = true;
    change(&mut params);
    params
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// The parameters of a valid X509-SVID for `id`: one URI SAN, not a CA, critical key
/// usage digitalSignature only, EKU clientAuth, valid now. Rows break one thing each.
fn svid_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.not_before = (SystemTime::now() - HOUR).into();
    params.not_after = (SystemTime::now() + HOUR).into();
    params.subject_alt_names = vec![uri(id)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params
}

// ---------------------------------------------------------------- the table

/// Which CA signs a row's certificate.
#[derive(Debug, Clone, Copy)]
enum Signer {
    /// The CA appended to the broker's `acme.test` bundle.
    Trusted,
    /// A CA the broker has never seen.
    Untrusted,
}

/// One bad certificate: how to build it and what the broker must log about it.
struct BadCert {
    name: &'static str,
    params: CertificateParams,
    signer: Signer,
    /// Words of the rule's message (identity/error.rs) the rejection log line must hold.
    rule_words: &'static str,
    /// The SPIFFE ID the log line names, when the leaf's ID is parseable.
    logged_id: Option<&'static str>,
    /// An intermediate CA between the signer and the leaf, presented after the leaf.
    via: Option<CertificateParams>,
}

fn row(
    name: &'static str,
    rule_words: &'static str,
    logged_id: Option<&'static str>,
    params: CertificateParams,
) -> BadCert {
    BadCert {
        name,
        params,
        signer: Signer::Trusted,
        rule_words,
        logged_id,
        via: None,
    }
}

/// A valid leaf for `id`, issued by an intermediate built from `intermediate`.
fn via(
    name: &'static str,
    rule_words: &'static str,
    id: &'static str,
    intermediate: CertificateParams,
) -> BadCert {
    BadCert {
        via: Some(intermediate),
        ..row(name, rule_words, Some(id), svid_params(id))
    }
}

/// Starts from a valid SVID for `id` and applies `change`.
fn with(id: &str, change: impl FnOnce(&mut CertificateParams)) -> CertificateParams {
    let mut p = svid_params(id);
    change(&mut p);
    p
}

fn bad_certs() -> Vec<BadCert> {
    const KEY_USAGE_OID: &[u64] = &[2, 5, 29, 15];
    vec![
        row(
            "two-uri-sans",
            "leaf has 2 URI SANs, exactly one is allowed",
            None,
            with("spiffe://acme.test/agent/two-a", |p| {
                p.subject_alt_names
                    .push(uri("spiffe://acme.test/agent/two-b"));
            }),
        ),
        row(
            "no-uri-san",
            "leaf has no URI SAN",
            None,
            with("spiffe://acme.test/agent/none", |p| {
                p.subject_alt_names = vec![SanType::DnsName("agent.acme.test".try_into().unwrap())];
            }),
        ),
        row(
            "https-scheme",
            "scheme must be exactly `spiffe://`",
            None,
            svid_params("https://acme.test/agent/https"),
        ),
        row(
            "upper-case-trust-domain",
            "trust domain must be lower case",
            None,
            svid_params("spiffe://ACME.test/agent/upper"),
        ),
        row(
            "empty-path-segment",
            "path has an empty segment",
            None,
            svid_params("spiffe://acme.test/agent//empty"),
        ),
        row(
            "dot-segment",
            "path segments `.` and `..` are not allowed",
            None,
            svid_params("spiffe://acme.test/agent/./dot"),
        ),
        row(
            "dot-dot-segment",
            "path segments `.` and `..` are not allowed",
            None,
            svid_params("spiffe://acme.test/agent/../dotdot"),
        ),
        row(
            "query",
            "a query (`?`) is not allowed",
            None,
            svid_params("spiffe://acme.test/agent/query?debug=1"),
        ),
        row(
            "fragment",
            "a fragment (`#`) is not allowed",
            None,
            svid_params("spiffe://acme.test/agent/fragment#top"),
        ),
        row(
            "port",
            "a port is not allowed",
            None,
            svid_params("spiffe://acme.test:8443/agent/port"),
        ),
        row(
            "userinfo",
            "userinfo (`user@`) is not allowed",
            None,
            svid_params("spiffe://admin@acme.test/agent/userinfo"),
        ),
        row(
            "percent-encoding",
            "percent-encoding (`%`) is not allowed",
            None,
            svid_params("spiffe://acme.test/agent/p%41th"),
        ),
        row(
            "trailing-slash",
            "path must not end with `/`",
            None,
            svid_params("spiffe://acme.test/agent/trailing/"),
        ),
        row(
            "root-path-only",
            "leaf SPIFFE ID has no path",
            Some("spiffe://acme.test"),
            svid_params("spiffe://acme.test"),
        ),
        row(
            "leaf-is-ca",
            "leaf has basicConstraints cA=true",
            Some("spiffe://acme.test/agent/leaf-is-ca"),
            with("spiffe://acme.test/agent/leaf-is-ca", |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }),
        ),
        row(
            "key-cert-sign",
            "leaf key usage sets keyCertSign",
            Some("spiffe://acme.test/agent/key-cert-sign"),
            with("spiffe://acme.test/agent/key-cert-sign", |p| {
                p.key_usages.push(KeyUsagePurpose::KeyCertSign);
            }),
        ),
        row(
            "crl-sign",
            "leaf key usage sets cRLSign",
            Some("spiffe://acme.test/agent/crl-sign"),
            with("spiffe://acme.test/agent/crl-sign", |p| {
                p.key_usages.push(KeyUsagePurpose::CrlSign);
            }),
        ),
        row(
            "no-digital-signature",
            "leaf key usage lacks digitalSignature",
            Some("spiffe://acme.test/agent/no-digital-signature"),
            with("spiffe://acme.test/agent/no-digital-signature", |p| {
                p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
            }),
        ),
        row(
            "no-key-usage",
            "leaf has no key usage extension",
            Some("spiffe://acme.test/agent/no-key-usage"),
            with("spiffe://acme.test/agent/no-key-usage", |p| {
                p.key_usages.clear();
            }),
        ),
        row(
            "key-usage-not-critical",
            "leaf key usage extension is not critical",
            Some("spiffe://acme.test/agent/ku-not-critical"),
            with("spiffe://acme.test/agent/ku-not-critical", |p| {
                // digitalSignature (BIT STRING, 7 unused bits, 0x80), non-critical.
                p.key_usages.clear();
                p.custom_extensions = vec![CustomExtension::from_oid_content(
                    KEY_USAGE_OID,
                    vec![0x03, 0x02, 0x07, 0x80],
                )];
            }),
        ),
        row(
            "expired",
            "certificate has expired",
            Some("spiffe://acme.test/agent/expired"),
            with("spiffe://acme.test/agent/expired", |p| {
                p.not_before = (SystemTime::now() - 2 * HOUR).into();
                p.not_after = (SystemTime::now() - HOUR).into();
            }),
        ),
        row(
            "not-yet-valid",
            "certificate is not yet valid",
            Some("spiffe://acme.test/agent/not-yet-valid"),
            with("spiffe://acme.test/agent/not-yet-valid", |p| {
                p.not_before = (SystemTime::now() + HOUR).into();
                p.not_after = (SystemTime::now() + 2 * HOUR).into();
            }),
        ),
        BadCert {
            name: "untrusted-ca",
            params: svid_params("spiffe://acme.test/agent/untrusted"),
            signer: Signer::Untrusted,
            rule_words: "chain does not lead to a trust anchor of the leaf's trust domain",
            logged_id: Some("spiffe://acme.test/agent/untrusted"),
            via: None,
        },
        row(
            // Signed by a CA trusted for acme.test: it must not vouch for another domain.
            "other-trust-domain",
            "no trust bundle for trust domain \"other.test\"",
            Some("spiffe://other.test/agent/x"),
            svid_params("spiffe://other.test/agent/x"),
        ),
        row(
            "server-auth-only",
            "path validation failed",
            Some("spiffe://acme.test/agent/server-auth-only"),
            with("spiffe://acme.test/agent/server-auth-only", |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }),
        ),
        // The CA certificates between the leaf and the anchor (RFC 5280 4.2.1.3,
        // X509-SVID.md 3.2 and 4.3), presented by the client after its leaf.
        via(
            "intermediate-without-key-cert-sign",
            "intermediate #1 key usage lacks keyCertSign",
            "spiffe://acme.test/agent/via-no-key-cert-sign",
            intermediate_params(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign]),
        ),
        via(
            "intermediate-not-a-ca",
            "intermediate #1 is not a CA",
            "spiffe://acme.test/agent/via-not-a-ca",
            intermediate_params(|p| p.is_ca = IsCa::ExplicitNoCa),
        ),
        via(
            "intermediate-spiffe-id-with-path",
            "intermediate #1 SPIFFE ID has a path",
            "spiffe://acme.test/agent/via-path",
            intermediate_params(|p| {
                p.subject_alt_names = vec![uri("spiffe://acme.test/issuing/ca")];
            }),
        ),
    ]
}

// ---------------------------------------------------------------- harness

/// A broker that trusts `ca` for `acme.test` in addition to its own PKI's CA.
async fn broker_trusting(ca: &TestCa) -> TestBroker {
    let pki = TestPki::new();
    let mut bundle = std::fs::OpenOptions::new()
        .append(true)
        .open(pki.bundle())
        .unwrap();
    bundle.write_all(b"\n").unwrap();
    bundle.write_all(ca.cert_pem.as_bytes()).unwrap();
    drop(bundle);
    TestBroker::start_with_pki(BrokerOptions::memory(), pki.into(), "leash").await
}

fn write_pair(dir: &Path, name: &str, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (cert_path, key_path)
}

/// Connects with `cert`/`key` and calls GetJwks. Unlike `TestBroker::channel_with` it
/// does not panic on a refused connection: any connect or RPC failure is returned.
/// A client configuration that cannot be built is a broken test, so that panics.
async fn get_jwks_with(broker: &TestBroker, cert: &Path, key: &Path) -> Result<String, String> {
    let tls = client_tls_config(&broker.pki.bundle(), cert, key)
        .unwrap_or_else(|e| panic!("client TLS config for {}: {e}", cert.display()));
    let attempt = async {
        let channel = client::connect_with(&broker.url(), tls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        VerifierClient::new(channel)
            .get_jwks(pb::GetJwksRequest {})
            .await
            .map(|r| r.into_inner().jwks_json)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// True if `why` (from [`get_jwks_with`]) is a connection-level failure.
fn handshake_refused(why: &str) -> bool {
    why.starts_with("connect: ")
        || why.starts_with("Unavailable: ")
        || why == "Unknown: transport error"
}

/// True once a rejection log line holds `words` (and `id`, when given).
fn rejection_logged(words: &str, id: Option<&str>) -> bool {
    logs().lines().any(|l| {
        l.contains("X509-SVID rejected")
            && l.contains(words)
            && id.is_none_or(|id| l.contains(&format!("for {id}:")))
    })
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn bad_svids_are_refused_at_the_handshake_and_logged() {
    let trusted = TestCa::new("trusted");
    let untrusted = TestCa::new("untrusted");
    let broker = broker_trusting(&trusted).await;
    let dir = tempfile::tempdir().unwrap();

    // The control: a good SVID from the same CA works, so the harness is not
    // rejecting everything.
    let good = write_pair(
        dir.path(),
        "good",
        &trusted.sign(&svid_params("spiffe://acme.test/agent/x")),
    );
    let jwks = get_jwks_with(&broker, &good.0, &good.1).await;
    assert!(
        jwks.as_ref().is_ok_and(|j| j.contains("\"keys\"")),
        "a valid SVID from the test CA must be accepted: {jwks:?}"
    );

    let rows = bad_certs();
    assert!(rows.len() >= 28);
    let mut accepted = Vec::new();
    let mut unlogged = Vec::new();
    let mut wrong_failure = Vec::new();
    for case in &rows {
        let ca = match case.signer {
            Signer::Trusted => &trusted,
            Signer::Untrusted => &untrusted,
        };
        let (cert, key) = match &case.via {
            None => write_pair(dir.path(), case.name, &ca.sign(&case.params)),
            Some(inter) => {
                let inter = ca.sign_ca(inter.clone());
                let (leaf, key) = inter.sign(&case.params);
                let chain = format!("{leaf}{}", inter.cert_pem);
                write_pair(dir.path(), case.name, &(chain, key))
            }
        };
        match get_jwks_with(&broker, &cert, &key).await {
            Ok(_) => accepted.push(case.name),
            // A refused handshake reaches the client as a transport failure (tonic
            // reports UNKNOWN "transport error" or UNAVAILABLE), never as an answer
            // from a service, which would mean the TLS layer let the peer in.
            Err(why) if handshake_refused(&why) => {}
            Err(why) => wrong_failure.push(format!("{}: {why}", case.name)),
        }
        // The broker logs the rule before it sends the alert; poll briefly anyway.
        let logged = eventually(Duration::from_secs(2), || async {
            rejection_logged(case.rule_words, case.logged_id)
        })
        .await;
        if logged.is_none() {
            unlogged.push(case.name);
        }
    }
    assert!(
        accepted.is_empty(),
        "the broker accepted bad client certificates: {accepted:?}"
    );
    assert!(
        wrong_failure.is_empty(),
        "bad certificates failed past the handshake: {wrong_failure:?}"
    );
    assert!(
        unlogged.is_empty(),
        "no rejection log line naming the expected rule for: {unlogged:?}"
    );

    // The broker still serves good clients after all those refusals.
    let again = get_jwks_with(&broker, &good.0, &good.1).await;
    assert!(
        again.is_ok(),
        "good SVID refused after the bad ones: {again:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn the_brokers_own_pki_svid_is_accepted_alongside_an_extra_ca() {
    // Appending a CA to the bundle must not break the CA that was already there.
    let extra = TestCa::new("extra");
    let broker = broker_trusting(&extra).await;
    let files = broker.pki.svid("agent/own");
    let r = get_jwks_with(&broker, &files.cert, &files.key).await;
    assert!(
        r.is_ok(),
        "SVID from the first CA in the bundle refused: {r:?}"
    );
    broker.stop().await;
}
