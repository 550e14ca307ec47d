//! In-memory [`LeaseStore`] for `leash dev` and tests: the same semantics as
//! Redis, inside one process (state is lost when the process exits).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::Notify;

use crate::audit::{self, AuditCursor, AuditEvent, AuditPage, AuditRetention};
use crate::templates::MAX_DELEGATION_DEPTH;

use super::{
    ApprovalDecision, ApprovalOutcome, ApprovalState, BeginOutcome, BeginQuota, Bucket,
    CONCURRENCY_RETRY_MS, CompleteOutcome, CredentialId, CredentialRecord, CredentialView,
    DelegateOutcome, EndReason, EndedTask, KillSwitch, KillTarget, LeaseStore, LiveCounts,
    LiveTaskPage, LogId, MAX_CHILDREN, MAX_DESCENDANTS, MAX_KILL_SWITCHES,
    MAX_LIVE_CREDENTIALS_PER_GRANT, PRUNE_PAGE, PagePosition, QuotaKind, REVOCATION_GRACE_MS,
    REVOCATION_LOG_MAX, Reaped, RedeemOutcome, RenewOutcome, Renewal, RevocationCursor,
    RevocationRead, RevocationRecord, RevokedPage, SHARDS, StoreError, TaskId, TaskPage,
    TaskRecord, TaskState,
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
    /// Per task, per grant: live credential ids, oldest first (the per-grant cap).
    grants: HashMap<TaskId, HashMap<String, VecDeque<CredentialId>>>,
    /// Per live task: when it was last renewed (or begun).
    renewed: HashMap<TaskId, u64>,
    deadlines: BTreeSet<(u64, TaskId)>,
    logs: Vec<Log>,
    /// Revoked credentials, kept until [`REVOCATION_GRACE_MS`] past their
    /// expiry: expiry → id → audience (ordered like Redis's revoked sets, for paging).
    revoked: BTreeMap<u64, BTreeMap<CredentialId, (String, String)>>,
    /// Live tasks per quota key (`id:<owner>`, `class:<class>`): task id → max
    /// deadline, exactly like the Redis sorted sets.
    live: HashMap<String, BTreeMap<TaskId, u64>>,
    /// Token buckets per quota key: (tokens, last update ms).
    buckets: HashMap<String, (f64, u64)>,
    /// Per task: the children delegated from it.
    kids: HashMap<TaskId, BTreeSet<TaskId>>,
    /// Per root task: its live delegated descendants.
    descendants: HashMap<TaskId, u64>,
    /// Per unredeemed delegated task: the SHA-256 of its handle.
    handles: HashMap<TaskId, String>,
    /// The kill switches in force, by (kind, value).
    kills: BTreeMap<(String, String), KillSwitch>,
    /// The audit trail.
    trail: Trail,
}

/// The audit trail in memory: like the Redis streams, one per tenant and
/// shard, and an index per task of its events and its descendants'.
#[derive(Debug, Default)]
struct Trail {
    retention: AuditRetention,
    streams: HashMap<(String, u8), VecDeque<(u64, AuditEvent)>>,
    index: HashMap<TaskId, Vec<AuditEvent>>,
    /// The last entry number given (entry ids are `<shard>-<n>-0`).
    seq: u64,
}

impl Trail {
    /// Appends `event` to `shard`'s stream of its tenant; indexes it under
    /// each of `index`.
    fn append(&mut self, shard: u8, mut event: AuditEvent, index: &[TaskId], now_ms: u64) {
        if !self.retention.streams {
            return;
        }
        self.seq += 1;
        event.id = format!("{shard:x}-{}-0", self.seq);
        for id in index {
            let list = self.index.entry(id.clone()).or_default();
            list.retain(|e| e.at_ms.saturating_add(self.retention.max_age_ms) > now_ms);
            list.push(event.clone());
        }
        let max_len = usize::try_from(self.retention.max_len).unwrap_or(usize::MAX);
        let age = self.retention.max_age_ms;
        let stream = self
            .streams
            .entry((event.stream().to_owned(), shard))
            .or_default();
        stream.push_back((self.seq, event));
        while stream.len() > max_len
            || stream
                .front()
                .is_some_and(|(_, e)| e.at_ms.saturating_add(age) <= now_ms)
        {
            stream.pop_front();
        }
    }
}

