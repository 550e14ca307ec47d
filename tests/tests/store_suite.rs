//! One behavioural suite for every [`LeaseStore`]: each case is written once as a
//! generic `case_*` function and run against [`MemoryStore`] and against
//! [`RedisStore`] on a real `redis-server` (one server per test).
//!
//! Time is passed to the store explicitly, so the cases use fixed instants around
//! [`T0`] and never sleep. `T0` lies far in the future because the Redis store
//! gives a task's keys a wall-clock expiry (`PEXPIREAT` at max lifetime plus
//! retention): instants near the epoch would make Redis delete them at once.
//!
//! Redis-only cases at the end check what only Redis can get wrong: no credential
//! value in the store, one hash tag per task, and fail-closed behaviour (no hang)
//! while Redis is down, then recovery with the data intact (AOF).
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use leash_broker::{
    audit::{AuditEvent, NO_TENANT},
    credentials::{opaque, value_digest},
    store::{
        Approval, ApprovalDecision, ApprovalOutcome, ApprovalState, BeginOutcome, BeginQuota,
        Bucket, CompleteOutcome, CredentialId, CredentialRecord, DelegateOutcome, EndReason,
        KillSwitch, KillTarget, LeaseStore, MemoryStore, QuotaKind, RedeemOutcome, RedisStore,
        RedisStoreOptions, RenewOutcome, Renewal, SHARDS, StoreError, StoredKind, TaskBinding,
        TaskId, TaskRecord, TaskState, Topology,
    },
};
use leash_e2e::{RedisServer, eventually};

/// The fixed "now" the cases start from (ms since the epoch, in the year 2096).
const T0: u64 = 4_000_000_000_000;
const PREFIX: &str = "leash-test";

// ---------------------------------------------------------------- fixtures

/// A task id in shard `shard` (its first hex digit), told apart by `n`.
fn task_id(shard: u8, n: u8) -> TaskId {
    assert!(shard < SHARDS);
    let mut bytes = [0x5a; 16];
    bytes[0] = (shard << 4) | 0x1;
    bytes[1] = n;
    let id = TaskId::from_bytes(bytes);
    assert_eq!(id.shard(), shard, "fixture must land in the intended shard");
    id
}

/// An active task whose lease ends at `deadline` and may last until `max`.
fn task(id: &TaskId, deadline: u64, max: u64) -> TaskRecord {
    TaskRecord {
        id: id.clone(),
        owner: "spiffe://acme.test/agent/reviewer".into(),
        template: "review".into(),
        template_version: "1".into(),
        parameters: BTreeMap::from([("repo".to_owned(), "acme/widgets".to_owned())]),
        intent: "review pull request 42".into(),
        fingerprint: "fp-1".into(),
        created_at_ms: T0,
        lease_ttl_ms: 2_000,
        lease_deadline_ms: deadline,
        max_deadline_ms: max,
        state: TaskState::Active,
        ended_at_ms: None,
        outcome: None,
        binding: Default::default(),
        class: String::new(),
        tenant: String::new(),
        parent: None,
        root: None,
        depth: 0,
        actors: Vec::new(),
        delegated: None,
        approval: None,
        policies: Vec::new(),
    }
}

/// A credential of `task` (told apart by `n`) that expires at `expires`.
fn cred(task: &TaskId, n: u8, expires: u64) -> CredentialRecord {
    cred_with_digest(
        task,
        n,
        expires,
        value_digest(&format!("not-a-real-value-{n}")),
    )
}

fn cred_with_digest(task: &TaskId, n: u8, expires: u64, digest: String) -> CredentialRecord {
    CredentialRecord {
        actors: Vec::new(),
        id: CredentialId::new(task, [n; 8]),
        grant: "github".into(),
        kind: StoredKind::Jwt,
        audience: "https://api.github.test".into(),
        scopes: vec!["repo:acme/widgets:read".into()],
        scope_classes: vec![leash_broker::templates::ScopeClass::Read],
        value_sha256: digest,
        subject: "spiffe://acme.test/agent/reviewer".into(),
        issuer: "https://leash.acme.test".into(),
        template: "review".into(),
        cnf_x5t_s256: Some("thumbprint".into()),
        tenant: String::new(),
        issued_at_ms: T0,
        expires_at_ms: expires,
    }
}

fn ids(creds: &[&CredentialRecord]) -> BTreeSet<CredentialId> {
    creds.iter().map(|c| c.id.clone()).collect()
}

fn set(ids: Vec<CredentialId>) -> BTreeSet<CredentialId> {
    let n = ids.len();
    let s: BTreeSet<_> = ids.into_iter().collect();
    assert_eq!(s.len(), n, "a credential id was listed twice");
    s
}

async fn begin_new<S: LeaseStore>(store: &S, t: &TaskRecord, creds: &[CredentialRecord]) {
    let outcome = store.begin(t, creds).await.unwrap();
    assert!(
        matches!(outcome, BeginOutcome::Created(_)),
        "begin of a new task: {outcome:?}"
    );
}

/// Renews so that the deadline becomes `new_deadline` (from `now`), as a renewal
/// without a rate limit (the limit has its own case).
async fn renew_to<S: LeaseStore>(
    store: &S,
    id: &TaskId,
    now: u64,
    new_deadline: u64,
    creds: &[CredentialRecord],
) -> Result<RenewOutcome, StoreError> {
    store
        .renew(
            id,
            Renewal {
                now_ms: now,
                extend_by_ms: new_deadline.saturating_sub(now),
                min_interval_ms: None,
                credentials: creds,
                redeems_approval: false,
            },
        )
        .await
}

async fn stored<S: LeaseStore>(store: &S, id: &TaskId) -> TaskRecord {
    store.task(id).await.unwrap().expect("task is stored")
}

async fn has_credential<S: LeaseStore>(store: &S, c: &CredentialRecord) -> bool {
    store
        .credential(&c.id.task_id(), &c.id, T0)
        .await
        .unwrap()
        .is_some()
}

// ---------------------------------------------------------------- cases

/// Begin creates; a second begin with the same id returns the original and writes nothing.
async fn case_begin_is_idempotent<S: LeaseStore>(store: &S) {
    let id = task_id(3, 1);
    let original = task(&id, T0 + 2_000, T0 + 60_000);
    let c1 = cred(&id, 1, T0 + 60_000);
    begin_new(store, &original, std::slice::from_ref(&c1)).await;

    let mut replay = task(&id, T0 + 9_000, T0 + 90_000);
    replay.intent = "something else entirely".into();
    replay.fingerprint = "fp-2".into();
    let c2 = cred(&id, 2, T0 + 60_000);
    match store
        .begin(&replay, std::slice::from_ref(&c2))
        .await
        .unwrap()
    {
        BeginOutcome::Existing(existing) => assert_eq!(*existing, original),
        other => panic!("second begin must return Existing, got {other:?}"),
    }
    assert_eq!(
        stored(store, &id).await,
        original,
        "replay overwrote the task"
    );
    assert!(has_credential(store, &c1).await);
    assert!(
        !has_credential(store, &c2).await,
        "replay wrote a credential"
    );
}

/// task() reads back exactly what begin stored; an unknown id reads as None.
async fn case_task_reads_back<S: LeaseStore>(store: &S) {
    let id = task_id(0, 1);
    let mut t = task(&id, T0 + 2_000, T0 + 60_000);
    t.parameters.insert("env".into(), "staging".into());
    begin_new(store, &t, &[]).await;
    assert_eq!(stored(store, &id).await, t);
    assert_eq!(store.task(&task_id(0, 2)).await.unwrap(), None);
}

/// Renew extends the deadline, never shortens it, never passes max_deadline, and adds credentials.
async fn case_renew_extends_within_bounds<S: LeaseStore>(store: &S) {
    let id = task_id(4, 1);
    let max = T0 + 10_000;
    begin_new(store, &task(&id, T0 + 2_000, max), &[]).await;

    let c2 = cred(&id, 2, T0 + 8_000);
    let deadline = |o: RenewOutcome| match o {
        RenewOutcome::Renewed { task: t, .. } => {
            assert_eq!(t.state, TaskState::Active);
            t.lease_deadline_ms
        }
        other => panic!("renew of a live task must succeed, got {other:?}"),
    };
    let extended = renew_to(
        store,
        &id,
        T0 + 1_000,
        T0 + 3_000,
        std::slice::from_ref(&c2),
    )
    .await
    .unwrap();
    assert_eq!(deadline(extended), T0 + 3_000, "renew extends");
    assert_eq!(stored(store, &id).await.lease_deadline_ms, T0 + 3_000);
    assert!(has_credential(store, &c2).await, "renew adds credentials");

    let earlier = renew_to(store, &id, T0 + 1_500, T0 + 2_500, &[])
        .await
        .unwrap();
    assert_eq!(deadline(earlier), T0 + 3_000, "renew never shortens");
    assert_eq!(stored(store, &id).await.lease_deadline_ms, T0 + 3_000);

    let beyond = renew_to(store, &id, T0 + 2_000, T0 + 99_000, &[])
        .await
        .unwrap();
    assert_eq!(deadline(beyond), max, "renew is capped at max_deadline");
    let now = stored(store, &id).await;
    assert_eq!(now.lease_deadline_ms, max);
    assert_eq!(now.max_deadline_ms, max);
    assert_eq!(now.state, TaskState::Active);
}

/// Renew drops records of credentials that expired before now, keeps the others.
async fn case_renew_prunes_expired_credentials<S: LeaseStore>(store: &S) {
    let id = task_id(5, 1);
    let now = T0 + 1_000;
    let old = cred(&id, 1, T0 + 500);
    let at_now = cred(&id, 2, now);
    let live = cred(&id, 3, T0 + 5_000);
    begin_new(
        store,
        &task(&id, T0 + 2_000, T0 + 60_000),
        &[old.clone(), at_now.clone(), live.clone()],
    )
    .await;
    assert!(has_credential(store, &old).await);

    let fresh = cred(&id, 4, T0 + 6_000);
    let outcome = renew_to(store, &id, now, T0 + 4_000, std::slice::from_ref(&fresh))
        .await
        .unwrap();
    assert!(
        matches!(outcome, RenewOutcome::Renewed { .. }),
        "{outcome:?}"
    );
    assert!(
        !has_credential(store, &old).await,
        "a credential expired before now must be pruned"
    );
    assert!(
        has_credential(store, &at_now).await,
        "a credential expiring exactly now did not expire before now"
    );
    assert!(has_credential(store, &live).await);
    assert!(has_credential(store, &fresh).await);
}

/// Renew of a task whose deadline is at or before now, or that ended, is NotActive and writes nothing.
async fn case_renew_not_active<S: LeaseStore>(store: &S) {
    let id = task_id(6, 1);
    let t = task(&id, T0 + 1_000, T0 + 60_000);
    begin_new(store, &t, &[]).await;
    let c = cred(&id, 1, T0 + 9_000);

    for now in [T0 + 1_000, T0 + 1_500] {
        match renew_to(store, &id, now, now + 5_000, std::slice::from_ref(&c))
            .await
            .unwrap()
        {
            RenewOutcome::NotActive(r) => assert_eq!(r, t),
            other => panic!("renew at {now} of a lapsed lease must be NotActive, got {other:?}"),
        }
    }
    assert_eq!(
        stored(store, &id).await,
        t,
        "NotActive renew wrote the task"
    );
    assert!(
        !has_credential(store, &c).await,
        "NotActive renew wrote a credential"
    );

    // A completed task is not renewable either, even before its old deadline.
    let done = task_id(6, 2);
    begin_new(store, &task(&done, T0 + 5_000, T0 + 60_000), &[]).await;
    store.complete(&done, T0 + 100, "ok").await.unwrap();
    match renew_to(store, &done, T0 + 200, T0 + 9_000, &[])
        .await
        .unwrap()
    {
        RenewOutcome::NotActive(r) => {
            assert_eq!(r.state, TaskState::Completed);
            assert_eq!(r.lease_deadline_ms, T0 + 5_000);
        }
        other => panic!("renew of a completed task must be NotActive, got {other:?}"),
    }
}

