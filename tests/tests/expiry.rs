//! Lease expiry by the real reaper, and fail-closed behaviour through a Redis outage.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use leash_e2e::{
    BrokerOptions, RedisServer, TestBroker, TestPki, eventually, is_active, ms, pb, review_request,
};
use tonic::Code;

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Begins a task with a 1 s lease, never renews it, and measures when its
/// credentials go inactive relative to the lease deadline.
async fn expires_within_a_second(broker: &TestBroker) {
    let mut agent = broker.broker("agent/sleepy").await;
    let mut req = review_request();
    req.requested_ttl = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let begun = agent.begin_task(req).await.unwrap().into_inner();
    let deadline = ms(begun.lease_expires_at);
    let opaque = begun.credentials[1].value.clone();
    assert!(is_active(broker, &opaque).await);
    // Wait for the reaper to record the expiry: a CompleteTask then reports EXPIRED,
    // not COMPLETED, because the lease is already over.
    let took = eventually(Duration::from_secs(5), || async {
        !is_active(broker, &opaque).await
    })
    .await
    .expect("credential never went inactive");
    let inactive_at = now_ms();
    assert!(
        inactive_at - deadline <= 1000,
        "inactive {} ms after the deadline",
        inactive_at - deadline
    );
    let _ = took;
    // The reaper itself (not only the read-time deadline check) must have ended the task.
    let ended = eventually(Duration::from_millis(1500), || async {
        let mut a = broker.broker("agent/sleepy").await;
        a.renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .err()
        .is_some_and(|e| {
            e.code() == Code::FailedPrecondition && e.message().contains("ended (expired)")
        })
    })
    .await;
    assert!(ended.is_some(), "the reaper did not mark the task expired");
    assert!(now_ms() - deadline <= 2500);
    let done = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), pb::LeaseState::Expired);
    assert_eq!(done.revoked_credentials, 0);
    // The audit trail has the expiry and the revocation of each credential.
    let logs = leash_e2e::logs();
    for c in &begun.credentials {
        let line = logs
            .lines()
            .find(|l| l.contains("credential.revoked") && l.contains(&c.id))
            .unwrap_or_else(|| panic!("no revocation audit record for {}", c.id));
        assert!(line.contains("expiry"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrenewed_lease_is_revoked_within_a_second_in_memory() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    expires_within_a_second(&broker).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrenewed_lease_is_revoked_within_a_second_on_redis() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.reaper_interval = "250ms";
    let broker = TestBroker::start(options).await;
    expires_within_a_second(&broker).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_state_and_never_expire_a_lease_twice() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let a = TestBroker::start_with_pki(BrokerOptions::redis(&redis), pki.clone(), "shared").await;
    let b = TestBroker::start_with_pki(BrokerOptions::redis(&redis), pki, "shared").await;
    let mut on_a = a.broker("agent/twin").await;
    let mut on_b = b.broker("agent/twin").await;
    // Begin on one replica, renew and complete on the other: no state lives in a broker.
    let begun = on_a
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    on_b.renew_lease(pb::RenewLeaseRequest {
        task_id: begun.task_id.clone(),
    })
    .await
    .unwrap();
    on_b.complete_task(pb::CompleteTaskRequest {
        task_id: begun.task_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!is_active(&a, &begun.credentials[0].value).await);
    // Twenty unrenewed 1 s leases; both replicas reap every 100 ms.
    let mut ids = Vec::new();
    for i in 0..20 {
        let mut req = review_request();
        req.requested_ttl = Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        });
        req.intent = format!("short task {i}");
        let client = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        ids.push(client.begin_task(req).await.unwrap().into_inner().task_id);
    }
    let all_expired = eventually(Duration::from_secs(6), || async {
        let logs = leash_e2e::logs();
        ids.iter().all(|id| {
            logs.lines()
                .any(|l| l.contains("lease.expired") && l.contains(id.as_str()))
        })
    })
    .await;
    assert!(all_expired.is_some(), "not every lease was expired");
    // Give a would-be second expiry time to happen, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = leash_e2e::logs();
    for id in &ids {
        let n = logs
            .lines()
            .filter(|l| l.contains("lease.expired") && l.contains(id.as_str()))
            .count();
        assert_eq!(n, 1, "lease {id} expired {n} times");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers_without_restart() {
    let mut redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    let mut agent = broker.broker("agent/steady").await;
    let mut verifier = broker.verifier("resource/api").await;
    let mut short = review_request();
    short.requested_ttl = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let doomed = agent.begin_task(short).await.unwrap().into_inner();
    let live = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let token = live.credentials[1].value.clone();
    assert!(is_active(&broker, &token).await);

    redis.kill();
    let started = Instant::now();
    let e = verifier
        .introspect(pb::IntrospectRequest {
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "introspection must never answer while the store is down: {e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls must fail fast, not hang"
    );
    let e = agent.begin_task(review_request()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let e = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: live.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let e = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: live.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    // The ops port reports not ready.
    let ready = http_status(broker.ops_addr, "/readyz").await;
    assert_eq!(ready, 503);
    // And so does its plaintext gRPC health service (the chart's startup probe).
    // (it follows the store's periodic check).
    let down = eventually(Duration::from_secs(10), || async {
        ops_grpc_health(broker.ops_addr).await == ServingStatus::NotServing
    })
    .await;
    assert!(
        down.is_some(),
        "the ops port's gRPC health stayed SERVING without Redis"
    );
    // Let the doomed lease's deadline pass during the outage.
    let wait = ms(doomed.lease_expires_at) + 300 - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap())).await;
    }

    redis.restart();
    // The same broker, without a restart, serves again.
    let back = eventually(Duration::from_secs(10), || async {
        let mut a = broker.broker("agent/steady").await;
        a.begin_task(review_request()).await.is_ok()
    })
    .await;
    assert!(
        back.is_some(),
        "broker did not recover after Redis came back"
    );
    assert_eq!(http_status(broker.ops_addr, "/readyz").await, 200);
    let serving = eventually(Duration::from_secs(10), || async {
        ops_grpc_health(broker.ops_addr).await == ServingStatus::Serving
    })
    .await;
    assert!(
        serving.is_some(),
        "the ops port's gRPC health did not return to SERVING"
    );
    // The lease whose deadline passed during the outage is expired by the reaper after it.
    let reaped = eventually(Duration::from_secs(5), || async {
        leash_e2e::logs()
            .lines()
            .any(|l| l.contains("lease.expired") && l.contains(doomed.task_id.as_str()))
    })
    .await;
    assert!(
        reaped.is_some(),
        "lease that lapsed during the outage was not expired after it"
    );
    for c in &doomed.credentials {
        assert!(!is_active(&broker, &c.value).await);
    }
    broker.stop().await;
}

/// GET `path` on the ops port; returns the HTTP status code.
use tonic_health::pb::health_check_response::ServingStatus;

/// The Broker service's status from the gRPC health service of the plaintext
/// ops port (h2c, as the kubelet's gRPC probe asks).
async fn ops_grpc_health(addr: std::net::SocketAddr) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "leash.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
