//! The revocation canary: proof, measured end to end, that a revocation
//! reaches resource servers in time.
//!
//! One [`probe`] acts as an agent and as a resource server at once, through
//! the same public paths real ones use (the SDK, mTLS, the Verifier service):
//!
//! 1. begins a task on the canary template and takes its JWT credential;
//! 2. checks the credential is active through `Introspect`, and accepted by an
//!    SDK [`Verifier`] checking it offline while watching the revocation
//!    stream;
//! 3. completes the task;
//! 4. polls both until `Introspect` answers inactive and the `Verifier`
//!    refuses the token as revoked, within [`REVOCATION_WAIT`] (or the SLO if
//!    longer).
//!
//! The result is a [`ProbeReport`] of the latencies, or a [`CanaryError`]
//! naming the step that failed. [`CanaryLoop`] runs a probe every
//! `[canary] interval` inside the broker, judges it against `[canary] slo`,
//! records it in [`CanaryMetrics`] and keeps the last run in [`CanaryState`]
//! for `Admin.Diagnose`; `leash doctor` runs one probe from the command line.
//!
//! The canary's identity needs what any agent and resource server need: a
//! class (`[[actors.classes]]`), the template's `identities`, and a
//! `[verifier] callers` entry for the canary template's audience.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use leash_proto::v1::{self as pb, verifier_client::VerifierClient};
use leash_sdk::{
    CredentialKind, Outcome, RetryPolicy, TaskRequest,
    verifier::{Verifier, VerifierConfig, VerifyError},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::{
    cli::client::{self, ClientFiles},
    clock::Clock,
};

/// How long a probe waits, after completing its task, for both Introspect
/// and the Verifier to refuse the credential (or the SLO, if longer).
pub const REVOCATION_WAIT: Duration = Duration::from_secs(10);
/// How often a probe polls while it waits.
pub const POLL: Duration = Duration::from_millis(5);
/// Most one probe may take in all (connecting, beginning, the Verifier's
/// first snapshot, the wait); past it the probe counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(45);

/// Why a probe failed, by step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CanaryError {
    /// The canary's SVID, key or bundle files are unusable, or the broker
    /// cannot be reached with them.
    #[error("connect: {0}")]
    Connect(String),
    /// BeginTask on the canary template was refused or failed.
    #[error("begin task: {0}")]
    Begin(String),
    /// The canary template yielded no JWT credential (it needs one: the
    /// Verifier checks JWTs).
    #[error(
        "begin task: the template issued no JWT credential; the canary template needs one jwt grant"
    )]
    NoJwt,
    /// The Verifier could not start (JWK Set or first revocation snapshot).
    #[error("verifier: {0}")]
    Verifier(String),
    /// Introspect failed, or answered inactive before the task completed.
    #[error("introspect: {0}")]
    Introspect(String),
    /// The Verifier refused the fresh credential before the task completed.
    #[error("verify: the Verifier refused the fresh credential: {0}")]
    Verify(String),
    /// CompleteTask failed.
    #[error("complete task: {0}")]
    Complete(String),
    /// The revocation was not seen by both within the wait.
    #[error("revocation not seen within {}: {which}", humantime::format_duration(*.waited))]
    NotRevoked {
        /// How long the probe waited.
        waited: Duration,
        /// Which of Introspect and the Verifier still accepted the credential.
        which: String,
    },
    /// The whole probe took longer than [`PROBE_TIMEOUT`].
    #[error(
        "the probe took longer than {}",
        humantime::format_duration(PROBE_TIMEOUT)
    )]
    Timeout,
}

impl CanaryError {
    /// The step that failed: `connect`, `begin`, `verifier`, `introspect`,
    /// `verify`, `complete`, `revocation` or `timeout`.
    pub fn step(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Begin(_) | Self::NoJwt => "begin",
            Self::Verifier(_) => "verifier",
            Self::Introspect(_) => "introspect",
            Self::Verify(_) => "verify",
            Self::Complete(_) => "complete",
            Self::NotRevoked { .. } => "revocation",
            Self::Timeout => "timeout",
        }
    }
}

