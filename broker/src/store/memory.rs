//! In-memory [`LeaseStore`] for `leash dev` and tests: the same semantics as
//! Redis, inside one process (state is lost when the process exits).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::Notify;

use super::{
    BeginOutcome, CompleteOutcome, CredentialId, CredentialRecord, CredentialView, EndReason,
    ExpireOutcome, LeaseStore, LogId, REVOCATION_GRACE_MS, REVOCATION_LOG_MAX, RenewOutcome,
    RevocationCursor, RevocationRead, RevocationRecord, SHARDS, StoreError, TaskId, TaskRecord,
    TaskState,
};

/// One shard's revocation log.
#[derive(Debug, Default)]
struct Log {
    entries: VecDeque<RevocationRecord>,
    last: LogId,
    /// The newest position trimmed away; a reader behind it has a gap.
    trimmed: LogId,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: HashMap<TaskId, TaskRecord>,
    credentials: HashMap<TaskId, BTreeMap<CredentialId, CredentialRecord>>,
    deadlines: BTreeSet<(u64, TaskId)>,
    claims: HashMap<TaskId, u64>,
    logs: Vec<Log>,
    /// Revoked credentials, kept until [`REVOCATION_GRACE_MS`] past their
    /// expiry: id → (expiry, audience).
    revoked: BTreeMap<CredentialId, (u64, String)>,
}

/// A [`LeaseStore`] held in this process's memory.
///
/// Every operation takes one lock, so each is atomic like its Redis script.
/// Ended tasks are forgotten `retention_ms` after their max lifetime, as Redis
/// keys expire.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    retention_ms: u64,
    logged: Notify,
}

impl MemoryStore {
    /// An empty store that keeps ended tasks `retention_ms` past their max lifetime.
    pub fn new(retention_ms: u64) -> Self {
        let mut inner = Inner::default();
        inner.logs.resize_with(usize::from(SHARDS), Log::default);
        Self {
            inner: Mutex::new(inner),
            retention_ms,
            logged: Notify::new(),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // A poisoned lock means a panic mid-update: the state may be torn, so
        // refuse to answer rather than guess.
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("in-memory store lock poisoned".into()))
    }
}

impl Inner {
    /// Logs the revocation of the credentials of `task_id` that expire after `now_ms`.
    fn log_revocations(
        &mut self,
        task_id: &TaskId,
        now_ms: u64,
        reason: EndReason,
    ) -> Vec<CredentialId> {
        let live: Vec<(CredentialId, u64, String)> = self
            .credentials
            .get(task_id)
            .map(|m| {
                m.values()
                    .filter(|c| c.expires_at_ms > now_ms)
                    .map(|c| (c.id.clone(), c.expires_at_ms, c.audience.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.revoked
            .retain(|_, (exp, _)| exp.saturating_add(REVOCATION_GRACE_MS) > now_ms);
        let shard = task_id.shard();
        let Some(log) = self.logs.get_mut(usize::from(shard)) else {
            return Vec::new();
        };
        for (id, exp, audience) in &live {
            log.last = log.last.next(now_ms);
            log.entries.push_back(RevocationRecord {
                credential_id: id.clone(),
                expires_at_ms: *exp,
                revoked_at_ms: now_ms,
                reason,
                audience: audience.clone(),
                position: (shard, log.last),
            });
            if log.entries.len() > REVOCATION_LOG_MAX
                && let Some(old) = log.entries.pop_front()
            {
                log.trimmed = old.position.1;
            }
            self.revoked.insert(id.clone(), (*exp, audience.clone()));
        }
        live.into_iter().map(|(id, ..)| id).collect()
    }

    fn forget_old(&mut self, now_ms: u64, retention_ms: u64) {
        let old: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.max_deadline_ms.saturating_add(retention_ms) <= now_ms)
            .map(|t| t.id.clone())
            .collect();
        for id in old {
            if let Some(t) = self.tasks.remove(&id) {
                self.deadlines.remove(&(t.lease_deadline_ms, id.clone()));
            }
            self.credentials.remove(&id);
        }
    }
}

impl LeaseStore for MemoryStore {
    async fn begin(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
    ) -> Result<BeginOutcome, StoreError> {
        let mut inner = self.lock()?;
        if let Some(existing) = inner.tasks.get(&task.id) {
            return Ok(BeginOutcome::Existing(Box::new(existing.clone())));
        }
        inner.tasks.insert(task.id.clone(), task.clone());
        inner
            .deadlines
            .insert((task.lease_deadline_ms, task.id.clone()));
        let creds = inner.credentials.entry(task.id.clone()).or_default();
        for c in credentials {
            creds.insert(c.id.clone(), c.clone());
        }
        Ok(BeginOutcome::Created)
    }

    async fn task(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.lock()?.tasks.get(task_id).cloned())
    }

    async fn renew(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        new_deadline_ms: u64,
        credentials: &[CredentialRecord],
    ) -> Result<RenewOutcome, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(task) = inner.tasks.get_mut(task_id) else {
            return Ok(RenewOutcome::NotFound);
        };
        if !task.is_live(now_ms) {
            return Ok(RenewOutcome::NotActive(task.clone()));
        }
        let deadline = new_deadline_ms
            .max(task.lease_deadline_ms)
            .min(task.max_deadline_ms);
        inner
            .deadlines
            .remove(&(task.lease_deadline_ms, task_id.clone()));
        inner.deadlines.insert((deadline, task_id.clone()));
        task.lease_deadline_ms = deadline;
        let renewed = task.clone();
        let creds = inner.credentials.entry(task_id.clone()).or_default();
        creds.retain(|_, c| c.expires_at_ms >= now_ms);
        for c in credentials {
            creds.insert(c.id.clone(), c.clone());
        }
        Ok(RenewOutcome::Renewed(renewed))
    }

    async fn complete(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
    ) -> Result<CompleteOutcome, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(task) = inner.tasks.get_mut(task_id) else {
            return Ok(CompleteOutcome::NotFound);
        };
        if task.state != TaskState::Active {
            return Ok(CompleteOutcome::AlreadyEnded(task.clone()));
        }
        if task.lease_deadline_ms <= now_ms {
            task.state = TaskState::Expired;
        } else {
            task.state = TaskState::Completed;
            task.outcome = Some(outcome.to_owned());
        }
        task.ended_at_ms = Some(now_ms);
        let reason = if task.state == TaskState::Expired {
            EndReason::Expiry
        } else {
            EndReason::Completion
        };
        let ended = task.clone();
        inner
            .deadlines
            .remove(&(ended.lease_deadline_ms, task_id.clone()));
        let revoked = inner.log_revocations(task_id, now_ms, reason);
        drop(guard);
        if !revoked.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(CompleteOutcome::Ended {
            task: ended,
            revoked,
        })
    }