/// Every call on an unknown task: renew NotFound, complete NotFound, reap nothing, reads None.
async fn case_unknown_task<S: LeaseStore>(store: &S) {
    let id = task_id(7, 9);
    assert!(matches!(
        renew_to(store, &id, T0, T0 + 1_000, &[]).await.unwrap(),
        RenewOutcome::NotFound
    ));
    assert!(matches!(
        store.complete(&id, T0, "ok").await.unwrap(),
        CompleteOutcome::NotFound
    ));
    assert!(
        store
            .reap(id.shard(), T0 + 10_000, 10)
            .await
            .unwrap()
            .expired
            .is_empty()
    );
    assert_eq!(store.task(&id).await.unwrap(), None);
    // The failed renew must not have created anything.
    let c = cred(&id, 1, T0 + 1_000);
    assert!(store.credential(&id, &c.id, T0).await.unwrap().is_none());
}

/// Complete before the deadline: Completed with the outcome, revoking exactly the unexpired credentials.
async fn case_complete_before_deadline<S: LeaseStore>(store: &S) {
    let id = task_id(8, 1);
    let now = T0 + 1_000;
    let expired = cred(&id, 1, T0 + 500);
    let live_a = cred(&id, 2, T0 + 5_000);
    let live_b = cred(&id, 3, T0 + 7_000);
    begin_new(
        store,
        &task(&id, T0 + 2_000, T0 + 60_000),
        &[expired.clone(), live_a.clone(), live_b.clone()],
    )
    .await;

    let ended = match store.complete(&id, now, "merged").await.unwrap() {
        CompleteOutcome::Ended { task, revoked, .. } => {
            assert_eq!(set(revoked), ids(&[&live_a, &live_b]), "revoked");
            task
        }
        other => panic!("complete of a live task must end it, got {other:?}"),
    };
    assert_eq!(ended.state, TaskState::Completed);
    assert_eq!(ended.outcome.as_deref(), Some("merged"));
    assert_eq!(ended.ended_at_ms, Some(now));
    assert_eq!(
        stored(store, &id).await,
        ended,
        "stored state after complete"
    );

    match store.complete(&id, now + 10, "again").await.unwrap() {
        CompleteOutcome::AlreadyEnded(t) => assert_eq!(t, ended, "second complete changed it"),
        other => panic!("second complete must be AlreadyEnded, got {other:?}"),
    }
    assert_eq!(stored(store, &id).await, ended);
    // Item 9: the credential records go with the task's end; only the task stays.
    for c in [&expired, &live_a, &live_b] {
        assert!(
            !has_credential(store, c).await,
            "an ended task's credential record must be deleted"
        );
    }
}

/// Complete at or after the deadline ends the task as Expired, without the outcome.
async fn case_complete_after_deadline<S: LeaseStore>(store: &S) {
    let id = task_id(9, 1);
    let live = cred(&id, 1, T0 + 5_000);
    begin_new(
        store,
        &task(&id, T0 + 1_000, T0 + 60_000),
        std::slice::from_ref(&live),
    )
    .await;
    match store.complete(&id, T0 + 1_000, "merged").await.unwrap() {
        CompleteOutcome::Ended { task, revoked, .. } => {
            assert_eq!(task.state, TaskState::Expired);
            assert_eq!(task.outcome, None);
            assert_eq!(task.ended_at_ms, Some(T0 + 1_000));
            assert_eq!(set(revoked), ids(&[&live]));
        }
        other => panic!("complete after the deadline must end the task, got {other:?}"),
    }
    assert_eq!(stored(store, &id).await.state, TaskState::Expired);
}

/// credential() returns the task and the record together; None for an unknown credential or task.
async fn case_credential_lookup<S: LeaseStore>(store: &S) {
    let id = task_id(10, 1);
    let t = task(&id, T0 + 2_000, T0 + 60_000);
    let c1 = cred(&id, 1, T0 + 5_000);
    let c2 = cred(&id, 2, T0 + 6_000);
    begin_new(store, &t, &[c1.clone(), c2.clone()]).await;

    let view = store.credential(&id, &c2.id, T0).await.unwrap().unwrap();
    assert_eq!(view.task, t);
    assert_eq!(view.credential, c2);
    let view = store.credential(&id, &c1.id, T0).await.unwrap().unwrap();
    assert_eq!(view.credential, c1);

    let unknown_cred = CredentialId::new(&id, [9; 8]);
    assert!(
        store
            .credential(&id, &unknown_cred, T0)
            .await
            .unwrap()
            .is_none()
    );
    let other = task_id(10, 2);
    let unknown_task_cred = CredentialId::new(&other, [1; 8]);
    assert!(
        store
            .credential(&other, &unknown_task_cred, T0)
            .await
            .unwrap()
            .is_none()
    );
}

/// reap expires exactly the due leases of its shard, once, revoking their unexpired
/// credentials and deleting their credential records in the same step.
async fn case_reap_expires_due_leases_once<S: LeaseStore>(store: &S) {
    let due = task_id(3, 1);
    let later = task_id(3, 2);
    let other_shard = task_id(4, 1);
    let live = cred(&due, 1, T0 + 9_000);
    let old = cred(&due, 2, T0 + 500);
    begin_new(
        store,
        &task(&due, T0 + 1_000, T0 + 60_000),
        &[live.clone(), old.clone()],
    )
    .await;
    begin_new(store, &task(&later, T0 + 5_000, T0 + 60_000), &[]).await;
    begin_new(store, &task(&other_shard, T0 + 1_000, T0 + 60_000), &[]).await;

    let early = store.reap(3, T0 + 999, 10).await.unwrap();
    assert!(
        early.expired.is_empty() && !early.more,
        "nothing is due yet"
    );

    let now = T0 + 1_000;
    let reaped = store.reap(3, now, 10).await.unwrap();
    assert_eq!(reaped.expired.len(), 1, "{reaped:?}");
    let e = &reaped.expired[0];
    assert_eq!(e.task.id, due);
    assert_eq!(e.task.state, TaskState::Expired);
    assert_eq!(e.task.ended_at_ms, Some(now));
    assert_eq!(
        set(e.revoked.clone()),
        ids(&[&live, &old]),
        "every credential ends with the lease"
    );
    let (snap, _) = store.revocation_snapshot(now).await.unwrap();
    let logged: BTreeSet<CredentialId> = snap.into_iter().map(|r| r.credential_id).collect();
    assert!(
        logged.contains(&live.id),
        "the unexpired one is logged for watchers"
    );
    assert!(
        !logged.contains(&old.id),
        "an expired one needs no revocation entry"
    );
    assert!(
        !has_credential(store, &live).await,
        "credential records go with the lease"
    );
    assert!(!has_credential(store, &old).await);
    assert_eq!(stored(store, &due).await.state, TaskState::Expired);
    assert_eq!(stored(store, &later).await.state, TaskState::Active);
    assert_eq!(
        stored(store, &other_shard).await.state,
        TaskState::Active,
        "other shard untouched"
    );

    let again = store.reap(3, now + 10, 10).await.unwrap();
    assert!(again.expired.is_empty(), "never twice: {again:?}");
    // A completed task is never expired.
    let done = task_id(3, 3);
    begin_new(store, &task(&done, T0 + 2_000, T0 + 60_000), &[]).await;
    store.complete(&done, T0 + 1_500, "ok").await.unwrap();
    let after = store.reap(3, T0 + 3_000, 10).await.unwrap();
    assert!(after.expired.iter().all(|e| e.task.id != done), "{after:?}");
    assert_eq!(stored(store, &done).await.state, TaskState::Completed);
}

/// A lease renewed before the sweep is not expired at its old deadline.
async fn case_reap_respects_renewal<S: LeaseStore>(store: &S) {
    let id = task_id(12, 1);
    begin_new(store, &task(&id, T0 + 1_000, T0 + 60_000), &[]).await;
    renew_to(store, &id, T0 + 900, T0 + 3_000, &[])
        .await
        .unwrap();
    let reaped = store.reap(12, T0 + 1_001, 10).await.unwrap();
    assert!(
        reaped.expired.is_empty(),
        "renewed lease expired: {reaped:?}"
    );
    let reaped = store.reap(12, T0 + 3_000, 10).await.unwrap();
    assert_eq!(reaped.expired.len(), 1);
    assert_eq!(reaped.expired[0].task.lease_deadline_ms, T0 + 3_000);
}

/// A backlog is expired in bounded batches: `more` says there is more to do.
async fn case_reap_in_bounded_batches<S: LeaseStore>(store: &S) {
    for n in 0..5 {
        begin_new(store, &task(&task_id(13, n), T0 + 1_000, T0 + 60_000), &[]).await;
    }
    let first = store.reap(13, T0 + 2_000, 2).await.unwrap();
    assert_eq!(first.expired.len(), 2);
    assert!(first.more);
    let second = store.reap(13, T0 + 2_000, 2).await.unwrap();
    assert_eq!(second.expired.len(), 2);
    assert!(second.more);
    let last = store.reap(13, T0 + 2_000, 2).await.unwrap();
    assert_eq!(last.expired.len(), 1);
    assert!(!last.more);
    let all: BTreeSet<TaskId> = [first, second, last]
        .into_iter()
        .flat_map(|r| r.expired.into_iter().map(|e| e.task.id))
        .collect();
    assert_eq!(all.len(), 5, "each lease expired exactly once");
}

/// Concurrent reapers of one shard never expire the same lease twice.
async fn case_concurrent_reapers_disjoint<S: LeaseStore>(store: &S) {
    for n in 0..12 {
        begin_new(store, &task(&task_id(14, n), T0 + 1_000, T0 + 60_000), &[]).await;
    }
    let reap = || async {
        let mut mine = Vec::new();
        for _ in 0..10 {
            let r = store.reap(14, T0 + 2_000, 2).await.unwrap();
            mine.extend(r.expired.into_iter().map(|e| e.task.id));
        }
        mine
    };
    let (a, b, c) = tokio::join!(reap(), reap(), reap());
    let total = a.len() + b.len() + c.len();
    let unique: BTreeSet<TaskId> = a.into_iter().chain(b).chain(c).collect();
    assert_eq!(total, 12, "every lease expired once");
    assert_eq!(unique.len(), 12, "no lease expired twice");
}

