//! A [`LeaseStore`] that times every call of the store it wraps.

use std::{sync::Arc, time::Duration, time::Instant};

use super::Metrics;
use crate::{
    audit::{AuditCursor, AuditEvent, AuditPage},
    store::{
        ApprovalDecision, ApprovalOutcome, BeginOutcome, BeginQuota, CompleteOutcome, CredentialId,
        CredentialRecord, CredentialView, DelegateOutcome, EndedTask, KillSwitch, KillTarget,
        LeaseStore, LiveCounts, LiveTaskPage, PagePosition, Reaped, RedeemOutcome, RenewOutcome,
        Renewal, RevocationCursor, RevocationRead, RevocationRecord, RevokedPage, StoreError,
        TaskId, TaskPage, TaskRecord,
    },
};

/// Wraps a store: each call's latency goes to `leash_store_duration_seconds`
/// and each failure to `leash_store_errors_total`, labelled by operation.
/// Behaviour is the inner store's, unchanged. The revocation log read, which
/// waits for news by design, is counted for errors but not timed.
#[derive(Debug)]
pub struct MeteredStore<S> {
    inner: Arc<S>,
    metrics: Arc<Metrics>,
}

impl<S> MeteredStore<S> {
    /// `inner`, timed into `metrics`.
    pub fn new(inner: Arc<S>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = call.await;
        self.metrics.store_call(op, start.elapsed(), r.is_err());
        r
    }
}

impl<S: LeaseStore> LeaseStore for MeteredStore<S> {
    async fn begin_with_quota(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
        quota: BeginQuota,
    ) -> Result<BeginOutcome, StoreError> {
        self.timed(
            "begin",
            self.inner.begin_with_quota(task, credentials, quota),
        )
        .await
    }

    async fn task(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.timed("task", self.inner.task(task_id)).await
    }

    async fn renew(
        &self,
        task_id: &TaskId,
        renewal: Renewal<'_>,
    ) -> Result<RenewOutcome, StoreError> {
        self.timed("renew", self.inner.renew(task_id, renewal))
            .await
    }

    async fn complete_with_summary(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
        summary: &str,
    ) -> Result<CompleteOutcome, StoreError> {
        self.timed(
            "complete",
            self.inner
                .complete_with_summary(task_id, now_ms, outcome, summary),
        )
        .await
    }

    async fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
        now_ms: u64,
    ) -> Result<Option<CredentialView>, StoreError> {
        self.timed(
            "credential",
            self.inner.credential(task_id, credential_id, now_ms),
        )
        .await
    }

    async fn reap(&self, shard: u8, now_ms: u64, limit: usize) -> Result<Reaped, StoreError> {
        self.timed("reap", self.inner.reap(shard, now_ms, limit))
            .await
    }

    async fn revocation_cursor(&self) -> Result<RevocationCursor, StoreError> {
        self.timed("revocation_cursor", self.inner.revocation_cursor())
            .await
    }

    async fn revoked_page(
        &self,
        shard: u8,
        from: PagePosition,
        limit: usize,
    ) -> Result<RevokedPage, StoreError> {
        self.timed("revoked_page", self.inner.revoked_page(shard, from, limit))
            .await
    }

    async fn revocation_snapshot(
        &self,
        now_ms: u64,
    ) -> Result<(Vec<RevocationRecord>, RevocationCursor), StoreError> {
        self.timed(
            "revocation_snapshot",
            self.inner.revocation_snapshot(now_ms),
        )
        .await
    }

    async fn read_revocations(
        &self,
        after: &RevocationCursor,
        wait: Duration,
        limit: usize,
    ) -> Result<RevocationRead, StoreError> {
        let r = self.inner.read_revocations(after, wait, limit).await;
        if r.is_err() {
            self.metrics
                .store_call("read_revocations", Duration::ZERO, true);
        }
        r
    }

    fn now_ms(&self, local_now_ms: u64) -> u64 {
        self.inner.now_ms(local_now_ms)
    }

    async fn delegate(
        &self,
        child: &TaskRecord,
        handle_sha256: &str,
    ) -> Result<DelegateOutcome, StoreError> {
        self.timed("delegate", self.inner.delegate(child, handle_sha256))
            .await
    }

    async fn redeem(
        &self,
        record: &TaskRecord,
        handle_sha256: &str,
        now_ms: u64,
        credentials: &[CredentialRecord],
    ) -> Result<RedeemOutcome, StoreError> {
        self.timed(
            "redeem",
            self.inner
                .redeem(record, handle_sha256, now_ms, credentials),
        )
        .await
    }

    async fn decide_approval(
        &self,
        task_id: &TaskId,
        decision: &ApprovalDecision,
        now_ms: u64,
    ) -> Result<ApprovalOutcome, StoreError> {
        self.timed(
            "decide_approval",
            self.inner.decide_approval(task_id, decision, now_ms),
        )
        .await
    }

    async fn set_kill_switch(&self, switch: &KillSwitch) -> Result<(), StoreError> {
        self.timed("set_kill_switch", self.inner.set_kill_switch(switch))
            .await
    }

    async fn lift_kill_switch(
        &self,
        kind: &str,
        value: &str,
        by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.timed(
            "lift_kill_switch",
            self.inner.lift_kill_switch(kind, value, by, reason, now_ms),
        )
        .await
    }

    async fn kill_switches(&self) -> Result<Vec<KillSwitch>, StoreError> {
        self.timed("kill_switches", self.inner.kill_switches())
            .await
    }

    async fn live_tasks(
        &self,
        shard: u8,
        cursor: u64,
        count: usize,
    ) -> Result<LiveTaskPage, StoreError> {
        self.timed("live_tasks", self.inner.live_tasks(shard, cursor, count))
            .await
    }

    async fn revoke_tasks(
        &self,
        shard: u8,
        ids: &[TaskId],
        target: &KillTarget,
        outcome: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Vec<EndedTask>, StoreError> {
        self.timed(
            "revoke_tasks",
            self.inner
                .revoke_tasks(shard, ids, target, outcome, by, now_ms),
        )
        .await
    }

    async fn list_tasks(&self, token: Option<&str>, count: usize) -> Result<TaskPage, StoreError> {
        self.timed("list_tasks", self.inner.list_tasks(token, count))
            .await
    }

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.timed("record_audit", self.inner.record_audit(event))
            .await
    }

    async fn audit_trace(
        &self,
        task_id: &TaskId,
        from: u64,
        limit: usize,
    ) -> Result<AuditPage, StoreError> {
        self.timed("audit_trace", self.inner.audit_trace(task_id, from, limit))
            .await
    }

    async fn audit_cursor(&self, tenant: &str) -> Result<AuditCursor, StoreError> {
        self.timed("audit_cursor", self.inner.audit_cursor(tenant))
            .await
    }

    async fn audit_read(
        &self,
        tenant: &str,
        after: &AuditCursor,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, AuditCursor), StoreError> {
        self.timed("audit_read", self.inner.audit_read(tenant, after, limit))
            .await
    }

    async fn audit_len(&self, tenant: &str) -> Result<u64, StoreError> {
        self.timed("audit_len", self.inner.audit_len(tenant)).await
    }

    async fn task_credentials(
        &self,
        task_id: &TaskId,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        self.timed("task_credentials", self.inner.task_credentials(task_id))
            .await
    }

    async fn live_counts(&self, now_ms: u64) -> Result<LiveCounts, StoreError> {
        self.timed("live_counts", self.inner.live_counts(now_ms))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }

    async fn diagnose(&self) -> Result<crate::store::StoreDiagnosis, StoreError> {
        self.timed("diagnose", self.inner.diagnose()).await
    }
}