/// Where and as whom a probe runs.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The broker's agent address, `https://host:port`.
    pub broker: String,
    /// PEM bundle the broker's serving certificate must chain to.
    pub ca: PathBuf,
    /// The canary's X509-SVID (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The canary template.
    pub template: String,
    /// How long to wait for the revocation to be seen (at least
    /// [`REVOCATION_WAIT`] is sensible).
    pub wait: Duration,
}

/// The figures of one probe that went through every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The task begun (completed by the probe).
    pub task_id: String,
    /// The credential checked (its id, never its value).
    pub credential_id: String,
    /// How long BeginTask took.
    pub begin: Duration,
    /// How long CompleteTask took.
    pub complete: Duration,
    /// From sending CompleteTask until Introspect answered inactive.
    pub introspect_lag: Duration,
    /// From sending CompleteTask until the Verifier refused the token as revoked.
    pub verifier_lag: Duration,
    /// From sending CompleteTask until both refused it: what the SLO bounds.
    pub revocation: Duration,
}

fn text(e: &dyn std::error::Error) -> String {
    client::error_chain(e)
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// The `iss` of a JWT (not verified here: the Verifier checks it against this).
fn issuer_of(jwt: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// The leaf certificate (DER) of a PEM chain, for the token's `cnf` binding.
fn leaf_der(path: &std::path::Path) -> Result<Vec<u8>, CanaryError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CanaryError::Connect(format!("{}: {e}", path.display())))?;
    pem::parse_many(&bytes)
        .ok()
        .and_then(|blocks| blocks.into_iter().find(|b| b.tag() == "CERTIFICATE"))
        .map(|b| b.into_contents())
        .ok_or_else(|| CanaryError::Connect(format!("{}: no CERTIFICATE block", path.display())))
}

async fn introspect(
    verifier: &mut VerifierClient<Channel>,
    token: &str,
) -> Result<bool, CanaryError> {
    verifier
        .introspect(pb::IntrospectRequest {
            token: token.to_owned(),
        })
        .await
        .map(|r| r.into_inner().active)
        .map_err(|s| CanaryError::Introspect(status_text(&s)))
}

/// Runs one probe against `target` (see the module docs). The task it begins
/// is completed in every case: by the probe, or, when a step fails first, by
/// the SDK's task guard as it is dropped.
///
/// # Errors
/// [`CanaryError`] naming the first step that failed; never more than
/// [`PROBE_TIMEOUT`] after the call.
pub async fn probe(target: &ProbeTarget) -> Result<ProbeReport, CanaryError> {
    match tokio::time::timeout(PROBE_TIMEOUT, probe_steps(target)).await {
        Ok(r) => r,
        Err(_) => Err(CanaryError::Timeout),
    }
}

