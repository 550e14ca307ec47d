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
//! - Expiry work is claimed atomically ([`LeaseStore::claim_due`]): two reapers
//!   never hold the same claim, and a claim not released within its TTL is
//!   handed to the next reaper that asks.

mod memory;
mod model;
mod redis;

use std::{future::Future, time::Duration};

pub use memory::MemoryStore;
pub use model::{
    CredentialId, CredentialRecord, EndReason, LogId, MAX_CURSOR_LEN, RevocationCursor,
    RevocationRead, RevocationRecord, StoredKind, TaskBinding, TaskId, TaskRecord, TaskState,
};
pub use redis::{RedisStore, RedisStoreOptions};

/// Number of shards tasks are spread over (a task's shard is fixed by its id).
pub const SHARDS: u8 = 16;

/// Most entries kept in one shard's revocation log; a watcher further behind
/// than this starts over from a snapshot.
pub const REVOCATION_LOG_MAX: usize = 100_000;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or did not answer in time. Callers must
    /// fail closed (deny, answer UNAVAILABLE) and may retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with data this broker cannot read (corruption or an
    /// incompatible broker version wrote it).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// What [`LeaseStore::begin`] did.
#[derive(Debug, Clone)]
pub enum BeginOutcome {
    /// The task was created with its lease and credentials.
    Created,
    /// A task with this id already existed (an idempotent replay); nothing was written.
    Existing(Box<TaskRecord>),
}

/// What [`LeaseStore::renew`] did.
#[derive(Debug, Clone)]
pub enum RenewOutcome {
    /// The lease now ends at the record's `lease_deadline_ms`; the credentials were added.
    Renewed(TaskRecord),
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
    },
    /// The task had already ended; nothing was written.
    AlreadyEnded(TaskRecord),
    /// No such task.
    NotFound,
}

/// What [`LeaseStore::expire`] did.
#[derive(Debug, Clone)]
pub enum ExpireOutcome {
    /// This call expired the lease; `revoked` lists the credentials it revoked.
    Expired {
        /// The task as it is now.
        task: Box<TaskRecord>,
        /// Ids of every credential record of the task: each ends with the lease
        /// (none outlives it), and the audit trail records each revocation.
        revoked: Vec<CredentialId>,
    },
    /// The lease was renewed after it was claimed; it is back in the deadline index.
    NotDue,
    /// The task had already ended (or is gone); nothing was written.
    AlreadyEnded,
}

/// A task and one of its credentials, read together.
#[derive(Debug, Clone)]
pub struct CredentialView {
    /// The task the credential belongs to.
    pub task: TaskRecord,
    /// The credential record.
    pub credential: CredentialRecord,
}

/// The storage of tasks, leases and credential records.
///
/// Time is always passed in (`now_ms`): no decision reads a store's clock, so
/// every replica's decisions follow the broker's injected clock. Only garbage
/// collection of ended tasks (retention) may follow the store's own clock, as
/// Redis key expiry does.
pub trait LeaseStore: Send + Sync + 'static {
    /// Creates `task` (state `Active`, in the deadline index) and its
    /// `credentials` in one atomic step, unless a task with the same id exists.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read; nothing was written.
    fn begin(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
    ) -> impl Future<Output = Result<BeginOutcome, StoreError>> + Send;

    /// Reads a task.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read.
    fn task(
        &self,
        task_id: &TaskId,
    ) -> impl Future<Output = Result<Option<TaskRecord>, StoreError>> + Send;

    /// If the task is `Active` and its deadline is after `now_ms`: sets the
    /// deadline to `new_deadline_ms` (never earlier than it was, never past the
    /// task's max lifetime), adds `credentials`, and drops records of
    /// credentials that expired before `now_ms` — in one atomic step.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read; nothing was written.
    fn renew(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        new_deadline_ms: u64,
        credentials: &[CredentialRecord],
    ) -> impl Future<Output = Result<RenewOutcome, StoreError>> + Send;

    /// Ends an `Active` task in one atomic step: `Completed` with `outcome`, or
    /// `Expired` if its deadline is not after `now_ms`. Every credential of the
    /// task is inactive once this returns.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read; nothing was written.
    fn complete(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
    ) -> impl Future<Output = Result<CompleteOutcome, StoreError>> + Send;

    /// Reads a credential and its task together.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached or read; callers must then
    /// never report the credential active.
    fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
    ) -> impl Future<Output = Result<Option<CredentialView>, StoreError>> + Send;

    /// Claims up to `limit` tasks of `shard` whose lease deadline is at or
    /// before `now_ms`, plus tasks whose earlier claim was not released before
    /// it timed out. A claimed task is held for `claim_ttl_ms`; no other call
    /// returns it until then.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached; nothing was claimed.
    fn claim_due(
        &self,
        shard: u8,
        now_ms: u64,
        claim_ttl_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<TaskId>, StoreError>> + Send;

    /// Expires a claimed task in one atomic step if its deadline is at or before
    /// `now_ms` and it is still `Active`. Idempotent. The claim is kept until
    /// [`LeaseStore::release`], so a crash before the revocation is published
    /// leads to it being redone.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached; nothing was written.
    fn expire(
        &self,
        task_id: &TaskId,
        now_ms: u64,
    ) -> impl Future<Output = Result<ExpireOutcome, StoreError>> + Send;

    /// Releases a claim once its revocation has been recorded and published.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached; the claim then times out
    /// and the work is redone (revocation is idempotent).
    fn release(&self, task_id: &TaskId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every revoked credential that has not expired at `now_ms`, and the
    /// cursor (per-shard log positions) the snapshot is consistent with.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn revocation_snapshot(
        &self,
        now_ms: u64,
    ) -> impl Future<Output = Result<(Vec<RevocationRecord>, RevocationCursor), StoreError>> + Send;

    /// Revocations logged after `after`, at most `limit`; if there are none,
    /// waits up to `wait` for one. `Gap` if history after `after` was trimmed.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be reached.
    fn read_revocations(
        &self,
        after: &RevocationCursor,
        wait: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<RevocationRead, StoreError>> + Send;

    /// Checks that the store answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if it does not.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
