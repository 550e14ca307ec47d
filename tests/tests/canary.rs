//! The revocation canary and `Admin.Diagnose` (issue 9), end to end through
//! the real gRPC edge, mTLS and (where it matters) a real `redis-server`:
//!
//! - with `[canary] enabled = true` the broker's own loop begins a task on the
//!   canary template, checks its credential through Introspect and an SDK
//!   Verifier, completes it, and Diagnose reports the run as passed with its
//!   figure, and its metrics are on `/metrics`;
//! - an SLO no revocation can meet (1 ms) makes the canary check fail, naming
//!   the SLO;
//! - a canary whose template is not loaded stops the broker at start;
//! - Diagnose is for admins only, and on Redis it reads the settings fresh:
//!   an eviction policy switched under a running broker fails the check,
//!   naming `maxmemory-policy`, and a replica clock 2 s off fails the skew check.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{sync::Arc, time::Duration};

use leash_broker::cli::dev::{CANARY_AUDIENCE, CANARY_TEMPLATE};
use leash_e2e::{BrokerOptions, REVIEW_TEMPLATE, RedisServer, TestBroker, TestPki, eventually, pb};
use tonic::Code;

const ADMIN: &str = "admin/ops";

fn canary_template() -> String {
    CANARY_TEMPLATE
        .replace("{td}", "acme.test")
        .replace("{audience}", CANARY_AUDIENCE)
}

/// A broker with the canary on (every `interval`, against `slo`), the canary
/// template loaded, the canary a verifier caller of its audience, and
/// `admin/ops` an admin.
async fn canary_broker(interval: &str, slo: &str) -> TestBroker {
    let pki = Arc::new(TestPki::new());
    let canary = pki.svid("canary/leash");
    let mut options = BrokerOptions::memory();
    options.templates = vec![REVIEW_TEMPLATE.to_owned(), canary_template()];
    options.verifier_toml = Some(format!(
        "callers = [{{ identity = \"{}\", audiences = [\"{CANARY_AUDIENCE}\"] }}]",
        canary.id
    ));
    options.extra_toml = format!(
        "[admin]\ncallers = [\"spiffe://acme.test/{ADMIN}\"]\n[canary]\nenabled = true\ninterval = \"{interval}\"\nslo = \"{slo}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        canary.cert.display(),
        canary.key.display()
    );
    TestBroker::start_with_pki(options, pki, "leash").await
}

async fn diagnose(broker: &TestBroker) -> Vec<pb::DiagnosticCheck> {
    broker
        .admin(ADMIN)
        .await
        .diagnose(pb::DiagnoseRequest {})
        .await
        .unwrap()
        .into_inner()
        .checks
}

fn find<'a>(checks: &'a [pb::DiagnosticCheck], name: &str) -> &'a pb::DiagnosticCheck {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:#?}"))
}

