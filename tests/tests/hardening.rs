//! "No credential outlives its reason" under crashes, restarts, skewed clocks
//! and hostile callers (issue 6, items 3, 4, 5, 8, 9 and 13), end to end: real
//! brokers over mTLS on real `redis-server`s, each case a way the promise broke
//! before.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use leash_e2e::{
    BrokerOptions, RedisServer, TestBroker, begin_and_complete_task, eventually, is_active, ms,
    review_request,
};
use leash_proto::v1 as pb;
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

/// The Redis key of one of a task's parts (`task`, `creds`, `cexp`, `cgr`) under
/// the harness prefix `leash`.
fn task_key(part: &str, task_id: &str) -> String {
    let shard = task_id.chars().nth(3).unwrap();
    format!("{{leash:s{shard}}}:{part}:{task_id}")
}

/// An inline command's integer reply (`:3` → 3).
fn int(reply: &str) -> i64 {
    reply
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|_| panic!("not an integer reply: {reply:?}"))
}

fn redis_pid(redis: &RedisServer) -> u32 {
    redis.pid().expect("redis-server is running")
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

async fn refused_to_start(options: BrokerOptions) -> String {
    let broker = TestBroker::start(options).await;
    match broker.ended(Duration::from_secs(20)).await {
        Err(e) => e.to_string(),
        Ok(()) => panic!("the broker stopped without an error"),
    }
}

// ------------------------------------------------------------ item 3: durability

/// `durability = "fsync"` (the default) refuses a Redis that would acknowledge
/// writes it has not put on disk: no AOF, or (Redis 7.0: no WAITAOF) an AOF
/// fsync'd only every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_durability_refuses_a_redis_that_does_not_fsync_every_write() {
    let everysec = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let message = refused_to_start(BrokerOptions::redis(&everysec)).await;
    assert!(message.contains("appendfsync always"), "{message}");
    let no_aof = RedisServer::start_with(&["--appendonly", "no"]);
    let message = refused_to_start(BrokerOptions::redis(&no_aof)).await;
    assert!(message.contains("appendonly yes"), "{message}");
    // The explicit opt-out starts (and says so loudly in its log).
    let mut options = BrokerOptions::redis(&no_aof);
    options.store_toml = r#"durability = "none""#.into();
    let broker = TestBroker::start(options).await;
    let mut agent = broker.broker("agent/reviewer").await;
    agent.begin_task(review_request()).await.unwrap();
    assert!(leash_e2e::logs().contains("Do not run production like this"));
    broker.stop().await;
}

/// With `durability = "replicas = 1"`, a change its replica does not
/// acknowledge is answered UNAVAILABLE with the outcome unknown, never OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_change_is_unavailable_with_the_outcome_unknown() {
    let master = RedisServer::start();
    let replica_of = master.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &replica_of]);
    let synced = eventually(Duration::from_secs(20), || async {
        let out = Command::new("redis-cli")
            .args(["-p", &replica.port().to_string(), "INFO", "replication"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("master_link_status:up")
    })
    .await;
    assert!(synced.is_some(), "the replica never synced");
    let mut options = BrokerOptions::redis(&master);
    options.store_toml = r#"durability = "replicas = 1""#.into();
    let broker = TestBroker::start(options).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();

    let pid = redis_pid(&replica);
    signal(pid, "-STOP");
    let complete = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await;
    signal(pid, "-CONT");
    let e = complete.expect_err("a completion no replica acknowledged must not be OK");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("outcome unknown"), "{}", e.message());
    assert!(
        !e.message().contains("nothing was changed"),
        "{}",
        e.message()
    );
    // Repeating the call is safe and, with the replica back, confirmed.
    let again = eventually(Duration::from_secs(10), || {
        let mut agent = agent.clone();
        let task_id = begun.task_id.clone();
        async move {
            agent
                .complete_task(pb::CompleteTaskRequest {
                    task_id,
                    ..Default::default()
                })
                .await
                .is_ok()
        }
    })
    .await;
    assert!(again.is_some(), "the repeated completion never succeeded");
    assert!(!is_active(&broker, &begun.credentials[0].value).await);
    broker.stop().await;
}

/// A completion acknowledged under `fsync` survives `kill -9` of Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_completion_survives_a_redis_crash() {
    let mut redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = begin_and_complete_task(&mut agent).await;
    redis.restart(); // SIGKILL, then start on the same data
    let answered = eventually(Duration::from_secs(15), || async {
        let mut v = broker.verifier("resource/api").await;
        v.introspect(pb::IntrospectRequest {
            token: begun.credentials[0].value.clone(),
        })
        .await
        .is_ok()
    })
    .await;
    assert!(answered.is_some(), "introspection never came back");
    for c in &begun.credentials {
        assert!(!is_active(&broker, &c.value).await, "{} came back", c.id);
    }
    let task = redis.command(&format!("HGET {} state", task_key("task", &begun.task_id)));
    assert!(task.contains("completed"), "{task}");
    broker.stop().await;
}

