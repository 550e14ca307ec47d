//! The reaper: expires leases whose deadline passed without renewal.
//!
//! Runs on every replica. Each sweep asks the store, shard by shard, to expire
//! a batch of due leases in one atomic step ([`LeaseStore::reap`]: one round
//! trip per batch), so a replica that dies mid-sweep leaves nothing half done
//! and two replicas never expire the same lease twice. A record the store
//! cannot expire or this broker cannot read is logged and skipped; it never
//! stops the sweep. Nothing relies on Redis keyspace notifications (they are
//! fire-and-forget).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    audit,
    clock::Clock,
    store::{LeaseStore, SHARDS, StoreError},
};

/// How the reaper paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ReaperSettings {
    /// Time between sweeps: the bound on how late after its deadline a lease is revoked.
    pub interval: Duration,
    /// Most leases expired per store call (one atomic step, one round trip).
    pub batch: usize,
    /// Most batches per shard per sweep, so one sweep is bounded even when a
    /// backlog is due; the rest waits for the next sweep.
    pub max_batches_per_shard: usize,
}

impl Default for ReaperSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            batch: 256,
            max_batches_per_shard: 16,
        }
    }
}

/// Expires unrenewed leases; one per replica.
#[derive(Debug)]
pub struct Reaper<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    settings: ReaperSettings,
    metrics: Arc<crate::metrics::Metrics>,
}

impl<S: LeaseStore> Reaper<S> {
    /// A reaper over `store`.
    pub fn new(store: Arc<S>, clock: Arc<dyn Clock>, settings: ReaperSettings) -> Self {
        Self {
            store,
            clock,
            settings,
            metrics: Arc::default(),
        }
    }

    /// Counts the tasks it ends in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
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
    /// A failing shard does not stop the others; the first error is returned
    /// after all were tried.
    ///
    /// # Errors
    /// The first [`StoreError`] met; the leases it concerned are expired by a
    /// later sweep (expiry is idempotent).
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let mut expired = 0;
        let mut first_error = None;
        for shard in 0..SHARDS {
            for _ in 0..self.settings.max_batches_per_shard.max(1) {
                let reaped = match self
                    .store
                    .reap(shard, self.clock.now_ms(), self.settings.batch)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        break;
                    }
                };
                for (task_id, why) in &reaped.skipped {
                    tracing::warn!(shard, task_id = %task_id, reason = %why, "reaper: skipped a deadline entry");
                }
                for e in &reaped.expired {
                    audit::task_ended(&e.task, e.reason, &e.revoked);
                    self.metrics.task_ended(e.reason);
                    let ended_at = e.task.ended_at_ms.unwrap_or_default();
                    // Its credentials expired at the deadline by their own
                    // `exp` (they never outlive the lease); the lag of an
                    // expiry is the deadline to the end the store recorded.
                    self.metrics
                        .revocation_seen(e.reason, e.task.lease_deadline_ms, ended_at);
                    let late_ms = ended_at.saturating_sub(e.task.lease_deadline_ms);
                    tracing::debug!(task_id = %e.task.id, late_ms, "lease expired");
                }
                expired += reaped.expired.len();
                if !reaped.more {
                    break;
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(expired),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        clock::ManualClock,
        store::{MemoryStore, TaskId, TaskRecord, TaskState},
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
    async fn a_backlog_is_expired_in_bounded_batches() {
        let clock = Arc::new(ManualClock::new(0));
        let store = Arc::new(MemoryStore::new(60_000));
        // Ten due leases in one shard (ids differ past the shard nibble).
        for n in 0..10u8 {
            let mut t = task(5, 1_000);
            let mut bytes = [5u8; 16];
            bytes[0] = 0x55;
            bytes[1] = n;
            t.id = TaskId::from_bytes(bytes);
            store.begin(&t, &[]).await.expect("begin");
        }
        let settings = ReaperSettings {
            batch: 3,
            max_batches_per_shard: 2,
            ..ReaperSettings::default()
        };
        let reaper = Reaper::new(store.clone(), clock.clone(), settings);
        clock.advance(Duration::from_millis(1_000));
        assert_eq!(
            reaper.sweep().await.expect("sweep"),
            6,
            "two batches of three"
        );
        assert_eq!(
            reaper.sweep().await.expect("sweep"),
            4,
            "the rest next sweep"
        );
        assert_eq!(reaper.sweep().await.expect("sweep"), 0);
    }
}