/// Waits (bounded) until the canary check satisfies `done`, and returns it.
async fn canary_check_when(
    broker: &TestBroker,
    done: impl Fn(&pb::DiagnosticCheck) -> bool,
) -> pb::DiagnosticCheck {
    let seen = std::sync::Mutex::new(None);
    let ok = eventually(Duration::from_secs(60), || async {
        let checks = diagnose(broker).await;
        let c = find(&checks, "canary").clone();
        let hit = done(&c);
        *seen.lock().unwrap() = Some(c);
        hit
    })
    .await;
    let last = seen.into_inner().unwrap();
    assert!(
        ok.is_some(),
        "the canary check never came out as expected: {last:#?}"
    );
    last.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_canary_loop_runs_and_diagnose_reports_it_passed() {
    let broker = canary_broker("200ms", "5s").await;
    let c = canary_check_when(&broker, |c| c.passed && !c.warning).await;
    assert!(
        c.detail.contains("within the SLO of 5s")
            && c.detail.contains("Introspect")
            && c.detail.contains("Verifier"),
        "{c:#?}"
    );
    assert!(
        c.figure.ends_with(" ms") || c.figure.ends_with(" s"),
        "{c:#?}"
    );

    // Its tasks were completed by the probe, as the canary identity.
    let mut admin = broker.admin(ADMIN).await;
    let tasks = admin
        .list_tasks(pb::ListTasksRequest {
            template: "leash-canary".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(!tasks.is_empty());
    assert!(
        tasks
            .iter()
            .all(|t| t.owner == "spiffe://acme.test/canary/leash"),
        "{tasks:#?}"
    );
    let completed = i32::from(pb::LeaseState::Completed);
    assert!(tasks.iter().any(|t| t.state == completed), "{tasks:#?}");

    // The metrics, on the ops port's /metrics.
    let (code, metrics) = leash_e2e::http_get(broker.ops_addr, "/metrics").await;
    assert_eq!(code, 200, "{metrics}");
    for want in [
        "leash_canary_revocation_seconds_bucket",
        "leash_canary_runs_total{result=\"pass\"}",
        "leash_canary_last_run_timestamp_seconds",
        "leash_canary_pass",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }

    // The rest of Diagnose on the embedded store.
    let checks = diagnose(&broker).await;
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "store persistence",
            "store eviction",
            "clock skew",
            "trust bundle expiry",
            "signing key age",
            "canary"
        ]
    );
    let persistence = find(&checks, "store persistence");
    assert!(
        persistence.passed && persistence.warning,
        "{persistence:#?}"
    );
    // The test CA lives an hour: a short-lived CA with most of its life left.
    let bundle = find(&checks, "trust bundle expiry");
    assert!(bundle.passed, "{bundle:#?}");
    assert!(
        bundle.figure.starts_with("0.0") && bundle.figure.contains("days ("),
        "{bundle:#?}"
    );

    // Admins only.
    let refused = broker
        .admin("agent/a")
        .await
        .diagnose(pb::DiagnoseRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_canary_over_its_slo_fails_the_check() {
    // No revocation is seen within a millisecond of sending CompleteTask: the
    // completion's own round trip takes longer.
    let broker = canary_broker("100ms", "1ms").await;
    let c = canary_check_when(&broker, |c| !c.passed && c.detail.contains("over the SLO")).await;
    assert!(
        c.detail.contains("SLO of 1ms") && c.detail.contains("[canary] slo"),
        "{c:#?}"
    );
    assert!(
        !c.figure.is_empty(),
        "the measured time is the figure: {c:#?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_canary_without_its_template_stops_the_broker_at_start() {
    let pki = Arc::new(TestPki::new());
    let canary = pki.svid("canary/leash");
    let mut options = BrokerOptions::memory();
    options.extra_toml = format!(
        "[canary]\nenabled = true\ntemplate = \"no-such-canary\"\ncert = \"{}\"\nkey = \"{}\"\n",
        canary.cert.display(),
        canary.key.display()
    );
    let broker = TestBroker::start_with_pki(options, pki, "leash").await;
    let err = broker.ended(Duration::from_secs(20)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("canary.template") && text.contains("no-such-canary"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn diagnose_reads_redis_settings_fresh_and_judges_them() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.extra_toml = format!("[admin]\ncallers = [\"spiffe://acme.test/{ADMIN}\"]\n");
    let broker = TestBroker::start(options).await;
    let checks = diagnose(&broker).await;
    for name in ["store persistence", "store eviction", "clock skew"] {
        let c = find(&checks, name);
        assert!(c.passed && !c.warning, "{c:#?}");
    }
    assert!(
        find(&checks, "store persistence")
            .detail
            .starts_with("redis 7."),
        "{checks:#?}"
    );
    assert_eq!(find(&checks, "store eviction").figure, "noeviction");
    assert!(
        checks.iter().all(|c| c.name != "canary"),
        "canary off: no check"
    );

    assert_eq!(
        redis.command("CONFIG SET maxmemory-policy volatile-lru"),
        "+OK"
    );
    let checks = diagnose(&broker).await;
    let eviction = find(&checks, "store eviction");
    assert!(!eviction.passed, "{eviction:#?}");
    assert!(
        eviction
            .detail
            .contains("maxmemory-policy is \"volatile-lru\""),
        "{eviction:#?}"
    );
    broker.stop().await;

    // A replica whose clock is 2 s ahead of Redis's.
    let mut options = BrokerOptions::redis(&redis);
    options.extra_toml = format!("[admin]\ncallers = [\"spiffe://acme.test/{ADMIN}\"]\n");
    options.clock_skew_ms = 2_000;
    assert_eq!(
        redis.command("CONFIG SET maxmemory-policy noeviction"),
        "+OK"
    );
    let broker = TestBroker::start(options).await;
    let checks = diagnose(&broker).await;
    let skew = find(&checks, "clock skew");
    assert!(!skew.passed, "{skew:#?}");
    assert!(
        skew.detail.contains("behind") && skew.detail.contains("NTP"),
        "{skew:#?}"
    );
    assert!(
        skew.figure.starts_with("-19") || skew.figure.starts_with("-20"),
        "{skew:#?}"
    );
    broker.stop().await;
}
