//! Store: where tasks, leases and credential records live.
//!
//! [`LeaseStore`] is the one interface; [`MemoryStore`] (for `leash dev` and
//! tests) and [`RedisStore`] (production) implement it with the same semantics,
//! checked by one shared behavioural test suite in `tests/`.
//!
//! Guarantees every implementation gives:
//! - Begin, renew, complete and expire each change the store in one atomic step.
//! - A task's keys share one Redis Cluster hash slot: every task belongs to one
//!   of [`SHARDS`] shards (from its id), and the shard's deadline index shares
//!   the slot, so each step stays a single-slot script.
//! - Only SHA-256 hashes of credential values are stored, never values.
//! - Ending a task logs each revoked, unexpired credential in its shard's
//!   revocation log in the same atomic step, for revocation watchers.
//! - Expiry is one atomic step per batch of due leases ([`LeaseStore::reap`]):
//!   the state change and the revocation log entries are written together, so
//!   a reaper that dies mid-sweep leaves nothing half done, and two reapers
//!   never expire the same lease twice.
//! - Every deadline decision uses the store's clock ([`StoreClock`]): with Redis,
//!   Redis's own `TIME` inside the script, so replicas whose clocks differ agree.
//! - Every script's work is bounded: at most [`MAX_LIVE_CREDENTIALS_PER_GRANT`]
//!   live credentials per grant (the oldest is revoked when a renewal passes the
//!   cap), a bounded number of grants per template, and pruning in bounded pages.
//! - Ending a task deletes its credential records at once; the task record alone
//!   stays readable for the retention period.

mod bells;
mod link;
mod memory;
mod model;
mod redis;

use std::{future::Future, time::Duration};

use crate::audit::{AuditCursor, AuditEvent, AuditPage};

pub use link::{Access, Topology};
pub use memory::MemoryStore;
pub use memory::quota_keys;
pub use model::{
    Approval, ApprovalDecision, ApprovalState, ApprovalStatus, CredentialId, CredentialRecord,
    EndReason, KillSwitch, KillTarget, LogId, MAX_CURSOR_LEN, PagePosition, RevocationCursor,
    RevocationRead, RevocationRecord, RevokedPage, StoredKind, TaskBinding, TaskId, TaskRecord,
    TaskState, scope_class_map,
};
pub use redis::{Durability, RedisStore, RedisStoreOptions, ServerFacts};

/// Most live credentials one grant of one task may have: a renewal that would
/// go past it revokes the oldest (reason `rotation`, logged for watchers). With
/// [`crate::templates::MAX_GRANTS`] grants, a task never holds more than
/// `MAX_GRANTS × MAX_LIVE_CREDENTIALS_PER_GRANT` live credentials, which bounds
/// the work of every script that ends it.
pub const MAX_LIVE_CREDENTIALS_PER_GRANT: usize = 4;

/// Most expired credential records one renewal prunes (the rest go with the next
/// renewal or with the task's end).
pub const PRUNE_PAGE: usize = 256;

/// Whose clock decides deadlines inside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreClock {
    /// The store's own clock (Redis `TIME` inside each script): one clock for all
    /// replicas, whatever their own clocks say. The production setting.
    #[default]
    Store,
    /// The `now_ms` each call passes in. For single-process stores (the memory
    /// store has no other clock) and for deterministic tests of store semantics.
    Caller,
}

/// Number of shards tasks are spread over (a task's shard is fixed by its id).
pub const SHARDS: u8 = 16;

/// How long a revoked credential stays in the revoked set (and so in every
/// watcher's snapshot) after its own expiry. A verifier that accepts a token up
/// to `exp + leeway` must use a leeway of at most this, or it would forget the
/// revocation while still accepting the token; the broker advertises it to
/// watchers and the SDK caps its leeway at it.
pub const REVOCATION_GRACE_MS: u64 = 30_000;

/// Most revoked-set entries one [`LeaseStore::revoked_page`] call returns in a
/// snapshot: a snapshot is read page by page, never whole in one command.
pub const SNAPSHOT_PAGE: usize = 1000;

/// Most entries kept in one shard's revocation log; a watcher further behind
/// than this starts over from a snapshot.
pub const REVOCATION_LOG_MAX: usize = 100_000;

/// Most child tasks one task may have delegated and still live.
pub const MAX_CHILDREN: u64 = 16;

