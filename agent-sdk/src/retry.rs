//! Exponential backoff with jitter, for `UNAVAILABLE` only.

use std::{future::Future, time::Duration};

use crate::Error;

/// How calls that fail with `UNAVAILABLE` are retried. No other failure is retried:
/// any other answer means the broker decided, or the outcome is unknown.
///
/// The wait before retry `n` (1-based) is drawn uniformly from `[d/2, d]` where
/// `d = min(max, base * 2^(n-1))` ("equal jitter"): it always backs off, and
/// agents that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; `1` disables retries. `0` counts as `1`.
    pub max_attempts: u32,
    /// Backoff before the first retry (before jitter).
    pub base: Duration,
    /// Largest backoff between two attempts.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, backoff 100 ms doubling up to 2 s.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// A policy that tries once.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The jittered wait before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(31);
        let ceiling = self
            .base
            .saturating_mul(1u32 << shift)
            .min(self.max)
            .max(Duration::from_millis(1));
        let half = ceiling / 2;
        half + half.mul_f64(random_unit())
    }

    /// Runs `call` until it succeeds, fails with a non-retryable error, or the
    /// attempts are used up; returns the last result.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let attempts = self.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e) if e.is_retryable() && attempt < attempts => {
                    let wait = self.backoff(attempt);
                    tracing::debug!(call = what, attempt, ?wait, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// A uniform value in `[0, 1)` from the system's CSPRNG (via ring); 0.5 if it fails,
/// which only loses the jitter, never the backoff.
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.5;
    }
    // 53 random bits make an exactly representable f64 in [0, 1).
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..200 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b3 = p.backoff(3);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400));
            let b9 = p.backoff(9);
            assert!(b9 >= Duration::from_millis(500) && b9 <= Duration::from_secs(1));
            assert!(p.backoff(u32::MAX) <= Duration::from_secs(1));
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(2)).collect();
        assert!(distinct.len() > 1, "no jitter");
    }

    #[tokio::test(start_paused = true)]
    async fn only_unavailable_is_retried() {
        let p = RetryPolicy::default();
        let n = AtomicU32::new(0);
        let r: Result<(), Error> = p
            .run("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(Error::Unavailable("down".into()))
            })
            .await;
        assert!(matches!(r, Err(Error::Unavailable(_))));
        assert_eq!(n.load(Ordering::SeqCst), 4);

        for e in [
            Error::Denied("no".into()),
            Error::Transport("timeout".into()),
            Error::Precondition("ended".into()),
        ] {
            let n = AtomicU32::new(0);
            let r: Result<(), Error> = p
                .run("t", || {
                    n.fetch_add(1, Ordering::SeqCst);
                    let e = e.clone();
                    async move { Err(e) }
                })
                .await;
            assert!(r.is_err());
            assert_eq!(n.load(Ordering::SeqCst), 1, "{e} must not be retried");
        }

        let n = AtomicU32::new(0);
        let r = p
            .run("t", || async {
                if n.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(Error::Unavailable("down".into()))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r, Ok(7));
    }
}