    async fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
    ) -> Result<Option<CredentialView>, StoreError> {
        let inner = self.lock()?;
        let Some(task) = inner.tasks.get(task_id) else {
            return Ok(None);
        };
        let credential = inner
            .credentials
            .get(task_id)
            .and_then(|m| m.get(credential_id));
        Ok(credential.map(|c| CredentialView {
            task: task.clone(),
            credential: c.clone(),
        }))
    }

    async fn claim_due(
        &self,
        shard: u8,
        now_ms: u64,
        claim_ttl_ms: u64,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let mut inner = self.lock()?;
        inner.forget_old(now_ms, self.retention_ms);
        let until = now_ms.saturating_add(claim_ttl_ms);
        let mut out: Vec<TaskId> = inner
            .claims
            .iter()
            .filter(|(id, at)| id.shard() == shard && **at <= now_ms)
            .map(|(id, _)| id.clone())
            .take(limit)
            .collect();
        let due: Vec<(u64, TaskId)> = inner
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .filter(|(_, id)| id.shard() == shard)
            .take(limit.saturating_sub(out.len()))
            .cloned()
            .collect();
        for entry in due {
            inner.deadlines.remove(&entry);
            // Renewed after an earlier claim (clock skew between replicas): list it once.
            if !out.contains(&entry.1) {
                out.push(entry.1);
            }
        }
        for id in &out {
            inner.claims.insert(id.clone(), until);
        }
        Ok(out)
    }

    async fn expire(&self, task_id: &TaskId, now_ms: u64) -> Result<ExpireOutcome, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(task) = inner.tasks.get_mut(task_id) else {
            return Ok(ExpireOutcome::AlreadyEnded);
        };
        if task.state != TaskState::Active {
            return Ok(ExpireOutcome::AlreadyEnded);
        }
        if task.lease_deadline_ms > now_ms {
            inner.claims.remove(task_id);
            inner
                .deadlines
                .insert((task.lease_deadline_ms, task_id.clone()));
            return Ok(ExpireOutcome::NotDue);
        }
        task.state = TaskState::Expired;
        task.ended_at_ms = Some(now_ms);
        let ended = Box::new(task.clone());
        inner
            .deadlines
            .remove(&(ended.lease_deadline_ms, task_id.clone()));
        let logged = inner.log_revocations(task_id, now_ms, EndReason::Expiry);
        let revoked = inner
            .credentials
            .get(task_id)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        drop(guard);
        if !logged.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(ExpireOutcome::Expired {
            task: ended,
            revoked,
        })
    }

    async fn release(&self, task_id: &TaskId) -> Result<(), StoreError> {
        self.lock()?.claims.remove(task_id);
        Ok(())
    }

    async fn revocation_snapshot(
        &self,
        now_ms: u64,
    ) -> Result<(Vec<RevocationRecord>, RevocationCursor), StoreError> {
        let inner = self.lock()?;
        let mut cursor = RevocationCursor::default();
        for (shard, log) in (0..SHARDS).zip(&inner.logs) {
            cursor.advance(shard, log.last);
        }
        let records = inner
            .revoked
            .iter()
            .filter(|(_, (exp, _))| exp.saturating_add(REVOCATION_GRACE_MS) > now_ms)
            .map(|(id, (exp, audience))| RevocationRecord {
                credential_id: id.clone(),
                expires_at_ms: *exp,
                revoked_at_ms: 0,
                reason: EndReason::Completion,
                audience: audience.clone(),
                position: (id.task_id().shard(), LogId::default()),
            })
            .collect();
        Ok((records, cursor))
    }

    async fn read_revocations(
        &self,
        after: &RevocationCursor,
        wait: Duration,
        limit: usize,
    ) -> Result<RevocationRead, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before reading, so a revocation logged between the
            // read and the wait still wakes us.
            let notified = self.logged.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = self.lock()?;
                let mut cursor = after.clone();
                let mut out = Vec::new();
                for (shard, log) in (0..SHARDS).zip(&inner.logs) {
                    let pos = after.0.get(usize::from(shard)).copied().unwrap_or_default();
                    if pos < log.trimmed {
                        return Ok(RevocationRead::Gap);
                    }
                    for r in log.entries.iter().filter(|r| r.position.1 > pos) {
                        if out.len() >= limit {
                            break;
                        }
                        cursor.advance(shard, r.position.1);
                        out.push(r.clone());
                    }
                }
                if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                    return Ok(RevocationRead::Records(out, cursor));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(RevocationRead::Records(Vec::new(), after.clone()));
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.lock().map(|_| ())
    }
}
