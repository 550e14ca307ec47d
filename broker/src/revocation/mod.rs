//! Revocation: telling resource servers, at once, that credentials have ended.
//!
//! Ending a task logs each of its revoked, unexpired credentials in its shard's
//! revocation log, in the same atomic store step as the state change. On every
//! replica one [`RevocationFeed`] follows those logs (a blocking read, so news
//! arrives in milliseconds) and fans them out to the watchers connected to that
//! replica; it starts at the logs' end without reading a snapshot. A watcher
//! starts from a snapshot of every revoked credential still within its grace,
//! or resumes from its cursor; if the history after its cursor is gone
//! (trimmed, or lost in a Redis restart or failover) it is told to reset and
//! given a snapshot, so it misses nothing. A snapshot always ends with an end
//! marker (`snapshot_complete`), is read from the store in bounded pages, and
//! is shared by the replica's watchers that need one at about the same time
//! (a reconnect storm reads the store once, not once per watcher). Each watcher
//! hears only of the audiences it serves ([`Audiences`]).

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, broadcast, mpsc, watch};

use crate::{
    clock::Clock,
    store::{
        EndReason, LeaseStore, RevocationCursor, RevocationRead, RevocationRecord, StoreError,
    },
};

/// Longest quiet period on a watch stream: an empty batch is sent this often.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one blocking read of the logs waits for news.
const FEED_WAIT: Duration = Duration::from_secs(1);
/// Most revocations in one batch.
pub const BATCH: usize = 1000;
/// Pause after a store error before the feed retries.
const RETRY: Duration = Duration::from_millis(250);
/// How long a snapshot read from the store is handed to further watchers: each
/// catches up from the snapshot's cursor, so an older snapshot is as complete,
/// only longer to catch up on.
pub const SNAPSHOT_REUSE: Duration = Duration::from_secs(2);

/// A snapshot as read from the store, shared by the watchers that send it.
#[derive(Debug)]
struct Snapshot {
    records: Vec<RevocationRecord>,
    cursor: RevocationCursor,
    taken: Instant,
}

/// One batch for a watcher.
#[derive(Debug, Clone, Default)]
pub struct RevocationBatch {
    /// The revocations (none in a heartbeat).
    pub records: Vec<RevocationRecord>,
    /// Resume after this batch with this cursor.
    pub cursor: RevocationCursor,
    /// These come from a snapshot.
    pub snapshot: bool,
    /// Forget what you knew: a full snapshot starts here.
    pub reset: bool,
    /// Snapshot or catch-up complete; what follows is live.
    pub caught_up: bool,
    /// The last batch of a snapshot: it is whole and replaces what the watcher knew.
    pub snapshot_complete: bool,
}

/// Which credentials a watcher hears of: those of the audiences it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audiences {
    /// Every audience (a verifier configured with `audiences = ["*"]`).
    All,
    /// Only credentials issued for one of these audiences (exact match).
    Only(BTreeSet<String>),
}

impl Audiences {
    /// True if a credential issued for `audience` is this watcher's business.
    pub fn admits(&self, audience: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(set) => set.contains(audience),
        }
    }
}

#[derive(Debug, Clone)]
enum FeedEvent {
    Records(Arc<Vec<RevocationRecord>>),
    /// The feed lost track (history trimmed under it): watchers re-read the store.
    Gap,
}