async fn probe_steps(target: &ProbeTarget) -> Result<ProbeReport, CanaryError> {
    let files = ClientFiles {
        bundle: &target.ca,
        cert: &target.cert,
        key: &target.key,
    };
    let channel = client::connect(&target.broker, &files)
        .await
        .map_err(|e| CanaryError::Connect(text(&e)))?;
    let cert_der = leaf_der(&target.cert)?;
    // No retries: a probe reports what an agent's first attempt meets.
    let agent = leash_sdk::Client::builder()
        .broker(target.broker.clone())
        .svid_files(target.cert.clone(), target.key.clone())
        .bundle_file(target.ca.clone())
        .retry(RetryPolicy::never())
        .connect()
        .await
        .map_err(|e| CanaryError::Connect(text(&e)))?;

    let started = Instant::now();
    let task = agent
        .begin_task(
            TaskRequest::new(target.template.clone()).intent("leash canary: revocation probe"),
        )
        .await
        .map_err(|e| CanaryError::Begin(text(&e)))?;
    let begin = started.elapsed();
    let task_id = task.id().to_owned();
    let credential = task
        .credentials()
        .iter()
        .find(|c| c.kind() == CredentialKind::Jwt)
        .cloned()
        .ok_or(CanaryError::NoJwt)?;
    let token = credential.secret().to_owned();
    let issuer = issuer_of(&token).ok_or_else(|| {
        CanaryError::Verify("the JWT credential has no readable iss claim".to_owned())
    })?;

    let mut resource = VerifierClient::new(channel.clone());
    if !introspect(&mut resource, &token).await? {
        return Err(CanaryError::Introspect(format!(
            "the fresh credential reads as inactive: is the canary's identity a [verifier] callers entry for audience {:?}?",
            credential.audience()
        )));
    }
    let verifier = Verifier::connect(channel, VerifierConfig::new(credential.audience(), issuer))
        .await
        .map_err(|e| CanaryError::Verifier(text(&e)))?;
    verifier
        .verify(&token, None, Some(&cert_der))
        .map_err(|e| CanaryError::Verify(e.to_string()))?;

    let completed = Instant::now();
    task.complete(Outcome::Succeeded, "leash canary probe")
        .await
        .map_err(|e| CanaryError::Complete(text(&e)))?;
    let complete = completed.elapsed();

    let mut introspect_lag = None;
    let mut verifier_lag = None;
    loop {
        if verifier_lag.is_none()
            && matches!(
                verifier.verify(&token, None, Some(&cert_der)),
                Err(VerifyError::Revoked)
            )
        {
            verifier_lag = Some(completed.elapsed());
        }
        if introspect_lag.is_none() && !introspect(&mut resource, &token).await? {
            introspect_lag = Some(completed.elapsed());
        }
        if let (Some(introspect_lag), Some(verifier_lag)) = (introspect_lag, verifier_lag) {
            return Ok(ProbeReport {
                task_id: task_id.clone(),
                credential_id: credential.id().to_owned(),
                begin,
                complete,
                introspect_lag,
                verifier_lag,
                revocation: introspect_lag.max(verifier_lag),
            });
        }
        if completed.elapsed() > target.wait {
            let which = match (introspect_lag, verifier_lag) {
                (None, None) => "Introspect still answers active and the Verifier still accepts it",
                (None, Some(_)) => "Introspect still answers active",
                _ => "the Verifier still accepts it (no revocation arrived on the stream)",
            };
            return Err(CanaryError::NotRevoked {
                waited: target.wait,
                which: which.to_owned(),
            });
        }
        // Measurement, not waiting for a state: the poll interval bounds the
        // resolution of the figures.
        tokio::time::sleep(POLL).await;
    }
}

/// How one canary run came out against the SLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunResult {
    /// Every step passed and the revocation was seen within the SLO.
    Pass,
    /// Every step passed, but the revocation took longer than the SLO.
    Slow,
    /// A step failed.
    Error,
}

impl EncodeLabelValue for RunResult {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl RunResult {
    /// `pass`, `slow` or `error` (the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Slow => "slow",
            Self::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RunLabels {
    result: RunResult,
}

/// One finished canary run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryRun {
    /// When it finished (Unix ms, the broker's clock).
    pub at_ms: u64,
    /// How it came out.
    pub result: RunResult,
    /// Its figures, unless a step failed.
    pub report: Option<ProbeReport>,
    /// The failed step's error, if one failed.
    pub error: Option<String>,
}

/// Judges a probe against `slo`: pass, slow, or error.
pub fn judge(outcome: Result<ProbeReport, CanaryError>, slo: Duration, at_ms: u64) -> CanaryRun {
    match outcome {
        Ok(report) => CanaryRun {
            at_ms,
            result: if report.revocation <= slo {
                RunResult::Pass
            } else {
                RunResult::Slow
            },
            report: Some(report),
            error: None,
        },
        Err(e) => CanaryRun {
            at_ms,
            result: RunResult::Error,
            report: None,
            error: Some(e.to_string()),
        },
    }
}

/// The canary's metrics. Cheap to clone; clones share the values.
#[derive(Debug, Clone)]
pub struct CanaryMetrics {
    /// Seconds from completion until Introspect and the Verifier both refuse.
    revocation: Histogram,
    /// 1 if the last run passed, else 0.
    pass: Gauge,
    /// Runs by result.
    runs: Family<RunLabels, Counter>,
    /// When the last run finished (Unix seconds).
    last_run: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for CanaryMetrics {
    fn default() -> Self {
        Self {
            // 5 ms to about 10 s.
            revocation: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            pass: Gauge::default(),
            runs: Family::default(),
            last_run: Gauge::default(),
        }
    }
}

impl CanaryMetrics {
    /// Registers `leash_canary_revocation_seconds` (histogram),
    /// `leash_canary_pass` (gauge: 1 pass, 0 slow or failed),
    /// `leash_canary_runs` (counter by `result` = pass | slow | error; exposed
    /// as `leash_canary_runs_total`) and
    /// `leash_canary_last_run_timestamp_seconds` (gauge) in `registry`, by
    /// these full names (register in a registry without a prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "leash_canary_revocation_seconds",
            "Time from a canary task's completion until Introspect and an SDK Verifier both refuse its credential",
            self.revocation.clone(),
        );
        registry.register(
            "leash_canary_pass",
            "1 if the last canary run saw the revocation within the SLO, else 0",
            self.pass.clone(),
        );
        registry.register(
            "leash_canary_runs",
            "Canary runs by result: pass, slow (over the SLO) or error (a step failed)",
            self.runs.clone(),
        );
        registry.register(
            "leash_canary_last_run_timestamp_seconds",
            "When the last canary run finished, Unix seconds",
            self.last_run.clone(),
        );
    }

