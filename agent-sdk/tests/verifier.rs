//! The SDK's offline Verifier against a real broker: every rejection rule, the
//! revocation stream's latency, catching up after a cut connection, and failing
//! closed when the stream is gone.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_broker::credentials::{Algorithm, SigningKey, jwt};
use leash_e2e::{BrokerOptions, TestBroker, pb, review_request};
use leash_sdk::verifier::{KeySet, Verifier, VerifierConfig, VerifyError};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::{Map, Value, json};

const AUD: &str = "https://api.github.test";
const ISS: &str = "https://leash.acme.test";
const SCOPE: &str = "repo:acme/widgets:read";

/// The claims of a token this test forges for `AUD` and `SCOPE`.
fn claims(jti: &str, exp: u64, nbf: u64) -> Map<String, Value> {
    let Value::Object(m) = json!({"iss": ISS, "aud": AUD, "sub": "spiffe://acme.test/agent/x",
        "scope": SCOPE, "jti": jti, "exp": exp, "nbf": nbf, "iat": nbf})
    else {
        unreachable!()
    };
    m
}

async fn verifier(broker: &TestBroker, config: VerifierConfig) -> Verifier {
    Verifier::connect(broker.channel("resource/api").await, config)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_is_enforced_against_real_credentials() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let files = broker.pki.svid("agent/verified");
    let cert = CertificateDer::from_pem_file(&files.cert).unwrap();
    let other = CertificateDer::from_pem_file(broker.pki.svid("agent/other").cert).unwrap();
    let mut agent = leash_e2e::pb::broker_client::BrokerClient::new(
        broker.channel_with(&files.cert, &files.key).await,
    );
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let token = begun.credentials[0].value.clone();
    let v = verifier(&broker, VerifierConfig::new(AUD, ISS)).await;

    let claims = v.verify(&token, Some(SCOPE), Some(cert.as_ref())).unwrap();
    assert_eq!(claims.subject, "spiffe://acme.test/agent/verified");
    assert_eq!(claims.task_id, begun.task_id);

    let wrong_aud = verifier(&broker, VerifierConfig::new("https://elsewhere.test", ISS)).await;
    assert_eq!(
        wrong_aud
            .verify(&token, None, Some(cert.as_ref()))
            .unwrap_err(),
        VerifyError::WrongAudience
    );
    let wrong_iss = verifier(
        &broker,
        VerifierConfig::new(AUD, "https://other-issuer.test"),
    )
    .await;
    assert_eq!(
        wrong_iss
            .verify(&token, None, Some(cert.as_ref()))
            .unwrap_err(),
        VerifyError::WrongIssuer
    );
    assert_eq!(
        v.verify(&token, Some("repo:acme/widgets:admin"), Some(cert.as_ref()))
            .unwrap_err(),
        VerifyError::MissingScope("repo:acme/widgets:admin".into())
    );
    assert_eq!(
        v.verify(&token, None, Some(other.as_ref())).unwrap_err(),
        VerifyError::CertificateBinding
    );
    assert_eq!(
        v.verify(&token, None, None).unwrap_err(),
        VerifyError::CertificateBinding
    );
    let (head, _) = token.rsplit_once('.').unwrap();
    let bad_sig = format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]));
    assert_eq!(
        v.verify(&bad_sig, None, Some(cert.as_ref())).unwrap_err(),
        VerifyError::BadSignature
    );
    // The opaque credential is not a JWT.
    assert!(matches!(
        v.verify(&begun.credentials[1].value, None, None),
        Err(VerifyError::Malformed(_))
    ));

    // Tokens signed by a key the broker does not publish, and by a published key
    // with bad times: forged with the broker's own signing code.
    let (rogue, _) = SigningKey::generate("test-1", Algorithm::EdDSA).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |exp: u64, nbf: u64| self::claims("x", exp, nbf);
    let forged = jwt::sign(&rogue, &claims(now + 60, now)).unwrap();
    assert_eq!(
        v.verify(&forged, None, None).unwrap_err(),
        VerifyError::BadSignature
    );
    let (unknown, _) = SigningKey::generate("nobody", Algorithm::EdDSA).unwrap();
    let unknown_kid = jwt::sign(&unknown, &claims(now + 60, now)).unwrap();
    assert_eq!(
        v.verify(&unknown_kid, None, None).unwrap_err(),
        VerifyError::UnknownKey
    );
    // With the verifier trusting `unknown`, time rules are checked too.
    let offline = Verifier::offline(
        KeySet::from_jwks(&json!({"keys": [unknown.jwk()]}).to_string()).unwrap(),
        VerifierConfig {
            fail_closed_after: None,
            ..VerifierConfig::new(AUD, ISS)
        },
    );
    assert!(offline.verify(&unknown_kid, None, None).is_ok());
    let expired = jwt::sign(&unknown, &claims(now - 60, now - 120)).unwrap();
    assert_eq!(
        offline.verify(&expired, None, None).unwrap_err(),
        VerifyError::Expired
    );
    let early = jwt::sign(&unknown, &claims(now + 600, now + 300)).unwrap();
    assert_eq!(
        offline.verify(&early, None, None).unwrap_err(),
        VerifyError::NotYetValid
    );
    let none_alg = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"nobody"}"#),
        URL_SAFE_NO_PAD.encode(Value::Object(claims(now + 60, now)).to_string())
    );
    assert_eq!(
        offline.verify(&none_alg, None, None).unwrap_err(),
        VerifyError::Algorithm
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_within_100ms_of_completion() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let files = broker.pki.svid("agent/fast");
    let cert = CertificateDer::from_pem_file(&files.cert).unwrap();
    let mut agent =
        pb::broker_client::BrokerClient::new(broker.channel_with(&files.cert, &files.key).await);
    let v = verifier(&broker, VerifierConfig::new(AUD, ISS)).await;
    let rounds: usize = std::env::var("LEASH_REVOCATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut latencies = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let begun = agent
            .begin_task(review_request())
            .await
            .unwrap()
            .into_inner();
        let token = begun.credentials[0].value.clone();
        v.verify(&token, Some(SCOPE), Some(cert.as_ref())).unwrap();
        agent
            .complete_task(pb::CompleteTaskRequest {
                task_id: begun.task_id,
                ..Default::default()
            })
            .await
            .unwrap();
        let done = Instant::now();
        loop {
            match v.verify(&token, Some(SCOPE), Some(cert.as_ref())) {
                Err(VerifyError::Revoked) => break,
                Ok(_) => {}
                Err(e) => panic!("unexpected refusal {e:?}"),
            }
            assert!(
                done.elapsed() < Duration::from_secs(5),
                "revocation never arrived"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.push(done.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    eprintln!(
        "revocation-to-rejection over {rounds} revocations: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        latencies[rounds - 1]
    );
    // The goal is 100 ms; shared CI machines get a generous bound on the median.
    assert!(
        pct(0.5) < Duration::from_millis(100),
        "median {:?}",
        pct(0.5)
    );
    assert!(pct(0.99) < Duration::from_secs(1), "p99 {:?}", pct(0.99));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_fails_closed_when_the_revocation_stream_is_gone() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let files = broker.pki.svid("agent/lonely");
    let cert = CertificateDer::from_pem_file(&files.cert).unwrap();
    let mut agent =
        pb::broker_client::BrokerClient::new(broker.channel_with(&files.cert, &files.key).await);
    let token = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner()
        .credentials[0]
        .value
        .clone();
    let config = VerifierConfig {
        fail_closed_after: Some(Duration::from_secs(1)),
        ..VerifierConfig::new(AUD, ISS)
    };
    let v = verifier(&broker, config).await;
    v.verify(&token, None, Some(cert.as_ref())).unwrap();
    broker.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        v.verify(&token, None, Some(cert.as_ref())).unwrap_err(),
        VerifyError::RevocationsUnknown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tower_layer_guards_a_real_resource_server() {
    use leash_sdk::verifier::VerifierLayer;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let dir = broker.pki.dir.path().to_owned();
    let files = broker.pki.svid("agent/caller");
    let mut agent =
        pb::broker_client::BrokerClient::new(broker.channel_with(&files.cert, &files.key).await);
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let token = begun.credentials[0].value.clone();
    let v = verifier(&broker, VerifierConfig::new(AUD, ISS)).await;

    // The resource server: mTLS (bundle as client CA), health behind the layer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(dir.join("broker.pem")).unwrap(),
            std::fs::read(dir.join("broker-key.pem")).unwrap(),
        ))
        .client_ca_root(Certificate::from_pem(
            std::fs::read(broker.pki.bundle()).unwrap(),
        ));
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .layer(VerifierLayer::new(v, Some(SCOPE)))
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client_as = |cert: std::path::PathBuf, key: std::path::PathBuf| {
        let bundle = broker.pki.bundle();
        async move {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(bundle).unwrap()))
                .identity(Identity::from_pem(
                    std::fs::read(cert).unwrap(),
                    std::fs::read(key).unwrap(),
                ))
                .domain_name("localhost");
            let ch = tonic::transport::Endpoint::from_shared(format!(
                "https://localhost:{}",
                addr.port()
            ))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
            HealthClient::new(ch)
        }
    };
    let call = |client: &mut HealthClient<tonic::transport::Channel>, bearer: Option<&str>| {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        if let Some(t) = bearer {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let mut c = client.clone();
        async move { c.check(req).await.map(|_| ()).map_err(|e| e.code()) }
    };
    let mut owner = client_as(files.cert.clone(), files.key.clone()).await;
    assert_eq!(call(&mut owner, Some(&token)).await, Ok(()));
    assert_eq!(
        call(&mut owner, None).await,
        Err(tonic::Code::Unauthenticated)
    );
    let thief_files = broker.pki.svid("agent/thief");
    let mut thief = client_as(thief_files.cert, thief_files.key).await;
    assert_eq!(
        call(&mut thief, Some(&token)).await,
        Err(tonic::Code::Unauthenticated),
        "a stolen token fails the certificate binding"
    );
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = leash_e2e::eventually(Duration::from_secs(2), || {
        let mut owner = owner.clone();
        let token = token.clone();
        async move { call(&mut owner, Some(&token)).await == Err(tonic::Code::Unauthenticated) }
    })
    .await;
    assert!(refused.is_some(), "revoked token still accepted");
    server.abort();
    broker.stop().await;
}

/// A TCP relay between the verifier and the broker that the test can cut (every
/// open connection dropped, new ones refused) and restore.
struct Relay {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, l) = (open.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(link);
            }
        });
        Relay {
            port,
            open,
            links,
            accept,
        }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_cut_off_during_revocations_learns_all_of_them_on_reconnect() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let files = broker.pki.svid("agent/cut-off");
    let mut agent =
        pb::broker_client::BrokerClient::new(broker.channel_with(&files.cert, &files.key).await);
    let relay = Relay::start(broker.agent_addr).await;
    let watcher = broker.pki.svid("resource/api");
    let tls = leash_broker::identity::client_tls_config(
        &broker.pki.bundle(),
        &watcher.cert,
        &watcher.key,
    )
    .unwrap();
    let channel =
        leash_broker::cli::client::connect_with(&format!("https://localhost:{}", relay.port), tls)
            .await
            .unwrap();
    let v = Verifier::connect(channel, VerifierConfig::new(AUD, ISS))
        .await
        .unwrap();

    // One revocation seen live proves the stream is up before the cut.
    let before = leash_e2e::begin_and_complete(&mut agent).await;
    let seen = &before[0].id;
    leash_e2e::eventually(Duration::from_secs(5), || async {
        v.is_revoked(seen) == Ok(true)
    })
    .await
    .expect("the live stream delivers a revocation");

    relay.cut();
    let mut missed = Vec::new();
    for _ in 0..25 {
        let begun = agent
            .begin_task(review_request())
            .await
            .unwrap()
            .into_inner();
        missed.extend(begun.credentials.iter().map(|c| c.id.clone()));
        agent
            .complete_task(pb::CompleteTaskRequest {
                task_id: begun.task_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        missed.iter().all(|id| v.is_revoked(id) == Ok(false)),
        "the relay was cut, so nothing can have arrived yet"
    );

    relay.restore();
    let all = leash_e2e::eventually(Duration::from_secs(15), || async {
        missed.iter().all(|id| v.is_revoked(id) == Ok(true))
    })
    .await;
    assert!(
        all.is_some(),
        "after reconnecting the verifier still misses {:?}",
        missed
            .iter()
            .filter(|id| v.is_revoked(id) != Ok(true))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        v.is_revoked(seen),
        Ok(true),
        "what it knew before the cut is kept"
    );
    broker.stop().await;
}

// ---------------------------------------------------------------------------
// The revocation feed, batch by batch: `Verifier::apply_batch` is the entry
// point the watch loop uses for every batch, so these drive it directly with
// the batches a broker sends, deterministically and without a broker.
// ---------------------------------------------------------------------------

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An offline verifier trusting a key of its own, with tokens forged by that key.
struct Forged {
    key: SigningKey,
    v: Verifier,
}

impl Forged {
    fn new(config: VerifierConfig) -> Self {
        let (key, _) = SigningKey::generate("feed-1", Algorithm::EdDSA).unwrap();
        let keys = KeySet::from_jwks(&json!({"keys": [key.jwk()]}).to_string()).unwrap();
        let v = Verifier::offline(keys, config);
        Self { key, v }
    }

    /// Verifies a fresh token for credential `jti` expiring at `exp` (Unix s).
    fn verify(&self, jti: &str, exp: u64) -> Result<(), VerifyError> {
        let token = jwt::sign(&self.key, &claims(jti, exp, exp.min(now_s()) - 600)).unwrap();
        self.v.verify(&token, Some(SCOPE), None).map(|_| ())
    }

    /// Verifies a token for `jti` that expires in ten minutes.
    fn check(&self, jti: &str) -> Result<(), VerifyError> {
        self.verify(jti, now_s() + 600)
    }
}

/// The revocation of `id`, which expires at `exp` (Unix s).
fn revocation(id: &str, exp: u64) -> pb::Revocation {
    pb::Revocation {
        credential_id: id.into(),
        task_id: "t".into(),
        expires_at: Some(prost_types::Timestamp {
            seconds: i64::try_from(exp).unwrap(),
            nanos: 0,
        }),
        reason: "completion".into(),
        audience: AUD.into(),
        ..Default::default()
    }
}

/// A live batch of `ids` (expiring in ten minutes), advertising a 30 s grace.
fn live(ids: &[&str]) -> pb::RevocationBatch {
    pb::RevocationBatch {
        revocations: ids.iter().map(|id| revocation(id, now_s() + 600)).collect(),
        cursor: format!("live-{}", ids.join(",")),
        revocation_grace: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A snapshot chunk of `ids`: the first one has `reset`, the last one `end`.
fn chunk(ids: &[&str], reset: bool, end: bool) -> pb::RevocationBatch {
    pb::RevocationBatch {
        snapshot: true,
        reset,
        snapshot_complete: end,
        cursor: "snapshot".into(),
        ..live(ids)
    }
}

/// The batch after a snapshot: caught up, now live.
fn caught_up() -> pb::RevocationBatch {
    pb::RevocationBatch {
        caught_up: true,
        ..live(&[])
    }
}

/// A verifier that has loaded a complete snapshot of `ids`.
fn loaded(config: VerifierConfig, ids: &[&str]) -> Forged {
    let f = Forged::new(config);
    f.v.apply_batch(&chunk(ids, true, true));
    f.v.apply_batch(&caught_up());
    f
}

#[test]
fn a_token_revoked_in_a_later_snapshot_chunk_is_never_accepted_before_the_end_marker() {
    let f = loaded(VerifierConfig::new(AUD, ISS), &[]);
    assert_eq!(f.check("late"), Ok(()));

    // A resnapshot (the broker lost our history): until its end marker the
    // verifier cannot know what it missed, so nothing passes.
    f.v.apply_batch(&chunk(&["first"], true, false));
    assert_eq!(
        f.check("late"),
        Err(VerifyError::RevocationsUnknown),
        "accepted a token before the snapshot that revokes it was whole"
    );
    f.v.apply_batch(&chunk(&["middle"], false, false));
    assert_eq!(f.check("late"), Err(VerifyError::RevocationsUnknown));
    assert_eq!(f.check("first"), Err(VerifyError::RevocationsUnknown));
    f.v.apply_batch(&chunk(&["late"], false, true));
    assert_eq!(f.check("late"), Err(VerifyError::Revoked));
    assert_eq!(f.check("first"), Err(VerifyError::Revoked));
    assert_eq!(f.check("middle"), Err(VerifyError::Revoked));
    assert_eq!(f.check("never"), Ok(()));
    f.v.apply_batch(&caught_up());
    assert_eq!(f.check("late"), Err(VerifyError::Revoked));
}

#[test]
fn the_end_marker_puts_the_new_snapshot_in_place_of_the_old() {
    let f = loaded(VerifierConfig::new(AUD, ISS), &["old", "kept"]);
    assert_eq!(f.check("old"), Err(VerifyError::Revoked));
    assert_eq!(f.check("kept"), Err(VerifyError::Revoked));
    assert_eq!(f.check("fresh"), Ok(()));

    f.v.apply_batch(&chunk(&["kept"], true, false));
    assert_eq!(
        f.check("old"),
        Err(VerifyError::RevocationsUnknown),
        "the old snapshot is out of date and the new one not whole"
    );
    f.v.apply_batch(&chunk(&["new"], false, true));
    assert_eq!(
        f.check("old"),
        Ok(()),
        "absent from the new snapshot: forgotten"
    );
    assert_eq!(f.check("kept"), Err(VerifyError::Revoked));
    assert_eq!(f.check("new"), Err(VerifyError::Revoked));
    assert_eq!(f.v.revoked_count(), 2);

    // An empty snapshot is one batch that is both first and last.
    f.v.apply_batch(&chunk(&[], true, true));
    assert_eq!(f.check("kept"), Ok(()));
    assert_eq!(f.v.revoked_count(), 0);
}

#[test]
fn a_snapshot_cut_off_midway_is_never_put_in_force() {
    let f = loaded(VerifierConfig::new(AUD, ISS), &["before"]);
    f.v.apply_batch(&chunk(&["part-1"], true, false));
    f.v.apply_batch(&chunk(&["part-2"], false, false));
    for id in ["before", "part-1", "part-2", "other"] {
        assert_eq!(
            f.check(id),
            Err(VerifyError::RevocationsUnknown),
            "{id} judged on a partial snapshot"
        );
    }
    // The stream broke there; the next one starts over with a whole snapshot.
    f.v.apply_batch(&chunk(&["again-1"], true, false));
    for id in ["before", "part-1", "part-2", "again-1", "other"] {
        assert_eq!(f.check(id), Err(VerifyError::RevocationsUnknown), "{id}");
    }
    f.v.apply_batch(&chunk(&["again-2"], false, true));
    f.v.apply_batch(&caught_up());
    for id in ["before", "part-1", "part-2", "other"] {
        assert_eq!(
            f.check(id),
            Ok(()),
            "{id} came from a snapshot that was never whole"
        );
    }
    assert_eq!(f.check("again-1"), Err(VerifyError::Revoked));
    assert_eq!(f.check("again-2"), Err(VerifyError::Revoked));
    assert_eq!(f.v.revoked_count(), 2);
}

/// A snapshot chunk of revocations expiring at the given times, advertising `grace_s`.
fn graced(revocations: &[(&str, u64)], grace_s: i64) -> pb::RevocationBatch {
    pb::RevocationBatch {
        revocations: revocations
            .iter()
            .map(|(id, exp)| revocation(id, *exp))
            .collect(),
        revocation_grace: Some(prost_types::Duration {
            seconds: grace_s,
            nanos: 0,
        }),
        ..chunk(&[], true, true)
    }
}

#[test]
fn a_long_advertised_grace_keeps_revocations_past_the_default() {
    let now = now_s();
    // The broker advertises 60 s: a token 45 s past its exp is still within a
    // 50 s leeway, so its revocation must still be known.
    let long = Forged::new(VerifierConfig {
        leeway: Duration::from_secs(50),
        ..VerifierConfig::new(AUD, ISS)
    });
    long.v
        .apply_batch(&graced(&[("late", now - 45), ("gone", now - 61)], 60));
    assert_eq!(
        long.verify("late", now - 45),
        Err(VerifyError::Revoked),
        "the revocation must outlive exp + leeway when the grace allows that leeway"
    );
    assert_eq!(long.verify("unrevoked", now - 45), Ok(()));
    assert_eq!(long.v.revoked_count(), 1, "exp + 60 s is past for `gone`");
}

#[test]
fn a_short_advertised_grace_caps_the_leeway_and_the_memory() {
    let now = now_s();
    // The broker advertises 2 s: kept until exp + 2 s, and the 5 s leeway is cut to 2 s.
    let short = Forged::new(VerifierConfig::new(AUD, ISS));
    short
        .v
        .apply_batch(&graced(&[("recent", now), ("past", now - 3)], 2));
    assert_eq!(
        short.verify("unrevoked", now - 3),
        Err(VerifyError::Expired),
        "a 5 s leeway is capped at the advertised 2 s grace"
    );
    assert_eq!(
        short.v.revoked_count(),
        1,
        "`past` is beyond exp + the advertised 2 s grace"
    );
    assert_eq!(short.verify("recent", now), Err(VerifyError::Revoked));
    assert_eq!(short.verify("unrevoked", now + 60), Ok(()));
}

#[tokio::test]
async fn due_revocations_are_pruned_by_the_next_batch_not_by_verify() {
    let now = now_s();
    let f = Forged::new(VerifierConfig::new(AUD, ISS));
    let old: Vec<String> = (0..2000).map(|i| format!("old-{i}")).collect();
    let mut entries: Vec<(&str, u64)> = old.iter().map(|id| (id.as_str(), now - 40)).collect();
    entries.extend([("young-1", now + 600), ("young-2", now + 600)]);
    f.v.apply_batch(&graced(&entries, 60));
    f.v.apply_batch(&caught_up_with_grace(60));
    assert_eq!(f.v.revoked_count(), 2002);
    // The next batch advertises 30 s, which makes every `old-*` entry due.
    f.v.apply_batch(&live(&[]));
    assert_eq!(f.v.revoked_count(), 2, "the batch pruned what was due");
    assert_eq!(f.check("young-2"), Err(VerifyError::Revoked));
    assert_eq!(f.check("old-7"), Ok(()));

    // Entries that fall due with the passing of time stay until a batch comes.
    let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
    let soon = SystemTime::now() + Duration::from_millis(300) - Duration::from_secs(30);
    let due = pb::RevocationBatch {
        revocations: (0..500)
            .map(|i| pb::Revocation {
                expires_at: Some(prost_types::Timestamp::from(soon)),
                ..revocation(&format!("due-{i}"), 0)
            })
            .collect(),
        ..live(&[])
    };
    f.v.apply_batch(&due);
    assert_eq!(f.v.revoked_count(), 502);
    let keep_until = ms(soon) + 30_000;
    leash_e2e::eventually(Duration::from_secs(5), || async {
        ms(SystemTime::now()) > keep_until
    })
    .await
    .expect("the clock moves");
    for i in 0..100 {
        assert_eq!(
            f.verify(&format!("due-{i}"), now_s() - 29),
            Err(VerifyError::Expired)
        );
    }
    assert_eq!(f.v.revoked_count(), 502, "verify never prunes");
    f.v.apply_batch(&live(&[]));
    assert_eq!(f.v.revoked_count(), 2);
}

/// A heartbeat that has caught up, advertising `grace_s`.
fn caught_up_with_grace(grace_s: i64) -> pb::RevocationBatch {
    pb::RevocationBatch {
        revocation_grace: Some(prost_types::Duration {
            seconds: grace_s,
            nanos: 0,
        }),
        ..caught_up()
    }
}

#[test]
fn a_custom_feed_resumes_from_the_cursor_and_starts_over_after_a_cut_off_snapshot() {
    let f = Forged::new(VerifierConfig::new(AUD, ISS));
    assert_eq!(
        f.v.resume_cursor(),
        "",
        "nothing heard: start with a snapshot"
    );
    assert_eq!(
        f.check("any"),
        Err(VerifyError::RevocationsUnknown),
        "fail_closed_after: nothing heard yet"
    );
    f.v.apply_batch(&chunk(&["a"], true, true));
    f.v.apply_batch(&caught_up());
    f.v.apply_batch(&live(&["b"]));
    assert_eq!(f.v.resume_cursor(), "live-b");
    f.v.stream_broken();
    assert_eq!(
        f.v.resume_cursor(),
        "live-b",
        "a live stream resumes where it was"
    );
    assert_eq!(f.check("b"), Err(VerifyError::Revoked));
    assert_eq!(f.v.is_revoked("b"), Ok(true));
    assert_eq!(f.v.is_revoked("c"), Ok(false));

    f.v.apply_batch(&chunk(&["c"], true, false));
    assert_eq!(
        f.v.resume_cursor(),
        "",
        "a snapshot chunk's cursor would skip the rest"
    );
    f.v.stream_broken();
    assert_eq!(f.check("c"), Err(VerifyError::RevocationsUnknown));
    assert_eq!(f.v.is_revoked("c"), Err(VerifyError::RevocationsUnknown));
    // Live batches on the next stream do not make a cut-off snapshot whole.
    f.v.apply_batch(&live(&["d"]));
    assert_eq!(f.check("x"), Err(VerifyError::RevocationsUnknown));
    f.v.apply_batch(&chunk(&["e"], true, true));
    assert_eq!(f.v.resume_cursor(), "snapshot");
    assert_eq!(
        f.check("c"),
        Ok(()),
        "the cut-off snapshot never came into force"
    );
    assert_eq!(f.check("e"), Err(VerifyError::Revoked));
}

#[test]
fn note_revoked_joins_the_snapshot_in_progress_and_is_no_sign_of_life() {
    let f = Forged::new(VerifierConfig::new(AUD, ISS));
    f.v.note_revoked(&[revocation("noted", now_s() + 600)]);
    assert_eq!(
        f.check("other"),
        Err(VerifyError::RevocationsUnknown),
        "noting revocations does not stand for a live stream"
    );
    f.v.apply_batch(&caught_up());
    assert_eq!(f.check("noted"), Err(VerifyError::Revoked));
    f.v.apply_batch(&chunk(&[], true, false));
    f.v.note_revoked(&[revocation("during", now_s() + 600)]);
    f.v.apply_batch(&chunk(&[], false, true));
    assert_eq!(f.check("during"), Err(VerifyError::Revoked));
    assert_eq!(f.check("noted"), Ok(()), "not in the new snapshot");
}