/// Most live delegated tasks under one root task: with
/// [`crate::templates::MAX_DELEGATION_DEPTH`] this bounds the work of the one
/// atomic step that ends a whole delegation tree.
pub const MAX_DESCENDANTS: u64 = 256;

/// Most kill switches in force at once (each begin checks them).
pub const MAX_KILL_SWITCHES: usize = 1000;

/// The refusal of a kill switch beyond [`MAX_KILL_SWITCHES`].
fn kill_switches_full() -> StoreError {
    StoreError::Unavailable(format!(
        "{MAX_KILL_SWITCHES} kill switches are in force, the most allowed; lift one first"
    ))
}

/// Most live tasks one kill-switch step examines (one script call): a kill
/// switch over many tasks is many bounded steps, never one over every key.
pub const KILL_PAGE: usize = 200;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached before the request was sent, or refused
    /// it; nothing was changed. Callers must fail closed (deny, answer
    /// UNAVAILABLE) and may retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A state change was sent but its result, or its durability (fsync or
    /// replica acknowledgements), was not confirmed: it may or may not have
    /// taken effect. Callers answer UNAVAILABLE and say the outcome is unknown.
    #[error("store outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The store is set up so that Leash's guarantees cannot hold (eviction
    /// allowed, too old, persistence weaker than the configured durability).
    #[error("store misconfigured: {0}")]
    Misconfigured(String),
    /// The store answered with data this broker cannot read (corruption or an
    /// incompatible broker version wrote it).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// A token bucket: `burst` begins, one coming back every `refill_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// The bucket's size.
    pub burst: u64,
    /// Milliseconds per token (at least 1).
    pub refill_ms: f64,
}

/// The quotas a begin is checked against in the same atomic step as the
/// create (`None`: no such limit). Live tasks are counted per owner (the
/// task's `owner`) and per class (its `class`); rates are token buckets
/// shared by every replica. A refused begin changes nothing (no token spent).
///
/// Counting cannot drift: the live tasks of an owner or class are a set of
/// task ids scored by their max lifetime, from which ending a task (complete,
/// expiry) removes it and from which every begin first drops what is past its
/// max lifetime, so a lost removal frees its slot at the latest then.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BeginQuota {
    /// Most live tasks of the owner.
    pub identity_max_live: Option<u64>,
    /// Most live tasks of the class.
    pub class_max_live: Option<u64>,
    /// Begin rate of the owner.
    pub identity_rate: Option<Bucket>,
    /// Begin rate of the class.
    pub class_rate: Option<Bucket>,
}

/// Which quota refused a begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// The owner's live tasks.
    IdentityTasks,
    /// The class's live tasks.
    ClassTasks,
    /// The owner's begin rate.
    IdentityRate,
    /// The class's begin rate.
    ClassRate,
}

impl QuotaKind {
    /// The name used in the store's replies and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdentityTasks => "identity_tasks",
            Self::ClassTasks => "class_tasks",
            Self::IdentityRate => "identity_rate",
            Self::ClassRate => "class_rate",
        }
    }

    /// Parses [`QuotaKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::IdentityTasks,
            Self::ClassTasks,
            Self::IdentityRate,
            Self::ClassRate,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Most a concurrency refusal asks a caller to wait: a slot frees as soon as
/// one of the tasks ends, which the store cannot foresee.
pub const CONCURRENCY_RETRY_MS: u64 = 1000;

/// What [`LeaseStore::begin`] did.
#[derive(Debug, Clone)]
pub enum BeginOutcome {
    /// A [`BeginQuota`] limit was reached; nothing was written.
    Exhausted {
        /// Which limit.
        quota: QuotaKind,
        /// How long until a begin can succeed (rates), or a hint (live tasks,
        /// at most [`CONCURRENCY_RETRY_MS`]).
        retry_after_ms: u64,
    },
    /// The task was created with its lease and credentials; this is the task as
    /// stored, with the deadlines the store's clock decided.
    Created(Box<TaskRecord>),
    /// A task with this id already existed (an idempotent replay); nothing was written.
    Existing(Box<TaskRecord>),
    /// A kill switch refuses the task; nothing was written.
    Killed(KillSwitch),
}

