//! The broker-side checks of `Admin.Diagnose` (printed by `leash doctor`).
//!
//! Each check reads a fact fresh and judges it against what Leash's guarantees
//! need: the store keeps what it acknowledged (persistence) and never drops a
//! key by itself (eviction: an evicted key is a lost revocation or lease), its
//! clock agrees with this replica's, the trust bundles stay valid, the signing
//! key is rotated, and the revocation canary (when on) sees revocations within
//! its SLO. A check never changes anything.
//!
//! A check's [`CheckStatus`] is `Fail` when a guarantee does not hold as
//! configured, `Warn` when it holds but deserves attention, else `Pass`; the
//! detail of every failure names the setting to change.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    canary::{CanaryRun, CanaryState, RunResult},
    clock::Clock,
    identity::{TrustBundleSource, TrustBundles},
    store::{ClockReading, Durability, Eviction, LeaseStore, Persistence},
};

/// Most clock skew between this replica and the store that passes.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_millis(500);
/// A trust bundle fails once less than this is left of its validity (or a
/// quarter of its CA's whole validity, if that is shorter: see
/// [`bundle_expiry_check`]).
pub const MIN_BUNDLE_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// A signing key older than this is flagged (a warning) for rotation.
pub const MAX_SIGNING_KEY_AGE: Duration = Duration::from_secs(90 * 86_400);

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// The guarantee holds.
    Pass,
    /// The guarantee holds, but something deserves attention.
    Warn,
    /// The guarantee does not hold as configured.
    Fail,
}

impl CheckStatus {
    /// `PASS`, `WARN` or `FAIL`, as `leash doctor` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked (`store eviction`, `clock skew`, ...).
    pub name: String,
    /// How it came out.
    pub status: CheckStatus,
    /// What was found; for a failure, what to change.
    pub detail: String,
    /// The measured figure, if any; may be empty.
    pub figure: String,
}

impl Check {
    fn new(
        name: &str,
        status: CheckStatus,
        detail: impl Into<String>,
        figure: impl Into<String>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            status,
            detail: detail.into(),
            figure: figure.into(),
        }
    }

    /// True unless the check failed.
    pub fn passed(&self) -> bool {
        self.status != CheckStatus::Fail
    }
}

/// A duration in days, readable at every scale: one decimal from a day up,
/// two decimals and the hours (or minutes, or seconds) below a day, so a CA
/// one hour from expiry prints `0.04 days (1h)`, never `0.0 days`.
pub fn format_days(d: Duration) -> String {
    let secs = d.as_secs_f64();
    let days = secs / 86_400.0;
    if secs >= 86_400.0 {
        return format!("{days:.1} days");
    }
    let whole = d.as_secs();
    let short = if whole >= 3600 {
        let (h, m) = (whole / 3600, (whole % 3600) / 60);
        if m == 0 {
            format!("{h}h")
        } else {
            format!("{h}h {m}m")
        }
    } else if whole >= 60 {
        format!("{}m", whole / 60)
    } else {
        format!("{whole}s")
    };
    format!("{days:.2} days ({short})")
}

/// A duration in milliseconds below 10 s (`34 ms`), else seconds (`12.3 s`).
pub fn format_ms(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// `store eviction`: passes only for a store that never evicts. Any Redis
/// `maxmemory-policy` other than `noeviction` fails, naming the setting: an
/// evicted key is a lease, a credential record or a revocation lost.
pub fn eviction_check(eviction: &Eviction) -> Check {
    const NAME: &str = "store eviction";
    match eviction {
        Eviction::Never => Check::new(NAME, CheckStatus::Pass, "embedded store: never evicts", ""),
        Eviction::Policy { value, source } => {
            let value = value.trim();
            if value.eq_ignore_ascii_case("noeviction") {
                Check::new(
                    NAME,
                    CheckStatus::Pass,
                    format!("maxmemory-policy noeviction (from {source})"),
                    "noeviction",
                )
            } else {
                Check::new(
                    NAME,
                    CheckStatus::Fail,
                    format!(
                        "maxmemory-policy is {value:?} (from {source}): Redis may evict leases, credential records and revocations, so a revoked credential could read as unknown and a lease vanish; set maxmemory-policy noeviction"
                    ),
                    value,
                )
            }
        }
        Eviction::Unknown(why) => Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "maxmemory-policy could not be read ({why}); allow the broker's Redis user CONFIG GET or INFO, and make sure maxmemory-policy is noeviction"
            ),
            "",
        ),
    }
}

