//! The SPIFFE Workload API on both sides: a broker serving with the SVID and
//! bundles of a (test) Workload API, and an SDK client taking its SVID from one,
//! both following rotations mid-task without a failed call.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_e2e::{
    BrokerOptions, TestBroker, TestPki, eventually,
    workload_api::{SvidKind, TestWorkloadApi, pb},
};
use leash_sdk::{Client, Error, LeaseStatus, Outcome, TaskRequest};
use rustls::pki_types::ServerName;

/// 1 s leases, renewable for a minute.
const FAST_TEMPLATE: &str = r#"
name: fast
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: { ttl: 1s, max_ttl: 2s, max_lifetime: 1m }
grants:
  - { name: github, kind: jwt, audience: "https://api.github.test", scopes: [{scope: "repo:read", class: read}], ttl: 60s }
"#;

fn workload_api_tls(endpoint: &str) -> String {
    format!(
        "source = \"workload_api\"\nworkload_api_socket = \"{endpoint}\"\nworkload_api_timeout = \"5s\""
    )
}

/// `cnf.x5t#S256` of a JWT credential.
fn bound_thumbprint(jwt: &str) -> String {
    let payload = jwt.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["cnf"]["x5t#S256"].as_str().unwrap().to_owned()
}

fn thumbprint(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The leaf certificate the broker presents to a new connection.
async fn broker_leaf(broker: &TestBroker) -> Vec<u8> {
    let svid = broker.pki.svid("agent/probe");
    let tls =
        leash_broker::identity::client_tls_config(&broker.pki.bundle(), &svid.cert, &svid.key)
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(broker.agent_addr)
        .await
        .unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    conn.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn svids_rotate_mid_task_on_both_sides_with_no_failed_call() {
    let pki = Arc::new(TestPki::new());
    let broker_api = TestWorkloadApi::start(pki.clone(), "leash/broker", SvidKind::Serving).await;
    let agent_api = TestWorkloadApi::start(pki.clone(), "agent/rotating", SvidKind::Client).await;
    let options = BrokerOptions {
        templates: vec![FAST_TEMPLATE.to_owned()],
        tls_toml: Some(workload_api_tls(&broker_api.endpoint)),
        ..BrokerOptions::memory()
    };
    let broker = TestBroker::start_with_pki(options, pki.clone(), "leash").await;
    assert_eq!(broker_leaf(&broker).await, broker_api.leaf());

    let client = Client::builder()
        .broker(broker.url())
        .workload_api_endpoint(&agent_api.endpoint)
        .connect()
        .await
        .unwrap();
    let task = client
        .begin_task(TaskRequest::new("fast").intent("work across rotations"))
        .await
        .unwrap();
    let first = task.credential("github").unwrap();
    assert_eq!(
        bound_thumbprint(first.secret()),
        thumbprint(&agent_api.leaf())
    );

    // Rotate the agent's SVID twice and the broker's once while the task renews
    // in the background and the agent keeps making calls; every call must succeed.
    let mut calls = 0;
    let mut agent_leaf = agent_api.leaf();
    let start = Instant::now();
    for round in 0..3 {
        if round < 2 {
            agent_leaf = agent_api.rotate();
        } else {
            broker_api.rotate();
        }
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            let probe = client
                .begin_task(TaskRequest::new("fast").intent("a short call"))
                .await
                .unwrap_or_else(|e| panic!("call failed after round {round}: {e}"));
            probe
                .complete(Outcome::Succeeded, "")
                .await
                .unwrap_or_else(|e| panic!("completion failed after round {round}: {e}"));
            calls += 2;
            assert!(
                matches!(*task.status().borrow(), LeaseStatus::Active { .. }),
                "lease lost after round {round}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(calls >= 12, "only {calls} calls in {:?}", start.elapsed());

    // The renewals now mint credentials bound to the newest agent SVID...
    let bound = eventually(Duration::from_secs(5), || {
        let want = thumbprint(&agent_leaf);
        let task = &task;
        async move { bound_thumbprint(task.credential("github").unwrap().secret()) == want }
    })
    .await;
    assert!(
        bound.is_some(),
        "credentials never bound to the rotated SVID"
    );
    // ...and new connections to the broker see its rotated serving SVID.
    let served = eventually(Duration::from_secs(5), || async {
        broker_leaf(&broker).await == broker_api.leaf()
    })
    .await;
    assert!(served.is_some(), "the broker still serves its old SVID");

    let done = task.complete(Outcome::Succeeded, "rotated").await.unwrap();
    assert!(done.completed_in_time);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_workload_api_requires_the_security_header() {
    let pki = Arc::new(TestPki::new());
    let api = TestWorkloadApi::start(pki, "agent/header", SvidKind::Client).await;
    let path = api.endpoint.trim_start_matches("unix://").to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://workload.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut client = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let refused = client
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("security header"));

    let mut request = tonic::Request::new(pb::X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, api.spiffe_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_workload_api_neither_side_starts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix://{}/absent.sock", dir.path().display());

    let mut tls = workload_api_tls(&missing);
    tls = tls.replace("\"5s\"", "\"1s\"");
    let options = BrokerOptions {
        tls_toml: Some(tls),
        ..BrokerOptions::memory()
    };
    let broker = TestBroker::start_with_pki(options, Arc::new(TestPki::new()), "leash").await;
    let err = broker.ended(Duration::from_secs(30)).await.unwrap_err();
    assert!(
        err.to_string().contains("Workload API"),
        "unclear error: {err}"
    );

    let err = Client::builder()
        .broker("https://localhost:1")
        .workload_api_endpoint(&missing)
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Config(ref m) if m.contains("Workload API")),
        "{err}"
    );
}