/// A renewal past the per-grant cap revokes the oldest credential of that grant
/// (reason rotation, logged for watchers); other grants are untouched.
async fn case_credentials_per_grant_are_capped<S: LeaseStore>(store: &S) {
    let cap = leash_broker::store::MAX_LIVE_CREDENTIALS_PER_GRANT;
    let id = task_id(15, 1);
    let mut other = cred(&id, 200, T0 + 50_000);
    other.grant = "db".into();
    let first = cred(&id, 0, T0 + 50_000);
    begin_new(
        store,
        &task(&id, T0 + 2_000, T0 + 60_000),
        &[first.clone(), other.clone()],
    )
    .await;
    let mut issued = vec![first];
    let mut rotated = Vec::new();
    for n in 1..(u8::try_from(cap).unwrap() + 3) {
        let c = cred(&id, n, T0 + 50_000);
        match renew_to(store, &id, T0 + 100, T0 + 2_000, std::slice::from_ref(&c))
            .await
            .unwrap()
        {
            RenewOutcome::Renewed { rotated: r, .. } => rotated.extend(r),
            other => panic!("{other:?}"),
        }
        issued.push(c);
    }
    assert_eq!(
        rotated,
        issued[..3].iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        "the oldest go first"
    );
    for c in &issued[..3] {
        assert!(!has_credential(store, c).await, "rotated out");
    }
    for c in &issued[3..] {
        assert!(has_credential(store, c).await, "the newest {cap} stay");
    }
    assert!(
        has_credential(store, &other).await,
        "another grant keeps its credential"
    );
    let (snap, _) = store.revocation_snapshot(T0 + 100).await.unwrap();
    let revoked: BTreeSet<CredentialId> = snap.into_iter().map(|r| r.credential_id).collect();
    for c in &issued[..3] {
        assert!(
            revoked.contains(&c.id),
            "watchers are told of a rotated credential"
        );
    }
}

/// A renewal sooner than the minimum interval after the last one (or the begin)
/// is TooSoon and writes nothing; a begin replay (no interval) is never limited.
async fn case_renewals_are_rate_limited<S: LeaseStore>(store: &S) {
    let id = task_id(15, 2);
    let t = task(&id, T0 + 5_000, T0 + 60_000);
    begin_new(store, &t, &[]).await;
    let limited = |now: u64, creds: &'static [CredentialRecord]| Renewal {
        now_ms: now,
        extend_by_ms: 5_000,
        min_interval_ms: Some(1_000),
        credentials: creds,
        redeems_approval: false,
    };
    match store.renew(&id, limited(T0 + 400, &[])).await.unwrap() {
        RenewOutcome::TooSoon { retry_after_ms } => assert_eq!(retry_after_ms, 600),
        other => panic!("renew 400 ms after begin must be TooSoon: {other:?}"),
    }
    assert_eq!(stored(store, &id).await, t, "TooSoon wrote nothing");
    assert!(matches!(
        store.renew(&id, limited(T0 + 1_000, &[])).await.unwrap(),
        RenewOutcome::Renewed { .. }
    ));
    assert!(matches!(
        store.renew(&id, limited(T0 + 1_500, &[])).await.unwrap(),
        RenewOutcome::TooSoon {
            retry_after_ms: 500
        }
    ));
    // A replay does not count as, nor wait for, a renewal.
    assert!(matches!(
        renew_to(store, &id, T0 + 1_600, T0 + 6_000, &[])
            .await
            .unwrap(),
        RenewOutcome::Renewed { .. }
    ));
    assert!(matches!(
        store.renew(&id, limited(T0 + 2_000, &[])).await.unwrap(),
        RenewOutcome::Renewed { .. }
    ));
}

/// A task of `owner` in class `agent`, begun at `at`: 2 s lease, 60 s max lifetime.
fn quota_task(shard: u8, n: u8, owner: &str, at: u64) -> TaskRecord {
    let mut t = task(&task_id(shard, n), at + 2_000, at + 60_000);
    t.owner = format!("spiffe://acme.test/agent/{owner}");
    t.class = "agent".into();
    t.tenant = "acme".into();
    t.created_at_ms = at;
    t
}

async fn begin_quota<S: LeaseStore>(store: &S, t: &TaskRecord, q: BeginQuota) -> BeginOutcome {
    store.begin_with_quota(t, &[], q).await.unwrap()
}

fn created(o: &BeginOutcome) -> bool {
    matches!(o, BeginOutcome::Created(_))
}

fn exhausted(o: &BeginOutcome) -> Option<(QuotaKind, u64)> {
    match o {
        BeginOutcome::Exhausted {
            quota,
            retry_after_ms,
        } => Some((*quota, *retry_after_ms)),
        _ => None,
    }
}

/// Live tasks per identity and per class: a refusal writes nothing, and ending
/// a task by completion or by expiry frees its slot; a task never removed
/// (a lost decrement) frees it at its max lifetime.
async fn case_live_task_quotas<S: LeaseStore>(store: &S) {
    let q = BeginQuota {
        identity_max_live: Some(2),
        class_max_live: Some(3),
        ..BeginQuota::default()
    };
    let a1 = quota_task(1, 1, "a", T0);
    let a2 = quota_task(2, 2, "a", T0);
    let a3 = quota_task(3, 3, "a", T0);
    assert!(created(&begin_quota(store, &a1, q).await));
    assert!(created(&begin_quota(store, &a2, q).await));
    let refused = begin_quota(store, &a3, q).await;
    assert_eq!(
        exhausted(&refused).map(|e| e.0),
        Some(QuotaKind::IdentityTasks),
        "{refused:?}"
    );
    assert!(exhausted(&refused).unwrap().1 > 0, "a retry-after hint");
    assert!(
        store.task(&a3.id).await.unwrap().is_none(),
        "nothing written"
    );
    // A replay of a task that exists is answered whatever the quotas.
    assert!(matches!(
        begin_quota(store, &a1, q).await,
        BeginOutcome::Existing(_)
    ));
    // Another identity is unaffected by a's limit, until the class is full.
    let b1 = quota_task(4, 4, "b", T0);
    let b2 = quota_task(5, 5, "b", T0);
    assert!(created(&begin_quota(store, &b1, q).await));
    assert_eq!(
        exhausted(&begin_quota(store, &b2, q).await).map(|e| e.0),
        Some(QuotaKind::ClassTasks)
    );
    // Completion frees a slot.
    assert!(matches!(
        store.complete(&a1.id, T0 + 100, "succeeded").await.unwrap(),
        CompleteOutcome::Ended { .. }
    ));
    let a4 = quota_task(6, 6, "a", T0 + 100);
    assert!(created(&begin_quota(store, &a4, q).await));
    // Expiry (the reaper) frees one too: a2 and b1 lapse at T0 + 2 s.
    for shard in 0..SHARDS {
        store.reap(shard, T0 + 2_050, 100).await.unwrap();
    }
    let a5 = quota_task(7, 7, "a", T0 + 2_060);
    assert!(created(&begin_quota(store, &a5, q).await));
    let b3 = quota_task(8, 8, "b", T0 + 2_060);
    assert!(created(&begin_quota(store, &b3, q).await));
    let b4 = quota_task(11, 11, "b", T0 + 2_060);
    assert_eq!(
        exhausted(&begin_quota(store, &b4, q).await).map(|e| e.0),
        Some(QuotaKind::ClassTasks),
        "a4, a5 and b3 are live"
    );
    // Nothing ends a4, a5 and b3 (say their removal was lost): past their max
    // lifetime they count no more.
    let late = T0 + 62_100;
    let a6 = quota_task(9, 9, "a", late);
    let a7 = quota_task(10, 10, "a", late);
    assert!(created(&begin_quota(store, &a6, q).await));
    assert!(created(&begin_quota(store, &a7, q).await));
}

/// Begin rates per identity and per class: token buckets that refill over
/// time; a refusal spends nothing and says how long to wait.
async fn case_begin_rate_buckets<S: LeaseStore>(store: &S) {
    let q = BeginQuota {
        identity_rate: Some(Bucket {
            burst: 2,
            refill_ms: 30_000.0,
        }),
        class_rate: Some(Bucket {
            burst: 3,
            refill_ms: 10_000.0,
        }),
        ..BeginQuota::default()
    };
    assert!(created(
        &begin_quota(store, &quota_task(1, 1, "a", T0), q).await
    ));
    assert!(created(
        &begin_quota(store, &quota_task(2, 2, "a", T0 + 1_000), q).await
    ));
    // a's bucket is empty: the next token comes 30 s after the first was spent
    // (refilling continuously: 1/30 of a token per second since T0).
    let refused = begin_quota(store, &quota_task(3, 3, "a", T0 + 1_000), q).await;
    let (kind, wait) = exhausted(&refused).expect("identity rate");
    assert_eq!(kind, QuotaKind::IdentityRate);
    assert!((28_000..=30_000).contains(&wait), "retry after {wait} ms");
    assert!(store.task(&task_id(3, 3)).await.unwrap().is_none());
    // b at the same moment: its own bucket is full; the class's has one left.
    assert!(created(
        &begin_quota(store, &quota_task(4, 4, "b", T0 + 1_000), q).await
    ));
    let refused = begin_quota(store, &quota_task(5, 5, "c", T0 + 1_000), q).await;
    assert_eq!(exhausted(&refused).map(|e| e.0), Some(QuotaKind::ClassRate));
    // The refusal of c spent none of c's own tokens, and time refills: by
    // T0 + 31 s a has a token again, and the class has refilled too.
    let later = T0 + 31_000;
    assert!(created(
        &begin_quota(store, &quota_task(6, 6, "a", later), q).await
    ));
    assert!(created(
        &begin_quota(store, &quota_task(7, 7, "c", later), q).await
    ));
    assert!(created(
        &begin_quota(store, &quota_task(8, 8, "c", later), q).await
    ));
}

async fn case_ping<S: LeaseStore>(store: &S) {
    store.ping().await.unwrap();
}

// ---------------------------------------------------------------- audit trail

/// The events of a task's story as (event, the detail that tells them apart).
fn story(events: &[AuditEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let key = ["credential", "decision", "deadline", "outcome", "by"]
                .iter()
                .find_map(|k| e.detail.get(*k).filter(|v| !v.is_empty()))
                .cloned()
                .unwrap_or_default();
            (e.event.clone(), key)
        })
        .collect()
}

fn pair(event: &str, key: impl ToString) -> (String, String) {
    (event.to_owned(), key.to_string())
}

async fn trace_all<S: LeaseStore>(store: &S, id: &TaskId) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    let mut from = 0;
    for _ in 0..100 {
        let page = store.audit_trace(id, from, 3).await.unwrap();
        out.extend(page.events);
        match page.next {
            Some(n) => from = n,
            None => return out,
        }
    }
    panic!("audit trace of {id} did not end in 100 pages");
}

