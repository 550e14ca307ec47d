//! Kill-switch time on a real `redis-server`: for each population size, a
//! fresh Redis (its own loopback port, AOF fsync) is filled with live tasks of
//! one identity, two credentials each, spread over every shard; then one
//! `Admin.RevokeIdentity` through the real gRPC edge ends them all. Prints the
//! wall time of that one call (from request to answer: every credential
//! inactive and published) and credentials per second.
//!
//! `cargo run --release -p leash-e2e --example kill_switch [CREDENTIALS...]`
//! (default 1000 10000 100000).
#![allow(clippy::unwrap_used, reason = "a benchmark: a panic is a failed run")]

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use leash_broker::{
    clock::{Clock, SystemClock},
    credentials::value_digest,
    store::{
        CredentialId, CredentialRecord, Durability, LeaseStore, RedisStore, RedisStoreOptions,
        StoreClock, StoredKind, TaskId, TaskRecord, TaskState,
    },
};
use leash_e2e::{BrokerOptions, RedisServer, TestBroker, pb};

const ROGUE: &str = "spiffe://acme.test/agent/rogue";

fn task(n: u32, now: u64) -> (TaskRecord, Vec<CredentialRecord>) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[4] = 0x6b;
    bytes[0] = bytes[3].wrapping_mul(17) ^ bytes[2];
    let id = TaskId::from_bytes(bytes);
    let creds = (0..2u8)
        .map(|g| CredentialRecord {
            actors: Vec::new(),
            id: CredentialId::new(&id, [g; 8]),
            grant: format!("g{g}"),
            kind: StoredKind::Opaque,
            audience: "https://api.acme.test".into(),
            scopes: vec!["read".into()],
            scope_classes: vec![leash_broker::templates::ScopeClass::Read],
            value_sha256: value_digest("not-a-secret"),
            subject: ROGUE.into(),
            issuer: "https://leash.acme.test".into(),
            template: "review".into(),
            cnf_x5t_s256: None,
            tenant: "default".into(),
            issued_at_ms: now,
            expires_at_ms: now + 600_000,
        })
        .collect();
    let t = TaskRecord {
        id,
        owner: ROGUE.into(),
        template: "review".into(),
        template_version: "1".into(),
        parameters: BTreeMap::new(),
        intent: "bench".into(),
        fingerprint: "f".into(),
        created_at_ms: now,
        lease_ttl_ms: 600_000,
        lease_deadline_ms: now + 600_000,
        max_deadline_ms: now + 1_200_000,
        state: TaskState::Active,
        ended_at_ms: None,
        outcome: None,
        binding: Default::default(),
        class: "any".into(),
        tenant: "default".into(),
        parent: None,
        root: None,
        depth: 0,
        actors: Vec::new(),
        delegated: None,
        approval: None,
        policies: Vec::new(),
    };
    (t, creds)
}

async fn fill(redis: &RedisServer, tasks: u32) {
    let store = Arc::new(
        RedisStore::connect(
            &redis.url(),
            RedisStoreOptions {
                prefix: "leash".into(),
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
    let mut pending = Vec::new();
    for n in 0..tasks {
        let store = store.clone();
        pending.push(tokio::spawn(async move {
            let (t, c) = task(n, now);
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
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<u32> = {
        let given: Vec<u32> = std::env::args()
            .skip(1)
            .map(|a| a.parse().unwrap())
            .collect();
        if given.is_empty() {
            vec![1000, 10_000, 100_000]
        } else {
            given
        }
    };
    println!("credentials  tasks   kill switch (RevokeIdentity)  credentials/s");
    for credentials in sizes {
        let tasks = credentials / 2;
        let redis = RedisServer::start();
        fill(&redis, tasks).await;
        let mut options = BrokerOptions::redis(&redis);
        options.extra_toml = "[admin]\ncallers = [\"spiffe://acme.test/ops/*\"]\n".into();
        let broker = TestBroker::start(options).await;
        let mut admin = broker.admin("ops/bench").await;
        let start = Instant::now();
        let answer = admin
            .revoke_identity(pb::RevokeIdentityRequest {
                identity: ROGUE.into(),
                prefix: false,
                reason: "bench".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let took = start.elapsed();
        assert_eq!(answer.revoked_credentials, credentials, "{answer:?}");
        println!(
            "{credentials:>11}  {tasks:>6}  {:>27.3} s  {:>13.0}",
            took.as_secs_f64(),
            f64::from(credentials) / took.as_secs_f64()
        );
        broker.stop().await;
    }
}