/// What [`LeaseStore::delegate`] did.
#[derive(Debug, Clone)]
pub enum DelegateOutcome {
    /// The child was created (no credentials yet); the deadlines are the
    /// store's, clamped to the parent's.
    Created(Box<TaskRecord>),
    /// The parent has ended or its lease has lapsed; nothing was written.
    ParentNotActive(Box<TaskRecord>),
    /// No such parent.
    ParentNotFound,
    /// The parent has [`MAX_CHILDREN`] live children, or its tree
    /// [`MAX_DESCENDANTS`] live tasks; nothing was written.
    TooMany {
        /// Which bound: `children` or `descendants`.
        bound: &'static str,
    },
    /// A kill switch refuses the child; nothing was written.
    Killed(KillSwitch),
}

/// What [`LeaseStore::redeem`] did.
#[derive(Debug, Clone)]
pub enum RedeemOutcome {
    /// The handle was good and is now spent; the credentials were added.
    Redeemed(Box<TaskRecord>),
    /// Wrong handle, or already redeemed; nothing was written.
    BadHandle,
    /// The task has ended or its lease has lapsed; nothing was written.
    NotActive(Box<TaskRecord>),
    /// No such task.
    NotFound,
}

/// What [`LeaseStore::decide_approval`] did.
#[derive(Debug, Clone)]
pub enum ApprovalOutcome {
    /// The decision is recorded; the task as it is now.
    Decided(Box<TaskRecord>),
    /// The approval is not pending (decided before, expired, or the task has
    /// none or has ended); nothing was written but a due expiry.
    NotPending(Box<TaskRecord>),
    /// No such task.
    NotFound,
}

/// One page of [`LeaseStore::list_tasks`].
#[derive(Debug, Clone, Default)]
pub struct TaskPage {
    /// The tasks (live, and ended ones within the retention).
    pub tasks: Vec<TaskRecord>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<String>,
}

/// One page of a shard's live tasks ([`LeaseStore::live_tasks`]).
#[derive(Debug, Clone, Default)]
pub struct LiveTaskPage {
    /// Task ids.
    pub ids: Vec<TaskId>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<u64>,
}

/// Live tasks and the credentials they hold, of one template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveCount {
    /// Live (active) tasks.
    pub tasks: u64,
    /// Credentials those tasks hold.
    pub credentials: u64,
}

/// What is live now ([`LeaseStore::live_counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// By template name; a template with nothing live may be absent.
    pub templates: std::collections::BTreeMap<String, LiveCount>,
    /// Live tasks past their deadline, waiting for the reaper.
    pub overdue: u64,
}

impl LiveCounts {
    /// The sum over every template.
    pub fn total(&self) -> LiveCount {
        self.templates
            .values()
            .fold(LiveCount::default(), |a, c| LiveCount {
                tasks: a.tasks + c.tasks,
                credentials: a.credentials + c.credentials,
            })
    }
}

/// What a [`LeaseStore::renew`] call asks for.
#[derive(Debug, Clone, Copy)]
pub struct Renewal<'a> {
    /// The caller's time; deciding uses the store's clock unless it is [`StoreClock::Caller`].
    pub now_ms: u64,
    /// The new deadline is the store's now plus this, never earlier than the
    /// current deadline and never past the max lifetime. 0 keeps the deadline.
    pub extend_by_ms: u64,
    /// `Some(m)`: a renewal, refused as too soon if the last renewal (or the
    /// begin) was less than `m` ms ago, and recorded as the last renewal.
    /// `None`: an idempotent begin replay, neither limited nor recorded.
    pub min_interval_ms: Option<u64>,
    /// Fresh credentials to add.
    pub credentials: &'a [CredentialRecord],
    /// The credentials include grants an approval gated: refused unless the
    /// approval is approved and unexpired (it is then marked used) or used.
    pub redeems_approval: bool,
}

/// What [`LeaseStore::renew`] did.
#[derive(Debug, Clone)]
pub enum RenewOutcome {
    /// The lease now ends at the record's `lease_deadline_ms`; the credentials
    /// were added, and `rotated` (older credentials past the per-grant cap) revoked.
    Renewed {
        /// The task as stored now.
        task: TaskRecord,
        /// Credentials revoked because their grant went past the cap.
        rotated: Vec<CredentialId>,
    },
    /// The renewal would issue approved grants, but the approval is no
    /// longer usable (expired meanwhile); nothing was written.
    ApprovalLapsed(TaskRecord),
    /// The last renewal was too recent; nothing was written.
    TooSoon {
        /// How long until a renewal is accepted.
        retry_after_ms: u64,
    },
    /// The task has ended (or its deadline has passed); nothing was written.
    NotActive(TaskRecord),
    /// No such task.
    NotFound,
}