/// Follows the revocation logs and fans news out to this replica's watchers.
#[derive(Debug)]
pub struct RevocationFeed<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    tx: broadcast::Sender<FeedEvent>,
    /// The last snapshot read; the lock is held while a new one is read, so
    /// watchers that need one meanwhile wait for it instead of reading their own.
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    snapshots_read: AtomicU64,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl<S: LeaseStore> RevocationFeed<S> {
    /// A feed over `store`; call [`RevocationFeed::run`] to start it.
    pub fn new(store: Arc<S>, clock: Arc<dyn Clock>) -> Arc<Self> {
        Self::with_metrics(store, clock, None)
    }

    /// A feed over `store` that measures each revocation's lag (from its due
    /// time to being read here) into `metrics`.
    pub fn with_metrics(
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Self {
            store,
            clock,
            tx,
            snapshot: Mutex::new(None),
            snapshots_read: AtomicU64::new(0),
            metrics,
        })
    }

    /// How many snapshots this feed has read from the store since it started
    /// (watchers that share one count once).
    pub fn snapshots_read(&self) -> u64 {
        self.snapshots_read.load(Ordering::Relaxed)
    }

    /// A snapshot at most [`SNAPSHOT_REUSE`] old: the last one read, or a new
    /// one read now (once, however many watchers ask at the same time).
    async fn shared_snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        let mut slot = self.snapshot.lock().await;
        if let Some(s) = slot.as_ref()
            && s.taken.elapsed() < SNAPSHOT_REUSE
        {
            return Ok(Arc::clone(s));
        }
        // Dropped before the read, so a failed read holds no memory.
        *slot = None;
        let now = self.store.now_ms(self.clock.now_ms());
        let (records, cursor) = self.store.revocation_snapshot(now).await?;
        self.snapshots_read.fetch_add(1, Ordering::Relaxed);
        let snapshot = Arc::new(Snapshot {
            records,
            cursor,
            taken: Instant::now(),
        });
        *slot = Some(Arc::clone(&snapshot));
        Ok(snapshot)
    }

    /// Follows the logs until `shutdown` turns true. Store errors are logged and
    /// retried; watchers catch up from the store by their own cursors.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut cursor: Option<RevocationCursor> = None;
        let mut failing = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let step = async {
                let from = match &cursor {
                    Some(c) => c.clone(),
                    None => self.store.revocation_cursor().await?,
                };
                let read = self.store.read_revocations(&from, FEED_WAIT, BATCH).await?;
                Ok::<_, StoreError>((from, read))
            };
            let result = tokio::select! {
                r = step => r,
                _ = shutdown.changed() => return,
            };
            match result {
                Ok((_, RevocationRead::Records(records, next))) => {
                    if failing {
                        tracing::info!("revocation feed: store reachable again");
                        failing = false;
                    }
                    if let Some(m) = &self.metrics {
                        let now = self.store.now_ms(self.clock.now_ms());
                        // An expiry's lag is the reaper's to measure: the
                        // credentials of an expired lease have already expired.
                        for r in records.iter().filter(|r| r.reason != EndReason::Expiry) {
                            m.revocation_seen(r.reason, r.due_ms, now);
                        }
                    }
                    if !records.is_empty() {
                        let _ = self.tx.send(FeedEvent::Records(Arc::new(records)));
                    }
                    cursor = Some(next);
                }
                Ok((_, RevocationRead::Gap)) => {
                    tracing::warn!("revocation feed fell behind the trimmed log; watchers re-read");
                    let _ = self.tx.send(FeedEvent::Gap);
                    cursor = None;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "revocation feed: store read failed; retrying");
                        failing = true;
                    }
                    // Watchers must re-check the store for what the feed missed.
                    let _ = self.tx.send(FeedEvent::Gap);
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Starts a watch: a snapshot (no cursor) or catch-up (cursor), then live
    /// batches and heartbeats. The stream ends with an error if the store fails;
    /// the watcher reconnects with its last cursor.
    pub fn watch(
        self: &Arc<Self>,
        cursor: Option<RevocationCursor>,
        audiences: Audiences,
    ) -> mpsc::Receiver<Result<RevocationBatch, StoreError>> {
        self.watch_tenant(cursor, audiences, None)
    }

    /// [`RevocationFeed::watch`], told only of credentials of `tenant` (every
    /// tenant when `None`) among its audiences'.
    pub fn watch_tenant(
        self: &Arc<Self>,
        cursor: Option<RevocationCursor>,
        audiences: Audiences,
        tenant: Option<String>,
    ) -> mpsc::Receiver<Result<RevocationBatch, StoreError>> {
        // Subscribe before reading the store, so nothing logged in between is lost.
        let rx = self.tx.subscribe();
        let (out, out_rx) = mpsc::channel(16);
        let feed = Arc::clone(self);
        tokio::spawn(async move {
            let watcher = Watcher {
                feed,
                out,
                audiences,
                tenant,
            };
            if let Err(e) = watcher.serve(cursor, rx).await {
                let _ = watcher.out.send(Err(e)).await;
            }
        });
        out_rx
    }
}