/// The entry number of a memory trail cursor position (`<n>-0`).
fn entry_number(position: &str) -> u64 {
    position
        .split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The quota keys of a task's owner and class, `id:<owner>` and
/// `class:<class>` (the Redis store names its keys with them too).
pub fn quota_keys(task: &TaskRecord) -> (String, String) {
    (
        format!("id:{}", task.owner),
        format!("class:{}", task.class),
    )
}

/// The tokens of a bucket at `now_ms` after refilling from `(tokens, at)`.
fn refilled(state: Option<(f64, u64)>, bucket: Bucket, now_ms: u64) -> f64 {
    let burst = bucket.burst as f64;
    match state {
        None => burst,
        Some((tokens, at)) => {
            let elapsed = now_ms.saturating_sub(at) as f64;
            (tokens + elapsed / bucket.refill_ms).min(burst)
        }
    }
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
        Self::with_audit(retention_ms, AuditRetention::default())
    }

    /// [`MemoryStore::new`], keeping the audit trail as `audit` says.
    pub fn with_audit(retention_ms: u64, audit: AuditRetention) -> Self {
        let mut inner = Inner::default();
        inner.logs.resize_with(usize::from(SHARDS), Log::default);
        inner.trail.retention = audit;
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
    /// Logs the revocation of the credentials of `task_id` that expire after
    /// `now_ms`, and deletes every credential record of the task.
    fn log_revocations(
        &mut self,
        task_id: &TaskId,
        now_ms: u64,
        reason: EndReason,
    ) -> Vec<CredentialId> {
        let due_ms = match (reason, self.tasks.get(task_id)) {
            (EndReason::Expiry, Some(t)) => t.lease_deadline_ms.min(now_ms),
            _ => now_ms,
        };
        let creds = self.credentials.remove(task_id).unwrap_or_default();
        self.grants.remove(task_id);
        self.renewed.remove(task_id);
        while let Some(entry) = self.revoked.first_entry()
            && entry.key().saturating_add(REVOCATION_GRACE_MS) <= now_ms
        {
            entry.remove();
        }
        creds
            .values()
            .filter(|c| c.expires_at_ms > now_ms)
            .map(|c| {
                self.log_one(c, now_ms, due_ms, reason);
                c.id.clone()
            })
            .collect()
    }

    /// Records one event about `task` (indexed under it and every ancestor),
    /// with `extra` details, exactly as the Lua `audit` function does.
    fn audit(&mut self, task: &TaskRecord, event: &str, now_ms: u64, extra: &[(&str, String)]) {
        let mut e = AuditEvent::about(task, event, now_ms, &audit::current_trace_id());
        for (k, v) in extra {
            e.detail.insert((*k).to_owned(), v.clone());
        }
        let mut index = vec![task.id.clone()];
        let mut parent = task.parent.clone();
        while let Some(p) = parent.filter(|_| index.len() <= MAX_DELEGATION_DEPTH as usize) {
            parent = self.tasks.get(&p).and_then(|t| t.parent.clone());
            index.push(p);
        }
        self.trail.append(task.id.shard(), e, &index, now_ms);
    }

    /// `credential.issued`, as the Lua `audit_issued`.
    fn audit_issued(&mut self, task: &TaskRecord, c: &CredentialRecord, now_ms: u64) {
        self.audit(
            task,
            "credential.issued",
            now_ms,
            &[
                ("credential", c.id.to_string()),
                ("grant", c.grant.clone()),
                ("audience", c.audience.clone()),
                ("scopes", c.scopes.join(" ")),
                ("expires_at", c.expires_at_ms.to_string()),
                ("bound", c.cnf_x5t_s256.is_some().to_string()),
            ],
        );
    }

    /// `credential.revoked` for each of `ids`.
    fn audit_revoked(
        &mut self,
        task: &TaskRecord,
        ids: &[CredentialId],
        reason: EndReason,
        by: &str,
        now_ms: u64,
    ) {
        for id in ids {
            self.audit(
                task,
                "credential.revoked",
                now_ms,
                &[
                    ("credential", id.to_string()),
                    ("reason", reason.as_str().to_owned()),
                    ("by", by.to_owned()),
                ],
            );
        }
    }

    /// The events of a task's end, as the Lua `audit_end`.
    fn audit_end(
        &mut self,
        task: &TaskRecord,
        reason: EndReason,
        by: &str,
        revoked: &[CredentialId],
        summary: &str,
        now_ms: u64,
    ) {
        let mut ids = revoked.to_vec();
        ids.sort();
        let event = match reason {
            EndReason::Completion => "task.completed",
            EndReason::Expiry => "lease.expired",
            EndReason::Cascade | EndReason::KillSwitch => "task.revoked",
            EndReason::Rotation => "task.ended",
        };
        let mut extra = vec![
            ("state", task.state.as_str().to_owned()),
            ("outcome", task.outcome.clone().unwrap_or_default()),
            ("reason", reason.as_str().to_owned()),
            ("by", by.to_owned()),
            (
                "credentials",
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ];
        if !summary.is_empty() {
            extra.push(("summary", summary.to_owned()));
        }
        self.audit(task, event, now_ms, &extra);
        self.audit_revoked(task, &ids, reason, by, now_ms);
    }

    /// Logs one revoked credential in its shard's log and the revoked set.
    fn log_one(&mut self, c: &CredentialRecord, now_ms: u64, due_ms: u64, reason: EndReason) {
        let shard = c.id.task_id().shard();
        let Some(log) = self.logs.get_mut(usize::from(shard)) else {
            return;
        };
        log.last = log.last.next(now_ms);
        log.entries.push_back(RevocationRecord {
            credential_id: c.id.clone(),
            expires_at_ms: c.expires_at_ms,
            revoked_at_ms: now_ms,
            due_ms,
            reason,
            audience: c.audience.clone(),
            tenant: c.tenant.clone(),
            position: (shard, log.last),
        });
        if log.entries.len() > REVOCATION_LOG_MAX
            && let Some(old) = log.entries.pop_front()
        {
            log.trimmed = old.position.1;
        }
        self.revoked
            .entry(c.expires_at_ms)
            .or_default()
            .insert(c.id.clone(), (c.audience.clone(), c.tenant.clone()));
    }

    /// Adds credentials to a live task; a grant past the cap loses its oldest,
    /// which is revoked (reason rotation) and returned.
    fn add_credentials(
        &mut self,
        task_id: &TaskId,
        credentials: &[CredentialRecord],
        now_ms: u64,
    ) -> Vec<CredentialId> {
        let mut rotated = Vec::new();
        let task = self.tasks.get(task_id).cloned();
        for c in credentials {
            if let Some(task) = &task {
                self.audit_issued(task, c, now_ms);
            }
            let creds = self.credentials.entry(task_id.clone()).or_default();
            creds.insert(c.id.clone(), c.clone());
            let list = self
                .grants
                .entry(task_id.clone())
                .or_default()
                .entry(c.grant.clone())
                .or_default();
            list.retain(|id| creds.contains_key(id));
            list.push_back(c.id.clone());
            let mut out = Vec::new();
            while list.len() > MAX_LIVE_CREDENTIALS_PER_GRANT {
                if let Some(old) = list.pop_front()
                    && let Some(record) = creds.remove(&old)
                {
                    out.push(record);
                }
            }
            for record in out {
                if record.expires_at_ms > now_ms {
                    self.log_one(&record, now_ms, now_ms, EndReason::Rotation);
                }
                if let Some(task) = &task {
                    self.audit_revoked(
                        task,
                        std::slice::from_ref(&record.id),
                        EndReason::Rotation,
                        "",
                        now_ms,
                    );
                }
                rotated.push(record.id);
            }
        }
        rotated
    }

    /// Ends `task_id` (state already set by the caller): out of the deadline
    /// index, its unexpired credentials logged, its credential records gone.
    fn end(&mut self, task: &TaskRecord, now_ms: u64, reason: EndReason) -> Vec<CredentialId> {
        self.deadlines
            .remove(&(task.lease_deadline_ms, task.id.clone()));
        self.unlive(task);
        self.handles.remove(&task.id);
        if let Some(root) = &task.root
            && let Some(n) = self.descendants.get_mut(root)
        {
            *n = n.saturating_sub(1);
        }
        self.log_revocations(&task.id, now_ms, reason)
    }

    /// Ends every active delegated descendant of `id`, breadth first (state
    /// `Revoked`, reason `cascade`), like `end_descendants` in the Lua prelude.
    fn end_descendants(&mut self, id: &TaskId, now_ms: u64) -> Vec<EndedTask> {
        let mut out = Vec::new();
        let mut queue = VecDeque::from([id.clone()]);
        while let Some(parent) = queue.pop_front() {
            for kid in self.kids.remove(&parent).unwrap_or_default() {
                let Some(task) = self.tasks.get_mut(&kid) else {
                    continue;
                };
                if task.state != TaskState::Active {
                    continue;
                }
                task.state = TaskState::Revoked;
                task.ended_at_ms = Some(now_ms);
                task.outcome = Some(format!("cascade: ancestor {id} ended"));
                let ended = task.clone();
                let revoked = self.end(&ended, now_ms, EndReason::Cascade);
                self.audit_end(
                    &ended,
                    EndReason::Cascade,
                    id.as_str(),
                    &revoked,
                    "",
                    now_ms,
                );
                out.push(EndedTask {
                    task: ended,
                    revoked,
                    reason: EndReason::Cascade,
                });
                queue.push_back(kid);
            }
        }
        out
    }

    /// Whether `task`'s parent (if it has one) is live at `now_ms`.
    fn parent_live(&self, task: &TaskRecord, now_ms: u64) -> bool {
        task.parent
            .as_ref()
            .is_none_or(|p| self.tasks.get(p).is_some_and(|p| p.is_live(now_ms)))
    }

    /// The kill switch refusing a begin or delegation of `task`, if any.
    fn killed(&self, task: &TaskRecord) -> Option<KillSwitch> {
        self.kills
            .values()
            .find(|k| k.target().is_some_and(|t| t.refuses(task)))
            .cloned()
    }

    /// Drops `task` from its owner's and class's live sets.
    fn unlive(&mut self, task: &TaskRecord) {
        let (id_key, class_key) = quota_keys(task);
        for key in [id_key, class_key] {
            if let Some(set) = self.live.get_mut(&key) {
                set.remove(&task.id);
                if set.is_empty() {
                    self.live.remove(&key);
                }
            }
        }
    }

    /// The live tasks under `key` at `now_ms`, after dropping those past their
    /// max lifetime.
    fn live_count(&mut self, key: &str, now_ms: u64) -> u64 {
        let Some(set) = self.live.get_mut(key) else {
            return 0;
        };
        set.retain(|_, max| *max > now_ms);
        set.len() as u64
    }

    /// Checks every limit of `quota` for `task` at `now_ms`; spends the
    /// tokens and records the task only when all pass.
    fn admit(
        &mut self,
        task: &TaskRecord,
        quota: BeginQuota,
        now_ms: u64,
    ) -> Option<(QuotaKind, u64)> {
        let (id_key, class_key) = quota_keys(task);
        for (key, max, kind) in [
            (&id_key, quota.identity_max_live, QuotaKind::IdentityTasks),
            (&class_key, quota.class_max_live, QuotaKind::ClassTasks),
        ] {
            if let Some(max) = max
                && self.live_count(key, now_ms) >= max
            {
                return Some((kind, CONCURRENCY_RETRY_MS));
            }
        }
        let mut spend = Vec::new();
        for (key, bucket, kind) in [
            (&id_key, quota.identity_rate, QuotaKind::IdentityRate),
            (&class_key, quota.class_rate, QuotaKind::ClassRate),
        ] {
            let Some(bucket) = bucket else { continue };
            let tokens = refilled(self.buckets.get(key).copied(), bucket, now_ms);
            if tokens < 1.0 {
                let wait = ((1.0 - tokens) * bucket.refill_ms).ceil().max(1.0) as u64;
                return Some((kind, wait));
            }
            spend.push((key.clone(), tokens - 1.0));
        }
        for (key, tokens) in spend {
            self.buckets.insert(key, (tokens, now_ms));
        }
        // Like the Redis script: only a limited count is kept.
        for (key, max) in [
            (id_key, quota.identity_max_live),
            (class_key, quota.class_max_live),
        ] {
            if max.is_some() {
                self.live
                    .entry(key)
                    .or_default()
                    .insert(task.id.clone(), task.max_deadline_ms);
            }
        }
        None
    }

    /// Forgets tasks past their retention: ended ones `retention_ms` after they
    /// ended, live ones `retention_ms` after their max lifetime (as Redis keys expire).
    fn forget_old(&mut self, now_ms: u64, retention_ms: u64) {
        let old: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| {
                t.ended_at_ms
                    .unwrap_or(t.max_deadline_ms)
                    .saturating_add(retention_ms)
                    <= now_ms
            })
            .map(|t| t.id.clone())
            .collect();
        for id in old {
            if let Some(t) = self.tasks.remove(&id) {
                self.deadlines.remove(&(t.lease_deadline_ms, id.clone()));
                self.unlive(&t);
            }
            self.credentials.remove(&id);
            self.grants.remove(&id);
            self.renewed.remove(&id);
            self.kids.remove(&id);
            self.descendants.remove(&id);
            self.handles.remove(&id);
        }
    }
}

impl LeaseStore for MemoryStore {
    #[tracing::instrument(skip_all, name = "store.begin")]
    async fn begin_with_quota(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
        quota: BeginQuota,
    ) -> Result<BeginOutcome, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        if let Some(existing) = inner.tasks.get(&task.id) {
            return Ok(BeginOutcome::Existing(Box::new(existing.clone())));
        }
        if let Some(k) = inner.killed(task) {
            return Ok(BeginOutcome::Killed(k));
        }
        if let Some((quota, retry_after_ms)) = inner.admit(task, quota, task.created_at_ms) {
            return Ok(BeginOutcome::Exhausted {
                quota,
                retry_after_ms,
            });
        }
        let mut task = task.clone();
        if let Some(a) = &mut task.approval {
            a.status = super::ApprovalStatus {
                state: ApprovalState::Pending,
                deadline_ms: task.created_at_ms.saturating_add(a.validity_ms),
                ..Default::default()
            };
        }
        inner.tasks.insert(task.id.clone(), task.clone());
        inner
            .deadlines
            .insert((task.lease_deadline_ms, task.id.clone()));
        inner.renewed.insert(task.id.clone(), task.created_at_ms);
        let now_ms = task.created_at_ms;
        inner.audit(
            &task,
            "task.declared",
            now_ms,
            &[("by", task.owner.clone())],
        );
        inner.audit(
            &task,
            "policy.decided",
            now_ms,
            &[
                ("decision", "allow".to_owned()),
                ("policies", task.policies.join(",")),
            ],
        );
        let pending = task.approval.as_ref().map(|a| a.status.deadline_ms);
        inner.audit(
            &task,
            "task.begun",
            now_ms,
            &[
                ("deadline", task.lease_deadline_ms.to_string()),
                ("max_deadline", task.max_deadline_ms.to_string()),
                (
                    "approval",
                    if pending.is_some() { "pending" } else { "" }.to_owned(),
                ),
            ],
        );
        if let (Some(a), Some(deadline)) = (&task.approval, pending) {
            inner.audit(
                &task,
                "approval.requested",
                now_ms,
                &[
                    ("grants", a.grants.join(",")),
                    ("expires_at", deadline.to_string()),
                ],
            );
        }
        let rotated = inner.add_credentials(&task.id, credentials, task.created_at_ms);
        drop(guard);
        if !rotated.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(BeginOutcome::Created(Box::new(task)))
    }

    #[tracing::instrument(skip_all, name = "store.task")]
    async fn task(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.lock()?.tasks.get(task_id).cloned())
    }

    #[tracing::instrument(skip_all, name = "store.renew")]
    async fn renew(
        &self,
        task_id: &TaskId,
        renewal: Renewal<'_>,
    ) -> Result<RenewOutcome, StoreError> {
        let now_ms = renewal.now_ms;
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(task) = inner.tasks.get_mut(task_id) else {
            return Ok(RenewOutcome::NotFound);
        };
        if !task.is_live(now_ms) {
            return Ok(RenewOutcome::NotActive(task.clone()));
        }
        let parent_live = inner
            .tasks
            .get(task_id)
            .is_some_and(|t| inner.parent_live(t, now_ms));
        let Some(task) = inner.tasks.get_mut(task_id).filter(|_| parent_live) else {
            return match inner.tasks.get(task_id) {
                Some(t) => Ok(RenewOutcome::NotActive(t.clone())),
                None => Ok(RenewOutcome::NotFound),
            };
        };
        if renewal.redeems_approval {
            let usable = task.approval.as_ref().is_some_and(|a| {
                a.status.state == ApprovalState::Redeemed
                    || (a.status.state == ApprovalState::Approved && a.status.deadline_ms > now_ms)
            });
            if !usable {
                return Ok(RenewOutcome::ApprovalLapsed(task.clone()));
            }
        }
        if let Some(min) = renewal.min_interval_ms {
            let last = inner.renewed.get(task_id).copied().unwrap_or(0);
            let wait = last.saturating_add(min).saturating_sub(now_ms);
            if wait > 0 {
                return Ok(RenewOutcome::TooSoon {
                    retry_after_ms: wait,
                });
            }
            inner.renewed.insert(task_id.clone(), now_ms);
        }
        let deadline = now_ms
            .saturating_add(renewal.extend_by_ms)
            .max(task.lease_deadline_ms)
            .min(task.max_deadline_ms);
        inner
            .deadlines
            .remove(&(task.lease_deadline_ms, task_id.clone()));
        inner.deadlines.insert((deadline, task_id.clone()));
        task.lease_deadline_ms = deadline;
        let mut redeemed_now = false;
        if renewal.redeems_approval
            && let Some(a) = &mut task.approval
        {
            redeemed_now = a.status.state == ApprovalState::Approved;
            a.status.state = ApprovalState::Redeemed;
        }
        let renewed = task.clone();
        if redeemed_now {
            inner.audit(&renewed, "approval.redeemed", now_ms, &[]);
        }
        let event = if renewal.extend_by_ms == 0 {
            "task.replayed"
        } else {
            "lease.renewed"
        };
        inner.audit(
            &renewed,
            event,
            now_ms,
            &[("deadline", renewed.lease_deadline_ms.to_string())],
        );
        if let Some(creds) = inner.credentials.get_mut(task_id) {
            let expired: Vec<CredentialId> = creds
                .values()
                .filter(|c| c.expires_at_ms < now_ms)
                .take(PRUNE_PAGE)
                .map(|c| c.id.clone())
                .collect();
            for id in expired {
                creds.remove(&id);
            }
        }
        let rotated = inner.add_credentials(task_id, renewal.credentials, now_ms);
        drop(guard);
        if !rotated.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(RenewOutcome::Renewed {
            task: renewed,
            rotated,
        })
    }

    #[tracing::instrument(skip_all, name = "store.complete")]
    async fn complete_with_summary(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
        summary: &str,
    ) -> Result<CompleteOutcome, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(task) = inner.tasks.get_mut(task_id) else {
            return Ok(CompleteOutcome::NotFound);
        };
        if task.state != TaskState::Active {
            return Ok(CompleteOutcome::AlreadyEnded(task.clone()));
        }
        let reason = if task.lease_deadline_ms <= now_ms {
            task.state = TaskState::Expired;
            EndReason::Expiry
        } else {
            task.state = TaskState::Completed;
            task.outcome = Some(outcome.to_owned());
            EndReason::Completion
        };
        task.ended_at_ms = Some(now_ms);
        let ended = task.clone();
        let revoked = inner.end(&ended, now_ms, reason);
        let by = if reason == EndReason::Expiry {
            ""
        } else {
            ended.owner.as_str()
        };
        inner.audit_end(&ended, reason, by, &revoked, summary, now_ms);
        let descendants = inner.end_descendants(task_id, now_ms);
        drop(guard);
        if !revoked.is_empty() || !descendants.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(CompleteOutcome::Ended {
            task: ended,
            revoked,
            descendants,
        })
    }

    #[tracing::instrument(skip_all, name = "store.credential")]
    async fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
        now_ms: u64,
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
            now_ms,
        }))
    }

    async fn reap(&self, shard: u8, now_ms: u64, limit: usize) -> Result<Reaped, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        inner.forget_old(now_ms, self.retention_ms);
        let due: Vec<(u64, TaskId)> = inner
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .filter(|(_, id)| id.shard() == shard)
            .take(limit.max(1).saturating_add(1))
            .cloned()
            .collect();
        let mut out = Reaped {
            more: due.len() > limit.max(1),
            ..Reaped::default()
        };
        for entry in due.into_iter().take(limit.max(1)) {
            let Some(task) = inner.tasks.get_mut(&entry.1) else {
                inner.deadlines.remove(&entry);
                out.skipped
                    .push((entry.1.to_string(), "task record gone".into()));
                continue;
            };
            if task.state != TaskState::Active {
                inner.deadlines.remove(&entry);
                out.skipped.push((
                    entry.1.to_string(),
                    format!("already {}", task.state.as_str()),
                ));
                continue;
            }
            task.state = TaskState::Expired;
            task.ended_at_ms = Some(now_ms);
            let ended = task.clone();
            let revoked: Vec<CredentialId> = inner
                .credentials
                .get(&ended.id)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let live = inner.end(&ended, now_ms, EndReason::Expiry);
            inner.audit_end(&ended, EndReason::Expiry, "", &live, "", now_ms);
            let id = ended.id.clone();
            out.expired.push(EndedTask {
                task: ended,
                revoked,
                reason: EndReason::Expiry,
            });
            out.expired.extend(inner.end_descendants(&id, now_ms));
        }
        drop(guard);
        if !out.expired.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(out)
    }

    async fn revocation_cursor(&self) -> Result<RevocationCursor, StoreError> {
        let inner = self.lock()?;
        let mut cursor = RevocationCursor::default();
        for (shard, log) in (0..SHARDS).zip(&inner.logs) {
            cursor.advance(shard, log.last);
        }
        Ok(cursor)
    }

    async fn revoked_page(
        &self,
        shard: u8,
        from: PagePosition,
        limit: usize,
    ) -> Result<RevokedPage, StoreError> {
        let inner = self.lock()?;
        let mut records = Vec::new();
        let mut expiries = Vec::new();
        'page: for (exp, ids) in inner.revoked.range(from.min_expires_at_ms..) {
            let skip = if *exp == from.min_expires_at_ms {
                usize::try_from(from.skip).unwrap_or(usize::MAX)
            } else {
                0
            };
            // Entries of every shard share the map: the position counts this shard's only.
            for (id, (audience, tenant)) in ids
                .iter()
                .filter(|(id, _)| id.task_id().shard() == shard)
                .skip(skip)
            {
                if records.len() >= limit {
                    break 'page;
                }
                expiries.push(*exp);
                records.push(RevocationRecord {
                    credential_id: id.clone(),
                    expires_at_ms: *exp,
                    revoked_at_ms: 0,
                    due_ms: 0,
                    reason: EndReason::Completion,
                    audience: audience.clone(),
                    tenant: tenant.clone(),
                    position: (shard, LogId::default()),
                });
            }
        }
        Ok(RevokedPage {
            records,
            next: from.after(&expiries, limit),
        })
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
                    // Trimmed past the cursor, or the cursor is ahead of the log
                    // (it came from a store that had more history).
                    if pos < log.trimmed || pos > log.last {
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

    #[tracing::instrument(skip_all, name = "store.delegate")]
    async fn delegate(
        &self,
        child: &TaskRecord,
        handle_sha256: &str,
    ) -> Result<DelegateOutcome, StoreError> {
        let Some(parent_id) = child.parent.clone() else {
            return Err(StoreError::Corrupt("delegated task without parent".into()));
        };
        let now_ms = child.created_at_ms;
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(parent) = inner.tasks.get(&parent_id).cloned() else {
            return Ok(DelegateOutcome::ParentNotFound);
        };
        if !parent.is_live(now_ms) {
            return Ok(DelegateOutcome::ParentNotActive(Box::new(parent)));
        }
        if let Some(k) = inner.killed(child) {
            return Ok(DelegateOutcome::Killed(k));
        }
        let live_kids = inner.kids.get(&parent_id).map_or(0, |kids| {
            kids.iter()
                .filter(|k| {
                    inner
                        .tasks
                        .get(*k)
                        .is_some_and(|t| t.state == TaskState::Active)
                })
                .count() as u64
        });
        if live_kids >= MAX_CHILDREN {
            return Ok(DelegateOutcome::TooMany { bound: "children" });
        }
        let root = child.root.clone().unwrap_or_else(|| parent_id.clone());
        if inner.descendants.get(&root).copied().unwrap_or(0) >= MAX_DESCENDANTS {
            return Ok(DelegateOutcome::TooMany {
                bound: "descendants",
            });
        }
        let mut task = child.clone();
        task.max_deadline_ms = task.max_deadline_ms.min(parent.max_deadline_ms);
        task.lease_deadline_ms = task
            .lease_deadline_ms
            .min(parent.lease_deadline_ms)
            .min(task.max_deadline_ms);
        inner.tasks.insert(task.id.clone(), task.clone());
        inner.audit(
            &task,
            "task.delegated",
            now_ms,
            &[
                ("by", parent.owner.clone()),
                ("depth", task.depth.to_string()),
                ("deadline", task.lease_deadline_ms.to_string()),
                ("max_deadline", task.max_deadline_ms.to_string()),
            ],
        );
        inner
            .deadlines
            .insert((task.lease_deadline_ms, task.id.clone()));
        inner.renewed.insert(task.id.clone(), now_ms);
        inner
            .handles
            .insert(task.id.clone(), handle_sha256.to_owned());
        inner
            .kids
            .entry(parent_id)
            .or_default()
            .insert(task.id.clone());
        *inner.descendants.entry(root).or_default() += 1;
        Ok(DelegateOutcome::Created(Box::new(task)))
    }

    #[tracing::instrument(skip_all, name = "store.redeem")]
    async fn redeem(
        &self,
        record: &TaskRecord,
        handle_sha256: &str,
        now_ms: u64,
        credentials: &[CredentialRecord],
    ) -> Result<RedeemOutcome, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let Some(task) = inner.tasks.get_mut(&record.id) else {
            return Ok(RedeemOutcome::NotFound);
        };
        if !task.is_live(now_ms) {
            return Ok(RedeemOutcome::NotActive(Box::new(task.clone())));
        }
        let snapshot = task.clone();
        if !inner.parent_live(&snapshot, now_ms) {
            return Ok(RedeemOutcome::NotActive(Box::new(snapshot)));
        }
        let Some(task) = inner.tasks.get_mut(&record.id) else {
            return Ok(RedeemOutcome::NotFound);
        };
        if inner.handles.get(&record.id).map(String::as_str) != Some(handle_sha256) {
            return Ok(RedeemOutcome::BadHandle);
        }
        inner.handles.remove(&record.id);
        // Only the begin record changes (the binding); the state is the store's.
        task.binding = record.binding.clone();
        let redeemed = task.clone();
        inner.audit(
            &redeemed,
            "delegation.redeemed",
            now_ms,
            &[("by", redeemed.owner.clone())],
        );
        inner.renewed.insert(record.id.clone(), now_ms);
        let rotated = inner.add_credentials(&record.id, credentials, now_ms);
        drop(guard);
        if !rotated.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(RedeemOutcome::Redeemed(Box::new(redeemed)))
    }

    #[tracing::instrument(skip_all, name = "store.decide_approval")]
    async fn decide_approval(
        &self,
        task_id: &TaskId,
        decision: &ApprovalDecision,
        now_ms: u64,
    ) -> Result<ApprovalOutcome, StoreError> {
        let mut inner = self.lock()?;
        let Some(task) = inner.tasks.get_mut(task_id) else {
            return Ok(ApprovalOutcome::NotFound);
        };
        let live = task.is_live(now_ms);
        let Some(a) = task.approval.as_mut().filter(|_| live) else {
            return Ok(ApprovalOutcome::NotPending(Box::new(task.clone())));
        };
        if a.status.state != ApprovalState::Pending {
            return Ok(ApprovalOutcome::NotPending(Box::new(task.clone())));
        }
        if a.status.deadline_ms <= now_ms {
            a.status.state = ApprovalState::Expired;
            let expired = task.clone();
            inner.audit(&expired, "approval.expired", now_ms, &[]);
            return Ok(ApprovalOutcome::NotPending(Box::new(expired)));
        }
        a.status.state = if decision.approve {
            a.status.deadline_ms = now_ms.saturating_add(decision.validity_ms);
            ApprovalState::Approved
        } else {
            ApprovalState::Denied
        };
        a.status.decided_by = Some(decision.by.clone());
        a.status.reason = Some(decision.reason.clone());
        a.status.decided_at_ms = Some(now_ms);
        let state = a.status.state;
        let valid_until = a.status.deadline_ms;
        let decided = task.clone();
        inner.audit(
            &decided,
            &format!("approval.{}", state.as_str()),
            now_ms,
            &[
                ("by", decision.by.clone()),
                ("reason", decision.reason.clone()),
                ("valid_until", valid_until.to_string()),
            ],
        );
        Ok(ApprovalOutcome::Decided(Box::new(decided)))
    }

    #[tracing::instrument(skip_all, name = "store.set_kill_switch")]
    async fn set_kill_switch(&self, switch: &KillSwitch) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let key = (switch.kind.clone(), switch.value.clone());
        if !inner.kills.contains_key(&key) && inner.kills.len() >= MAX_KILL_SWITCHES {
            return Err(super::kill_switches_full());
        }
        inner.kills.insert(key, switch.clone());
        let event = kill_event(
            "kill_switch.set",
            &switch.kind,
            &switch.value,
            &switch.set_by,
            &switch.reason,
            switch.set_at_ms,
        );
        let now_ms = switch.set_at_ms;
        inner.trail.append(0, event, &[], now_ms);
        Ok(())
    }

    #[tracing::instrument(skip_all, name = "store.lift_kill_switch")]
    async fn lift_kill_switch(
        &self,
        kind: &str,
        value: &str,
        by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let lifted = inner
            .kills
            .remove(&(kind.to_owned(), value.to_owned()))
            .is_some();
        if lifted {
            let event = kill_event("kill_switch.lifted", kind, value, by, reason, now_ms);
            inner.trail.append(0, event, &[], now_ms);
        }
        Ok(lifted)
    }

    async fn kill_switches(&self) -> Result<Vec<KillSwitch>, StoreError> {
        Ok(self.lock()?.kills.values().cloned().collect())
    }

    async fn live_tasks(
        &self,
        shard: u8,
        _cursor: u64,
        _count: usize,
    ) -> Result<LiveTaskPage, StoreError> {
        // In process, a shard's live tasks are one page: no cursor can then
        // skip a task that a revocation between pages moved.
        let inner = self.lock()?;
        let ids = inner
            .deadlines
            .iter()
            .map(|(_, id)| id)
            .filter(|id| id.shard() == shard)
            .cloned()
            .collect();
        Ok(LiveTaskPage { ids, next: None })
    }

    #[tracing::instrument(skip_all, name = "store.revoke_tasks")]
    async fn revoke_tasks(
        &self,
        shard: u8,
        ids: &[TaskId],
        target: &KillTarget,
        outcome: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Vec<EndedTask>, StoreError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        let mut out = Vec::new();
        for id in ids.iter().filter(|id| id.shard() == shard) {
            let Some(task) = inner.tasks.get_mut(id) else {
                continue;
            };
            if task.state != TaskState::Active || !target.matches(task) {
                continue;
            }
            task.state = TaskState::Revoked;
            task.ended_at_ms = Some(now_ms);
            task.outcome = Some(outcome.to_owned());
            let ended = task.clone();
            let revoked = inner.end(&ended, now_ms, EndReason::KillSwitch);
            inner.audit_end(&ended, EndReason::KillSwitch, by, &revoked, "", now_ms);
            out.push(EndedTask {
                task: ended,
                revoked,
                reason: EndReason::KillSwitch,
            });
            out.extend(inner.end_descendants(id, now_ms));
        }
        drop(guard);
        if !out.is_empty() {
            self.logged.notify_waiters();
        }
        Ok(out)
    }

    async fn list_tasks(&self, token: Option<&str>, count: usize) -> Result<TaskPage, StoreError> {
        let after = match token {
            None => None,
            Some(t) => Some(TaskId::parse(t).ok_or_else(|| {
                StoreError::Corrupt("page token: not one this broker issued".into())
            })?),
        };
        let inner = self.lock()?;
        let mut ids: Vec<&TaskId> = inner
            .tasks
            .keys()
            .filter(|id| after.as_ref().is_none_or(|a| *id > a))
            .collect();
        ids.sort();
        let page: Vec<TaskRecord> = ids
            .iter()
            .take(count.max(1))
            .filter_map(|id| inner.tasks.get(*id).cloned())
            .collect();
        let next = (ids.len() > page.len())
            .then(|| page.last().map(|t| t.id.to_string()))
            .flatten();
        Ok(TaskPage { tasks: page, next })
    }

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let task = TaskId::parse(&event.task);
        let shard = task.as_ref().map_or(0, TaskId::shard);
        let index: Vec<TaskId> = task.into_iter().collect();
        inner
            .trail
            .append(shard, event.clone(), &index, event.at_ms);
        Ok(())
    }

    async fn audit_trace(
        &self,
        task_id: &TaskId,
        from: u64,
        limit: usize,
    ) -> Result<AuditPage, StoreError> {
        let inner = self.lock()?;
        let all = inner
            .trail
            .index
            .get(task_id)
            .map_or(&[][..], Vec::as_slice);
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(all.len());
        let end = start.saturating_add(limit.max(1)).min(all.len());
        Ok(AuditPage {
            events: all.get(start..end).unwrap_or_default().to_vec(),
            next: (end < all.len()).then_some(end as u64),
        })
    }

    async fn audit_cursor(&self, tenant: &str) -> Result<AuditCursor, StoreError> {
        let inner = self.lock()?;
        let mut cursor = AuditCursor::default();
        for (shard, slot) in (0..SHARDS).zip(cursor.0.iter_mut()) {
            if let Some((n, _)) = inner
                .trail
                .streams
                .get(&(tenant.to_owned(), shard))
                .and_then(VecDeque::back)
            {
                *slot = format!("{n}-0");
            }
        }
        Ok(cursor)
    }

    async fn audit_read(
        &self,
        tenant: &str,
        after: &AuditCursor,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, AuditCursor), StoreError> {
        let inner = self.lock()?;
        let mut cursor = after.clone();
        let mut shards = Vec::new();
        for (shard, slot) in (0..SHARDS).zip(cursor.0.iter_mut()) {
            let Some(stream) = inner.trail.streams.get(&(tenant.to_owned(), shard)) else {
                continue;
            };
            let from = entry_number(slot);
            let mut page = Vec::new();
            for (n, e) in stream.iter().filter(|(n, _)| *n > from).take(limit.max(1)) {
                *slot = format!("{n}-0");
                page.push(e.clone());
            }
            shards.push(page);
        }
        Ok((audit::merge(shards), cursor))
    }

    async fn audit_len(&self, tenant: &str) -> Result<u64, StoreError> {
        let inner = self.lock()?;
        Ok((0..SHARDS)
            .filter_map(|s| inner.trail.streams.get(&(tenant.to_owned(), s)))
            .map(|q| q.len() as u64)
            .sum())
    }

    async fn task_credentials(
        &self,
        task_id: &TaskId,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .credentials
            .get(task_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn live_counts(&self, now_ms: u64) -> Result<LiveCounts, StoreError> {
        let inner = self.lock()?;
        let mut counts = LiveCounts::default();
        for (deadline, id) in &inner.deadlines {
            if *deadline <= now_ms {
                counts.overdue += 1;
            }
            let Some(task) = inner.tasks.get(id) else {
                continue;
            };
            let c = counts.templates.entry(task.template.clone()).or_default();
            c.tasks += 1;
            c.credentials += inner.credentials.get(id).map_or(0, |m| m.len() as u64);
        }
        Ok(counts)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.lock().map(|_| ())
    }

    async fn diagnose(&self) -> Result<super::StoreDiagnosis, StoreError> {
        // Answering at all shows the state is readable; the facts are fixed.
        drop(self.lock()?);
        Ok(super::StoreDiagnosis {
            store: "embedded memory store".to_owned(),
            persistence: super::Persistence::Embedded,
            eviction: super::Eviction::Never,
            clock: None,
        })
    }
}

/// A kill switch event, as the Lua `kill` script writes it: in the tenant's
/// stream for a tenant switch, else in that of no tenant.
fn kill_event(
    event: &str,
    kind: &str,
    value: &str,
    by: &str,
    reason: &str,
    at_ms: u64,
) -> AuditEvent {
    AuditEvent {
        event: event.to_owned(),
        at_ms,
        tenant: if kind == "tenant" {
            value.to_owned()
        } else {
            String::new()
        },
        trace: audit::current_trace_id(),
        ..AuditEvent::default()
    }
    .with("kind", kind)
    .with("value", value)
    .with("by", by)
    .with("reason", reason)
}