/// What [`LeaseStore::complete`] did.
#[derive(Debug, Clone)]
pub enum CompleteOutcome {
    /// This call ended the task; `revoked` credentials became inactive.
    Ended {
        /// The task as it is now (state `Completed`, or `Expired` if its lease had lapsed).
        task: TaskRecord,
        /// The unexpired credentials this call revoked.
        revoked: Vec<CredentialId>,
        /// Delegated descendants ended with it (state `Revoked`, reason
        /// `cascade`), each with its revoked credentials.
        descendants: Vec<EndedTask>,
    },
    /// The task had already ended; nothing was written.
    AlreadyEnded(TaskRecord),
    /// No such task.
    NotFound,
}

/// One task an atomic step ended: expired by the reaper, revoked by a kill
/// switch, or ended with an ancestor (cascade).
#[derive(Debug, Clone)]
pub struct EndedTask {
    /// The task as it is now (state `Expired` or `Revoked`).
    pub task: TaskRecord,
    /// Its credentials that ended with it (for an expiry, every credential, as
    /// the audit trail records each); the unexpired ones were also logged for
    /// watchers.
    pub revoked: Vec<CredentialId>,
    /// Why its credentials ended.
    pub reason: EndReason,
}

/// What one [`LeaseStore::reap`] call did.
#[derive(Debug, Clone, Default)]
pub struct Reaped {
    /// Leases expired by this call, and the delegated descendants that ended
    /// with them (reason `cascade`).
    pub expired: Vec<EndedTask>,
    /// Deadline entries dropped without an expiry, each with why (task gone,
    /// already ended, or an unreadable record); logged, never fatal.
    pub skipped: Vec<(String, String)>,
    /// More leases of the shard were due than this call handled.
    pub more: bool,
}

/// A task and one of its credentials, read together.
#[derive(Debug, Clone)]
pub struct CredentialView {
    /// The task the credential belongs to.
    pub task: TaskRecord,
    /// The credential record.
    pub credential: CredentialRecord,
    /// The store's time of the read: the instant liveness is judged at.
    pub now_ms: u64,
}