    /// Records one run.
    pub fn record(&self, run: &CanaryRun) {
        if let Some(r) = &run.report {
            self.revocation.observe(r.revocation.as_secs_f64());
        }
        self.pass.set(i64::from(run.result == RunResult::Pass));
        self.runs
            .get_or_create(&RunLabels { result: run.result })
            .inc();
        // Unix ms to seconds: exact enough for a timestamp gauge.
        #[expect(
            clippy::cast_precision_loss,
            reason = "ms since 1970 fit f64's 53 bits"
        )]
        self.last_run.set(run.at_ms as f64 / 1000.0);
    }

    /// The count of runs with `result` so far (for tests and diagnostics).
    pub fn runs(&self, result: RunResult) -> u64 {
        self.runs.get_or_create(&RunLabels { result }).get()
    }

    /// The `leash_canary_pass` value.
    pub fn pass(&self) -> i64 {
        self.pass.get()
    }
}

/// The canary's last run, readable while the loop runs (by Admin.Diagnose).
#[derive(Debug)]
pub struct CanaryState {
    last: watch::Sender<Option<CanaryRun>>,
}

impl Default for CanaryState {
    fn default() -> Self {
        Self {
            last: watch::Sender::new(None),
        }
    }
}

impl CanaryState {
    /// The last finished run; `None` before the first.
    pub fn last(&self) -> Option<CanaryRun> {
        self.last.borrow().clone()
    }

    /// A receiver that sees every new last run.
    pub fn subscribe(&self) -> watch::Receiver<Option<CanaryRun>> {
        self.last.subscribe()
    }

    fn set(&self, run: CanaryRun) {
        self.last.send_replace(Some(run));
    }
}

/// The canary loop: a probe every `interval`, judged against `slo`, recorded
/// in its metrics and state; errors are logged and the loop goes on.
pub struct CanaryLoop {
    target: ProbeTarget,
    interval: Duration,
    slo: Duration,
    clock: Arc<dyn Clock>,
    metrics: CanaryMetrics,
    state: Arc<CanaryState>,
}

impl std::fmt::Debug for CanaryLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanaryLoop")
            .field("target", &self.target)
            .field("interval", &self.interval)
            .field("slo", &self.slo)
            .finish_non_exhaustive()
    }
}