/// `store persistence`: whether acknowledged changes survive a store restart.
/// The embedded store passes with a warning (it is for `leash dev` only);
/// Redis passes with AOF and `appendfsync always`, warns with a weaker fsync,
/// with RDB snapshots only, or with no persistence but replica
/// acknowledgements (`store.durability = "replicas = N"`), and fails with no
/// persistence at all.
pub fn persistence_check(persistence: &Persistence, durability: Option<Durability>) -> Check {
    const NAME: &str = "store persistence";
    match persistence {
        Persistence::Embedded => Check::new(
            NAME,
            CheckStatus::Warn,
            "embedded store: state is not persisted (leash dev only; production uses Redis)",
            "",
        ),
        Persistence::Redis {
            appendonly: true,
            appendfsync,
            source,
            ..
        } => {
            if appendfsync == "always" {
                Check::new(
                    NAME,
                    CheckStatus::Pass,
                    format!("appendonly yes, appendfsync always (from {source})"),
                    "aof",
                )
            } else {
                Check::new(
                    NAME,
                    CheckStatus::Warn,
                    format!(
                        "appendonly yes, appendfsync {appendfsync} (from {source}): unless store.durability waits for the disk or for replicas, a crash can lose the last changes; appendfsync always is the safe setting"
                    ),
                    "aof",
                )
            }
        }
        Persistence::Redis {
            appendonly: false,
            save,
            source,
            ..
        } => {
            let snapshots = save.as_deref().map(str::trim).filter(|s| !s.is_empty());
            match (snapshots, durability) {
                (_, Some(Durability::Replicas(n))) => Check::new(
                    NAME,
                    CheckStatus::Warn,
                    format!(
                        "appendonly no (from {source}): durability rests on {n} replica(s) acknowledging each change (store.durability); a whole-cluster restart loses state unless the replicas persist"
                    ),
                    "replicas",
                ),
                (Some(save), _) => Check::new(
                    NAME,
                    CheckStatus::Warn,
                    format!(
                        "appendonly no, RDB snapshots only (save {save:?}, from {source}): a crash loses every change since the last snapshot, revocations included; set appendonly yes"
                    ),
                    "rdb",
                ),
                (None, _) => Check::new(
                    NAME,
                    CheckStatus::Fail,
                    format!(
                        "no persistence (appendonly no{}, from {source}): a Redis restart loses every lease and revocation; set appendonly yes and appendfsync always",
                        if save.is_some() { ", save \"\"" } else { "" }
                    ),
                    "none",
                ),
            }
        }
        Persistence::Unknown(why) => Check::new(
            NAME,
            CheckStatus::Warn,
            format!("persistence settings could not be read ({why})"),
            "",
        ),
    }
}

/// `clock skew`: the store's clock against this replica's. Fails when the
/// skew is over [`MAX_CLOCK_SKEW`] beyond what the round trip leaves
/// uncertain. Leases are decided on the store's clock, but credentials carry
/// this replica's times, which resource servers compare with theirs.
pub fn clock_check(reading: Option<&ClockReading>) -> Check {
    const NAME: &str = "clock skew";
    let Some(r) = reading else {
        return Check::new(
            NAME,
            CheckStatus::Pass,
            "embedded store: runs on this broker's clock",
            "0 ms",
        );
    };
    let skew = r.skew_ms();
    let within = r.uncertainty_ms();
    let figure = format!("{skew:+} ms (±{within} ms)");
    let max = u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
    if skew.unsigned_abs().saturating_sub(within) > max {
        Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "the store's clock is {} ms {} this broker's, more than {} ms: synchronise both with NTP",
                skew.unsigned_abs(),
                if skew > 0 { "ahead of" } else { "behind" },
                max
            ),
            figure,
        )
    } else {
        Check::new(
            NAME,
            CheckStatus::Pass,
            format!("store TIME against this broker's clock, within {max} ms"),
            figure,
        )
    }
}