struct Watcher<S> {
    feed: Arc<RevocationFeed<S>>,
    out: mpsc::Sender<Result<RevocationBatch, StoreError>>,
    audiences: Audiences,
    /// Only this tenant's credentials (`None`: every tenant's).
    tenant: Option<String>,
}

/// The watcher has gone away; stop quietly.
struct Gone;

impl From<Gone> for StoreError {
    fn from(_: Gone) -> Self {
        StoreError::Unavailable("watcher gone".into())
    }
}

impl<S: LeaseStore> Watcher<S> {
    /// Whether `r` is this watcher's business: one of its audiences, its tenant.
    fn admits(&self, r: &RevocationRecord) -> bool {
        self.audiences.admits(&r.audience) && self.tenant.as_ref().is_none_or(|t| *t == r.tenant)
    }

    /// Sends `batch` with only the records of this watcher's audiences and tenant.
    async fn send(&self, mut batch: RevocationBatch) -> Result<(), Gone> {
        batch.records.retain(|r| self.admits(r));
        self.out.send(Ok(batch)).await.map_err(|_| Gone)
    }

    async fn serve(
        &self,
        cursor: Option<RevocationCursor>,
        mut rx: broadcast::Receiver<FeedEvent>,
    ) -> Result<(), StoreError> {
        let mut cursor = match cursor {
            Some(c) => self.catch_up(c).await?,
            None => self.snapshot().await?,
        };
        self.send(RevocationBatch {
            cursor: cursor.clone(),
            caught_up: true,
            ..RevocationBatch::default()
        })
        .await?;
        loop {
            let event = tokio::select! {
                e = rx.recv() => e,
                () = tokio::time::sleep(HEARTBEAT) => {
                    self.send(RevocationBatch { cursor: cursor.clone(), ..RevocationBatch::default() }).await?;
                    continue;
                }
                () = self.out.closed() => return Ok(()),
            };
            match event {
                Ok(FeedEvent::Records(records)) => {
                    let fresh: Vec<RevocationRecord> = records
                        .iter()
                        .filter(|r| cursor.is_before(r.position.0, r.position.1))
                        .cloned()
                        .collect();
                    if fresh.is_empty() {
                        continue;
                    }
                    for r in &fresh {
                        cursor.advance(r.position.0, r.position.1);
                    }
                    self.send(RevocationBatch {
                        records: fresh,
                        cursor: cursor.clone(),
                        ..RevocationBatch::default()
                    })
                    .await?;
                }
                Ok(FeedEvent::Gap) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    cursor = self.catch_up(cursor).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// Sends a full snapshot (first batch `reset`, last batch
    /// `snapshot_complete`, one batch if it is small) and returns its cursor.
    async fn snapshot(&self) -> Result<RevocationCursor, StoreError> {
        let snapshot = self.feed.shared_snapshot().await?;
        let mine: Vec<&RevocationRecord> =
            snapshot.records.iter().filter(|r| self.admits(r)).collect();
        let chunks: Vec<&[&RevocationRecord]> = mine.chunks(BATCH).collect();
        let batches = chunks.len().max(1);
        for i in 0..batches {
            let records = chunks
                .get(i)
                .map(|c| c.iter().map(|r| (*r).clone()).collect())
                .unwrap_or_default();
            self.send(RevocationBatch {
                records,
                cursor: snapshot.cursor.clone(),
                snapshot: true,
                reset: i == 0,
                snapshot_complete: i + 1 == batches,
                ..RevocationBatch::default()
            })
            .await?;
        }
        Ok(snapshot.cursor.clone())
    }

    /// Sends everything logged after `cursor`; falls back to a snapshot on a gap.
    async fn catch_up(&self, mut cursor: RevocationCursor) -> Result<RevocationCursor, StoreError> {
        loop {
            match self
                .feed
                .store
                .read_revocations(&cursor, Duration::ZERO, BATCH)
                .await?
            {
                RevocationRead::Gap => return self.snapshot().await,
                RevocationRead::Records(records, next) => {
                    cursor = next;
                    if records.is_empty() {
                        return Ok(cursor);
                    }
                    self.send(RevocationBatch {
                        records,
                        cursor: cursor.clone(),
                        ..RevocationBatch::default()
                    })
                    .await?;
                }
            }
        }
    }
}