impl CanaryLoop {
    /// A loop probing `target` every `interval` against `slo`; `clock` dates
    /// the runs.
    pub fn new(
        target: ProbeTarget,
        interval: Duration,
        slo: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            target,
            interval,
            slo,
            clock,
            metrics: CanaryMetrics::default(),
            state: Arc::new(CanaryState::default()),
        }
    }

    /// Its metrics, to register with [`CanaryMetrics::register`].
    pub fn metrics(&self) -> &CanaryMetrics {
        &self.metrics
    }

    /// Its last-run state, shared with whoever reports it.
    pub fn state(&self) -> Arc<CanaryState> {
        Arc::clone(&self.state)
    }

    /// The last run (as [`CanaryState::last`]).
    pub fn last(&self) -> Option<CanaryRun> {
        self.state.last()
    }

    /// Probes at once, then every `interval` (measured from the end of each
    /// probe), until `stop` turns true or its sender is dropped; a probe in
    /// flight is abandoned at stop (its task then completes as its guard is
    /// dropped, or expires).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let outcome = tokio::select! {
                r = probe(&self.target) => r,
                _ = stop.changed() => return,
            };
            let run = judge(outcome, self.slo, self.clock.now_ms());
            self.metrics.record(&run);
            match (&run.result, &run.report, &run.error) {
                (RunResult::Pass, Some(r), _) => tracing::debug!(
                    revocation_ms = duration_ms(r.revocation),
                    task_id = %r.task_id,
                    "canary passed"
                ),
                (RunResult::Slow, Some(r), _) => tracing::warn!(
                    revocation_ms = duration_ms(r.revocation),
                    introspect_ms = duration_ms(r.introspect_lag),
                    verifier_ms = duration_ms(r.verifier_lag),
                    slo_ms = duration_ms(self.slo),
                    "canary: revocation slower than the SLO"
                ),
                (_, _, error) => tracing::warn!(
                    error = error.as_deref().unwrap_or(""),
                    "canary probe failed"
                ),
            }
            self.state.set(run);
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ms: u64) -> ProbeReport {
        ProbeReport {
            task_id: "tk_1".into(),
            credential_id: "cr_1".into(),
            begin: Duration::from_millis(3),
            complete: Duration::from_millis(2),
            introspect_lag: Duration::from_millis(ms / 2),
            verifier_lag: Duration::from_millis(ms),
            revocation: Duration::from_millis(ms),
        }
    }

    #[test]
    fn runs_are_judged_against_the_slo_and_counted() {
        let slo = Duration::from_millis(100);
        let metrics = CanaryMetrics::default();
        let pass = judge(Ok(report(40)), slo, 1_000);
        assert_eq!(pass.result, RunResult::Pass);
        metrics.record(&pass);
        assert_eq!((metrics.pass(), metrics.runs(RunResult::Pass)), (1, 1));
        let slow = judge(Ok(report(150)), slo, 2_000);
        assert_eq!(slow.result, RunResult::Slow);
        metrics.record(&slow);
        assert_eq!((metrics.pass(), metrics.runs(RunResult::Slow)), (0, 1));
        let failed = judge(
            Err(CanaryError::Begin("PermissionDenied: no".into())),
            slo,
            3_000,
        );
        assert_eq!(failed.result, RunResult::Error);
        assert!(
            failed
                .error
                .as_deref()
                .unwrap_or("")
                .starts_with("begin task:")
        );
        metrics.record(&failed);
        assert_eq!((metrics.pass(), metrics.runs(RunResult::Error)), (0, 1));

        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        for line in [
            "leash_canary_pass 0",
            "leash_canary_runs_total{result=\"slow\"} 1",
            "leash_canary_revocation_seconds_count 2",
            "leash_canary_last_run_timestamp_seconds 3.0",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn errors_name_their_step() {
        assert_eq!(CanaryError::NoJwt.step(), "begin");
        let e = CanaryError::NotRevoked {
            waited: Duration::from_secs(10),
            which: "Introspect still answers active".into(),
        };
        assert_eq!(e.step(), "revocation");
        assert_eq!(
            e.to_string(),
            "revocation not seen within 10s: Introspect still answers active"
        );
    }

    #[test]
    fn the_issuer_is_read_from_the_token() {
        use base64::Engine as _;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            enc("{}"),
            enc(r#"{"iss":"https://leash.dev","task_id":"tk_9"}"#)
        );
        assert_eq!(issuer_of(&jwt).as_deref(), Some("https://leash.dev"));
        assert_eq!(issuer_of("not a jwt"), None);
    }
}
