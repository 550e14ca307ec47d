//! A replica that starts on a backlog (issue 11): 100,000 leases already due
//! when the broker starts drain in bounded time, and the broker serves
//! meanwhile — every begin and completion during the drain succeeds.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use leash_broker::{
    clock::{Clock, SystemClock},
    store::{Durability, LeaseStore, RedisStore, RedisStoreOptions, SHARDS, StoreClock},
};
use leash_e2e::{BrokerOptions, RedisServer, TestBroker, TestPki, begin_and_complete_task};

const PREFIX: &str = "backlog";
const LEASES: u32 = 100_000;
/// The bound the drain must meet on a busy 2-core machine in a debug build
/// (the release reaper expires ~3.4k leases/s with fsync on such a machine).
const DRAIN_BOUND: Duration = Duration::from_secs(240);

/// Deadline entries left in every shard (inline commands to the test's Redis).
fn due_left(redis: &RedisServer) -> u64 {
    (0..SHARDS)
        .map(|shard| {
            let reply = redis.command(&format!("ZCARD {{{PREFIX}:s{shard:x}}}:deadlines"));
            reply.trim_start_matches(':').parse::<u64>().unwrap()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_starting_on_100k_due_leases_drains_them_while_serving() {
    // No persistence: the fill is set-up, not what is measured.
    let redis = RedisServer::start_with(&["--appendonly", "no"]);
    let store = Arc::new(
        RedisStore::connect(
            &redis.url(),
            RedisStoreOptions {
                prefix: PREFIX.into(),
                timeout: Duration::from_secs(5),
                retention: Duration::from_secs(60),
                durability: Durability::None,
                clock: StoreClock::Store,
                local_clock: Arc::new(SystemClock),
                audit: leash_broker::audit::AuditRetention::default(),
            },
        )
        .unwrap(),
    );
    let now = SystemClock.now_ms();
    let filled = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    for n in 0..LEASES {
        let store = store.clone();
        pending.spawn(async move {
            let (t, c) = leash_e2e::due_lease(n, 0xb1, 1, now, 600_000);
            store.begin(&t, &c).await.unwrap();
        });
        if pending.len() >= 128 {
            pending.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(done) = pending.join_next().await {
        done.unwrap();
    }
    assert_eq!(due_left(&redis), u64::from(LEASES));
    println!("filled {LEASES} due leases in {:.1?}", filled.elapsed());

    // The broker starts on the backlog and serves while its reaper drains it.
    let started = Instant::now();
    let options = BrokerOptions {
        store_toml: "durability = \"none\"".into(),
        ..BrokerOptions::redis(&redis)
    };
    let broker = TestBroker::start_with_pki(options, Arc::new(TestPki::new()), PREFIX).await;
    let mut agent = broker.broker("agent/during-drain").await;
    let mut served = 0u32;
    let mut served_during = 0u32;
    let mut slowest = Duration::ZERO;
    let mut left = due_left(&redis);
    while left > 0 && started.elapsed() < DRAIN_BOUND {
        let call = Instant::now();
        // Panics unless the begin and the completion both succeed.
        begin_and_complete_task(&mut agent).await;
        slowest = slowest.max(call.elapsed());
        served += 1;
        left = due_left(&redis);
        if left > 0 {
            served_during += 1;
        }
    }
    let drained = started.elapsed();
    println!(
        "drained {LEASES} due leases in {drained:.1?} ({:.0} leases/s, debug build) while serving {served} begin+complete ({served_during} before the backlog was gone; slowest {slowest:.0?})",
        f64::from(LEASES) / drained.as_secs_f64()
    );
    assert_eq!(left, 0, "{left} leases still due after {DRAIN_BOUND:?}");
    assert!(
        served_during > 0,
        "nothing was served while the backlog drained"
    );
    // A lease of the backlog ended as expired.
    let (sample, _) = leash_e2e::due_lease(7, 0xb1, 1, now, 600_000);
    let state = redis.command(&format!(
        "HGET {{{PREFIX}:s{:x}}}:task:{} state",
        sample.id.shard(),
        sample.id
    ));
    assert!(state.ends_with("expired"), "{state:?}");
    broker.stop().await;
}
