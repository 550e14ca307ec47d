//! Sustained expiry rate of the reaper on a real `redis-server`.
//!
//! Starts its own Redis (free loopback port, AOF with `appendfsync always`, as
//! production's `durability = "fsync"` needs), fills it with leases that are all
//! due, each with two credentials, then lets one reaper sweep until none is
//! left and prints leases expired per second — the rate the reaper keeps up
//! with when leases lapse faster than that, they queue and are reaped late.
//!
//! `cargo run --release -p leash-e2e --example reaper_rate [LEASES] [BATCH]`
//! (defaults 20000 leases, batch 256).
#![allow(clippy::unwrap_used, reason = "a benchmark: a panic is a failed run")]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use leash_broker::{
    clock::{Clock, SystemClock},
    lease::{Reaper, ReaperSettings},
    store::{Durability, LeaseStore, RedisStore, RedisStoreOptions, StoreClock},
};
use leash_e2e::RedisServer;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let leases: u32 = args.next().map_or(20_000, |a| a.parse().unwrap());
    let batch: usize = args.next().map_or(256, |a| a.parse().unwrap());
    let redis = RedisServer::start();
    let store = Arc::new(
        RedisStore::connect(
            &redis.url(),
            RedisStoreOptions {
                prefix: "bench".into(),
                timeout: Duration::from_secs(5),
                retention: Duration::from_secs(60),
                durability: Durability::Fsync,
                clock: StoreClock::Store,
                local_clock: Arc::new(SystemClock),
                audit: leash_broker::audit::AuditRetention::default(),
            },
        )
        .unwrap(),
    );
    let now = SystemClock.now_ms();
    let fill = Instant::now();
    let mut pending = Vec::new();
    for n in 0..leases {
        let store = store.clone();
        pending.push(tokio::spawn(async move {
            let (t, c) = leash_e2e::due_lease(n, 0x5a, 2, now, 60_000);
            store.begin(&t, &c).await.unwrap();
        }));
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    println!(
        "filled {leases} leases (2 credentials each) in {:?}",
        fill.elapsed()
    );
    let reaper = Reaper::new(
        store.clone(),
        Arc::new(SystemClock),
        ReaperSettings {
            batch,
            ..ReaperSettings::default()
        },
    );
    let start = Instant::now();
    let mut expired = 0;
    let mut sweeps = 0;
    while expired < leases as usize && sweeps < 10_000 {
        expired += reaper.sweep().await.unwrap();
        sweeps += 1;
    }
    let took = start.elapsed();
    #[expect(clippy::cast_precision_loss, reason = "a rate for people")]
    let rate = expired as f64 / took.as_secs_f64();
    println!(
        "reaper: {expired} leases expired in {took:?} over {sweeps} sweeps (batch {batch}): {rate:.0} leases/s, {:.0} revocations/s",
        rate * 2.0
    );
}