async fn case_audit_trail_tells_each_story_in_order<S: LeaseStore>(store: &S) {
    let tenant = "acme";
    let cursor = store.audit_cursor(tenant).await.unwrap();
    let id = task_id(4, 1);
    let t = TaskRecord {
        tenant: tenant.into(),
        class: "reviewers".into(),
        policies: vec!["permit-reviews".into()],
        ..task(&id, T0 + 10_000, T0 + 60_000)
    };
    let (c1, c2) = (cred(&id, 1, T0 + 10_000), cred(&id, 2, T0 + 10_000));
    begin_new(store, &t, &[c1.clone(), c2.clone()]).await;
    let c3 = cred(&id, 3, T0 + 20_000);
    renew_to(
        store,
        &id,
        T0 + 1_000,
        T0 + 20_000,
        std::slice::from_ref(&c3),
    )
    .await
    .unwrap();
    let child = TaskRecord {
        tenant: tenant.into(),
        ..child_of(&t, 1, "spiffe://acme.test/sub/a")
    };
    let child = delegated(store, &child, "h1").await;
    let c4 = cred(&child.id, 4, T0 + 9_000);
    store
        .redeem(&child, "h1", T0 + 2_000, std::slice::from_ref(&c4))
        .await
        .unwrap();
    store
        .complete_with_summary(&id, T0 + 3_000, "succeeded", "reviewed 3 files")
        .await
        .unwrap();
    let events = trace_all(store, &id).await;
    let owner = t.owner.as_str();
    let want = vec![
        pair("task.declared", owner),
        pair("policy.decided", "allow"),
        pair("task.begun", T0 + 10_000),
        pair("credential.issued", &c1.id),
        pair("credential.issued", &c2.id),
        pair("lease.renewed", T0 + 20_000),
        pair("credential.issued", &c3.id),
        pair("task.delegated", T0 + 20_000),
        pair("delegation.redeemed", "spiffe://acme.test/sub/a"),
        pair("credential.issued", &c4.id),
        pair("task.completed", "succeeded"),
        pair("credential.revoked", &c1.id),
        pair("credential.revoked", &c2.id),
        pair("credential.revoked", &c3.id),
        pair("task.revoked", format!("cascade: ancestor {id} ended")),
        pair("credential.revoked", &c4.id),
    ];
    assert_eq!(story(&events), want);
    // Every event carries who, what for and under which template.
    for e in &events {
        assert_eq!(e.tenant, tenant, "{e:?}");
        assert_eq!(e.template, "review");
        assert_eq!(e.version, "1");
        assert_eq!(e.intent, "review pull request 42");
        assert!(!e.id.is_empty());
    }
    assert_eq!(events[1].detail("policies"), "permit-reviews");
    assert_eq!(events[10].detail("summary"), "reviewed 3 files");
    assert_eq!(events[10].detail("by"), owner);
    assert_eq!(events[14].task, child.id.as_str());
    assert_eq!(events[14].parent, id.as_str());
    assert_eq!(events[14].detail("by"), id.as_str());
    // The child's story is its own part of the tree, in the same order.
    let child_story: Vec<_> = events
        .iter()
        .filter(|e| e.task == child.id.as_str())
        .cloned()
        .collect();
    assert_eq!(trace_all(store, &child.id).await, child_story);
    // Tailing the tenant reads the same events after the cursor, all of them.
    let (tail, after) = store.audit_read(tenant, &cursor, 1000).await.unwrap();
    assert_eq!(story(&tail), want, "the tenant's stream, in order");
    let (more, _) = store.audit_read(tenant, &after, 1000).await.unwrap();
    assert!(more.is_empty(), "nothing after the end: {more:?}");
    assert_eq!(store.audit_len(tenant).await.unwrap(), want.len() as u64);
    // Segregated: another tenant's stream holds none of it.
    assert_eq!(store.audit_len("globex").await.unwrap(), 0);

    // An expiry, by the reaper: no one asked, so no `by`.
    let id2 = task_id(4, 2);
    let t2 = TaskRecord {
        tenant: tenant.into(),
        ..task(&id2, T0 + 5_000, T0 + 60_000)
    };
    let c5 = cred(&id2, 5, T0 + 7_000);
    begin_new(store, &t2, std::slice::from_ref(&c5)).await;
    store.reap(4, T0 + 6_000, 10).await.unwrap();
    let events = trace_all(store, &id2).await;
    let tail: Vec<_> = story(&events).into_iter().skip(4).collect();
    assert_eq!(
        tail,
        vec![
            pair("lease.expired", ""),
            pair("credential.revoked", &c5.id)
        ]
    );
    assert_eq!(events[4].detail("reason"), "expiry");
}

async fn case_audit_trail_records_refusals_and_kill_switches<S: LeaseStore>(store: &S) {
    let id = task_id(5, 1);
    let refusal = AuditEvent {
        event: "task.denied".into(),
        at_ms: T0,
        task: id.to_string(),
        identity: "spiffe://acme.test/agent/intruder".into(),
        tenant: "acme".into(),
        ..AuditEvent::default()
    }
    .with("reason", "not the owner");
    let cursor = store.audit_cursor("acme").await.unwrap();
    store.record_audit(&refusal).await.unwrap();
    let events = trace_all(store, &id).await;
    assert_eq!(story(&events), vec![pair("task.denied", "")]);
    assert_eq!(events[0].detail("reason"), "not the owner");
    // A tenant kill switch is in the tenant's stream; others in that of no tenant.
    let switch = KillSwitch {
        kind: "tenant".into(),
        value: "acme".into(),
        reason: "incident 7".into(),
        set_by: "spiffe://acme.test/admin".into(),
        set_at_ms: T0 + 1,
    };
    store.set_kill_switch(&switch).await.unwrap();
    store
        .lift_kill_switch(
            "tenant",
            "acme",
            "spiffe://acme.test/admin",
            "resolved",
            T0 + 2,
        )
        .await
        .unwrap();
    let (tail, _) = store.audit_read("acme", &cursor, 100).await.unwrap();
    assert_eq!(
        story(&tail),
        vec![
            pair("task.denied", ""),
            pair("kill_switch.set", "spiffe://acme.test/admin"),
            pair("kill_switch.lifted", "spiffe://acme.test/admin"),
        ]
    );
    assert_eq!(tail[1].detail("reason"), "incident 7");
    assert_eq!(tail[2].detail("reason"), "resolved");
    let other = KillSwitch {
        kind: "identity".into(),
        value: "spiffe://acme.test/agent/x".into(),
        ..switch
    };
    let none = store.audit_cursor(NO_TENANT).await.unwrap();
    store.set_kill_switch(&other).await.unwrap();
    let (tail, _) = store.audit_read(NO_TENANT, &none, 100).await.unwrap();
    assert_eq!(
        story(&tail),
        vec![pair("kill_switch.set", "spiffe://acme.test/admin")]
    );
}

// ---------------------------------------------------------------- instantiation

fn memory_store() -> MemoryStore {
    MemoryStore::new(3_600_000)
}

fn redis_store(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(
        &redis.url(),
        RedisStoreOptions {
            prefix: PREFIX.into(),
            timeout: Duration::from_secs(1),
            retention: Duration::from_secs(3_600),
            durability: leash_broker::store::Durability::Fsync,
            // The cases pass fixed instants in 2096; Redis's own clock has its own case.
            clock: leash_broker::store::StoreClock::Caller,
            local_clock: std::sync::Arc::new(leash_broker::clock::SystemClock),
            audit: leash_broker::audit::AuditRetention::default(),
        },
    )
    .unwrap()
}

/// Ending a task logs its unexpired credentials; snapshots and cursor reads see
/// exactly them; a waiting read wakes on a new revocation.
async fn case_revocations_are_logged_and_read<S: LeaseStore>(store: &S) {
    use leash_broker::store::{EndReason, RevocationRead};
    let (snap, start) = store.revocation_snapshot(T0).await.unwrap();
    assert!(snap.is_empty());
    let t1 = task_id(2, 1);
    let live = cred(&t1, 1, T0 + 5_000);
    let stale = cred(&t1, 2, T0 + 500);
    begin_new(
        store,
        &task(&t1, T0 + 3_000, T0 + 60_000),
        &[live.clone(), stale.clone()],
    )
    .await;
    store.complete(&t1, T0 + 1_000, "succeeded").await.unwrap();

    let (records, after) = read_after(store, &start).await;
    assert_eq!(
        records.len(),
        1,
        "only the unexpired credential is logged: {records:?}"
    );
    let r = &records[0];
    assert_eq!(r.credential_id, live.id);
    assert_eq!(r.expires_at_ms, T0 + 5_000);
    assert_eq!(r.revoked_at_ms, T0 + 1_000);
    assert_eq!(r.reason, EndReason::Completion);
    assert_eq!(r.audience, live.audience);
    assert_eq!(r.position.0, 2);
    assert!(!after.is_before(2, r.position.1) && start.is_before(2, r.position.1));
    let (none, same) = read_after(store, &after).await;
    assert!(none.is_empty());
    assert_eq!(same, after);

    let (snap, snap_cursor) = store.revocation_snapshot(T0 + 1_000).await.unwrap();
    assert_eq!(
        snap.iter().map(|r| &r.credential_id).collect::<Vec<_>>(),
        vec![&live.id]
    );
    assert_eq!(
        snap_cursor, after,
        "the snapshot is consistent with the log position"
    );
    assert_eq!(
        snap[0].audience, live.audience,
        "the audience travels with it"
    );
    let grace = leash_broker::store::REVOCATION_GRACE_MS;
    let (kept, _) = store
        .revocation_snapshot(T0 + 5_000 + grace - 1)
        .await
        .unwrap();
    assert_eq!(kept.len(), 1, "kept for the grace past its expiry");
    let (later, _) = store.revocation_snapshot(T0 + 5_000 + grace).await.unwrap();
    assert!(
        later.is_empty(),
        "revocations leave the snapshot after the grace"
    );

    // A waiting read wakes when a revocation is logged.
    let t2 = task_id(9, 1);
    let c3 = cred(&t2, 3, T0 + 9_000);
    begin_new(
        store,
        &task(&t2, T0 + 8_000, T0 + 60_000),
        std::slice::from_ref(&c3),
    )
    .await;
    // Woken by the entry, whenever it comes; the long wait only bounds a busy
    // machine (a TLS Cluster's bell watchers reconnecting on two loaded cores
    // once took longer than 5 s).
    let (read, ()) = tokio::join!(
        store.read_revocations(&after, Duration::from_secs(30), 100),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            store.complete(&t2, T0 + 2_000, "succeeded").await.unwrap();
        }
    );
    let RevocationRead::Records(woken, _) = read.unwrap() else {
        panic!("unexpected gap");
    };
    assert_eq!(
        woken.iter().map(|r| &r.credential_id).collect::<Vec<_>>(),
        vec![&c3.id]
    );
}