/// The storage of tasks, leases and credential records.
///
/// Every call passes the caller's time (`now_ms`); whether it or the store's
/// own clock decides is the store's [`StoreClock`]. Returned records carry the
/// deadlines the store decided.
pub trait LeaseStore: Send + Sync + 'static {
    /// Creates `task` (state `Active`, in the deadline index) and its
    /// `credentials` in one atomic step, unless a task with the same id exists.
    /// The lease deadline and max lifetime are the store's now plus the offsets
    /// the record has from its `created_at_ms`.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read, or the write was
    /// not confirmed durable ([`StoreError::OutcomeUnknown`]).
    fn begin(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
    ) -> impl Future<Output = Result<BeginOutcome, StoreError>> + Send {
        self.begin_with_quota(task, credentials, BeginQuota::default())
    }

    /// [`LeaseStore::begin`], unless a task with the same id exists (answered
    /// `Existing` whatever the quotas) or a `quota` limit is reached
    /// (`Exhausted`, nothing written): all decided in the same atomic step.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn begin_with_quota(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
        quota: BeginQuota,
    ) -> impl Future<Output = Result<BeginOutcome, StoreError>> + Send;

    /// Reads a task.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read.
    fn task(
        &self,
        task_id: &TaskId,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StoreError>> + Send;

    /// If the task is `Active` and its deadline is after the store's now, in
    /// one atomic step: extends the deadline as [`Renewal`] says, adds the
    /// credentials (revoking the oldest of a grant past
    /// [`MAX_LIVE_CREDENTIALS_PER_GRANT`]), and drops up to [`PRUNE_PAGE`]
    /// records of credentials that expired.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn renew(
        &self,
        task_id: &TaskId,
        renewal: Renewal<'_>,
    ) -> impl Future<Output = Result<RenewOutcome, StoreError>> + Send;

    /// Ends an `Active` task in one atomic step: `Completed` with `outcome`, or
    /// `Expired` if its deadline is not after the store's now. Every unexpired
    /// credential is logged as revoked and every credential record deleted;
    /// the task record stays for the retention period.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn complete(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
    ) -> impl Future<Output = Result<CompleteOutcome, StoreError>> + Send {
        self.complete_with_summary(task_id, now_ms, outcome, "")
    }

    /// [`LeaseStore::complete`], the owner's `summary` recorded with the
    /// completion in the audit trail.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn complete_with_summary(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
        summary: &str,
    ) -> impl Future<Output = Result<CompleteOutcome, StoreError>> + Send;

    /// Reads a credential and its task together, with the store's time.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read; callers must then
    /// never report the credential active.
    fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<CredentialView>, StoreError>> + Send;

    /// Expires up to `limit` leases of `shard` whose deadline is at or before
    /// the store's now, in one atomic step: each becomes `Expired`, its
    /// unexpired credentials are logged as revoked, its credential records are
    /// deleted. Entries that cannot be expired (task gone, ended, unreadable)
    /// are dropped from the index and reported in [`Reaped::skipped`].
    ///
    /// # Errors
    /// As [`LeaseStore::begin`]; nothing was changed unless the error is
    /// [`StoreError::OutcomeUnknown`] (expiry is idempotent: the next sweep redoes it).
    fn reap(
        &self,
        shard: u8,
        now_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Reaped, StoreError>> + Send;

    /// The current end of every shard's revocation log: a cursor that reads
    /// only what is logged from now on. No snapshot is read.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn revocation_cursor(
        &self,
    ) -> impl Future<Output = Result<RevocationCursor, StoreError>> + Send;

    /// One page of `shard`'s revoked set from `from`: at most `limit`
    /// credentials by expiry, and where the next page starts. Each call is one
    /// bounded read; pages of a set that changes in between still cover every
    /// entry that was in it throughout (entries only leave after their grace).
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read.
    fn revoked_page(
        &self,
        shard: u8,
        from: PagePosition,
        limit: usize,
    ) -> impl Future<Output = Result<RevokedPage, StoreError>> + Send;

    /// Every revoked credential whose expiry plus [`REVOCATION_GRACE_MS`] is
    /// after `now_ms`, and a cursor the snapshot is consistent with: the cursor
    /// is taken first and the revoked sets are then read in pages of
    /// [`SNAPSHOT_PAGE`], so every revocation is either in the snapshot or
    /// after the cursor (some may be both, which is harmless).
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn revocation_snapshot(
        &self,
        now_ms: u64,
    ) -> impl Future<Output = Result<(Vec<RevocationRecord>, RevocationCursor), StoreError>> + Send
    {
        async move {
            let cursor = self.revocation_cursor().await?;
            let mut records = Vec::new();
            for shard in 0..SHARDS {
                let mut from = PagePosition::start(now_ms);
                loop {
                    let page = self.revoked_page(shard, from, SNAPSHOT_PAGE).await?;
                    records.extend(page.records);
                    match page.next {
                        Some(next) => from = next,
                        None => break,
                    }
                }
            }
            Ok((records, cursor))
        }
    }

    /// Revocations logged after `after`, at most `limit` per shard; if there
    /// are none, waits up to `wait` for one. `Gap` if any history after
    /// `after` is gone: trimmed, or lost in a restart or failover (the entry
    /// at the cursor is no longer in the log). The gap check and the read are
    /// one atomic step, so nothing can be lost between them.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn read_revocations(
        &self,
        after: &RevocationCursor,
        wait: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<RevocationRead, StoreError>> + Send;

    /// This replica's estimate of the store's clock, given its own reading
    /// `local_now_ms`: the time credentials are minted with, so their `iat`,
    /// `nbf` and `exp` agree with deadlines the store decides. Stores without a
    /// clock of their own answer `local_now_ms`.
    fn now_ms(&self, local_now_ms: u64) -> u64 {
        local_now_ms
    }

    /// Creates the delegated `child` of `parent` in one atomic step, unless
    /// the parent is not live, has too many live children or descendants, or
    /// a kill switch refuses the child. The child's lease deadline and max
    /// lifetime are the store's now plus the offsets the record has from its
    /// `created_at_ms`, never past the parent's. It holds no credential until
    /// [`LeaseStore::redeem`] with the handle whose SHA-256 (hex) is
    /// `handle_sha256`.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn delegate(
        &self,
        child: &TaskRecord,
        handle_sha256: &str,
    ) -> impl Future<Output = Result<DelegateOutcome, StoreError>> + Send;

    /// Spends a delegation handle in one atomic step: if the task is live and
    /// the handle's hash matches, the hash is deleted (the handle works once),
    /// the record becomes `record` (with the subagent's binding) and the
    /// credentials are added.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn redeem(
        &self,
        record: &TaskRecord,
        handle_sha256: &str,
        now_ms: u64,
        credentials: &[CredentialRecord],
    ) -> impl Future<Output = Result<RedeemOutcome, StoreError>> + Send;

    /// Records an approver's decision in one atomic step, if the task is live
    /// and its approval pending and unexpired. An approval gets
    /// `validity_ms` from now to be used.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn decide_approval(
        &self,
        task_id: &TaskId,
        decision: &ApprovalDecision,
        now_ms: u64,
    ) -> impl Future<Output = Result<ApprovalOutcome, StoreError>> + Send;

    /// Puts a kill switch in force (replacing one of the same kind and
    /// value): from when this returns, every begin and delegation it matches
    /// is refused. Durable like every state change, so it survives restarts.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`]; [`StoreError::Misconfigured`] never.
    fn set_kill_switch(
        &self,
        switch: &KillSwitch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts a kill switch at `now_ms` (`by` whom, for `reason`, both
    /// recorded); true if one was in force.
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn lift_kill_switch(
        &self,
        kind: &str,
        value: &str,
        by: &str,
        reason: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The kill switches in force, by kind then value.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read.
    fn kill_switches(&self) -> impl Future<Output = Result<Vec<KillSwitch>, StoreError>> + Send;

    /// A page of the ids of `shard`'s live tasks, from `cursor` (0 to start).
    /// A full pass returns every task that was live throughout it (some
    /// maybe twice).
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn live_tasks(
        &self,
        shard: u8,
        cursor: u64,
        count: usize,
    ) -> impl Future<Output = Result<LiveTaskPage, StoreError>> + Send;

    /// Ends, in one atomic step, each of `ids` (tasks of `shard`, at most
    /// [`KILL_PAGE`]) that is still active and that `target` matches, with
    /// every delegated descendant: state `Revoked`, outcome `outcome`, every
    /// unexpired credential logged as revoked (reason `kill_switch`; the
    /// descendants' `cascade`).
    ///
    /// # Errors
    /// As [`LeaseStore::begin`].
    fn revoke_tasks(
        &self,
        shard: u8,
        ids: &[TaskId],
        target: &KillTarget,
        outcome: &str,
        by: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Vec<EndedTask>, StoreError>> + Send;

    /// A page of every task the store holds (live, and ended within the
    /// retention), from `token` (`None` to start), about `count` of them.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read;
    /// [`StoreError::Corrupt`] for a token it did not issue.
    fn list_tasks(
        &self,
        token: Option<&str>,
        count: usize,
    ) -> impl Future<Output = Result<TaskPage, StoreError>> + Send;

    /// Appends `event`, which records no state change of its own (a refusal),
    /// to its tenant's stream, indexed under its task if it names one.
    /// Every state change records its own events in the step that makes it.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or the trail written.
    fn record_audit(
        &self,
        event: &AuditEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A page of the story of `task_id` and its descendants, oldest first:
    /// at most `limit` events from position `from` of its index.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read.
    fn audit_trace(
        &self,
        task_id: &TaskId,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<AuditPage, StoreError>> + Send;

    /// The current end of every shard's stream of `tenant` (or of
    /// [`crate::audit::NO_TENANT`]): a cursor that reads what comes next.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn audit_cursor(
        &self,
        tenant: &str,
    ) -> impl Future<Output = Result<AuditCursor, StoreError>> + Send;

    /// The events of `tenant` after `after`, at most `limit` per shard, in
    /// order, and the cursor after them. Does not wait.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read.
    fn audit_read(
        &self,
        tenant: &str,
        after: &AuditCursor,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<AuditEvent>, AuditCursor), StoreError>> + Send;

    /// How many events the streams of `tenant` hold, over every shard.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn audit_len(&self, tenant: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The credentials `task_id` holds now (ids, grants, audiences, scopes and
    /// expiries; a record holds a value's digest, never the value), by id;
    /// empty for an ended or unknown task. Bounded: a task holds at most
    /// `MAX_GRANTS` x `MAX_LIVE_CREDENTIALS_PER_GRANT`.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or a record is damaged.
    fn task_credentials(
        &self,
        task_id: &TaskId,
    ) -> impl Future<Output = Result<Vec<CredentialRecord>, StoreError>> + Send;

    /// What is live at `now_ms`, summed over every shard: per template, its
    /// live tasks and the credentials they hold (an expired credential of a
    /// live task counts until its renewal prunes it or the task ends); and the
    /// reaper's backlog, live tasks whose deadline has passed. Exact across
    /// broker replicas: the counts change in the same atomic step as the
    /// tasks. Bounded work: one read per shard.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn live_counts(
        &self,
        now_ms: u64,
    ) -> impl Future<Output = Result<LiveCounts, StoreError>> + Send;

    /// Checks that the store answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if it does not.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What the store says about itself for `Admin.Diagnose` (`leash doctor`):
    /// read fresh from the store at each call, never from the check cached at
    /// start, so a setting changed since shows. Read-only; it never fails
    /// because a setting is wrong (that is for the caller to judge), and a
    /// setting the store refuses to tell is [`Persistence::Unknown`] or
    /// [`Eviction::Unknown`] with the reason.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the store cannot be reached.
    fn diagnose(&self) -> impl Future<Output = Result<StoreDiagnosis, StoreError>> + Send;
}

/// What [`LeaseStore::diagnose`] found: facts, not judgements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDiagnosis {
    /// What the store is, for people: `redis 7.0.15`, `embedded memory store`.
    pub store: String,
    /// Whether acknowledged state survives a restart of the store.
    pub persistence: Persistence,
    /// Whether the store may drop keys by itself.
    pub eviction: Eviction,
    /// The store's own clock against this replica's; `None` for a store that
    /// runs on this replica's clock (the embedded store).
    pub clock: Option<ClockReading>,
}

/// A store's persistence, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Persistence {
    /// In this process's memory only: everything is lost when it stops (the
    /// embedded store of `leash dev`).
    Embedded,
    /// Redis's persistence settings.
    Redis {
        /// `appendonly` is `yes`.
        appendonly: bool,
        /// `appendfsync` (`always`, `everysec`, `no`).
        appendfsync: String,
        /// `save` (RDB snapshot schedule; empty: none); `None` when only
        /// `INFO persistence` could be read, which does not tell it.
        save: Option<String>,
        /// Where the settings were read: `CONFIG GET` or `INFO persistence`.
        source: &'static str,
    },
    /// The settings could not be read, and why.
    Unknown(String),
}

/// A store's eviction policy, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Eviction {
    /// The store never drops keys by itself (the embedded store).
    Never,
    /// Redis's `maxmemory-policy` value.
    Policy {
        /// The value as Redis reports it (`noeviction`, `allkeys-lru`, ...).
        value: String,
        /// Where it was read: `CONFIG GET` or `INFO memory`.
        source: &'static str,
    },
    /// The policy could not be read, and why.
    Unknown(String),
}

/// One reading of a store's clock, bracketed by this replica's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// The store's time (Unix ms), e.g. from Redis `TIME`.
    pub store_ms: u64,
    /// This replica's time (Unix ms) just before the store was asked.
    pub sent_ms: u64,
    /// This replica's time (Unix ms) just after the answer came.
    pub received_ms: u64,
}

impl ClockReading {
    /// How far the store's clock is ahead of this replica's (ms; negative:
    /// behind), taking this replica's time at the middle of the round trip.
    pub fn skew_ms(&self) -> i64 {
        let mid = (i128::from(self.sent_ms) + i128::from(self.received_ms)) / 2;
        i64::try_from(i128::from(self.store_ms) - mid).unwrap_or(i64::MAX)
    }

    /// How uncertain [`skew_ms`](Self::skew_ms) is: half the round trip (ms).
    pub fn uncertainty_ms(&self) -> u64 {
        self.received_ms.saturating_sub(self.sent_ms).div_ceil(2)
    }
}
