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
    credentials::{opaque, value_digest},
    store::{
        BeginOutcome, CompleteOutcome, CredentialId, CredentialRecord, ExpireOutcome, LeaseStore,
        MemoryStore, RedisStore, RedisStoreOptions, RenewOutcome, SHARDS, StoreError, StoredKind,
        TaskId, TaskRecord, TaskState,
    },
};
use leash_e2e::{RedisServer, eventually};

/// The fixed "now" the cases start from (ms since the epoch, in the year 2096).
const T0: u64 = 4_000_000_000_000;
/// Claim TTL used by the reaper-side cases.
const CLAIM_TTL: u64 = 1_000;
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
        id: CredentialId::new(task, [n; 8]),
        grant: "github".into(),
        kind: StoredKind::Jwt,
        audience: "https://api.github.test".into(),
        scopes: vec!["repo:acme/widgets:read".into()],
        value_sha256: digest,
        subject: "spiffe://acme.test/agent/reviewer".into(),
        issuer: "https://leash.acme.test".into(),
        template: "review".into(),
        cnf_x5t_s256: Some("thumbprint".into()),
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
        matches!(outcome, BeginOutcome::Created),
        "begin of a new task: {outcome:?}"
    );
}

async fn stored<S: LeaseStore>(store: &S, id: &TaskId) -> TaskRecord {
    store.task(id).await.unwrap().expect("task is stored")
}

async fn has_credential<S: LeaseStore>(store: &S, c: &CredentialRecord) -> bool {
    store
        .credential(&c.id.task_id(), &c.id)
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
        RenewOutcome::Renewed(t) => {
            assert_eq!(t.state, TaskState::Active);
            t.lease_deadline_ms
        }
        other => panic!("renew of a live task must succeed, got {other:?}"),
    };
    let extended = store
        .renew(&id, T0 + 1_000, T0 + 3_000, std::slice::from_ref(&c2))
        .await
        .unwrap();
    assert_eq!(deadline(extended), T0 + 3_000, "renew extends");
    assert_eq!(stored(store, &id).await.lease_deadline_ms, T0 + 3_000);
    assert!(has_credential(store, &c2).await, "renew adds credentials");

    let earlier = store.renew(&id, T0 + 1_500, T0 + 2_500, &[]).await.unwrap();
    assert_eq!(deadline(earlier), T0 + 3_000, "renew never shortens");
    assert_eq!(stored(store, &id).await.lease_deadline_ms, T0 + 3_000);

    let beyond = store
        .renew(&id, T0 + 2_000, T0 + 99_000, &[])
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
    let outcome = store
        .renew(&id, now, T0 + 4_000, std::slice::from_ref(&fresh))
        .await
        .unwrap();
    assert!(matches!(outcome, RenewOutcome::Renewed(_)), "{outcome:?}");
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
        match store
            .renew(&id, now, now + 5_000, std::slice::from_ref(&c))
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
    match store.renew(&done, T0 + 200, T0 + 9_000, &[]).await.unwrap() {
        RenewOutcome::NotActive(r) => {
            assert_eq!(r.state, TaskState::Completed);
            assert_eq!(r.lease_deadline_ms, T0 + 5_000);
        }
        other => panic!("renew of a completed task must be NotActive, got {other:?}"),
    }
}