/// A cursor ahead of what the log holds (the store came back, or was failed
/// over to, with less history) is a gap: the watcher must start over from a
/// snapshot, never silently skip what it cannot see.
async fn case_cursor_ahead_of_the_log_is_a_gap<S: LeaseStore>(store: &S) {
    use leash_broker::store::{LogId, RevocationCursor, RevocationRead};
    let t = task_id(2, 1);
    begin_new(
        store,
        &task(&t, T0 + 3_000, T0 + 60_000),
        &[cred(&t, 1, T0 + 5_000)],
    )
    .await;
    store.complete(&t, T0 + 1_000, "succeeded").await.unwrap();
    let mut ahead = RevocationCursor::default();
    // Far past anything either store has written in shard 2 (ids are times in ms).
    ahead.advance(
        2,
        LogId {
            ms: 9_000_000_000_000,
            seq: 0,
        },
    );
    let read = store
        .read_revocations(&ahead, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(
        matches!(read, RevocationRead::Gap),
        "a cursor ahead of the log must be a gap, got {read:?}"
    );
    // A shard whose log was never written, with a cursor in it, is a gap too.
    let mut phantom = RevocationCursor::default();
    phantom.advance(11, LogId { ms: 1, seq: 0 });
    let read = store
        .read_revocations(&phantom, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(
        matches!(read, RevocationRead::Gap),
        "a cursor into an empty log must be a gap, got {read:?}"
    );
}

/// A snapshot is read in bounded pages; the pages cover every revoked
/// credential exactly once, many of which share one expiry, even while other
/// revocations land between pages.
async fn case_revoked_set_is_read_in_pages<S: LeaseStore>(store: &S) {
    use leash_broker::store::PagePosition;
    let first = task_id(3, 1);
    // 25 credentials (each its own grant, so none is rotated out): 10 expire
    // together, 10 more together, 5 apart.
    let creds: Vec<CredentialRecord> = (1..=25u8)
        .map(|n| {
            let exp = match n {
                1..=10 => T0 + 5_000,
                11..=20 => T0 + 6_000,
                _ => T0 + 7_000 + u64::from(n),
            };
            CredentialRecord {
                grant: format!("g{n}"),
                ..cred(&first, n, exp)
            }
        })
        .collect();
    begin_new(store, &task(&first, T0 + 3_000, T0 + 60_000), &creds).await;
    store
        .complete(&first, T0 + 1_000, "succeeded")
        .await
        .unwrap();

    let limit = 4;
    let mut seen = Vec::new();
    let mut from = PagePosition::start(T0 + 1_000);
    for page_no in 0.. {
        assert!(page_no < 20, "paging must end");
        let page = store.revoked_page(3, from, limit).await.unwrap();
        assert!(page.records.len() <= limit, "a page is bounded");
        seen.extend(page.records.iter().map(|r| r.credential_id.clone()));
        if page_no == 1 {
            // A revocation sharing an expiry with entries already read lands mid-snapshot.
            let other = task_id(3, 2);
            begin_new(
                store,
                &task(&other, T0 + 3_000, T0 + 60_000),
                &[cred(&other, 1, T0 + 5_000)],
            )
            .await;
            store
                .complete(&other, T0 + 1_500, "succeeded")
                .await
                .unwrap();
        }
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    let unique: BTreeSet<CredentialId> = seen.iter().cloned().collect();
    let wanted: BTreeSet<CredentialId> = creds.iter().map(|c| c.id.clone()).collect();
    assert!(
        wanted.is_subset(&unique),
        "every revoked credential is in some page: missing {:?}",
        wanted.difference(&unique).collect::<Vec<_>>()
    );
    assert!(
        seen.len() <= 27,
        "no entry is read more than twice: {seen:?}"
    );
    let other_shard = store
        .revoked_page(4, PagePosition::start(T0 + 1_000), limit)
        .await
        .unwrap();
    assert!(other_shard.records.is_empty() && other_shard.next.is_none());
    // Past the grace, the first page of a new snapshot starts after them all.
    let grace = leash_broker::store::REVOCATION_GRACE_MS;
    let late = store
        .revoked_page(3, PagePosition::start(T0 + 7_025 + grace), limit)
        .await
        .unwrap();
    assert!(late.records.is_empty(), "{:?}", late.records);
}

/// The cursor of the log's end is had without reading any snapshot, and reads
/// only what is logged after it.
async fn case_cursor_without_snapshot<S: LeaseStore>(store: &S) {
    let t1 = task_id(7, 1);
    begin_new(
        store,
        &task(&t1, T0 + 3_000, T0 + 60_000),
        &[cred(&t1, 1, T0 + 9_000)],
    )
    .await;
    store.complete(&t1, T0 + 1_000, "succeeded").await.unwrap();
    let end = store.revocation_cursor().await.unwrap();
    let (none, same) = read_after(store, &end).await;
    assert!(none.is_empty(), "nothing after the end: {none:?}");
    assert_eq!(same, end);
    let t2 = task_id(7, 2);
    let c2 = cred(&t2, 1, T0 + 9_000);
    begin_new(
        store,
        &task(&t2, T0 + 3_000, T0 + 60_000),
        std::slice::from_ref(&c2),
    )
    .await;
    store.complete(&t2, T0 + 1_000, "succeeded").await.unwrap();
    let (next, _) = read_after(store, &end).await;
    assert_eq!(
        next.iter().map(|r| &r.credential_id).collect::<Vec<_>>(),
        vec![&c2.id]
    );
}

/// What the log holds after `cursor` (up to 100 entries), and the cursor after
/// it; a gap fails the test.
async fn read_after<S: LeaseStore>(
    store: &S,
    cursor: &leash_broker::store::RevocationCursor,
) -> (
    Vec<leash_broker::store::RevocationRecord>,
    leash_broker::store::RevocationCursor,
) {
    match store
        .read_revocations(cursor, Duration::ZERO, 100)
        .await
        .unwrap()
    {
        leash_broker::store::RevocationRead::Records(records, next) => (records, next),
        leash_broker::store::RevocationRead::Gap => panic!("unexpected gap"),
    }
}

// ---------------------------------------------------------------- delegation, approvals, kill switches

/// A child of `parent` (same shard), not yet redeemed.
fn child_of(parent: &TaskRecord, n: u8, owner: &str) -> TaskRecord {
    let mut bytes = [0x77; 16];
    bytes[1] = n;
    let id = TaskId::in_shard(parent.id.shard(), bytes);
    let mut actors = vec![owner.to_owned()];
    if parent.actors.is_empty() {
        actors.push(parent.owner.clone());
    } else {
        actors.extend(parent.actors.iter().cloned());
    }
    TaskRecord {
        id,
        owner: owner.into(),
        parent: Some(parent.id.clone()),
        root: Some(parent.root.clone().unwrap_or_else(|| parent.id.clone())),
        depth: parent.depth + 1,
        actors,
        binding: TaskBinding::Delegated,
        delegated: Some(BTreeMap::from([(
            "github".to_owned(),
            vec!["repo:acme/widgets:read".to_owned()],
        )])),
        // Asks for more than the parent has left: the store clamps it.
        lease_deadline_ms: parent.lease_deadline_ms + 50_000,
        max_deadline_ms: parent.max_deadline_ms + 50_000,
        ..task(&parent.id, 0, 0)
    }
}

async fn delegated<S: LeaseStore>(store: &S, child: &TaskRecord, handle: &str) -> TaskRecord {
    match store.delegate(child, handle).await.unwrap() {
        DelegateOutcome::Created(t) => *t,
        other => panic!("delegate: {other:?}"),
    }
}

/// Live counts per template follow every begin, issuance, renewal (with its
/// pruning), delegation, redemption, expiry, completion and cascade exactly.
async fn case_live_counts_are_exact<S: LeaseStore>(store: &S) {
    async fn live<S: LeaseStore>(store: &S, now: u64) -> (BTreeMap<String, (u64, u64)>, u64) {
        let counts = store.live_counts(now).await.unwrap();
        let by = counts
            .templates
            .iter()
            .filter(|(_, c)| c.tasks > 0 || c.credentials > 0)
            .map(|(t, c)| (t.clone(), (c.tasks, c.credentials)))
            .collect();
        (by, counts.overdue)
    }
    let none = || BTreeMap::<String, (u64, u64)>::new();
    assert_eq!(live(store, T0).await, (none(), 0));
    let a = task_id(1, 1);
    let b = task_id(2, 1);
    let ta = task(&a, T0 + 10_000, T0 + 60_000);
    let tb = TaskRecord {
        template: "deploy".into(),
        ..task(&b, T0 + 1_000, T0 + 60_000)
    };
    begin_new(
        store,
        &ta,
        &[cred(&a, 1, T0 + 500), cred(&a, 2, T0 + 10_000)],
    )
    .await;
    begin_new(store, &tb, &[cred(&b, 1, T0 + 1_000)]).await;
    let want = |review: (u64, u64), deploy: (u64, u64)| {
        let mut m = none();
        for (t, c) in [("review", review), ("deploy", deploy)] {
            if c != (0, 0) {
                m.insert(t.to_owned(), c);
            }
        }
        m
    };
    assert_eq!(live(store, T0).await, (want((1, 2), (1, 1)), 0));
    // A renewal prunes the expired credential and adds one.
    renew_to(
        store,
        &a,
        T0 + 600,
        T0 + 20_000,
        &[cred(&a, 3, T0 + 20_000)],
    )
    .await
    .unwrap();
    assert_eq!(live(store, T0 + 600).await, (want((1, 2), (1, 1)), 0));
    // A child is a live task of the same template; it holds what it redeems.
    let child = delegated(store, &child_of(&ta, 1, "spiffe://acme.test/sub/a"), "h1").await;
    assert_eq!(live(store, T0 + 700).await, (want((2, 2), (1, 1)), 0));
    store
        .redeem(&child, "h1", T0 + 800, &[cred(&child.id, 4, T0 + 9_000)])
        .await
        .unwrap();
    assert_eq!(live(store, T0 + 800).await, (want((2, 3), (1, 1)), 0));
    // Past b's deadline it is the reaper's backlog until reaped.
    assert_eq!(live(store, T0 + 2_000).await, (want((2, 3), (1, 1)), 1));
    store.reap(2, T0 + 2_000, 10).await.unwrap();
    assert_eq!(live(store, T0 + 2_000).await, (want((2, 3), (0, 0)), 0));
    // Completing the root ends its child too.
    store.complete(&a, T0 + 3_000, "succeeded").await.unwrap();
    assert_eq!(live(store, T0 + 3_000).await, (none(), 0));
    // Ending again changes nothing.
    store.complete(&a, T0 + 3_100, "succeeded").await.unwrap();
    assert_eq!(live(store, T0 + 3_100).await, (none(), 0));
}

async fn case_delegation_tree_ends_with_its_root<S: LeaseStore>(store: &S) {
    let root_id = task_id(3, 1);
    let root = task(&root_id, T0 + 10_000, T0 + 60_000);
    begin_new(store, &root, &[cred(&root_id, 1, T0 + 10_000)]).await;
    let child = delegated(store, &child_of(&root, 1, "spiffe://acme.test/sub/a"), "h1").await;
    assert_eq!(child.id.shard(), 3);
    assert_eq!(
        child.lease_deadline_ms,
        T0 + 10_000,
        "clamped to the parent's lease"
    );
    assert_eq!(
        child.max_deadline_ms,
        T0 + 60_000,
        "clamped to the parent's lifetime"
    );
    // The handle works once, and only the right one.
    let bound = TaskRecord {
        binding: TaskBinding::JwtSvid,
        ..child.clone()
    };
    let c1 = cred(&child.id, 1, T0 + 9_000);
    for (handle, want_ok) in [("wrong", false), ("h1", true), ("h1", false)] {
        let got = store
            .redeem(&bound, handle, T0 + 1, std::slice::from_ref(&c1))
            .await
            .unwrap();
        match got {
            RedeemOutcome::Redeemed(t) => {
                assert!(want_ok, "redeemed with {handle}");
                assert_eq!(t.binding, TaskBinding::JwtSvid);
            }
            RedeemOutcome::BadHandle => assert!(!want_ok, "refused {handle}"),
            other => panic!("redeem: {other:?}"),
        }
    }
    assert!(has_credential(store, &c1).await);
    let grandchild = delegated(
        store,
        &child_of(&child, 2, "spiffe://acme.test/sub/b"),
        "h2",
    )
    .await;
    assert_eq!(grandchild.depth, 2);
    assert_eq!(grandchild.root.as_ref(), Some(&root_id));
    let CompleteOutcome::Ended {
        task, descendants, ..
    } = store.complete(&root_id, T0 + 2, "succeeded").await.unwrap()
    else {
        panic!("complete");
    };
    assert_eq!(task.state, TaskState::Completed);
    let ended: BTreeSet<TaskId> = descendants.iter().map(|d| d.task.id.clone()).collect();
    assert_eq!(
        ended,
        BTreeSet::from([child.id.clone(), grandchild.id.clone()])
    );
    for d in &descendants {
        assert_eq!(d.task.state, TaskState::Revoked);
        assert_eq!(d.reason, EndReason::Cascade);
    }
    let child_revoked = descendants.iter().find(|d| d.task.id == child.id).unwrap();
    assert_eq!(child_revoked.revoked, vec![c1.id.clone()]);
    assert!(!has_credential(store, &c1).await);
    assert_eq!(
        stored(store, &grandchild.id).await.state,
        TaskState::Revoked
    );
    // An ended parent delegates nothing.
    let late = child_of(&task, 3, "spiffe://acme.test/sub/c");
    assert!(matches!(
        store.delegate(&late, "h3").await.unwrap(),
        DelegateOutcome::ParentNotActive(_)
    ));
}

async fn case_reaping_a_parent_ends_its_children<S: LeaseStore>(store: &S) {
    let root_id = task_id(4, 1);
    let root = task(&root_id, T0 + 1_000, T0 + 60_000);
    begin_new(store, &root, &[]).await;
    let child = delegated(store, &child_of(&root, 1, "spiffe://acme.test/sub/a"), "h").await;
    let reaped = store.reap(4, T0 + 1_000, 100).await.unwrap();
    let reasons: BTreeMap<TaskId, EndReason> = reaped
        .expired
        .iter()
        .map(|e| (e.task.id.clone(), e.reason))
        .collect();
    assert_eq!(reasons.get(&root_id), Some(&EndReason::Expiry));
    assert_eq!(reasons.get(&child.id), Some(&EndReason::Cascade));
}

async fn case_kill_switches_refuse_and_revoke<S: LeaseStore>(store: &S) {
    let rogue = "spiffe://acme.test/agent/rogue";
    let mut victims = Vec::new();
    for shard in 0..SHARDS {
        let id = task_id(shard, 9);
        let t = TaskRecord {
            owner: rogue.into(),
            ..task(&id, T0 + 10_000, T0 + 60_000)
        };
        begin_new(store, &t, &[cred(&id, 1, T0 + 10_000)]).await;
        victims.push(id);
    }
    let bystander = task_id(0, 8);
    begin_new(store, &task(&bystander, T0 + 10_000, T0 + 60_000), &[]).await;
    let switch = KillSwitch {
        kind: "identity".into(),
        value: rogue.into(),
        reason: "leaked".into(),
        set_by: "spiffe://acme.test/ops/a".into(),
        set_at_ms: T0,
    };
    store.set_kill_switch(&switch).await.unwrap();
    assert_eq!(store.kill_switches().await.unwrap(), vec![switch.clone()]);
    let again = TaskRecord {
        owner: rogue.into(),
        ..task(&task_id(1, 7), T0 + 10_000, T0 + 60_000)
    };
    match store.begin(&again, &[]).await.unwrap() {
        BeginOutcome::Killed(k) => {
            assert_eq!((k.kind.as_str(), k.reason.as_str()), ("identity", "leaked"))
        }
        other => panic!("a killed identity began: {other:?}"),
    }
    let target = KillTarget::Identity(rogue.into());
    let mut ended = Vec::new();
    for shard in 0..SHARDS {
        let mut cursor = 0;
        loop {
            let page = store.live_tasks(shard, cursor, 2).await.unwrap();
            ended.extend(
                store
                    .revoke_tasks(
                        shard,
                        &page.ids,
                        &target,
                        "killed",
                        "spiffe://t.test/admin",
                        T0 + 1,
                    )
                    .await
                    .unwrap(),
            );
            match page.next {
                Some(n) => cursor = n,
                None => break,
            }
        }
    }
    let ended_ids: BTreeSet<TaskId> = ended.iter().map(|e| e.task.id.clone()).collect();
    assert_eq!(ended_ids, victims.iter().cloned().collect());
    assert!(
        ended
            .iter()
            .all(|e| e.reason == EndReason::KillSwitch && e.revoked.len() == 1)
    );
    assert_eq!(stored(store, &victims[3]).await.state, TaskState::Revoked);
    assert_eq!(
        stored(store, &victims[3]).await.outcome.as_deref(),
        Some("killed")
    );
    assert_eq!(stored(store, &bystander).await.state, TaskState::Active);
    assert!(
        store
            .lift_kill_switch("identity", rogue, "spiffe://t.test/admin", "done", T0 + 2)
            .await
            .unwrap()
    );
    assert!(
        !store
            .lift_kill_switch("identity", rogue, "spiffe://t.test/admin", "done", T0 + 2)
            .await
            .unwrap()
    );
    begin_new(store, &again, &[]).await;
}

fn gated(id: &TaskId) -> TaskRecord {
    TaskRecord {
        approval: Some(Approval {
            grants: vec!["github".into()],
            approvers: vec!["spiffe://acme.test/human/*".into()],
            approver_classes: Vec::new(),
            validity_ms: 1_000,
            issue_others: true,
            status: Default::default(),
        }),
        ..task(id, T0 + 30_000, T0 + 60_000)
    }
}

async fn case_approvals_are_decided_once_and_expire<S: LeaseStore>(store: &S) {
    let id = task_id(6, 1);
    begin_new(store, &gated(&id), &[]).await;
    let a = stored(store, &id).await.approval.unwrap();
    assert_eq!(
        (a.status.state, a.status.deadline_ms),
        (ApprovalState::Pending, T0 + 1_000)
    );
    let yes = ApprovalDecision {
        approve: true,
        by: "spiffe://acme.test/human/a".into(),
        reason: "fine".into(),
        validity_ms: 1_000,
    };
    let ApprovalOutcome::Decided(t) = store.decide_approval(&id, &yes, T0 + 10).await.unwrap()
    else {
        panic!("approve");
    };
    let a = t.approval.unwrap();
    assert_eq!(a.status.state, ApprovalState::Approved);
    assert_eq!(
        a.status.deadline_ms,
        T0 + 1_010,
        "the approval's own validity"
    );
    assert_eq!(
        a.status.decided_by.as_deref(),
        Some("spiffe://acme.test/human/a")
    );
    assert!(matches!(
        store.decide_approval(&id, &yes, T0 + 20).await.unwrap(),
        ApprovalOutcome::NotPending(_)
    ));
    let renewal = |now| Renewal {
        now_ms: now,
        extend_by_ms: 1_000,
        min_interval_ms: None,
        credentials: &[],
        redeems_approval: true,
    };
    assert!(matches!(
        store.renew(&id, renewal(T0 + 30)).await.unwrap(),
        RenewOutcome::Renewed { .. }
    ));
    assert_eq!(
        stored(store, &id).await.approval.unwrap().status.state,
        ApprovalState::Redeemed
    );
    // Used: later renewals keep the grants, past the approval's validity too.
    assert!(matches!(
        store.renew(&id, renewal(T0 + 5_000)).await.unwrap(),
        RenewOutcome::Renewed { .. }
    ));

    // Undecided past its validity: expired, and an approval then changes nothing.
    let late = task_id(6, 2);
    begin_new(store, &gated(&late), &[]).await;
    assert!(matches!(
        store
            .decide_approval(&late, &yes, T0 + 1_000)
            .await
            .unwrap(),
        ApprovalOutcome::NotPending(_)
    ));
    assert_eq!(
        stored(store, &late)
            .await
            .approval
            .unwrap()
            .state_at(T0 + 1_000),
        ApprovalState::Expired
    );
    // Approved but unused in time: the renewal that would issue the grants is refused.
    let unused = task_id(6, 3);
    begin_new(store, &gated(&unused), &[]).await;
    store.decide_approval(&unused, &yes, T0 + 10).await.unwrap();
    assert!(matches!(
        store.renew(&unused, renewal(T0 + 1_010)).await.unwrap(),
        RenewOutcome::ApprovalLapsed(_)
    ));
}

async fn case_a_child_of_a_lapsed_parent_cannot_renew_or_redeem<S: LeaseStore>(store: &S) {
    let root_id = task_id(7, 1);
    let root = task(&root_id, T0 + 1_000, T0 + 60_000);
    begin_new(store, &root, &[]).await;
    let child = delegated(store, &child_of(&root, 1, "spiffe://acme.test/sub/a"), "h").await;
    let later = delegated(store, &child_of(&root, 2, "spiffe://acme.test/sub/b"), "h2").await;
    let bound = TaskRecord {
        binding: TaskBinding::JwtSvid,
        ..child.clone()
    };
    assert!(matches!(
        store.redeem(&bound, "h", T0 + 10, &[]).await.unwrap(),
        RedeemOutcome::Redeemed(_)
    ));
    // Renewed while the parent is live, the child's lease reaches past the
    // parent's (it is bounded by the parent's max lifetime only).
    let early = Renewal {
        now_ms: T0 + 500,
        extend_by_ms: 1_000,
        min_interval_ms: None,
        credentials: &[],
        redeems_approval: false,
    };
    assert!(matches!(
        store.renew(&child.id, early).await.unwrap(),
        RenewOutcome::Renewed { .. }
    ));
    // The parent's lease lapses (the reaper has not run yet): the child's own
    // deadline is still ahead, but it may no longer renew.
    let renewal = Renewal {
        now_ms: T0 + 1_000,
        extend_by_ms: 1_000,
        min_interval_ms: None,
        credentials: &[],
        redeems_approval: false,
    };
    assert!(matches!(
        store.renew(&child.id, renewal).await.unwrap(),
        RenewOutcome::NotActive(_)
    ));
    let bound_later = TaskRecord {
        binding: TaskBinding::JwtSvid,
        ..later.clone()
    };
    assert!(matches!(
        store
            .redeem(&bound_later, "h2", T0 + 1_000, &[])
            .await
            .unwrap(),
        RedeemOutcome::NotActive(_)
    ));
}

async fn case_a_kill_switch_over_many_pages_of_one_shard<S: LeaseStore>(store: &S) {
    let owner = "spiffe://acme.test/agent/many";
    let mut all = BTreeSet::new();
    for n in 0..450u16 {
        let mut bytes = [0x33; 16];
        bytes[1..3].copy_from_slice(&n.to_be_bytes());
        let id = TaskId::in_shard(2, bytes);
        let t = TaskRecord {
            owner: owner.into(),
            ..task(&id, T0 + 10_000, T0 + 60_000)
        };
        begin_new(store, &t, &[]).await;
        all.insert(id);
    }
    let target = KillTarget::Identity(owner.into());
    let mut ended = BTreeSet::new();
    let mut cursor = 0;
    for _ in 0..1_000 {
        let page = store.live_tasks(2, cursor, 200).await.unwrap();
        for e in store
            .revoke_tasks(
                2,
                &page.ids,
                &target,
                "killed",
                "spiffe://t.test/admin",
                T0 + 1,
            )
            .await
            .unwrap()
        {
            ended.insert(e.task.id);
        }
        match page.next {
            Some(n) => cursor = n,
            None => break,
        }
    }
    assert_eq!(ended, all, "a page cursor skipped live tasks");
}

/// Runs each case once per store: `memory::<case>` and `redis::<case>`.
macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    let store = super::memory_store();
                    super::$case(&store).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    let server = leash_e2e::RedisServer::start();
                    let store = super::redis_store(&server);
                    super::$case(&store).await;
                }
            )*
        }

        /// Every case on one real Redis Cluster (3 masters with a replica
        /// each) over TLS (a CA of the test's own; the bus and replication on
        /// TLS too), the store signed in as an ACL user with only
        /// [`leash_e2e::leash_acl`] (the default user off), each case under a
        /// key prefix of its own, acknowledged by a replica (`WAIT` on the node
        /// each script ran on).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_case_on_a_redis_cluster_over_tls_as_an_acl_user() {
            let tls = leash_e2e::RedisTls::generate();
            let (cluster, tls) = tokio::task::spawn_blocking(move || {
                let c = leash_e2e::RedisCluster::start_with(3, 1, Some(&tls));
                c.require_users(&acl_users(), Some(REPLICA));
                (c, tls)
            })
            .await
            .unwrap();
            let topology = Topology::Cluster { nodes: cluster.tls_seeds() };
            let access = leash_access(Some(&tls));
            $(
                println!("cluster: {}", stringify!($case));
                $case(&topology_store(&topology, &access, stringify!($case))).await;
            )*
        }

        /// Every case on a real Sentinel group (a master, two replicas, three
        /// Sentinels), the store finding the master through the Sentinels and
        /// signing in to it as an ACL user with only [`leash_e2e::leash_acl`]
        /// (the default user off; the replicas and Sentinels sign in as users
        /// of their own).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_case_on_redis_sentinel_as_an_acl_user() {
            let group = tokio::task::spawn_blocking(|| {
                let g = leash_e2e::SentinelGroup::start(2, 3);
                g.require_users(&acl_users(), REPLICA, SENTINEL);
                g
            })
            .await
            .unwrap();
            let topology = Topology::Sentinel {
                master: leash_e2e::SentinelGroup::NAME.into(),
                sentinels: group.sentinel_addresses(),
            };
            let access = leash_access(None);
            $(
                println!("sentinel: {}", stringify!($case));
                $case(&topology_store(&topology, &access, stringify!($case))).await;
            )*
        }

        /// Every case on one Redis over TLS (`rediss://`, a CA of the test's
        /// own) as an ACL user with only [`leash_e2e::leash_acl`].
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_case_on_redis_over_tls_as_an_acl_user() {
            let tls = leash_e2e::RedisTls::generate();
            let server = leash_e2e::RedisServer::start_tls(&tls, &[]);
            server.require_users(&acl_users(), None);
            let topology = Topology::Standalone { url: server.tls_url().unwrap() };
            let access = leash_access(Some(&tls));
            $(
                println!("tls: {}", stringify!($case));
                $case(&topology_store(&topology, &access, stringify!($case))).await;
            )*
        }
    };
}

