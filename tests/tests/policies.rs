//! Cedar policies at BeginTask, through the real gRPC edge on real Redis: the
//! example policies allow and deny (the time window with an injected clock), a
//! denial names its policy in the status and the audit trail and changes nothing
//! in the store, credentials carry their scope classes, and a bad policy edit
//! keeps the last good set.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_e2e::{
    BrokerOptions, REVIEW_TEMPLATE, RedisServer, TestBroker, eventually, example_file,
    example_policies, pb, review_request,
};
use tonic::Code;

/// Wednesday 2026-12-09 10:00 in Berlin (09:00Z).
const WED_1000_BERLIN: i64 = 1_796_806_800_000;
/// Saturday 2026-12-12 10:00 in Berlin.
const SAT_1000_BERLIN: i64 = 1_797_066_000_000;
/// Wednesday 2026-12-09 18:30 in Berlin (17:30Z: inside the window in UTC).
const WED_1830_BERLIN: i64 = 1_796_837_400_000;

/// The example templates belong to tenant `acme`: every test identity is an
/// `agent` of it unless a test says otherwise.
const ACME_AGENTS: &str = r#"[[actors.classes]]
name = "agent"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/*"]"#;

fn now_ms() -> i64 {
    i64::try_from(leash_broker::clock::SystemClock.now_ms()).unwrap()
}

use leash_broker::clock::Clock as _;

/// A broker on `redis` with the example templates and policies, whose clock
/// reads `at` (Unix ms) now, deciding `context.time` in Europe/Berlin.
async fn broker_at(redis: &RedisServer, at: i64, prefix: &str) -> TestBroker {
    broker_with(redis, at, prefix, String::new()).await
}

async fn broker_with(redis: &RedisServer, at: i64, prefix: &str, extra: String) -> TestBroker {
    let mut options = BrokerOptions::redis(redis);
    options.extra_toml = extra;
    options.templates = vec![
        // The harness's review template, moved into the examples' tenant.
        REVIEW_TEMPLATE.replacen("\nidentities:", "\ntenant: acme\nidentities:", 1),
        example_file("templates/github-pr-review.yaml"),
        example_file("templates/repo-cleanup.yaml"),
    ];
    options.policies = example_policies();
    options.policy_time_zone = "Europe/Berlin";
    options.clock_skew_ms = at - now_ms();
    options.actors_toml = Some(ACME_AGENTS.to_owned());
    TestBroker::start_with_pki(
        options,
        std::sync::Arc::new(leash_e2e::TestPki::new()),
        prefix,
    )
    .await
}

fn pr_review() -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "github-pr-review".into(),
        parameters: [("repo", "acme/widgets"), ("pr", "42")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..review_request()
    }
}

fn cleanup(ttl_s: Option<i64>) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "repo-cleanup".into(),
        parameters: [("repo", "sandbox/demo"), ("branch", "stale")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        requested_ttl: ttl_s.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        ..review_request()
    }
}

fn denied_by(status: &tonic::Status, policy: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("denied by policy \"{policy}\"")),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_scopes_only_on_weekdays_office_hours_in_the_configured_zone() {
    let redis = RedisServer::start();
    let weekday = broker_at(&redis, WED_1000_BERLIN, "wed").await;
    let mut agent = weekday.broker("agent/reviewer").await;
    agent.begin_task(pr_review()).await.expect("weekday 10:00");

    for (at, prefix) in [(SAT_1000_BERLIN, "sat"), (WED_1830_BERLIN, "evening")] {
        let broker = broker_at(&redis, at, prefix).await;
        let mut agent = broker.broker("agent/reviewer").await;
        let e = agent.begin_task(pr_review()).await.unwrap_err();
        denied_by(&e, "write-office-hours");
        assert!(e.message().contains("weekdays 09-18"), "{e:?}");
        // Reads are not bound to the window.
        agent.begin_task(review_request()).await.expect("read-only");
        broker.stop().await;
    }
    weekday.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destructive_scopes_need_a_short_lease_and_a_denial_changes_nothing() {
    let redis = RedisServer::start();
    let broker = broker_at(&redis, SAT_1000_BERLIN, "leash").await;
    let mut agent = broker.broker("agent/cleaner").await;

    // Allowed: low sensitivity, 30 s default lease, mTLS, class not a partner.
    let begun = agent
        .begin_task(cleanup(None))
        .await
        .expect("destructive within bounds")
        .into_inner();
    // The example template gates its grant behind a person's approval
    // (`while_pending: issue_none`): nothing is issued until a human approves.
    assert_eq!(begun.state, pb::LeaseState::PendingApproval as i32);
    assert!(begun.credentials.is_empty(), "{begun:?}");
    broker
        .admin("human/ops")
        .await
        .approve(pb::DecideApprovalRequest {
            task_id: begun.task_id.clone(),
            reason: "sandbox cleanup, fine".into(),
        })
        .await
        .unwrap();
    let renewed = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let jwt = &renewed.credentials[0].value;
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["scope_classes"],
        serde_json::json!({
            "repo:sandbox/demo:read": "read",
            "branch:sandbox/demo:stale:delete": "destructive",
        })
    );
    let mut verifier = broker.verifier("resource/api").await;
    let answer = verifier
        .introspect(pb::IntrospectRequest { token: jwt.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.active);
    assert_eq!(
        answer
            .scope_classes
            .get("branch:sandbox/demo:stale:delete")
            .map(String::as_str),
        Some("destructive")
    );
    assert_eq!(
        answer
            .scope_classes
            .get("repo:sandbox/demo:read")
            .map(String::as_str),
        Some("read")
    );

    // Denied: a 2 minute lease. Nothing is written, the audit trail names the policy.
    let before = redis.dump_state();
    let e = agent.begin_task(cleanup(Some(120))).await.unwrap_err();
    denied_by(&e, "destructive-low-short");
    assert_eq!(
        redis.dump_state(),
        before,
        "a denied begin changed the store"
    );
    let logged = eventually(Duration::from_secs(5), || async {
        leash_e2e::logs().lines().any(|l| {
            l.contains("task.denied")
                && l.contains("spiffe://acme.test/agent/cleaner")
                && l.contains("destructive-low-short")
        })
    })
    .await;
    assert!(logged.is_some(), "no audit event naming the policy");
    agent
        .begin_task(cleanup(Some(60)))
        .await
        .expect("60 s is the bound");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_edit_keeps_the_last_good_set() {
    let redis = RedisServer::start();
    let broker = broker_at(&redis, WED_1000_BERLIN, "leash").await;
    let mut agent = broker.broker("agent/reviewer").await;
    agent.begin_task(pr_review()).await.expect("allowed");

    // A broken forbid-everything edit: refused and logged; the old set serves.
    let path = broker.policies_dir().join("00-baseline.cedar");
    std::fs::write(
        &path,
        "@id(\"baseline-permit\")\nforbid (principal, action,\n",
    )
    .unwrap();
    let reported = eventually(Duration::from_secs(5), || async {
        leash_e2e::logs().contains("policies not reloaded")
    })
    .await;
    assert!(reported.is_some(), "bad edit not reported");
    assert!(
        leash_e2e::logs().contains("00-baseline.cedar:2"),
        "no file:line in the log"
    );
    agent.begin_task(pr_review()).await.expect("last good set");

    // A good edit that drops the permit: default deny, naming no policy.
    std::fs::write(&path, "// no permit any more\n").unwrap();
    let denied = eventually(Duration::from_secs(5), || async {
        let mut a = broker.broker("agent/reviewer").await;
        matches!(a.begin_task(review_request()).await, Err(e)
            if e.code() == Code::PermissionDenied && e.message().contains("default deny"))
    })
    .await;
    assert!(denied.is_some(), "the new set was not installed");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svid_callers_never_get_destructive_scopes() {
    const AUDIENCE: &str = "spiffe://acme.test/leash";
    let redis = RedisServer::start();
    let authority = leash_e2e::JwtSvidAuthority::new();
    let bundles = tempfile::tempdir().unwrap();
    let port = leash_e2e::free_port();
    let section = authority.section(bundles.path(), port, AUDIENCE);
    let broker = broker_with(&redis, SAT_1000_BERLIN, "leash", section).await;
    let mut jwt = pb::broker_client::BrokerClient::new(broker.jwt_svid_channel(port).await);
    let bearer = |body: pb::BeginTaskRequest| {
        let mut request = tonic::Request::new(body);
        let token = authority.token("agent/cleaner", AUDIENCE);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let e = jwt.begin_task(bearer(cleanup(None))).await.unwrap_err();
    denied_by(&e, "jwt-svid-no-destructive");
    // The same caller may read over a JWT-SVID; over mTLS the cleanup is allowed.
    jwt.begin_task(bearer(review_request()))
        .await
        .expect("read-only over a JWT-SVID");
    let mut mtls = broker.broker("agent/cleaner").await;
    mtls.begin_task(cleanup(None)).await.expect("over mTLS");
    broker.stop().await;
}

/// Partner classes never get destructive scopes: the policy sees the class the
/// caller's SPIFFE ID maps to (`[[actors.classes]]`), through the real edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_classes_never_get_destructive_scopes() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates = vec![example_file("templates/repo-cleanup.yaml")];
    options.policies = example_policies();
    options.policy_time_zone = "Europe/Berlin";
    options.clock_skew_ms = SAT_1000_BERLIN - now_ms();
    options.actors_toml = Some(format!(
        r#"[[actors.classes]]
name = "partner-globex"
tenant = "acme"
owner = "partners@acme.test"
identities = ["spiffe://acme.test/agent/partner/*"]

{}"#,
        ACME_AGENTS
    ));
    let broker = TestBroker::start(options).await;
    let mut partner = broker.broker("agent/partner/globex").await;
    let before = redis.dump_state();
    let e = partner.begin_task(cleanup(None)).await.unwrap_err();
    denied_by(&e, "partner-no-destructive");
    assert_eq!(
        redis.dump_state(),
        before,
        "a denied begin changed the store"
    );
    // The same request from an identity of another class is allowed.
    let mut agent = broker.broker("agent/cleaner").await;
    agent
        .begin_task(cleanup(None))
        .await
        .expect("a non-partner class within the bounds");
    broker.stop().await;
}
