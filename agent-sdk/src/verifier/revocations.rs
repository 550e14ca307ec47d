//! The revocation state a [`Verifier`](super::Verifier) judges by, fed batch by
//! batch from `WatchRevocations`.
//!
//! Two halves with two locks, so that `verify` never waits on feed work:
//!
//! - [`InForce`], behind an `RwLock`: the revocations tokens are judged by, and
//!   whether they are *whole*. `verify` only ever takes its read lock.
//! - [`Feed`], behind a `Mutex` only the feed takes: a snapshot being received
//!   (built aside, put in force at its end marker in one swap) and the cursor
//!   to resume from.
//!
//! Fail closed: from a snapshot's `reset` until its end marker, after a stream
//! broke off mid-snapshot, and after a panic under either lock, the state is
//! not whole and every token is refused as revocations unknown. Entries are
//! forgotten at `expires_at` + the grace the broker advertises, by the next
//! batch (a bounded number per write-lock hold), never by `verify`.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use leash_proto::v1 as pb;

use super::VerifyError;

/// Most due entries pruned in one hold of the write lock; the rest are
/// pruned in further holds, so a burst of expiries never stalls `verify`.
const PRUNE_CHUNK: usize = 1024;

/// Revocations that are known, with what falls due first.
#[derive(Debug, Default)]
struct InForce {
    /// Whether these are all the revocations there are: false between a
    /// snapshot's reset and its end marker, after a snapshot was cut off, and
    /// after a panic under a lock.
    whole: bool,
    /// Revoked credential id → its expiry (Unix ms; `u64::MAX` if not given).
    by_id: HashMap<Arc<str>, u64>,
    /// `(expiry, id)` of every entry of `by_id`, earliest first.
    by_expiry: BTreeSet<(u64, Arc<str>)>,
}

impl InForce {
    /// Records `r` unless it is already due (expiry + `grace_ms` at or before
    /// `now_ms`). A second revocation of one id keeps the later expiry.
    fn insert(&mut self, r: &pb::Revocation, now_ms: u64, grace_ms: u64) {
        let exp = expiry_ms(r);
        if exp.saturating_add(grace_ms) <= now_ms {
            return;
        }
        match self.by_id.get_mut(r.credential_id.as_str()) {
            Some(known) if *known >= exp => {}
            Some(known) => {
                let id = self
                    .by_expiry
                    .take(&(*known, Arc::from(r.credential_id.as_str())))
                    .map_or_else(|| Arc::from(r.credential_id.as_str()), |(_, id)| id);
                *known = exp;
                self.by_expiry.insert((exp, id));
            }
            None => {
                let id: Arc<str> = Arc::from(r.credential_id.as_str());
                self.by_id.insert(Arc::clone(&id), exp);
                self.by_expiry.insert((exp, id));
            }
        }
    }

    /// Forgets at most `limit` entries whose expiry + `grace_ms` is at or
    /// before `now_ms`, earliest first. True if more are due.
    fn prune(&mut self, now_ms: u64, grace_ms: u64, limit: usize) -> bool {
        let due = |set: &BTreeSet<(u64, Arc<str>)>| {
            set.first()
                .is_some_and(|(exp, _)| exp.saturating_add(grace_ms) <= now_ms)
        };
        for _ in 0..limit {
            if !due(&self.by_expiry) {
                return false;
            }
            if let Some((_, id)) = self.by_expiry.pop_first() {
                self.by_id.remove(&id);
            }
        }
        due(&self.by_expiry)
    }
}

/// The feed's own state: never read by `verify`.
#[derive(Debug, Default)]
struct Feed {
    /// The snapshot being received, from its reset batch to its end marker.
    pending: Option<InForce>,
    /// Where to resume: the cursor of the last batch applied outside a
    /// snapshot, or of a snapshot at its end marker; empty (start with a
    /// snapshot) from a reset until then and after state was lost.
    cursor: String,
    /// State was lost to a panic: the stream must start over with a snapshot.
    resync: bool,
}

/// What a verifier knows of revocations. Every method is fail-closed: a
/// poisoned lock reads as "unknown", never as "not revoked".
#[derive(Debug)]
pub(super) struct Revocations {
    in_force: RwLock<InForce>,
    feed: Mutex<Feed>,
    /// The grace in force (ms): [`super::REVOCATION_GRACE`] until a batch
    /// advertises one.
    grace_ms: AtomicU64,
}