/// `trust bundle expiry`: the time left until the first trust domain's bundle
/// stops vouching for anyone, that is until the last-expiring CA of that
/// domain expires (a domain rotating its CA carries the next one beside the
/// old). Fails when less than [`MIN_BUNDLE_VALIDITY`] is left, or, for CAs
/// valid for less than four times that in all (short-lived rotated CAs, such
/// as SPIRE's default 24 h), when less than a quarter of the validity is left;
/// and fails for an expired or unreadable certificate.
pub fn bundle_expiry_check(bundles: &TrustBundles, now: SystemTime) -> Check {
    const NAME: &str = "trust bundle expiry";
    let now_s = unix_secs(now);
    // Per domain: (not_before, not_after) of its last-expiring CA.
    let mut earliest: Option<(String, i64, i64)> = None;
    for td in bundles.trust_domains() {
        let mut best: Option<(i64, i64)> = None;
        for der in bundles.certificates(td).unwrap_or_default() {
            match x509_parser::parse_x509_certificate(der.as_ref()) {
                Ok((_, cert)) => {
                    let v = cert.validity();
                    let span = (v.not_before.timestamp(), v.not_after.timestamp());
                    if best.is_none_or(|b| span.1 > b.1) {
                        best = Some(span);
                    }
                }
                Err(e) => {
                    return Check::new(
                        NAME,
                        CheckStatus::Fail,
                        format!("a CA of trust domain {td} cannot be read: {e}"),
                        "",
                    );
                }
            }
        }
        if let Some((from, to)) = best
            && earliest.as_ref().is_none_or(|(_, _, e)| to < *e)
        {
            earliest = Some((td.to_owned(), from, to));
        }
    }
    let Some((td, from, to)) = earliest else {
        return Check::new(NAME, CheckStatus::Fail, "no trust bundle is loaded", "");
    };
    let at = jiff::Timestamp::from_second(to).map_or_else(|_| to.to_string(), |t| t.to_string());
    if to <= now_s {
        return Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "the bundle of trust domain {td} expired at {at}: every SVID of it is refused; replace tls.bundles.{td}"
            ),
            "expired",
        );
    }
    let left = Duration::from_secs(u64::try_from(to - now_s).unwrap_or(0));
    let whole = Duration::from_secs(u64::try_from(to - from).unwrap_or(0));
    let min = MIN_BUNDLE_VALIDITY.min(whole / 4);
    let figure = format_days(left);
    if left < min {
        Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "the bundle of trust domain {td} expires at {at}, in under {}: rotate its CA",
                format_days(min)
            ),
            figure,
        )
    } else {
        Check::new(
            NAME,
            CheckStatus::Pass,
            format!("first to expire: trust domain {td}, at {at}"),
            figure,
        )
    }
}

/// `signing key age`: the age of the key that signs new credentials (the
/// first `signing.keys` entry), from its file's modification time. Warns past
/// [`MAX_SIGNING_KEY_AGE`]; fails if the file cannot be read.
pub fn signing_key_check(kid: &str, path: &std::path::Path, now: SystemTime) -> Check {
    const NAME: &str = "signing key age";
    let modified = std::fs::metadata(path).and_then(|m| m.modified());
    let modified = match modified {
        Ok(m) => m,
        Err(e) => {
            return Check::new(
                NAME,
                CheckStatus::Fail,
                format!("signing key {kid}: {} cannot be read: {e}", path.display()),
                "",
            );
        }
    };
    let age = now.duration_since(modified).unwrap_or_default();
    let figure = format_days(age);
    if age > MAX_SIGNING_KEY_AGE {
        Check::new(
            NAME,
            CheckStatus::Warn,
            format!(
                "signing key {kid} ({}) is older than {}: rotate it (add the new key first in signing.keys, keep the old one until its credentials expire)",
                path.display(),
                format_days(MAX_SIGNING_KEY_AGE)
            ),
            figure,
        )
    } else {
        Check::new(
            NAME,
            CheckStatus::Pass,
            format!("signing key {kid}, by its file's modification time"),
            figure,
        )
    }
}

