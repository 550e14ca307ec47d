//! A task keeps the kind of proof it was begun with. A task begun over mutual TLS
//! has certificate-bound credentials; a JWT-SVID of the same SPIFFE ID must not
//! renew, complete or replay it (and so shed the binding), nor the reverse. With
//! `tls.task_binding = "spiffe_id"` (the default) a rotated SVID of the same ID
//! renews, and the fresh credentials are bound to it; with `"key"` renewals must
//! come from the key that began the task. Real mTLS brokers on a real Redis: the
//! binding is stored with the task and read back.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_e2e::{BrokerOptions, RedisServer, TestBroker, free_port, pb, review_request};
use pb::broker_client::BrokerClient;
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::{Value, json};
use tonic::{Code, Request, transport::Channel};

const AUDIENCE: &str = "spiffe://acme.test/leash";
const AGENT: &str = "agent/bound";

/// A JWT authority for `acme.test`, independent of the broker's code.
struct Authority {
    key: EcdsaKeyPair,
}

impl Authority {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self { key }
    }

    fn jwks(&self) -> String {
        let point = self.key.public_key().as_ref();
        json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]})
        .to_string()
    }

    /// A JWT-SVID for `spiffe://acme.test/<path>`, valid for two minutes.
    fn token(&self, path: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = json!({ "alg": "ES256", "kid": "k1", "typ": "JWT" });
        let claims = json!({
            "sub": format!("spiffe://acme.test/{path}"), "aud": AUDIENCE, "exp": now + 120,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

struct Setup {
    broker: TestBroker,
    jwt_port: u16,
    authority: Authority,
    _redis: RedisServer,
    _bundles: tempfile::TempDir,
}

/// A broker on a real Redis with both listeners; `tls_extra` is appended to `[tls]`.
async fn setup(tls_extra: &str) -> Setup {
    let redis = RedisServer::start();
    let authority = Authority::new();
    let bundles = tempfile::tempdir().unwrap();
    std::fs::write(bundles.path().join("acme.json"), authority.jwks()).unwrap();
    let jwt_port = free_port();
    let pki = Arc::new(leash_e2e::TestPki::new());
    let mut options = BrokerOptions::redis(&redis);
    options.tls_toml = Some(format!(
        "cert = \"{dir}/broker.pem\"\nkey = \"{dir}/broker-key.pem\"\nbundles = {{ \"acme.test\" = \"{dir}/bundle.pem\" }}\n{tls_extra}",
        dir = pki.dir.path().display()
    ));
    options.extra_toml = format!(
        "[jwt_svid]\nlisten = \"127.0.0.1:{jwt_port}\"\naudience = \"{AUDIENCE}\"\nbundles = {{ \"acme.test\" = \"{}\" }}\n",
        bundles.path().join("acme.json").display()
    );
    let broker = TestBroker::start_with_pki(options, pki, "leash").await;
    Setup {
        broker,
        jwt_port,
        authority,
        _redis: redis,
        _bundles: bundles,
    }
}

/// A channel to the JWT-SVID listener (server-authenticated TLS only).
async fn bearer_channel(s: &Setup) -> Channel {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(s.broker.pki.bundle()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let url = format!("https://localhost:{}", s.jwt_port);
    for _ in 0..50 {
        if let Ok(c) = leash_broker::cli::client::connect_with(&url, Arc::new(config.clone())).await
        {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the JWT-SVID listener never came up");
}

fn bearer<T>(body: T, token: &str) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn renew_req(task_id: &str) -> pb::RenewLeaseRequest {
    pb::RenewLeaseRequest {
        task_id: task_id.to_owned(),
    }
}

fn complete_req(task_id: &str) -> pb::CompleteTaskRequest {
    pb::CompleteTaskRequest {
        task_id: task_id.to_owned(),
        ..Default::default()
    }
}

/// `cnf.x5t#S256` of the JWT credential of a response, if bound.
fn cnf(credentials: &[pb::Credential]) -> Option<String> {
    let jwt = &credentials
        .iter()
        .find(|c| c.kind == pb::CredentialKind::Jwt as i32)?
        .value;
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    claims["cnf"]["x5t#S256"].as_str().map(str::to_owned)
}

fn thumbprint_of_pem(path: &std::path::Path) -> String {
    let der = CertificateDer::from_pem_file(path).unwrap();
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der.as_ref()))
}

fn denied(status: &tonic::Status, words: &str) -> bool {
    status.code() == Code::PermissionDenied && status.message().contains(words)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_svid_cannot_renew_complete_or_replay_a_task_begun_over_mtls() {
    let s = setup("").await;
    let mut mtls = s.broker.broker(AGENT).await;
    let mut request = review_request();
    request.idempotency_key = "binding-1".into();
    let begun = mtls.begin_task(request.clone()).await.unwrap().into_inner();
    let bound = cnf(&begun.credentials).expect("mTLS credentials are bound");

    let mut jwt = BrokerClient::new(bearer_channel(&s).await);
    let token = s.authority.token(AGENT);
    let renew = jwt
        .renew_lease(bearer(renew_req(&begun.task_id), &token))
        .await
        .unwrap_err();
    assert!(denied(&renew, "mutual TLS"), "renew: {renew:?}");
    let replay = jwt
        .begin_task(bearer(request.clone(), &token))
        .await
        .unwrap_err();
    assert!(denied(&replay, "mutual TLS"), "replay: {replay:?}");
    let complete = jwt
        .complete_task(bearer(complete_req(&begun.task_id), &token))
        .await
        .unwrap_err();
    assert!(denied(&complete, "mutual TLS"), "complete: {complete:?}");

    // Nothing changed: the owner's connection renews, and still gets bound credentials.
    let renewed = mtls
        .renew_lease(renew_req(&begun.task_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cnf(&renewed.credentials).as_deref(), Some(bound.as_str()));
    let replayed = mtls.begin_task(request).await.unwrap().into_inner();
    assert!(replayed.replayed);
    assert_eq!(cnf(&replayed.credentials).as_deref(), Some(bound.as_str()));
    assert!(
        leash_e2e::logs()
            .lines()
            .any(|l| l.contains("task.denied") && l.contains("mutual TLS")),
        "the refusal is not in the audit trail"
    );
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_begun_with_a_jwt_svid_is_renewed_only_with_a_jwt_svid() {
    let s = setup("").await;
    let mut jwt = BrokerClient::new(bearer_channel(&s).await);
    let begun = jwt
        .begin_task(bearer(review_request(), &s.authority.token(AGENT)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cnf(&begun.credentials), None);

    let mut mtls = s.broker.broker(AGENT).await;
    let renew = mtls
        .renew_lease(renew_req(&begun.task_id))
        .await
        .unwrap_err();
    assert!(denied(&renew, "JWT-SVID"), "renew: {renew:?}");
    jwt.renew_lease(bearer(renew_req(&begun.task_id), &s.authority.token(AGENT)))
        .await
        .unwrap();
    jwt.complete_task(bearer(
        complete_req(&begun.task_id),
        &s.authority.token(AGENT),
    ))
    .await
    .unwrap();
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_key_binding_only_the_key_that_began_the_task_renews_it() {
    let s = setup("task_binding = \"key\"").await;
    let mut first = s.broker.broker(AGENT).await;
    let begun = first
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    // Another SVID of the same SPIFFE ID, with its own key.
    let mut other = s.broker.broker(AGENT).await;
    let renew = other
        .renew_lease(renew_req(&begun.task_id))
        .await
        .unwrap_err();
    assert!(denied(&renew, "key"), "renew: {renew:?}");
    let complete = other
        .complete_task(complete_req(&begun.task_id))
        .await
        .unwrap_err();
    assert!(denied(&complete, "key"), "complete: {complete:?}");
    first.renew_lease(renew_req(&begun.task_id)).await.unwrap();
    first
        .complete_task(complete_req(&begun.task_id))
        .await
        .unwrap();
    s.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_spiffe_id_binding_a_rotated_svid_renews_and_its_credentials_follow_it() {
    // The default: `task_binding = "spiffe_id"`.
    let s = setup("").await;
    let mut first = s.broker.broker(AGENT).await;
    let begun = first
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    // The rotated SVID: same SPIFFE ID, new key and certificate.
    let rotated = s.broker.pki.svid(AGENT);
    let mut next = BrokerClient::new(s.broker.channel_with(&rotated.cert, &rotated.key).await);
    let renewed = next
        .renew_lease(renew_req(&begun.task_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cnf(&renewed.credentials),
        Some(thumbprint_of_pem(&rotated.cert)),
        "fresh credentials are bound to the certificate that renewed"
    );
    // The kind of proof still counts: a JWT-SVID of the same ID is refused.
    let mut jwt = BrokerClient::new(bearer_channel(&s).await);
    let err = jwt
        .renew_lease(bearer(renew_req(&begun.task_id), &s.authority.token(AGENT)))
        .await
        .unwrap_err();
    assert!(denied(&err, "mutual TLS"), "{err:?}");
    next.complete_task(complete_req(&begun.task_id))
        .await
        .unwrap();
    s.broker.stop().await;
}
