//! The reaper: expires leases whose deadline passed without renewal.
//!
//! Runs on every replica. Each tick it asks the store to claim due tasks shard
//! by shard; a claim is exclusive until its TTL, so replicas never both act,
//! and a claim left by a replica that died mid-revocation is handed to the next
//! reaper once it times out. Expiry is idempotent: redoing it is harmless.
//! Nothing relies on Redis keyspace notifications (they are fire-and-forget).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    audit,
    clock::{Clock, duration_ms},
    store::{EndReason, ExpireOutcome, LeaseStore, SHARDS, StoreError, TaskId},
};

/// How the reaper paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ReaperSettings {
    /// Time between sweeps: the bound on how late after its deadline a lease is revoked.
    pub interval: Duration,
    /// How long a claim is exclusive before another reaper may take it over.
    pub claim_ttl: Duration,
    /// Most tasks claimed per shard per sweep.
    pub batch: usize,
}

impl Default for ReaperSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            claim_ttl: Duration::from_secs(5),
            batch: 256,
        }
    }
}

/// Expires unrenewed leases; one per replica.
#[derive(Debug)]
pub struct Reaper<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    settings: ReaperSettings,
}

impl<S: LeaseStore> Reaper<S> {
    /// A reaper over `store`.
    pub fn new(store: Arc<S>, clock: Arc<dyn Clock>, settings: ReaperSettings) -> Self {
        Self {
            store,
            clock,
            settings,
        }
    }

    /// Sweeps until `shutdown` turns true. Store errors are logged and the sweep
    /// retried next tick: leases whose deadline passed during an outage are
    /// expired once the store is back.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
            match self.sweep().await {
                Ok(_) if failing => {
                    tracing::info!("reaper: store reachable again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reaper: sweep failed; retrying every tick");
                    }
                    failing = true;
                }
            }
        }
    }

    /// One pass over every shard. Returns how many leases this pass expired.
    ///
    /// # Errors
    /// The first [`StoreError`] met; claimed work left undone is retried when
    /// its claim times out.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let mut expired = 0;
        for shard in 0..SHARDS {
            let now_ms = self.clock.now_ms();
            let claimed = self
                .store
                .claim_due(
                    shard,
                    now_ms,
                    duration_ms(self.settings.claim_ttl),
                    self.settings.batch,
                )
                .await?;
            for task_id in claimed {
                if self.expire_one(&task_id).await? {
                    expired += 1;
                }
            }
        }
        Ok(expired)
    }

    async fn expire_one(&self, task_id: &TaskId) -> Result<bool, StoreError> {
        let now_ms = self.clock.now_ms();
        let done = match self.store.expire(task_id, now_ms).await? {
            ExpireOutcome::Expired { task, revoked } => {
                let late_ms = now_ms.saturating_sub(task.lease_deadline_ms);
                audit::task_ended(&task, EndReason::Expiry, &revoked);
                tracing::debug!(task_id = %task.id, late_ms, "lease expired");
                true
            }
            ExpireOutcome::NotDue | ExpireOutcome::AlreadyEnded => false,
        };
        self.store.release(task_id).await?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        clock::ManualClock,
        store::{MemoryStore, TaskRecord, TaskState},
    };

    fn task(n: u8, deadline_ms: u64) -> TaskRecord {
        let mut bytes = [n; 16];
        bytes[0] = n << 4 | n;
        TaskRecord {
            id: TaskId::from_bytes(bytes),
            owner: "spiffe://acme.test/agent/a".into(),
            template: "t".into(),
            template_version: "1".into(),
            parameters: BTreeMap::new(),
            intent: "i".into(),
            fingerprint: "f".into(),
            created_at_ms: 0,
            lease_ttl_ms: deadline_ms,
            lease_deadline_ms: deadline_ms,
            max_deadline_ms: 10_000,
            state: TaskState::Active,
            ended_at_ms: None,
            outcome: None,
            binding: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_sweep_expires_exactly_the_due_leases_once() {
        let clock = Arc::new(ManualClock::new(0));
        let store = Arc::new(MemoryStore::new(60_000));
        for (n, deadline) in [(1, 1_000), (2, 2_000), (3, 3_000)] {
            store.begin(&task(n, deadline), &[]).await.expect("begin");
        }
        let reaper = Reaper::new(store.clone(), clock.clone(), ReaperSettings::default());
        assert_eq!(
            reaper.sweep().await.expect("sweep"),
            0,
            "nothing is due at t=0"
        );
        clock.advance(Duration::from_millis(2_000));
        assert_eq!(
            reaper.sweep().await.expect("sweep"),
            2,
            "deadlines at or before now"
        );
        assert_eq!(reaper.sweep().await.expect("sweep"), 0, "never twice");
        let t3 = store
            .task(&task(3, 3_000).id)
            .await
            .expect("read")
            .expect("task");
        assert_eq!(t3.state, TaskState::Active);
        let t1 = store
            .task(&task(1, 1_000).id)
            .await
            .expect("read")
            .expect("task");
        assert_eq!(t1.state, TaskState::Expired);
        assert_eq!(t1.ended_at_ms, Some(2_000));
    }

    #[tokio::test]
    async fn a_dead_replicas_claim_is_taken_over_after_its_ttl() {
        let clock = Arc::new(ManualClock::new(0));
        let store = Arc::new(MemoryStore::new(60_000));
        let t = task(4, 1_000);
        store.begin(&t, &[]).await.expect("begin");
        // Another replica claimed the lease at its deadline, then died.
        let claimed = store
            .claim_due(t.id.shard(), 1_000, 5_000, 10)
            .await
            .expect("claim");
        assert_eq!(claimed, vec![t.id.clone()]);
        let reaper = Reaper::new(store.clone(), clock.clone(), ReaperSettings::default());
        clock.advance(Duration::from_millis(3_000));
        assert_eq!(
            reaper.sweep().await.expect("sweep"),
            0,
            "the claim is still exclusive"
        );
        clock.advance(Duration::from_millis(3_000));
        assert_eq!(
            reaper.sweep().await.expect("sweep"),
            1,
            "a timed-out claim is taken over"
        );
    }
}