/// `canary`: the revocation canary's last run. Passes when it saw the
/// revocation within the SLO; fails when it was slower, when the probe
/// failed, or when no run finished for three intervals (plus the probe's own
/// bound); warns before the first run.
pub fn canary_check(
    last: Option<&CanaryRun>,
    interval: Duration,
    slo: Duration,
    now_ms: u64,
) -> Check {
    const NAME: &str = "canary";
    let Some(run) = last else {
        return Check::new(
            NAME,
            CheckStatus::Warn,
            format!(
                "on; no probe finished yet (every {})",
                humantime::format_duration(interval)
            ),
            "",
        );
    };
    let ago = Duration::from_millis(now_ms.saturating_sub(run.at_ms));
    let ago_text = format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(ago.as_secs()))
    );
    let stale = interval * 3 + crate::canary::PROBE_TIMEOUT;
    let slo_text = humantime::format_duration(slo);
    if ago > stale {
        return Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "the last probe finished {ago_text}; one should finish every {}: the canary loop is stuck",
                humantime::format_duration(interval)
            ),
            "",
        );
    }
    match (&run.result, &run.report, &run.error) {
        (RunResult::Pass, Some(r), _) => Check::new(
            NAME,
            CheckStatus::Pass,
            format!(
                "revocation seen by Introspect in {} and by a Verifier in {}, within the SLO of {slo_text} (last probe {ago_text})",
                format_ms(r.introspect_lag),
                format_ms(r.verifier_lag)
            ),
            format_ms(r.revocation),
        ),
        (RunResult::Slow, Some(r), _) => Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "revocation took {} (Introspect {}, Verifier {}), over the SLO of {slo_text} ([canary] slo; last probe {ago_text})",
                format_ms(r.revocation),
                format_ms(r.introspect_lag),
                format_ms(r.verifier_lag)
            ),
            format_ms(r.revocation),
        ),
        (_, _, error) => Check::new(
            NAME,
            CheckStatus::Fail,
            format!(
                "the last probe failed ({ago_text}): {}",
                error.as_deref().unwrap_or("no report")
            ),
            "",
        ),
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The canary's settings and state, for its check.
#[derive(Debug, Clone)]
pub struct CanaryView {
    /// The loop's state.
    pub state: Arc<CanaryState>,
    /// How often it probes.
    pub interval: Duration,
    /// How soon a revocation must be visible.
    pub slo: Duration,
}

/// Everything `Admin.Diagnose` checks, over one broker's parts.
pub struct Diagnostics<S> {
    store: Arc<S>,
    bundles: Arc<TrustBundleSource>,
    /// The key that signs: (kid, file).
    signing_key: Option<(String, PathBuf)>,
    durability: Option<Durability>,
    clock: Arc<dyn Clock>,
    canary: Option<CanaryView>,
}

