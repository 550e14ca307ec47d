//! Files change under a running broker: templates and trust bundles reload
//! without a restart, and a bad edit keeps the last good version.

use std::time::Duration;

use leash_broker::identity::{SpiffeId, client_tls_config, pki::DevCa};
use leash_e2e::{BrokerOptions, TestBroker, eventually, pb, review_request};
use tonic::Code;

const FRESH: &str = r#"
name: fresh
version: "1"
owner: platform@acme.test
description: Added while the broker runs.
identities: [spiffe://acme.test/agent/*]
lease: { ttl: 5s, max_ttl: 5s, max_lifetime: 1m }
grants:
  - { name: api, kind: opaque, audience: https://api.acme.test, scopes: [{scope: "read", class: read}], ttl: 5s }
"#;

fn fresh_request() -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "fresh".into(),
        parameters: Default::default(),
        ..review_request()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_reload_and_a_bad_edit_keeps_the_last_good_set() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let mut agent = broker.broker("agent/a").await;
    let e = agent.begin_task(fresh_request()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    std::fs::write(broker.templates_dir().join("fresh.yaml"), FRESH).unwrap();
    let loaded = eventually(Duration::from_secs(5), || async {
        let mut a = broker.broker("agent/a").await;
        a.begin_task(fresh_request()).await.is_ok()
    })
    .await;
    assert!(loaded.is_some(), "new template not picked up");

    // A broken edit: the last good set stays in force, and the problem is logged.
    std::fs::write(
        broker.templates_dir().join("fresh.yaml"),
        "name: fresh\nlease: [oops\n",
    )
    .unwrap();
    let reported = eventually(Duration::from_secs(5), || async {
        leash_e2e::logs().contains("templates not reloaded")
    })
    .await;
    assert!(reported.is_some(), "bad edit not reported");
    agent
        .begin_task(fresh_request())
        .await
        .expect("last good set still serves");
    agent
        .begin_task(review_request())
        .await
        .expect("other templates unaffected");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_rotation_applies_without_restart() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    // An SVID from a second CA of the same trust domain, not yet in the bundle.
    let next_ca = DevCa::generate("acme.test", Duration::from_secs(3600)).unwrap();
    let svid = next_ca
        .issue_svid(
            &SpiffeId::parse("spiffe://acme.test/agent/rotated").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("svid.pem"), dir.path().join("svid-key.pem"));
    std::fs::write(&cert, &svid.cert_pem).unwrap();
    std::fs::write(&key, &svid.key_pem).unwrap();
    let tls = client_tls_config(&broker.pki.bundle(), &cert, &key).unwrap();
    let try_call = || {
        let tls = tls.clone();
        let url = broker.url();
        async move {
            let Ok(ch) = leash_broker::cli::client::connect_with(&url, tls).await else {
                return false;
            };
            let mut v = leash_proto::v1::verifier_client::VerifierClient::new(ch);
            v.get_jwks(pb::GetJwksRequest {}).await.is_ok()
        }
    };
    assert!(
        !try_call().await,
        "an SVID from an untrusted CA must be refused"
    );

    // Rotation: the bundle now holds both CAs.
    let mut bundle = std::fs::read_to_string(broker.pki.bundle()).unwrap();
    bundle.push_str(next_ca.cert_pem());
    std::fs::write(broker.pki.bundle(), bundle).unwrap();
    let accepted = eventually(Duration::from_secs(5), try_call).await;
    assert!(accepted.is_some(), "rotated bundle not picked up");
    // The old CA's SVIDs still work during the rotation.
    let mut old = broker.broker("agent/old").await;
    old.begin_task(review_request()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_stops_working_when_its_trust_anchor_is_removed() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    // An agent of the original CA, on one connection it keeps open.
    let mut agent = broker.broker("agent/kept-open").await;
    let task = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();

    // The trust domain moves to a new CA; the old one leaves the bundle. Client
    // configurations read the bundle (for the broker's certificate, still from the
    // old CA) now, before the file changes.
    let next_ca = DevCa::generate("acme.test", Duration::from_secs(3600)).unwrap();
    let svid = next_ca
        .issue_svid(
            &SpiffeId::parse("spiffe://acme.test/agent/new-ca").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("svid.pem"), dir.path().join("svid-key.pem"));
    std::fs::write(&cert, &svid.cert_pem).unwrap();
    std::fs::write(&key, &svid.key_pem).unwrap();
    let new_tls = client_tls_config(&broker.pki.bundle(), &cert, &key).unwrap();
    let old_bundle = std::fs::read_to_string(broker.pki.bundle()).unwrap();
    std::fs::write(broker.pki.bundle(), next_ca.cert_pem()).unwrap();
    let reloaded = eventually(Duration::from_secs(10), || {
        let tls = new_tls.clone();
        let url = broker.url();
        async move {
            let Ok(ch) = leash_broker::cli::client::connect_with(&url, tls).await else {
                return false;
            };
            let mut v = leash_proto::v1::verifier_client::VerifierClient::new(ch);
            v.get_jwks(pb::GetJwksRequest {}).await.is_ok()
        }
    })
    .await;
    assert!(reloaded.is_some(), "the new bundle was never loaded");

    // The connection opened under the removed anchor is still open, but its next
    // calls are refused: the chain is checked against the current bundle each time.
    let renew = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(renew.code(), Code::Unauthenticated, "{renew:?}");
    assert!(
        renew.message().contains("trust anchor"),
        "unclear refusal: {renew:?}"
    );
    let begin = agent.begin_task(review_request()).await.unwrap_err();
    assert_eq!(begin.code(), Code::Unauthenticated, "{begin:?}");

    // Putting the anchor back makes the same connection work again: each call is
    // judged on the bundle of its moment.
    std::fs::write(broker.pki.bundle(), old_bundle).unwrap();
    let back = eventually(Duration::from_secs(10), || {
        let mut agent = agent.clone();
        let task_id = task.task_id.clone();
        async move {
            agent
                .renew_lease(pb::RenewLeaseRequest { task_id })
                .await
                .is_ok()
        }
    })
    .await;
    assert!(back.is_some(), "the restored anchor was never used again");
    broker.stop().await;
}

/// A channel over one TLS connection made with `tls`, and how that connection's
/// handshake went (full or resumed).
async fn channel_noting_handshake(
    broker: &TestBroker,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> (tonic::transport::Channel, rustls::HandshakeKind) {
    let kind = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = kind.clone();
    let addr = broker.agent_addr;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, seen) = (connector.clone(), seen.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                *seen.lock().unwrap() = tls.get_ref().1.handshake_kind();
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let kind = kind.lock().unwrap().expect("handshake done");
    (channel, kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_is_judged_on_the_current_bundle_like_a_full_one() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let files = broker.pki.svid("agent/resumes");
    let tls = client_tls_config(&broker.pki.bundle(), &files.cert, &files.key).unwrap();

    let (first, kind) = channel_noting_handshake(&broker, tls.clone()).await;
    assert_eq!(kind, rustls::HandshakeKind::Full);
    let mut agent = pb::broker_client::BrokerClient::new(first);
    agent.begin_task(review_request()).await.unwrap();
    drop(agent);

    // A new connection per task resumes the session (no second verification of
    // the chain at the handshake) and is served as the same identity.
    let (second, kind) = channel_noting_handshake(&broker, tls.clone()).await;
    assert_eq!(
        kind,
        rustls::HandshakeKind::Resumed,
        "no resumption offered"
    );
    let mut agent = pb::broker_client::BrokerClient::new(second);
    let task = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let mut verifier = broker.verifier("resource/api").await;
    let looked = verifier
        .introspect(pb::IntrospectRequest {
            token: task.credentials[0].value.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(looked.active, "{looked:?}");
    drop(agent);

    // The agent's trust anchor leaves the bundle. A resumed session skips the
    // handshake's verifier, but its first call is judged on the bundle of now.
    let next_ca = DevCa::generate("acme.test", Duration::from_secs(3600)).unwrap();
    std::fs::write(broker.pki.bundle(), next_ca.cert_pem()).unwrap();
    let refused = eventually(Duration::from_secs(10), || {
        let (broker, tls) = (&broker, tls.clone());
        async move {
            let (channel, kind) = channel_noting_handshake(broker, tls).await;
            let mut agent = pb::broker_client::BrokerClient::new(channel);
            match agent.begin_task(review_request()).await {
                Err(e) => {
                    assert_eq!(kind, rustls::HandshakeKind::Resumed);
                    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
                    assert!(e.message().contains("trust anchor"), "unclear: {e:?}");
                    true
                }
                Ok(_) => false,
            }
        }
    })
    .await;
    assert!(
        refused.is_some(),
        "a resumed session outlived its trust anchor"
    );
    broker.stop().await;
}