/// The ACL user the store signs in as (with [`leash_e2e::leash_acl`]).
const LEASH_USER: (&str, &str) = ("leash", "leash-test-password");
/// The ACL user replicas replicate as.
const REPLICA: (&str, &str) = ("replica", "replica-test-password");
/// The ACL user Sentinels monitor the data nodes as.
const SENTINEL: (&str, &str) = ("sentinel", "sentinel-test-password");

/// The ACL users of a data node: Leash (the keys of prefixes `case_*`, those
/// of the cases, and `refused`), replication, Sentinel monitoring (the rules
/// the Redis documentation gives for each).
fn acl_users() -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            LEASH_USER.0,
            LEASH_USER.1,
            format!("{} ~refused*", leash_e2e::leash_acl("case_")),
        ),
        (
            REPLICA.0,
            REPLICA.1,
            "on resetkeys resetchannels -@all +psync +replconf +ping".into(),
        ),
        (
            SENTINEL.0,
            SENTINEL.1,
            "on allchannels -@all +multi +slaveof +ping +exec +subscribe +config|rewrite +role \
             +publish +info +client|setname +client|kill +script|kill"
                .into(),
        ),
    ]
}

/// How the store signs in as [`LEASH_USER`], trusting `tls`'s CA.
fn leash_access(tls: Option<&leash_e2e::RedisTls>) -> leash_broker::store::Access {
    leash_broker::store::Access {
        username: Some(LEASH_USER.0.into()),
        password: Some(LEASH_USER.1.into()),
        tls: tls.is_some(),
        ca_pem: tls.map(|t| t.ca_pem.clone().into_bytes()),
        ..Default::default()
    }
}