// ------------------------------------------------------------ item 4: eviction

/// A Redis that may evict keys could drop a lease or a revocation: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_is_refused() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
    let message = refused_to_start(BrokerOptions::redis(&redis)).await;
    assert!(message.contains("maxmemory-policy"), "{message}");
    assert!(message.contains("noeviction"), "{message}");
}

// ------------------------------------------------------------ item 5: one clock

const SHORT: &str = r#"
name: short
version: "1"
owner: platform@acme.test
description: A two-second lease.
identities: [spiffe://acme.test/agent/*]
parameters:
  repo: { type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true }
lease: { ttl: 2s, max_ttl: 2s, max_lifetime: 1m, min_renew_interval: 0s }
grants:
  - { name: github, kind: jwt, audience: https://api.github.test, scopes: [{scope: "repo:{repo}:read", class: read}], ttl: 2s }
"#;

fn short_request() -> pb::BeginTaskRequest {
    let mut req = review_request();
    req.template = "short".into();
    req
}

/// Two replicas whose clocks are 3 s apart from real time (one slow, one fast)
/// share one Redis: the slow one cannot renew a lease that has lapsed, nor call
/// its credential active; the fast one does not expire a live lease early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_agree_on_every_deadline() {
    let redis = RedisServer::start();
    let pki = std::sync::Arc::new(leash_e2e::TestPki::new());
    let replica = |skew: i64| {
        let mut o = BrokerOptions::redis(&redis);
        o.templates.push(SHORT.to_owned());
        o.clock_skew_ms = skew;
        o
    };
    let honest = TestBroker::start_with_pki(replica(0), pki.clone(), "leash").await;
    let slow = TestBroker::start_with_pki(replica(-3_000), pki.clone(), "leash").await;

    // Begun on the honest replica, which then goes away.
    let mut agent = honest.broker("agent/reviewer").await;
    let begun = agent
        .begin_task(short_request())
        .await
        .unwrap()
        .into_inner();
    let deadline = ms(begun.lease_expires_at);
    honest.stop().await;
    let lapsed = eventually(Duration::from_secs(10), || async {
        now_ms() > deadline + 200
    })
    .await;
    assert!(lapsed.is_some());
    // The slow replica believes the lease has almost 3 s left.
    let mut on_slow = slow.broker("agent/reviewer").await;
    let renewed = on_slow
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await;
    let e = renewed.expect_err("a slow replica revived a lapsed lease");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        !is_active(&slow, &begun.credentials[0].value).await,
        "a lapsed lease's credential is active"
    );

    // A fast replica must not expire a live lease early (its reaper runs every 100 ms).
    let fast = TestBroker::start_with_pki(replica(3_000), pki, "leash").await;
    let mut on_fast = fast.broker("agent/reviewer").await;
    let live = on_fast
        .begin_task(short_request())
        .await
        .unwrap()
        .into_inner();
    let deadline = ms(live.lease_expires_at);
    let begun_at = now_ms();
    assert!(
        deadline - begun_at > 1_000,
        "the deadline follows Redis's clock, not the fast replica's: {} ms left",
        deadline - begun_at
    );
    // Until shortly before the credential's own expiry (a JWT `exp` is the lease
    // deadline rounded down to a whole second) it stays active.
    let credential_end = ms(live.credentials[0].expires_at).min(deadline);
    assert!(
        credential_end - begun_at > 500,
        "credential lifetime {} ms",
        credential_end - begun_at
    );
    while now_ms() < credential_end - 300 {
        assert!(
            is_active(&fast, &live.credentials[0].value).await,
            "a fast replica expired a live lease early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fast.stop().await;
    slow.stop().await;
}

// ------------------------------------------------------ item 8: bounded per task

const MANY_GRANTS: &str = r#"
name: many
version: "1"
owner: platform@acme.test
description: Three grants, renewed as fast as a hostile caller can.
identities: [spiffe://acme.test/agent/*]
parameters:
  repo: { type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true }
lease: { ttl: 30s, max_ttl: 30s, max_lifetime: 10m, min_renew_interval: 0s }
grants:
  - { name: a, kind: jwt, audience: https://a.test, scopes: [{scope: "repo:{repo}:read", class: read}], ttl: 30s }
  - { name: b, kind: opaque, audience: https://b.test, scopes: [{scope: "read", class: read}], ttl: 30s }
  - { name: c, kind: jwt, audience: https://c.test, scopes: [{scope: "read", class: read}], ttl: 30s }
"#;

const LIMITED: &str = r#"
name: limited
version: "1"
owner: platform@acme.test
description: The default renewal limit.
identities: [spiffe://acme.test/agent/*]
parameters:
  repo: { type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true }
lease: { ttl: 8s, max_ttl: 8s, max_lifetime: 10m }
grants:
  - { name: a, kind: jwt, audience: https://a.test, scopes: [{scope: "read", class: read}], ttl: 8s }
"#;

/// A renewal loop cannot pile up credentials: each grant keeps at most 4 live
/// ones, the oldest are revoked as new ones arrive, and ending the task is one
/// bounded step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_loop_keeps_at_most_four_live_credentials_per_grant() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates.push(MANY_GRANTS.to_owned());
    let broker = TestBroker::start(options).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let mut req = review_request();
    req.template = "many".into();
    let begun = agent.begin_task(req).await.unwrap().into_inner();
    for _ in 0..30 {
        agent
            .renew_lease(pb::RenewLeaseRequest {
                task_id: begun.task_id.clone(),
            })
            .await
            .unwrap();
    }
    let stored = int(&redis.command(&format!("HLEN {}", task_key("creds", &begun.task_id))));
    assert_eq!(stored, 3 * 4, "three grants, four live credentials each");
    for c in &begun.credentials {
        assert!(
            !is_active(&broker, &c.value).await,
            "{} was rotated out but is active",
            c.id
        );
    }
    let done = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.revoked_credentials, 12);
    broker.stop().await;
}

/// Renewing sooner than the template's minimum interval (default: a quarter
/// of the TTL, at most 1 s) is RESOURCE_EXHAUSTED with a retry-after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_too_soon_is_resource_exhausted_with_retry_after() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates.push(LIMITED.to_owned());
    let broker = TestBroker::start(options).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let mut req = review_request();
    req.template = "limited".into();
    let begun = agent.begin_task(req).await.unwrap().into_inner();
    let e = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .expect_err("a renewal right after the begin must be refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let retry: u64 = e
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms metadata");
    assert!(retry > 0 && retry <= 1_000, "{retry}");
    assert!(
        e.message().contains("min_renew_interval"),
        "{}",
        e.message()
    );
    tokio::time::sleep(Duration::from_millis(retry + 50)).await;
    agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .expect("after the retry-after a renewal is accepted");
    broker.stop().await;
}

// -------------------------------------------------- item 9: ended tasks go at once

/// Ending a task deletes its credential records at once; the task record stays
/// only for the retention (1 h in the harness), not for its max lifetime too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_task_keeps_only_its_record_and_only_for_the_retention() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = begin_and_complete_task(&mut agent).await;
    for part in ["creds", "cexp", "cgr"] {
        let exists = int(&redis.command(&format!("EXISTS {}", task_key(part, &begun.task_id))));
        assert_eq!(exists, 0, "{part} of an ended task is still stored");
    }
    let ttl = int(&redis.command(&format!("PTTL {}", task_key("task", &begun.task_id))));
    assert!(
        ttl > 0 && ttl <= 3_600_000,
        "the task record must expire within the retention of its end, PTTL {ttl}"
    );
    broker.stop().await;
}

// ------------------------------------------------------ item 13: reaper robustness

/// A damaged record in the deadline index is logged and skipped; every other
/// due lease is still reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_damaged_record_never_stops_the_reaper() {
    let redis = RedisServer::start();
    // Damaged leases, due long ago, in every shard.
    for shard in 0..16u8 {
        let id = format!("tk_{shard:x}{}", "0".repeat(31));
        let key = task_key("task", &id);
        redis.command(&format!(
            "HSET {key} rec not-json state active deadline 1 max 2"
        ));
        redis.command(&format!("ZADD {{leash:s{shard:x}}}:deadlines 1 {id}"));
        let junk = format!("tk_{shard:x}{}", "1".repeat(31));
        redis.command(&format!("ZADD {{leash:s{shard:x}}}:deadlines 1 {junk}"));
    }
    let mut options = BrokerOptions::redis(&redis);
    options.templates.push(SHORT.to_owned());
    let broker = TestBroker::start(options).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(
            agent
                .begin_task(short_request())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    // Within 3 s of their 2 s deadlines: the reaper runs every 100 ms, and the
    // damaged records must not hold a shard up (they used to, for a claim TTL).
    let reaped = eventually(Duration::from_secs(5), || async {
        tasks.iter().all(|t| {
            redis
                .command(&format!("HGET {} state", task_key("task", &t.task_id)))
                .contains("expired")
        })
    })
    .await;
    assert!(
        reaped.is_some(),
        "due leases were not reaped past a damaged record"
    );
    let logs = leash_e2e::logs();
    assert!(
        logs.contains("reaper: skipped"),
        "the damaged record was not logged"
    );
    broker.stop().await;
}
