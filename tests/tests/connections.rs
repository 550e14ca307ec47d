//! Connection limits on the agent port (`[limits]`): a flood of half-open TLS
//! handshakes does not starve agents, handshakes are bounded in time, concurrent
//! connections are capped, and each connection's HTTP/2 streams and request
//! messages are bounded. Real mTLS brokers, loopback only; every socket a test
//! opens is closed when it ends.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::TcpStream as StdTcpStream,
    time::Duration,
};

use leash_broker::identity::client_tls_config;
use leash_e2e::{BrokerOptions, TestBroker, eventually, pb, renew_when_allowed, review_request};
use pb::broker_client::BrokerClient;
use rustls::pki_types::ServerName;
use tonic::{Code, transport::Channel};

/// Half-open connections opened by the flood: more than the pending-handshake cap.
const FLOOD: usize = 400;

/// 30 s leases: opening the flood on a busy machine must not expire a task.
const STEADY_TEMPLATE: &str = r#"
name: steady
version: "1"
owner: platform@acme.test
identities: [spiffe://acme.test/agent/*]
lease: { ttl: 30s, max_ttl: 30s, max_lifetime: 5m }
grants:
  - { name: api, kind: opaque, audience: https://api.acme.test, scopes: [{scope: "read", class: read}], ttl: 30s }
"#;

async fn broker_with_limits(limits: &str) -> TestBroker {
    let mut options = BrokerOptions::memory();
    options.templates.push(STEADY_TEMPLATE.to_owned());
    options.extra_toml = format!("[limits]\n{limits}\n");
    TestBroker::start(options).await
}

fn steady_request() -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "steady".into(),
        parameters: Default::default(),
        ..review_request()
    }
}

/// Opens `n` loopback connections to `addr`; every third sends half of a TLS
/// ClientHello (a record header announcing 512 bytes, then 11 of them), the rest
/// send nothing. Non-blocking, so the test can poll them for being closed.
fn flood(addr: std::net::SocketAddr, n: usize) -> Vec<StdTcpStream> {
    let half_hello: [u8; 21] = [
        0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, 512 bytes follow
        0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes follow
        0x03, 0x03, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, // version, start of random
    ];
    (0..n)
        .map(|i| {
            let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            if i % 3 == 0 {
                s.write_all(&half_hello).unwrap();
            }
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect()
}

/// True once the broker has closed the connection (EOF or reset).
fn closed_by_peer(s: &mut StdTcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        // A TLS alert before the close is still a close.
        Ok(_) => closed_by_peer(s),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// A full task life on `channel`: begin, renew, complete.
async fn task_life(channel: Channel) -> Result<(), tonic::Status> {
    let mut agent = BrokerClient::new(channel);
    let task = agent.begin_task(steady_request()).await?.into_inner();
    renew_when_allowed(&mut agent, &task.task_id).await?;
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: task.task_id,
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_handshakes_does_not_starve_agents() {
    let broker = broker_with_limits(
        "max_pending_handshakes = 64\nhandshake_timeout = \"3s\"\nmax_connections = 1000",
    )
    .await;
    // An agent connected before the flood, with a task in flight.
    let existing = broker.channel("agent/existing").await;
    let mut agent = BrokerClient::new(existing.clone());
    let in_flight = agent
        .begin_task(steady_request())
        .await
        .unwrap()
        .into_inner();

    let addr = broker.agent_addr;
    let mut sockets = tokio::task::spawn_blocking(move || flood(addr, FLOOD))
        .await
        .unwrap();

    // While the flood's connections are open: the existing agent renews and
    // completes its task and runs a new one; a new agent connects (a fresh
    // handshake among the pending ones) and does the same. Bounded, not timed:
    // 60 s only keeps a broken broker from hanging the test.
    let bound = Duration::from_secs(60);
    tokio::time::timeout(bound, async {
        renew_when_allowed(&mut agent, &in_flight.task_id)
            .await
            .expect("existing agent renews during the flood");
        agent
            .complete_task(pb::CompleteTaskRequest {
                task_id: in_flight.task_id.clone(),
                ..Default::default()
            })
            .await
            .expect("existing agent completes during the flood");
        task_life(existing.clone())
            .await
            .expect("existing agent runs a new task during the flood");
        let newcomer = broker.channel("agent/newcomer").await;
        task_life(newcomer)
            .await
            .expect("a new agent runs a task during the flood");
    })
    .await
    .expect("agents were starved by the flood");
    assert!(
        leash_e2e::logs().contains("dropping the oldest"),
        "the flood never reached the pending-handshake cap, so the test proved nothing"
    );

    // The broker drops every half-open connection: the oldest as newer ones
    // arrive beyond the cap, the rest at the handshake timeout.
    let all_closed = eventually(Duration::from_secs(30), || {
        sockets.retain_mut(|s| !closed_by_peer(s));
        let left = sockets.len();
        async move { left == 0 }
    })
    .await;
    assert!(
        all_closed.is_some(),
        "{} half-open connections still open after the handshake timeout",
        sockets.len()
    );
    drop(sockets);
    // And agents still work afterwards.
    task_life(broker.channel("agent/after").await)
        .await
        .unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_and_a_freed_slot_is_reused() {
    let broker = broker_with_limits("max_connections = 3").await;
    let files = broker.pki.svid("agent/capped");
    let tls = client_tls_config(&broker.pki.bundle(), &files.cert, &files.key).unwrap();
    let url = broker.url();
    let connect = || leash_broker::cli::client::connect_with(&url, tls.clone());
    let mut held = Vec::new();
    for _ in 0..3 {
        let ch = connect().await.unwrap();
        task_life(ch.clone()).await.unwrap();
        held.push(ch);
    }
    // A fourth connection is refused (closed before its handshake)...
    let fourth = async {
        let ch = connect().await.map_err(|e| e.to_string())?;
        task_life(ch).await.map_err(|e| e.to_string())
    }
    .await;
    assert!(fourth.is_err(), "a fourth connection was served");
    // ...while the three established ones keep working.
    for ch in &held {
        task_life(ch.clone()).await.unwrap();
    }
    // Closing one frees its slot for the next client.
    held.pop();
    let reused = eventually(Duration::from_secs(20), || async {
        match connect().await {
            Ok(ch) => task_life(ch).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(reused.is_some(), "a freed connection slot was never reused");
    drop(held);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_and_request_size_are_bounded() {
    let broker = broker_with_limits("max_concurrent_streams = 3\nmax_message_bytes = 16384").await;

    // HTTP/2: the broker announces its stream limit in its SETTINGS.
    let files = broker.pki.svid("agent/h2");
    let tls = client_tls_config(&broker.pki.bundle(), &files.cert, &files.key).unwrap();
    let tcp = tokio::net::TcpStream::connect(broker.agent_addr)
        .await
        .unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (h2, connection) = h2::client::handshake(conn).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri("https://localhost/leash.v1.Verifier/GetJwks")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    // An empty GetJwksRequest: uncompressed, zero bytes long.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(h2.current_max_send_streams(), 3);
    drop(h2);
    driver.abort();

    // gRPC: a request message over the cap is refused before it is decoded; one
    // under it is served.
    let mut agent = broker.broker("agent/big").await;
    let mut big = review_request();
    big.intent = "x".repeat(32 * 1024);
    let err = agent.begin_task(big).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(err.message().contains("16384"), "{err:?}");
    agent.begin_task(review_request()).await.unwrap();
    broker.stop().await;
}