/// A store on `topology` as `access` under its own `prefix`, each change
/// acknowledged by one replica (none on a lone server: fsync there).
fn topology_store(
    topology: &Topology,
    access: &leash_broker::store::Access,
    prefix: &str,
) -> RedisStore {
    let durability = match topology {
        Topology::Standalone { .. } => leash_broker::store::Durability::Fsync,
        _ => leash_broker::store::Durability::Replicas(1),
    };
    RedisStore::open(
        topology,
        access,
        RedisStoreOptions {
            prefix: prefix.into(),
            // The cases test behaviour, not speed: a TLS Cluster waiting for a
            // replica's acknowledgement on two shared, busy cores took over 2 s
            // once (a flake); the timeout cases use stores of their own.
            timeout: Duration::from_secs(10),
            retention: Duration::from_secs(3_600),
            durability,
            clock: leash_broker::store::StoreClock::Caller,
            local_clock: std::sync::Arc::new(leash_broker::clock::SystemClock),
            audit: leash_broker::audit::AuditRetention::default(),
        },
    )
    .unwrap()
}

store_suite!(
    case_live_counts_are_exact,
    case_begin_is_idempotent,
    case_task_reads_back,
    case_renew_extends_within_bounds,
    case_renew_prunes_expired_credentials,
    case_renew_not_active,
    case_unknown_task,
    case_complete_before_deadline,
    case_complete_after_deadline,
    case_credential_lookup,
    case_reap_expires_due_leases_once,
    case_reap_respects_renewal,
    case_reap_in_bounded_batches,
    case_concurrent_reapers_disjoint,
    case_credentials_per_grant_are_capped,
    case_renewals_are_rate_limited,
    case_live_task_quotas,
    case_begin_rate_buckets,
    case_ping,
    case_revocations_are_logged_and_read,
    case_cursor_ahead_of_the_log_is_a_gap,
    case_revoked_set_is_read_in_pages,
    case_cursor_without_snapshot,
    case_delegation_tree_ends_with_its_root,
    case_reaping_a_parent_ends_its_children,
    case_kill_switches_refuse_and_revoke,
    case_approvals_are_decided_once_and_expire,
    case_a_child_of_a_lapsed_parent_cannot_renew_or_redeem,
    case_a_kill_switch_over_many_pages_of_one_shard,
    case_audit_trail_tells_each_story_in_order,
    case_audit_trail_records_refusals_and_kill_switches,
);

/// A watcher further behind than the log keeps (entries after its cursor were
/// trimmed) gets a gap, never the entries that are left as if nothing was missed.
#[tokio::test]
async fn redis_trimmed_revocation_history_is_a_gap() {
    use leash_broker::store::RevocationRead;
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let (_, start) = store.revocation_snapshot(T0).await.unwrap();
    let mut ended = Vec::new();
    for n in 1..=3 {
        let id = task_id(5, n);
        begin_new(
            &store,
            &task(&id, T0 + 3_000, T0 + 60_000),
            &[cred(&id, 1, T0 + 50_000)],
        )
        .await;
        store.complete(&id, T0 + 1_000, "succeeded").await.unwrap();
        ended.push(id);
        if n == 1 {
            // Read up to the first revocation only.
            let (seen, _) = read_after(&store, &start).await;
            assert_eq!(seen.len(), 1);
        }
    }
    let (all, _) = read_after(&store, &start).await;
    assert_eq!(all.len(), 3);
    let mut behind = start.clone();
    behind.advance(5, all[0].position.1);
    // Keep only the newest entry: the second revocation is gone.
    let trimmed = redis.command(&format!("XTRIM {{{PREFIX}:s5}}:revlog MAXLEN 1"));
    assert_eq!(trimmed, ":2", "the fixture trims two entries");
    let read = store
        .read_revocations(&behind, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(
        matches!(read, RevocationRead::Gap),
        "a cursor behind trimmed history must be a gap, got {read:?}"
    );
}

/// Redis came back without the revocation history a watcher had read (no
/// persistence, or a replica promoted before it had the last entries): the
/// watcher's cursor is a gap, both before and after new revocations are logged
/// with ids past it.
#[tokio::test]
async fn redis_restart_that_lost_revocation_history_is_a_gap() {
    use leash_broker::store::RevocationRead;
    let mut redis = RedisServer::start();
    let store = redis_store(&redis);
    let (_, start) = store.revocation_snapshot(T0).await.unwrap();
    let first = task_id(4, 1);
    begin_new(
        &store,
        &task(&first, T0 + 3_000, T0 + 60_000),
        &[cred(&first, 1, T0 + 50_000)],
    )
    .await;
    store
        .complete(&first, T0 + 1_000, "succeeded")
        .await
        .unwrap();
    let (seen, cursor) = read_after(&store, &start).await;
    assert_eq!(seen.len(), 1);

    redis.restart_empty();
    // The store reconnects on its own; the first answer after it does counts.
    let mut read = None;
    let started = Instant::now();
    while read.is_none() && started.elapsed() < Duration::from_secs(10) {
        read = store
            .read_revocations(&cursor, Duration::ZERO, 100)
            .await
            .ok();
        if read.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        matches!(read, Some(RevocationRead::Gap)),
        "history lost under the cursor must be a gap, got {read:?}"
    );

    // New revocations in the same shard get ids past the cursor: still a gap.
    let second = task_id(4, 2);
    let t = task(&second, T0 + 3_000, T0 + 60_000);
    let c = cred(&second, 1, T0 + 50_000);
    // The write connection notices the restart at its first use; a begin is
    // idempotent, so retrying it until it is confirmed is safe.
    let started = Instant::now();
    while store.begin(&t, std::slice::from_ref(&c)).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Redis did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store
        .complete(&second, T0 + 2_000, "succeeded")
        .await
        .unwrap();
    let read = store
        .read_revocations(&cursor, Duration::ZERO, 100)
        .await
        .unwrap();
    assert!(
        matches!(read, RevocationRead::Gap),
        "entries past a lost cursor must not be read as if nothing was missed, got {read:?}"
    );
}

// ---------------------------------------------------------------- redis only

/// Every key in the server (`KEYS *`), read as a whole RESP array (the harness's
/// `command` returns only the first 256 bytes of a reply).
fn all_keys(redis: &RedisServer) -> Vec<String> {
    let mut s = TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"KEYS *\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(keys) = parse_resp_array(&buf) {
            return keys;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "redis closed the connection mid-reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses `*N\r\n($len\r\nbytes\r\n)*N`, or None if incomplete.
fn parse_resp_array(buf: &[u8]) -> Option<Vec<String>> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    };
    let (head, mut at) = line(0)?;
    assert_eq!(head.first(), Some(&b'*'), "not an array reply");
    let n: usize = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (len_line, next) = line(at)?;
        let len: usize = std::str::from_utf8(&len_line[1..]).ok()?.parse().ok()?;
        let body = buf.get(next..next + len)?;
        out.push(String::from_utf8_lossy(body).into_owned());
        at = next + len + 2;
        if buf.len() < at {
            return None;
        }
    }
    Some(out)
}

/// The Redis Cluster hash tag of a key: what is between the first `{` and the next `}`.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

#[tokio::test]
async fn redis_store_never_holds_a_credential_value() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let id = task_id(2, 1);
    let first = CredentialId::new(&id, [1; 8]);
    let value1 = opaque::generate(&first).unwrap();
    let c1 = cred_with_digest(&id, 1, T0 + 5_000, value_digest(value1.expose()));
    begin_new(
        &store,
        &task(&id, T0 + 2_000, T0 + 60_000),
        std::slice::from_ref(&c1),
    )
    .await;
    let second = CredentialId::new(&id, [2; 8]);
    let value2 = opaque::generate(&second).unwrap();
    let c2 = cred_with_digest(&id, 2, T0 + 6_000, value_digest(value2.expose()));
    assert!(matches!(
        renew_to(
            &store,
            &id,
            T0 + 1_000,
            T0 + 3_000,
            std::slice::from_ref(&c2)
        )
        .await
        .unwrap(),
        RenewOutcome::Renewed { .. }
    ));

    let dump = redis.dump_all();
    for (value, record) in [(&value1, &c1), (&value2, &c2)] {
        assert!(
            dump.contains(&record.value_sha256),
            "the store must keep the value's digest (dump did not contain it)"
        );
        assert!(
            !dump.contains(value.expose()),
            "a credential value is stored in Redis"
        );
        let (_, secret) = value.expose().rsplit_once('.').unwrap();
        assert!(secret.len() >= 20);
        assert!(
            !dump.contains(secret),
            "the secret part of a credential value is stored in Redis"
        );
    }
}