impl Revocations {
    /// No revocations known; `whole` says whether that is the whole truth (an
    /// offline verifier) or not yet (one that waits for its first snapshot).
    pub(super) fn new(whole: bool) -> Self {
        Self {
            in_force: RwLock::new(InForce {
                whole,
                ..InForce::default()
            }),
            feed: Mutex::new(Feed::default()),
            grace_ms: AtomicU64::new(millis(super::REVOCATION_GRACE)),
        }
    }

    /// The grace in force: how long past its expiry a revocation is kept, and
    /// the most leeway a token's `exp` may be given.
    pub(super) fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms.load(Ordering::Relaxed))
    }

    /// `Ok` if `credential_id` is known not to be revoked; `Revoked` if it is;
    /// `RevocationsUnknown` if the state is not whole or cannot be read.
    pub(super) fn check(&self, credential_id: &str) -> Result<(), VerifyError> {
        let set = self
            .in_force
            .read()
            .map_err(|_| VerifyError::RevocationsUnknown)?;
        if !set.whole {
            return Err(VerifyError::RevocationsUnknown);
        }
        if set.by_id.contains_key(credential_id) {
            return Err(VerifyError::Revoked);
        }
        Ok(())
    }

    /// Whether the revocations in force are all there are.
    pub(super) fn is_whole(&self) -> bool {
        self.in_force.read().is_ok_and(|s| s.whole)
    }

    /// How many revocations are held in force, due ones not yet pruned
    /// included; read through a poisoned lock, since it decides nothing.
    pub(super) fn count(&self) -> usize {
        self.in_force
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    /// Applies one batch at `now_ms`. Returns the grace the batch advertised,
    /// if it did.
    pub(super) fn apply(&self, batch: &pb::RevocationBatch, now_ms: u64) -> Option<Duration> {
        let mut feed = self.feed();
        let advertised = batch.revocation_grace.as_ref().map(grace_of);
        if let Some(g) = advertised {
            self.grace_ms.store(millis(g), Ordering::Relaxed);
        }
        let grace_ms = self.grace_ms.load(Ordering::Relaxed);
        if batch.reset {
            // What we knew is out of date and the new snapshot is not whole
            // yet: unknown until its end marker. A snapshot cut off earlier
            // is dropped here with its partial contents.
            feed.pending = Some(InForce::default());
            feed.cursor.clear();
            self.write(&mut feed).whole = false;
        }
        if let Some(pending) = feed.pending.as_mut() {
            for r in &batch.revocations {
                pending.insert(r, now_ms, grace_ms);
            }
            // `caught_up` also ends a snapshot: brokers from before the end
            // marker sent only that, after the last chunk.
            if (batch.snapshot_complete || batch.caught_up)
                && let Some(mut fresh) = feed.pending.take()
            {
                // Built aside; only the swap holds the lock `verify` reads,
                // and the old set is dropped after it is released.
                fresh.prune(now_ms, grace_ms, usize::MAX);
                fresh.whole = true;
                let stale = std::mem::replace(&mut *self.write(&mut feed), fresh);
                drop(stale);
                feed.cursor.clone_from(&batch.cursor);
                feed.resync = false;
            }
        } else {
            if !batch.revocations.is_empty() {
                let mut set = self.write(&mut feed);
                for r in &batch.revocations {
                    set.insert(r, now_ms, grace_ms);
                }
            }
            if !batch.cursor.is_empty() && !feed.resync {
                feed.cursor.clone_from(&batch.cursor);
            }
        }
        while self.write(&mut feed).prune(now_ms, grace_ms, PRUNE_CHUNK) {}
        advertised
    }

    /// The stream broke off: a snapshot in progress is dropped and the state
    /// stays unknown until a whole one arrives; live state is kept, since
    /// resuming from the cursor misses nothing.
    pub(super) fn stream_broken(&self) {
        let mut feed = self.feed();
        if feed.pending.take().is_some() {
            feed.cursor.clear();
        }
    }

    /// The cursor to resume from; empty to start with a snapshot.
    pub(super) fn resume_cursor(&self) -> String {
        self.feed().cursor.clone()
    }

    /// True once after state was lost to a panic: the stream in progress
    /// cannot repair it, so the caller should reconnect (with the now empty
    /// [`Revocations::resume_cursor`]) for a snapshot.
    pub(super) fn take_resync(&self) -> bool {
        std::mem::take(&mut self.feed().resync)
    }

    /// The feed state. After a panic under its lock it is started afresh, and
    /// the revocations in force are marked not whole.
    fn feed(&self) -> MutexGuard<'_, Feed> {
        match self.feed.lock() {
            Ok(feed) => feed,
            Err(poisoned) => {
                let mut feed = poisoned.into_inner();
                self.feed.clear_poison();
                *feed = Feed::default();
                Self::lost(&mut feed);
                self.write(&mut feed).whole = false;
                feed
            }
        }
    }

    /// The revocations in force, for writing. After a panic under their lock
    /// they may be half-changed: emptied, marked not whole, and a resync is
    /// asked for. `feed` is held by the caller, so no second writer interleaves.
    fn write(&self, feed: &mut Feed) -> RwLockWriteGuard<'_, InForce> {
        match self.in_force.write() {
            Ok(set) => set,
            Err(poisoned) => {
                let mut set = poisoned.into_inner();
                *set = InForce::default();
                self.in_force.clear_poison();
                Self::lost(feed);
                set
            }
        }
    }

    /// Asks for a fresh snapshot. A snapshot already being built aside is
    /// kept: it is whole truth once its end marker comes.
    fn lost(feed: &mut Feed) {
        tracing::error!(
            "revocation state lost to a panic; refusing every token until a new snapshot is whole"
        );
        feed.cursor.clear();
        feed.resync = true;
    }
}