impl<S> std::fmt::Debug for Diagnostics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diagnostics")
            .field("signing_key", &self.signing_key)
            .field("durability", &self.durability)
            .field("canary", &self.canary.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: LeaseStore> Diagnostics<S> {
    /// Checks over `store`, the trust bundles in force and the signing key
    /// file (`signing_key`: kid and path of the first `signing.keys` entry);
    /// `durability` is the Redis store's, `None` for the embedded store.
    pub fn new(
        store: Arc<S>,
        bundles: Arc<TrustBundleSource>,
        signing_key: Option<(String, PathBuf)>,
        durability: Option<Durability>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            bundles,
            signing_key,
            durability,
            clock,
            canary: None,
        }
    }

    /// Adds the canary's check.
    #[must_use]
    pub fn with_canary(mut self, canary: Option<CanaryView>) -> Self {
        self.canary = canary;
        self
    }

    /// Runs every check, in a fixed order: store persistence, store eviction,
    /// clock skew, trust bundle expiry, signing key age, canary (when on). An
    /// unreachable store fails its three checks, naming the error.
    pub async fn run(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        match self.store.diagnose().await {
            Ok(d) => {
                let mut p = persistence_check(&d.persistence, self.durability);
                if d.persistence != Persistence::Embedded {
                    p.detail = format!("{}: {}", d.store, p.detail);
                }
                checks.push(p);
                checks.push(eviction_check(&d.eviction));
                checks.push(clock_check(d.clock.as_ref()));
            }
            Err(e) => {
                for name in ["store persistence", "store eviction", "clock skew"] {
                    checks.push(Check::new(
                        name,
                        CheckStatus::Fail,
                        format!("the store cannot be read: {e}"),
                        "",
                    ));
                }
            }
        }
        let now_ms = self.clock.now_ms();
        let now = UNIX_EPOCH + Duration::from_millis(now_ms);
        checks.push(bundle_expiry_check(&self.bundles.current(), now));
        match &self.signing_key {
            Some((kid, path)) => checks.push(signing_key_check(kid, path, now)),
            None => checks.push(Check::new(
                "signing key age",
                CheckStatus::Fail,
                "no signing key configured (signing.keys)",
                "",
            )),
        }
        if let Some(c) = &self.canary {
            checks.push(canary_check(
                c.state.last().as_ref(),
                c.interval,
                c.slo,
                now_ms,
            ));
        }
        checks
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    #[test]
    fn days_print_readably_at_every_scale() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(format_days(h(1)), "0.04 days (1h)");
        assert_eq!(format_days(h(12)), "0.50 days (12h)");
        assert_eq!(format_days(Duration::from_secs(5400)), "0.06 days (1h 30m)");
        assert_eq!(format_days(Duration::from_secs(600)), "0.01 days (10m)");
        assert_eq!(format_days(Duration::from_secs(30)), "0.00 days (30s)");
        assert_eq!(format_days(h(24)), "1.0 days");
        assert_eq!(format_days(h(24 * 365)), "365.0 days");
        assert_eq!(format_days(Duration::ZERO), "0.00 days (0s)");
        assert_eq!(format_ms(Duration::from_millis(34)), "34 ms");
        assert_eq!(format_ms(Duration::from_millis(12_340)), "12.3 s");
    }

    #[test]
    fn only_noeviction_passes_and_a_failure_names_the_setting() {
        let policy = |v: &str| Eviction::Policy {
            value: v.into(),
            source: "CONFIG GET",
        };
        assert_eq!(
            eviction_check(&policy("noeviction")).status,
            CheckStatus::Pass
        );
        assert_eq!(
            eviction_check(&policy(" noeviction\r")).status,
            CheckStatus::Pass
        );
        assert_eq!(eviction_check(&Eviction::Never).status, CheckStatus::Pass);
        for bad in [
            "allkeys-lru",
            "volatile-lru",
            "allkeys-lfu",
            "volatile-lfu",
            "allkeys-random",
            "volatile-random",
            "volatile-ttl",
            "",
        ] {
            let c = eviction_check(&policy(bad));
            assert_eq!(c.status, CheckStatus::Fail, "{bad}");
            assert!(c.detail.contains("maxmemory-policy"), "{}", c.detail);
            assert!(c.detail.contains(&format!("{bad:?}")), "{}", c.detail);
            assert!(
                c.detail.contains("noeviction"),
                "says what to set: {}",
                c.detail
            );
        }
        let unknown = eviction_check(&Eviction::Unknown("CONFIG GET refused (NOPERM)".into()));
        assert_eq!(unknown.status, CheckStatus::Fail);
        assert!(unknown.detail.contains("NOPERM") && unknown.detail.contains("maxmemory-policy"));
    }

    #[test]
    fn persistence_is_judged_with_the_durability() {
        let redis = |aof: bool, fsync: &str, save: Option<&str>| Persistence::Redis {
            appendonly: aof,
            appendfsync: fsync.into(),
            save: save.map(str::to_owned),
            source: "CONFIG GET",
        };
        let status = |p: &Persistence, d| persistence_check(p, d).status;
        assert_eq!(
            status(&redis(true, "always", Some("")), None),
            CheckStatus::Pass
        );
        assert_eq!(
            status(&redis(true, "everysec", Some("")), None),
            CheckStatus::Warn
        );
        assert_eq!(
            status(&redis(false, "everysec", Some("3600 1 300 100")), None),
            CheckStatus::Warn
        );
        let none = persistence_check(&redis(false, "everysec", Some("")), Some(Durability::None));
        assert_eq!(none.status, CheckStatus::Fail);
        assert!(none.detail.contains("appendonly yes"), "{}", none.detail);
        assert_eq!(
            status(
                &redis(false, "everysec", Some("")),
                Some(Durability::Replicas(2))
            ),
            CheckStatus::Warn
        );
        let dev = persistence_check(&Persistence::Embedded, None);
        assert_eq!(dev.status, CheckStatus::Warn);
        assert!(
            dev.passed() && dev.detail.contains("not persisted"),
            "{}",
            dev.detail
        );
    }

    #[test]
    fn clock_skew_fails_past_the_bound_beyond_the_round_trip() {
        let reading = |store_ms, sent_ms, received_ms| ClockReading {
            store_ms,
            sent_ms,
            received_ms,
        };
        let ok = clock_check(Some(&reading(10_003, 10_000, 10_002)));
        assert_eq!(
            (ok.status, ok.figure.as_str()),
            (CheckStatus::Pass, "+2 ms (±1 ms)")
        );
        let behind = clock_check(Some(&reading(9_000, 10_000, 10_000)));
        assert_eq!(behind.status, CheckStatus::Fail);
        assert!(
            behind.detail.contains("1000 ms behind"),
            "{}",
            behind.detail
        );
        // 700 ms off, but a 600 ms round trip leaves 300 ms of it uncertain.
        let slow = clock_check(Some(&reading(11_000, 10_000, 10_600)));
        assert_eq!(slow.status, CheckStatus::Pass, "{slow:?}");
        assert_eq!(clock_check(None).status, CheckStatus::Pass);
    }

    fn bundles(validity: Duration) -> TrustBundles {
        let ca = crate::identity::pki::DevCa::generate("acme.test", validity).unwrap();
        TrustBundles::from_pem([("acme.test", ca.cert_pem().as_bytes())]).unwrap()
    }

    #[test]
    fn bundle_expiry_prints_days_and_fails_when_short() {
        let now = SystemTime::now();
        let year = bundles(Duration::from_secs(365 * 86_400));
        let c = bundle_expiry_check(&year, now);
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        assert!(
            c.figure.ends_with(" days") && c.detail.contains("acme.test"),
            "{c:?}"
        );
        // Ten days left of a year-long CA: under seven days? No; five days: yes.
        let c = bundle_expiry_check(&year, now + Duration::from_secs(360 * 86_400));
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        assert!(c.detail.contains("rotate"), "{c:?}");
        // A one-hour CA, just made: a short-lived CA with most of its life left.
        let hour = bundles(Duration::from_secs(3600));
        let c = bundle_expiry_check(&hour, now);
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        assert!(
            c.figure.starts_with("0.0") && c.figure.contains('h'),
            "{c:?}"
        );
        let c = bundle_expiry_check(&hour, now + Duration::from_secs(7200));
        assert_eq!(
            (c.status, c.figure.as_str()),
            (CheckStatus::Fail, "expired")
        );
        let c = bundle_expiry_check(&TrustBundles::default(), now);
        assert_eq!(c.status, CheckStatus::Fail);
    }

    #[test]
    fn the_canary_check_follows_the_last_run() {
        use crate::canary::{CanaryError, ProbeReport, judge};
        let (interval, slo) = (Duration::from_secs(30), Duration::from_secs(2));
        let report = |ms| ProbeReport {
            task_id: "tk_1".into(),
            credential_id: "tk_1.c1".into(),
            begin: Duration::from_millis(4),
            complete: Duration::from_millis(3),
            introspect_lag: Duration::from_millis(5),
            verifier_lag: Duration::from_millis(ms),
            revocation: Duration::from_millis(ms),
        };
        let none = canary_check(None, interval, slo, 0);
        assert_eq!(none.status, CheckStatus::Warn);
        let pass = judge(Ok(report(12)), slo, 1_000_000);
        let c = canary_check(Some(&pass), interval, slo, 1_005_000);
        assert_eq!(
            (c.status, c.figure.as_str()),
            (CheckStatus::Pass, "12 ms"),
            "{c:?}"
        );
        assert!(
            c.detail.contains("5s ago") && c.detail.contains("SLO of 2s"),
            "{c:?}"
        );
        let slow = judge(Ok(report(2_500)), slo, 1_000_000);
        let c = canary_check(Some(&slow), interval, slo, 1_000_000);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("over the SLO of 2s"), "{c:?}");
        let failed = judge(
            Err(CanaryError::Complete("Unavailable".into())),
            slo,
            1_000_000,
        );
        let c = canary_check(Some(&failed), interval, slo, 1_000_000);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("complete task: Unavailable"), "{c:?}");
        // A loop that stopped finishing probes fails, however its last one went.
        let stale = 1_000_000 + 3 * 30_000 + 46_000;
        let c = canary_check(Some(&pass), interval, slo, stale);
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("stuck"), "{c:?}");
    }

    #[test]
    fn signing_key_age_warns_when_old_and_fails_when_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        let now = SystemTime::now();
        assert_eq!(signing_key_check("k1", &key, now).status, CheckStatus::Pass);
        let later = now + MAX_SIGNING_KEY_AGE + Duration::from_secs(86_400);
        let old = signing_key_check("k1", &key, later);
        assert_eq!(old.status, CheckStatus::Warn);
        assert!(
            old.detail.contains("rotate") && old.figure.starts_with("91."),
            "{old:?}"
        );
        let gone = signing_key_check("k1", &dir.path().join("missing.pem"), now);
        assert_eq!(gone.status, CheckStatus::Fail);
    }
}