/// A change whose audit record cannot be written does not happen: the audit
/// stream is checked before anything is written, in the same script.
#[tokio::test]
async fn redis_unwritable_audit_stream_refuses_the_change_whole() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let id = task_id(6, 1);
    let t = TaskRecord {
        tenant: "acme".into(),
        ..task(&id, T0 + 2_000, T0 + 60_000)
    };
    // Damage the tenant's stream of the task's shard: a string, not a stream.
    let key = format!("{{{PREFIX}:s6}}:audit:acme");
    assert_eq!(redis.command(&format!("SET {key} damaged")).trim(), "+OK");
    let c1 = cred(&id, 1, T0 + 5_000);
    let err = store
        .begin(&t, std::slice::from_ref(&c1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("audit trail")),
        "{err:?}"
    );
    assert!(
        store.task(&id).await.unwrap().is_none(),
        "no task without its record"
    );
    assert!(
        !has_credential(&store, &c1).await,
        "no credential without its record"
    );
    // Repaired, the same begin succeeds and is recorded.
    assert_eq!(redis.command(&format!("DEL {key}")).trim(), ":1");
    begin_new(&store, &t, std::slice::from_ref(&c1)).await;
    assert_eq!(
        store.audit_trace(&id, 0, 100).await.unwrap().events.len(),
        4
    );
    // Damaged again: completion is refused whole too, and the task stays live.
    assert_eq!(redis.command(&format!("DEL {key}")).trim(), ":1");
    assert_eq!(redis.command(&format!("SET {key} damaged")).trim(), "+OK");
    let err = store.complete(&id, T0 + 10, "done").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(stored(&store, &id).await.state, TaskState::Active);
    assert!(has_credential(&store, &c1).await);
}

#[tokio::test]
async fn redis_keys_of_one_task_share_one_hash_tag() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let a = task_id(1, 1);
    let b = task_id(0xe, 1);
    for id in [&a, &b] {
        begin_new(
            &store,
            &task(id, T0 + 1_000, T0 + 60_000),
            &[cred(id, 1, T0 + 5_000)],
        )
        .await;
        renew_to(&store, id, T0 + 10, T0 + 2_000, &[cred(id, 2, T0 + 5_000)])
            .await
            .unwrap();
    }
    let keys = all_keys(&redis);
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(
            hash_tag(k).is_some_and(|t| t.starts_with(PREFIX)),
            "key {k:?} has no hash tag under the prefix"
        );
    }
    let mut tags = Vec::new();
    for id in [&a, &b] {
        let own: Vec<&String> = keys.iter().filter(|k| k.contains(id.as_str())).collect();
        assert!(
            own.len() >= 3,
            "expected the task, credential and expiry keys of {id}, got {own:?}"
        );
        let tag = hash_tag(own[0]).unwrap();
        for k in &own {
            assert_eq!(
                hash_tag(k),
                Some(tag),
                "{k:?} is in another slot than {own:?}"
            );
        }
        // The shard's deadline index and claims set, which the same scripts touch.
        let shard_keys: Vec<&String> = keys
            .iter()
            .filter(|k| !k.contains("tk_") && hash_tag(k) == Some(tag))
            .collect();
        assert!(
            !shard_keys.is_empty(),
            "no shard index key shares the tag {tag:?}: {keys:?}"
        );
        tags.push(tag.to_owned());
    }
    assert_ne!(tags[0], tags[1], "tasks of different shards share a slot");
}

#[tokio::test]
async fn redis_down_fails_fast_and_recovers_with_data() {
    let mut redis = RedisServer::start();
    let store = redis_store(&redis);
    let id = task_id(6, 1);
    let t = task(&id, T0 + 2_000, T0 + 60_000);
    let c = cred(&id, 1, T0 + 9_000);
    begin_new(&store, &t, std::slice::from_ref(&c)).await;
    store.ping().await.unwrap();

    redis.kill();

    let other = task_id(6, 2);
    let bound = Duration::from_secs(2);
    let unavailable = |what: &str, started: Instant, r: Result<(), StoreError>| {
        let took = started.elapsed();
        // A write whose connection died may have been sent: outcome unknown is
        // the honest answer; both are UNAVAILABLE to a client.
        assert!(
            matches!(
                r,
                Err(StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_))
            ),
            "{what} with Redis down must fail closed, got {r:?}"
        );
        assert!(
            took <= bound,
            "{what} took {took:?} to fail (bound {bound:?})"
        );
    };
    // A hard outer bound turns a hang into a clear failure instead of a stuck test.
    macro_rules! down {
        ($what:literal, $call:expr) => {{
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(10), $call)
                .await
                .unwrap_or_else(|_| panic!("{} hung with Redis down", $what));
            unavailable($what, started, r.map(|_| ()));
        }};
    }
    down!("ping", store.ping());
    down!("task", store.task(&id));
    down!(
        "begin",
        store.begin(&task(&other, T0 + 2_000, T0 + 60_000), &[])
    );
    down!("renew", renew_to(&store, &id, T0 + 1_000, T0 + 3_000, &[]));
    down!("complete", store.complete(&id, T0 + 1_000, "ok"));
    down!("credential", store.credential(&id, &c.id, T0));
    down!("reap", store.reap(6, T0 + 5_000, 10));

    redis.restart();

    // The same store object reconnects by itself (bounded polling, no rebuild).
    let back = eventually(Duration::from_secs(10), || async {
        store.ping().await.is_ok()
    })
    .await;
    assert!(
        back.is_some(),
        "the store did not reconnect after Redis came back"
    );
    assert_eq!(
        stored(&store, &id).await,
        t,
        "the task written before the crash is gone (AOF)"
    );
    assert_eq!(
        store
            .credential(&id, &c.id, T0)
            .await
            .unwrap()
            .unwrap()
            .credential,
        c
    );
    assert_eq!(
        store.task(&other).await.unwrap(),
        None,
        "a failed begin wrote"
    );
    // Writes work again too, with scripts reloaded into the restarted server.
    assert!(matches!(
        renew_to(&store, &id, T0 + 1_000, T0 + 3_000, &[])
            .await
            .unwrap(),
        RenewOutcome::Renewed { .. }
    ));
    assert_eq!(stored(&store, &id).await.lease_deadline_ms, T0 + 3_000);
    begin_new(&store, &task(&other, T0 + 2_000, T0 + 60_000), &[]).await;
}

/// The PID of the test's own `redis-server` (from `INFO server`).
fn redis_pid(redis: &RedisServer) -> u32 {
    let mut s = TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"INFO server\r\n").unwrap();
    let mut text = String::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(pid) = text
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .filter(|_| text.contains("\r\nrun_id:"))
        {
            return pid.trim().parse().unwrap();
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "redis closed the connection mid-reply");
        text.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// A Redis that accepts connections but never answers (stopped, not dead) must not
/// make store calls hang: they fail Unavailable within the configured timeout, and
/// the store recovers by itself once Redis answers again.
#[tokio::test]
async fn redis_unresponsive_fails_within_timeout_and_recovers() {
    let redis = RedisServer::start();
    let store = redis_store(&redis);
    let id = task_id(9, 7);
    let t = task(&id, T0 + 2_000, T0 + 60_000);
    begin_new(&store, &t, &[]).await;
    let pid = redis_pid(&redis);

    signal(pid, "-STOP");
    let mut results = Vec::new();
    for what in ["ping", "task", "reap"] {
        let started = Instant::now();
        let call = async {
            match what {
                "ping" => store.ping().await,
                "task" => store.task(&id).await.map(|_| ()),
                _ => store.reap(9, T0 + 5_000, 10).await.map(|_| ()),
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(10), call).await;
        results.push((what, started.elapsed(), r));
    }
    // Resume before asserting, so a failed assertion leaves no stopped process behind.
    signal(pid, "-CONT");
    for (what, took, r) in results {
        let r = r.unwrap_or_else(|_| panic!("{what} hung on an unresponsive Redis"));
        assert!(
            matches!(r, Err(StoreError::Unavailable(_)))
                || (what == "reap" && matches!(r, Err(StoreError::OutcomeUnknown(_)))),
            "{what} on an unresponsive Redis must be Unavailable (a write: outcome unknown), got {r:?}"
        );
        // 1 s timeout, one retry with at most 0.5 s delay: a little over 2 s at worst.
        assert!(
            took <= Duration::from_millis(3_000),
            "{what} took {took:?} to fail on an unresponsive Redis"
        );
    }

    let back = eventually(Duration::from_secs(10), || async {
        store.ping().await.is_ok()
    })
    .await;
    assert!(
        back.is_some(),
        "the store did not recover after Redis resumed"
    );
    assert_eq!(stored(&store, &id).await, t);
}

/// A store that cannot prove itself to Redis gets nowhere and says why
/// without the password: a wrong password, no user (the default user is off),
/// a server certificate its CA did not sign, or plain text to the TLS port.
#[tokio::test]
async fn a_store_without_its_password_or_ca_is_refused() {
    let tls = leash_e2e::RedisTls::generate();
    let server = RedisServer::start_tls(&tls, &[]);
    server.require_users(&acl_users(), None);
    let url = server.tls_url().unwrap();
    let good = leash_access(Some(&tls));
    let other_ca = leash_e2e::RedisTls::generate();
    let cases = [
        (
            "a wrong password",
            url.clone(),
            leash_broker::store::Access {
                password: Some("not-the-password".into()),
                ..good.clone()
            },
        ),
        (
            "no user",
            url.clone(),
            leash_broker::store::Access {
                username: None,
                password: None,
                ..good.clone()
            },
        ),
        (
            "a CA that did not sign the server",
            url.clone(),
            leash_access(Some(&other_ca)),
        ),
        (
            "plain text to the TLS port",
            url.replace("rediss://", "redis://"),
            leash_broker::store::Access {
                tls: false,
                ca_pem: None,
                ..good.clone()
            },
        ),
    ];
    for (what, url, access) in cases {
        let opened = RedisStore::open(
            &Topology::Standalone { url },
            &access,
            RedisStoreOptions {
                prefix: "refused".into(),
                timeout: Duration::from_secs(2),
                retention: Duration::from_secs(3_600),
                durability: leash_broker::store::Durability::Fsync,
                clock: leash_broker::store::StoreClock::Caller,
                local_clock: std::sync::Arc::new(leash_broker::clock::SystemClock),
                audit: leash_broker::audit::AuditRetention::default(),
            },
        );
        let err = match opened {
            Ok(store) => store.ping().await.expect_err(what),
            Err(e) => e,
        };
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{what}: {err:?}");
        for secret in [LEASH_USER.1, "not-the-password"] {
            assert!(
                !text.contains(secret),
                "{what}: the error shows a password: {text}"
            );
        }
        println!("{what}: {text}");
    }
    let store = topology_store(&Topology::Standalone { url }, &good, "refused");
    store.ping().await.expect("the right user, password and CA");
}
