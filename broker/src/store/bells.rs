//! Redis Cluster: wake-ups for waiting revocation reads.
//!
//! On one node a waiting read blocks on every shard's revocation log in one
//! `XREAD`. A cluster refuses a command over several slots, and one blocked
//! `XREAD` holds its node connection, so here each shard has a watcher task
//! with a cluster connection of its own, blocked on that shard's log alone;
//! any entry rings one shared bell. A bell carries no data: the read that
//! follows goes through the gap-checking script, so a missed ring only costs
//! latency (the reader's wait), never a revocation.

use std::{
    sync::{Arc, Once, Weak},
    time::Duration,
};

use tokio::sync::watch;

use super::{SHARDS, link::Target};

/// How long each watcher blocks before it looks again (and notices a dropped
/// store).
const BLOCK: Duration = Duration::from_secs(2);

/// One bell rung by every shard's watcher; watchers start at the first
/// subscription and stop when the store is dropped.
pub(super) struct Bells {
    target: Target,
    prefix: String,
    timeout: Duration,
    rung: watch::Sender<u64>,
    started: Once,
}

impl Bells {
    /// Bells for the shards of `prefix` on the cluster `target`.
    pub fn new(target: Target, prefix: String, timeout: Duration) -> Self {
        Self {
            target,
            prefix,
            timeout,
            rung: watch::channel(0).0,
            started: Once::new(),
        }
    }

    /// A receiver that has seen every ring so far: its `changed()` completes
    /// at the next entry logged in any shard.
    pub fn subscribe(self: &Arc<Self>) -> watch::Receiver<u64> {
        let rx = self.rung.subscribe();
        self.started.call_once(|| {
            for shard in 0..SHARDS {
                tokio::spawn(watch_shard(Arc::downgrade(self), shard));
            }
        });
        rx
    }
}

/// Blocks on one shard's log and rings at each new entry, while the store lives.
async fn watch_shard(bells: Weak<Bells>, shard: u8) {
    let mut last = String::new();
    let mut conn = None;
    loop {
        let Some(b) = bells.upgrade() else { return };
        let key = format!("{{{}:s{shard:x}}}:revlog", b.prefix);
        let (target, timeout) = (b.target.clone(), b.timeout);
        drop(b);
        let Some(c) = conn.as_mut() else {
            match target.cluster_connection(None).await {
                Ok(mut c) => {
                    // Blocking from the log's last entry now, and ringing once,
                    // leaves no gap however long the connection took: what was
                    // logged before this entry the reader's re-read finds, what
                    // comes after it the XREAD returns ("$" would miss an entry
                    // logged while the watcher was still connecting).
                    let tail: Result<Result<redis::streams::StreamRangeReply, _>, _> =
                        tokio::time::timeout(
                            timeout,
                            redis::cmd("XREVRANGE")
                                .arg(&key)
                                .arg("+")
                                .arg("-")
                                .arg("COUNT")
                                .arg(1)
                                .query_async(&mut c),
                        )
                        .await;
                    match tail {
                        Ok(Ok(r)) => {
                            last = r.ids.first().map_or_else(|| "0-0".into(), |e| e.id.clone());
                            conn = Some(c);
                            let Some(b) = bells.upgrade() else { return };
                            b.rung.send_modify(|n| *n = n.wrapping_add(1));
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(shard, error = %e, "revocation bell: cannot read the log's tail");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => {
                    tracing::debug!(shard, error = %e, "revocation bell: cannot connect");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            continue;
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(crate::clock::duration_ms(BLOCK))
            .arg("STREAMS")
            .arg(&key)
            .arg(&last);
        let read: Result<Result<Option<redis::streams::StreamReadReply>, _>, _> =
            tokio::time::timeout(BLOCK + timeout, cmd.query_async(c)).await;
        match read {
            Ok(Ok(Some(reply))) => {
                if let Some(id) = reply
                    .keys
                    .iter()
                    .flat_map(|k| k.ids.iter())
                    .next_back()
                    .map(|e| e.id.clone())
                {
                    last = id;
                }
                let Some(b) = bells.upgrade() else { return };
                b.rung.send_modify(|n| *n = n.wrapping_add(1));
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(shard, error = %e, "revocation bell: read failed; reconnecting");
                conn = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => {
                conn = None;
            }
        }
    }
}