/// Every call on an unknown task: renew NotFound, complete NotFound, expire AlreadyEnded, reads None.
async fn case_unknown_task<S: LeaseStore>(store: &S) {
    let id = task_id(7, 9);
    assert!(matches!(
        store.renew(&id, T0, T0 + 1_000, &[]).await.unwrap(),
        RenewOutcome::NotFound
    ));
    assert!(matches!(
        store.complete(&id, T0, "ok").await.unwrap(),
        CompleteOutcome::NotFound
    ));
    assert!(matches!(
        store.expire(&id, T0).await.unwrap(),
        ExpireOutcome::AlreadyEnded
    ));
    assert_eq!(store.task(&id).await.unwrap(), None);
    // The failed renew must not have created anything.
    let c = cred(&id, 1, T0 + 1_000);
    assert!(store.credential(&id, &c.id).await.unwrap().is_none());
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
        CompleteOutcome::Ended { task, revoked } => {
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
    // The credential record stays readable, now with an ended task.
    let view = store.credential(&id, &live_a.id).await.unwrap().unwrap();
    assert_eq!(view.task.state, TaskState::Completed);
    assert!(!view.task.is_live(now));
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
        CompleteOutcome::Ended { task, revoked } => {
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

    let view = store.credential(&id, &c2.id).await.unwrap().unwrap();
    assert_eq!(view.task, t);
    assert_eq!(view.credential, c2);
    let view = store.credential(&id, &c1.id).await.unwrap().unwrap();
    assert_eq!(view.credential, c1);

    let unknown_cred = CredentialId::new(&id, [9; 8]);
    assert!(
        store
            .credential(&id, &unknown_cred)
            .await
            .unwrap()
            .is_none()
    );
    let other = task_id(10, 2);
    let unknown_task_cred = CredentialId::new(&other, [1; 8]);
    assert!(
        store
            .credential(&other, &unknown_task_cred)
            .await
            .unwrap()
            .is_none()
    );
}

/// claim_due returns only due tasks of the shard; a claim hides the task until its TTL
/// passes, then the next claimer takes it over (a dead replica's claim).
async fn case_claim_due_and_takeover<S: LeaseStore>(store: &S) {
    let due = task_id(3, 1);
    let later = task_id(3, 2);
    let other_shard = task_id(5, 1);
    begin_new(store, &task(&due, T0 + 1_000, T0 + 60_000), &[]).await;
    begin_new(store, &task(&later, T0 + 5_000, T0 + 60_000), &[]).await;
    begin_new(store, &task(&other_shard, T0 + 1_000, T0 + 60_000), &[]).await;

    assert!(
        store
            .claim_due(3, T0 + 999, CLAIM_TTL, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing is due before its deadline"
    );
    let now = T0 + 2_000;
    assert_eq!(
        store.claim_due(3, now, CLAIM_TTL, 10).await.unwrap(),
        vec![due.clone()]
    );
    assert_eq!(
        store.claim_due(5, now, CLAIM_TTL, 10).await.unwrap(),
        vec![other_shard.clone()]
    );
    assert!(
        store
            .claim_due(4, now, CLAIM_TTL, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Held: nobody else gets it while the claim is live.
    for t in [now, now + 500, now + CLAIM_TTL - 1] {
        assert!(
            store
                .claim_due(3, t, CLAIM_TTL, 10)
                .await
                .unwrap()
                .is_empty(),
            "a live claim was handed out again at +{}",
            t - now
        );
    }
    // The claimer died without expire/release: after the TTL the task is handed out again.
    let takeover = now + CLAIM_TTL + 500;
    assert_eq!(
        store.claim_due(3, takeover, CLAIM_TTL, 10).await.unwrap(),
        vec![due.clone()],
        "an unreleased claim must be taken over once its TTL passed"
    );
    // ...and the new claim is held again.
    assert!(
        store
            .claim_due(3, takeover + 100, CLAIM_TTL, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The task has not been touched by claiming.
    assert_eq!(stored(store, &due).await.state, TaskState::Active);
}

/// expire on a due task: Expired with every credential id; a second expire is AlreadyEnded.
async fn case_expire_due_task<S: LeaseStore>(store: &S) {
    let id = task_id(11, 1);
    let a = cred(&id, 1, T0 + 5_000);
    let b = cred(&id, 2, T0 + 6_000);
    begin_new(
        store,
        &task(&id, T0 + 1_000, T0 + 60_000),
        &[a.clone(), b.clone()],
    )
    .await;
    let now = T0 + 1_500;
    assert_eq!(
        store.claim_due(11, now, CLAIM_TTL, 10).await.unwrap(),
        vec![id.clone()]
    );
    match store.expire(&id, now).await.unwrap() {
        ExpireOutcome::Expired { task, revoked } => {
            assert_eq!(task.state, TaskState::Expired);
            assert_eq!(task.ended_at_ms, Some(now));
            assert_eq!(task.outcome, None);
            assert_eq!(set(revoked), ids(&[&a, &b]));
        }
        other => panic!("expire of a due task must expire it, got {other:?}"),
    }
    let after = stored(store, &id).await;
    assert_eq!(after.state, TaskState::Expired);
    assert!(matches!(
        store.expire(&id, now + 1).await.unwrap(),
        ExpireOutcome::AlreadyEnded
    ));
    assert!(matches!(
        store.complete(&id, now + 2, "late").await.unwrap(),
        CompleteOutcome::AlreadyEnded(_)
    ));
    assert!(matches!(
        store.renew(&id, now + 3, now + 9_000, &[]).await.unwrap(),
        RenewOutcome::NotActive(_)
    ));
    assert_eq!(stored(store, &id).await, after, "idempotent calls wrote");
    store.release(&id).await.unwrap();
    assert!(
        store
            .claim_due(11, now + 10 * CLAIM_TTL, CLAIM_TTL, 10)
            .await
            .unwrap()
            .is_empty(),
        "an expired and released task was claimed again"
    );
}

/// A task renewed after it was claimed is NotDue on expire, loses the claim, and is
/// claimable again at its new deadline.
async fn case_expire_renewed_after_claim<S: LeaseStore>(store: &S) {
    let id = task_id(12, 1);
    let c = cred(&id, 1, T0 + 9_000);
    begin_new(
        store,
        &task(&id, T0 + 1_000, T0 + 60_000),
        std::slice::from_ref(&c),
    )
    .await;
    // The reaper's clock says the lease is due...
    assert_eq!(
        store
            .claim_due(12, T0 + 1_000, CLAIM_TTL, 10)
            .await
            .unwrap(),
        vec![id.clone()]
    );
    // ...while the owner's renewal (by the broker that served it) landed just in time.
    let renewed = store.renew(&id, T0 + 999, T0 + 3_000, &[]).await.unwrap();
    assert!(matches!(renewed, RenewOutcome::Renewed(_)), "{renewed:?}");

    assert!(
        matches!(
            store.expire(&id, T0 + 1_001).await.unwrap(),
            ExpireOutcome::NotDue
        ),
        "a renewed task must not be expired"
    );
    let t = stored(store, &id).await;
    assert_eq!(t.state, TaskState::Active);
    assert_eq!(t.lease_deadline_ms, T0 + 3_000);
    assert!(has_credential(store, &c).await);

    // The claim is gone (else it would be taken over at +CLAIM_TTL) and the task is
    // back in the deadline index: claimable exactly from its new deadline.
    for now in [T0 + 1_001, T0 + 1_000 + CLAIM_TTL + 1, T0 + 2_999] {
        assert!(
            store
                .claim_due(12, now, CLAIM_TTL, 10)
                .await
                .unwrap()
                .is_empty(),
            "claimed at {} before the new deadline",
            now - T0
        );
    }
    assert_eq!(
        store
            .claim_due(12, T0 + 3_000, CLAIM_TTL, 10)
            .await
            .unwrap(),
        vec![id.clone()],
        "the renewed task must be claimable at its new deadline"
    );
    assert!(matches!(
        store.expire(&id, T0 + 3_000).await.unwrap(),
        ExpireOutcome::Expired { .. }
    ));
}

/// release removes the claim: the task is not handed out again when the TTL passes.
async fn case_release_removes_claim<S: LeaseStore>(store: &S) {
    let id = task_id(13, 1);
    let keep = task_id(13, 2);
    begin_new(store, &task(&id, T0 + 1_000, T0 + 60_000), &[]).await;
    begin_new(store, &task(&keep, T0 + 1_000, T0 + 60_000), &[]).await;
    let claimed: BTreeSet<TaskId> = store
        .claim_due(13, T0 + 1_000, CLAIM_TTL, 10)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(claimed, BTreeSet::from([id.clone(), keep.clone()]));
    assert!(matches!(
        store.expire(&id, T0 + 1_000).await.unwrap(),
        ExpireOutcome::Expired { .. }
    ));
    store.release(&id).await.unwrap();
    // Releasing twice (a retried release) is harmless.
    store.release(&id).await.unwrap();
    assert_eq!(
        store
            .claim_due(13, T0 + 1_000 + CLAIM_TTL + 1, CLAIM_TTL, 10)
            .await
            .unwrap(),
        vec![keep],
        "only the unreleased claim may be taken over"
    );
}

/// A completed task is never claimed, however late the reaper looks.
async fn case_completed_never_claimed<S: LeaseStore>(store: &S) {
    let id = task_id(14, 1);
    begin_new(store, &task(&id, T0 + 1_000, T0 + 60_000), &[]).await;
    assert!(matches!(
        store.complete(&id, T0 + 500, "done").await.unwrap(),
        CompleteOutcome::Ended { .. }
    ));
    for now in [T0 + 1_000, T0 + 5_000, T0 + 59_000] {
        assert!(
            store
                .claim_due(14, now, CLAIM_TTL, 10)
                .await
                .unwrap()
                .is_empty(),
            "a completed task was claimed at +{}",
            now - T0
        );
    }
}

/// Two reapers claiming at once never get the same task, and between them get all.
async fn case_concurrent_claimers_disjoint<S: LeaseStore>(store: &S) {
    let mut all = BTreeSet::new();
    for n in 0..50u8 {
        let id = task_id(n % SHARDS, n);
        begin_new(store, &task(&id, T0 + 1_000, T0 + 60_000), &[]).await;
        all.insert(id);
    }
    let claimer = || async {
        let mut got = Vec::new();
        loop {
            let mut progress = false;
            for shard in 0..SHARDS {
                let batch = store.claim_due(shard, T0 + 2_000, 60_000, 2).await.unwrap();
                progress |= !batch.is_empty();
                got.extend(batch);
                tokio::task::yield_now().await;
            }
            if !progress {
                return got;
            }
        }
    };
    let (a, b) = tokio::join!(claimer(), claimer());
    let a_set: BTreeSet<TaskId> = a.iter().cloned().collect();
    let b_set: BTreeSet<TaskId> = b.iter().cloned().collect();
    assert_eq!(a_set.len(), a.len(), "one claimer got a task twice");
    assert_eq!(b_set.len(), b.len(), "one claimer got a task twice");
    let both: Vec<_> = a_set.intersection(&b_set).collect();
    assert!(both.is_empty(), "both claimers got {both:?}");
    let union: BTreeSet<TaskId> = a_set.union(&b_set).cloned().collect();
    assert_eq!(union, all, "together the claimers must get every due task");
}

/// One claim reply never lists a task twice, even when the task is both a timed-out
/// claim and due again in the deadline index (renewed after the claim, then its
/// claimer died and nobody looked until after the new deadline).
async fn case_claim_reply_has_no_duplicates<S: LeaseStore>(store: &S) {
    let id = task_id(15, 1);
    begin_new(store, &task(&id, T0 + 1_000, T0 + 60_000), &[]).await;
    assert_eq!(
        store
            .claim_due(15, T0 + 1_000, CLAIM_TTL, 10)
            .await
            .unwrap(),
        vec![id.clone()]
    );
    let renewed = store.renew(&id, T0 + 999, T0 + 3_000, &[]).await.unwrap();
    assert!(matches!(renewed, RenewOutcome::Renewed(_)), "{renewed:?}");
    // The claimer died before expire; the next look is after the new deadline.
    assert_eq!(
        store
            .claim_due(15, T0 + 3_500, CLAIM_TTL, 10)
            .await
            .unwrap(),
        vec![id.clone()],
        "claim_due listed the same task more than once"
    );
}

async fn case_ping<S: LeaseStore>(store: &S) {
    store.ping().await.unwrap();
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

    let RevocationRead::Records(records, after) = store
        .read_revocations(&start, Duration::ZERO, 100)
        .await
        .unwrap()
    else {
        panic!("unexpected gap");
    };
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
    assert_eq!(r.position.0, 2);
    assert!(!after.is_before(2, r.position.1) && start.is_before(2, r.position.1));
    let RevocationRead::Records(none, same) = store
        .read_revocations(&after, Duration::ZERO, 100)
        .await
        .unwrap()
    else {
        panic!("unexpected gap");
    };
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
    let (later, _) = store.revocation_snapshot(T0 + 5_000).await.unwrap();
    assert!(later.is_empty(), "expired revocations leave the snapshot");

    // A waiting read wakes when a revocation is logged.
    let t2 = task_id(9, 1);
    let c3 = cred(&t2, 3, T0 + 9_000);
    begin_new(
        store,
        &task(&t2, T0 + 8_000, T0 + 60_000),
        std::slice::from_ref(&c3),
    )
    .await;
    let (read, ()) = tokio::join!(
        store.read_revocations(&after, Duration::from_secs(5), 100),
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
    };
}

store_suite!(
    case_begin_is_idempotent,
    case_task_reads_back,
    case_renew_extends_within_bounds,
    case_renew_prunes_expired_credentials,
    case_renew_not_active,
    case_unknown_task,
    case_complete_before_deadline,
    case_complete_after_deadline,
    case_credential_lookup,
    case_claim_due_and_takeover,
    case_expire_due_task,
    case_expire_renewed_after_claim,
    case_release_removes_claim,
    case_completed_never_claimed,
    case_concurrent_claimers_disjoint,
    case_claim_reply_has_no_duplicates,
    case_ping,
    case_revocations_are_logged_and_read,
);

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
        store
            .renew(&id, T0 + 1_000, T0 + 3_000, std::slice::from_ref(&c2))
            .await
            .unwrap(),
        RenewOutcome::Renewed(_)
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
        store
            .claim_due(id.shard(), T0 + 1_000, CLAIM_TTL, 10)
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
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "{what} with Redis down must be Unavailable, got {r:?}"
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
    down!("renew", store.renew(&id, T0 + 1_000, T0 + 3_000, &[]));
    down!("complete", store.complete(&id, T0 + 1_000, "ok"));
    down!("credential", store.credential(&id, &c.id));
    down!("claim_due", store.claim_due(6, T0 + 5_000, CLAIM_TTL, 10));
    down!("expire", store.expire(&id, T0 + 5_000));
    down!("release", store.release(&id));

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
            .credential(&id, &c.id)
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
        store.renew(&id, T0 + 1_000, T0 + 3_000, &[]).await.unwrap(),
        RenewOutcome::Renewed(_)
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
    for what in ["ping", "task", "claim_due"] {
        let started = Instant::now();
        let call = async {
            match what {
                "ping" => store.ping().await,
                "task" => store.task(&id).await.map(|_| ()),
                _ => store
                    .claim_due(9, T0 + 5_000, CLAIM_TTL, 10)
                    .await
                    .map(|_| ()),
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
            matches!(r, Err(StoreError::Unavailable(_))),
            "{what} on an unresponsive Redis must be Unavailable, got {r:?}"
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