#[cfg(test)]
impl Revocations {
    /// Panics while holding the write lock of the revocations in force, as a
    /// bug under that lock would: the lock is left poisoned.
    pub(super) fn poison(&self) {
        let _held = self.in_force.write();
        panic!("poisoning the revocation set on purpose");
    }
}

/// `expires_at` in Unix ms; `u64::MAX` (kept for ever) when absent.
fn expiry_ms(r: &pb::Revocation) -> u64 {
    r.expires_at.as_ref().map_or(u64::MAX, |t| {
        let s = u64::try_from(t.seconds).unwrap_or(0);
        let sub_ms = u64::try_from(t.nanos.clamp(0, 999_999_999)).unwrap_or(0) / 1_000_000;
        s.saturating_mul(1000).saturating_add(sub_ms)
    })
}

/// An advertised grace; a negative one counts as none.
fn grace_of(d: &prost_types::Duration) -> Duration {
    Duration::try_from(*d).unwrap_or(Duration::ZERO)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: &str, exp_ms: u64) -> pb::Revocation {
        pb::Revocation {
            credential_id: id.into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(exp_ms / 1000).unwrap_or(i64::MAX),
                nanos: i32::try_from(exp_ms % 1000 * 1_000_000).unwrap_or(0),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pruning_takes_only_what_is_due_and_at_most_a_chunk_at_a_time() {
        let mut set = InForce::default();
        for i in 0..2500 {
            set.insert(&rev(&format!("due-{i}"), 1_000 + i), 0, 100);
        }
        set.insert(&rev("later", 50_000), 0, 100);
        let no_expiry = pb::Revocation {
            credential_id: "no-expiry".into(),
            ..Default::default()
        };
        set.insert(&no_expiry, 0, 100);

        // At 10 s with a 100 ms grace every due-* entry is due, `later` not.
        assert!(set.prune(10_000, 100, 1000), "more remain after one chunk");
        assert_eq!(set.by_id.len(), 1502);
        assert!(set.by_id.contains_key("due-1000"));
        assert!(!set.by_id.contains_key("due-999"), "earliest first");
        assert!(set.prune(10_000, 100, 1000));
        assert!(!set.prune(10_000, 100, 1000), "nothing due is left");
        assert_eq!(set.by_id.len(), 2);
        assert_eq!(set.by_expiry.len(), 2);
        assert!(!set.prune(u64::MAX - 1, 100, 1000));
        assert!(set.by_id.contains_key("no-expiry"));
    }

    #[test]
    fn a_revocation_seen_twice_keeps_its_later_expiry_once() {
        let mut set = InForce::default();
        set.insert(&rev("a", 5_000), 0, 0);
        set.insert(&rev("a", 9_000), 0, 0);
        set.insert(&rev("a", 7_000), 0, 0);
        assert_eq!(set.by_id.get("a"), Some(&9_000));
        assert_eq!(set.by_expiry.len(), 1);
        assert!(!set.prune(8_000, 0, 10));
        assert_eq!(set.by_id.len(), 1);
        assert!(!set.prune(9_000, 0, 10));
        assert!(set.by_id.is_empty() && set.by_expiry.is_empty());
    }

    #[test]
    fn an_already_due_revocation_is_not_recorded_and_a_missing_expiry_is_kept() {
        let mut set = InForce::default();
        set.insert(&rev("gone", 1_000), 1_500, 500);
        assert!(set.by_id.is_empty());
        set.insert(
            &pb::Revocation {
                credential_id: "open".into(),
                ..Default::default()
            },
            u64::MAX - 1,
            500,
        );
        assert_eq!(set.by_id.get("open"), Some(&u64::MAX));
    }

    fn batch(ids: &[(&str, u64)], reset: bool, end: bool, cursor: &str) -> pb::RevocationBatch {
        pb::RevocationBatch {
            revocations: ids.iter().map(|(id, exp)| rev(id, *exp)).collect(),
            cursor: cursor.into(),
            snapshot: reset || end,
            reset,
            snapshot_complete: end,
            ..Default::default()
        }
    }

    #[test]
    fn the_cursor_moves_only_outside_snapshots_and_at_their_end_marker() {
        let r = Revocations::new(false);
        assert_eq!(r.resume_cursor(), "");
        r.apply(&batch(&[("a", 60_000)], true, false, "snap-1"), 0);
        assert_eq!(
            r.resume_cursor(),
            "",
            "resuming mid-snapshot from its cursor would skip the rest of it"
        );
        r.apply(&batch(&[("b", 60_000)], false, true, "snap-1"), 0);
        assert_eq!(r.resume_cursor(), "snap-1");
        r.apply(&batch(&[("c", 60_000)], false, false, "live-1"), 0);
        assert_eq!(r.resume_cursor(), "live-1");
        r.apply(&batch(&[], false, false, ""), 0);
        assert_eq!(r.resume_cursor(), "live-1", "an empty cursor is no cursor");

        // A resnapshot that breaks off: resume with no cursor, for a new one.
        r.apply(&batch(&[("d", 60_000)], true, false, "snap-2"), 0);
        r.stream_broken();
        assert_eq!(r.resume_cursor(), "");
        assert_eq!(r.check("x"), Err(VerifyError::RevocationsUnknown));
        // The partial snapshot is gone: its chunk does not join the next one.
        r.apply(&batch(&[("e", 60_000)], true, true, "snap-3"), 0);
        assert_eq!(r.check("d"), Ok(()));
        assert_eq!(r.check("e"), Err(VerifyError::Revoked));
        assert_eq!(r.resume_cursor(), "snap-3");

        // A live stream that breaks keeps both state and cursor.
        r.stream_broken();
        assert_eq!(r.check("e"), Err(VerifyError::Revoked));
        assert_eq!(r.resume_cursor(), "snap-3");
    }

    #[test]
    fn caught_up_ends_a_snapshot_from_a_broker_without_the_end_marker() {
        let r = Revocations::new(false);
        r.apply(&batch(&[("a", 60_000)], true, false, "s"), 0);
        assert_eq!(r.check("a"), Err(VerifyError::RevocationsUnknown));
        r.apply(
            &pb::RevocationBatch {
                caught_up: true,
                cursor: "s".into(),
                ..Default::default()
            },
            0,
        );
        assert_eq!(r.check("a"), Err(VerifyError::Revoked));
        assert_eq!(r.check("b"), Ok(()));
    }

    #[test]
    fn the_advertised_grace_replaces_the_default_and_a_negative_one_is_zero() {
        let r = Revocations::new(true);
        assert_eq!(r.grace(), super::super::REVOCATION_GRACE);
        let with = |seconds: i64| pb::RevocationBatch {
            revocation_grace: Some(prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        };
        assert_eq!(r.apply(&with(7), 0), Some(Duration::from_secs(7)));
        assert_eq!(r.grace(), Duration::from_secs(7));
        assert_eq!(r.apply(&pb::RevocationBatch::default(), 0), None);
        assert_eq!(r.grace(), Duration::from_secs(7), "kept until told again");
        r.apply(&with(-3), 0);
        assert_eq!(r.grace(), Duration::ZERO);
    }
}
