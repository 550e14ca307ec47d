//! Actor classes, tenants, class limits and quotas (issue 7), end to end on a
//! real `redis-server` through the real gRPC edge.
//!
//! - an identity no actor class matches is denied, saying so;
//! - a tenant's callers reach nothing of another tenant's: a table of every
//!   RPC against a foreign task and its tokens, all refused or inactive, and
//!   the store unchanged afterwards;
//! - a class's TTL ceiling and live-task limits;
//! - a begin rate shared by two replicas: one identity over it gets
//!   RESOURCE_EXHAUSTED with `retry-after-ms` while another succeeds at once.
//!
//! Rates use buckets that refill over ten minutes, so no outcome depends on
//! how fast the test runs.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{sync::Arc, time::Duration};

use leash_broker::clock::{Clock as _, SystemClock};

use leash_e2e::{
    BrokerOptions, RedisServer, TestBroker, TestPki, eventually, ms, pb, read_until_caught_up,
    retry_after_ms, store_lines, watch_revocations,
};
use tonic::{Code, Status};

/// Two tenants: `acme` (agents and resource servers under `/acme/`) and
/// `partner` (under `/partner/`), each with an agent class and a resource
/// server class. `limits` goes into the acme agent class.
fn actors(limits: &str) -> String {
    format!(
        r#"[[actors.classes]]
name = "acme-agent"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/acme/agent/*"]
{limits}

[[actors.classes]]
name = "acme-resource"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/acme/resource/*"]

[[actors.classes]]
name = "partner-agent"
tenant = "partner"
owner = "partner@partner.test"
identities = ["spiffe://acme.test/partner/agent/*"]

[[actors.classes]]
name = "partner-resource"
tenant = "partner"
owner = "partner@partner.test"
identities = ["spiffe://acme.test/partner/resource/*"]
"#
    )
}

/// Every resource server of either tenant serves every audience: only the
/// tenant can keep them apart.
const VERIFIERS: &str = r#"callers = [
  { identity = "spiffe://acme.test/acme/resource/*", audiences = ["*"] },
  { identity = "spiffe://acme.test/partner/resource/*", audiences = ["*"] },
]"#;

/// A template of `tenant` for `classes`, open to every identity of the trust
/// domain (so only the tenant and class rules decide), 30 s leases.
fn template(name: &str, tenant: &str, classes: &str) -> String {
    format!(
        r#"
name: {name}
version: "1"
owner: platform@acme.test
tenant: {tenant}
classes: [{classes}]
identities: ["spiffe://acme.test/*"]
lease:
  ttl: 30s
  max_ttl: 1m
  max_lifetime: 10m
  min_renew_interval: 0s
grants:
  - name: github
    kind: jwt
    audience: https://api.github.test
    scopes: [{{scope: "repo:read", class: read}}]
    ttl: 5m
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{{scope: "db:select", class: read}}]
    ttl: 5m
"#
    )
}

fn options(redis: &RedisServer, limits: &str) -> BrokerOptions {
    let mut o = BrokerOptions::redis(redis);
    o.templates = vec![
        template("acme-review", "acme", "acme-agent"),
        template("partner-review", "partner", "partner-agent"),
    ];
    o.verifier_toml = Some(VERIFIERS.into());
    o.actors_toml = Some(actors(limits));
    o
}

fn begin_request(template: &str) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: template.into(),
        intent: "review".into(),
        ..Default::default()
    }
}

async fn begin(
    broker: &TestBroker,
    who: &str,
    template: &str,
) -> Result<pb::BeginTaskResponse, Status> {
    broker
        .broker(who)
        .await
        .begin_task(begin_request(template))
        .await
        .map(tonic::Response::into_inner)
}

async fn complete(broker: &TestBroker, who: &str, task_id: &str) -> Result<(), Status> {
    broker
        .broker(who)
        .await
        .complete_task(pb::CompleteTaskRequest {
            task_id: task_id.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn introspect(broker: &TestBroker, who: &str, token: &str) -> Result<bool, Status> {
    broker
        .verifier(who)
        .await
        .introspect(pb::IntrospectRequest {
            token: token.into(),
        })
        .await
        .map(|r| r.into_inner().active)
}

const ACME_AGENT: &str = "acme/agent/a1";
const ACME_AGENT_2: &str = "acme/agent/a2";
const ACME_RESOURCE: &str = "acme/resource/api";
const PARTNER_AGENT: &str = "partner/agent/p1";
const PARTNER_RESOURCE: &str = "partner/resource/api";

#[tokio::test]
async fn an_identity_no_class_matches_is_denied_saying_so() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(&redis, "")).await;
    for who in ["ops/stranger", "agent/a1"] {
        let err = begin(&broker, who, "acme-review").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("no actor class matches"),
            "{}",
            err.message()
        );
        assert!(
            err.message().contains(who),
            "names the identity: {}",
            err.message()
        );
    }
    // A verifier that no class places in a tenant is no verifier.
    let mut o = options(&redis, "");
    o.verifier_toml =
        Some(r#"callers = [{ identity = "spiffe://acme.test/ops/*", audiences = ["*"] }]"#.into());
    let other = TestBroker::start(o).await;
    let err = introspect(&other, "ops/auditor", "lsh_x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no actor class matches"), "{err:?}");
    broker.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn no_call_of_one_tenant_reaches_another_tenants_tasks_or_tokens() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(&redis, "")).await;
    // acme: one live task, one ended (its credentials are in the revocation log).
    let live = begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    let ended = begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    complete(&broker, ACME_AGENT, &ended.task_id).await.unwrap();
    let tokens: Vec<String> = live.credentials.iter().map(|c| c.value.clone()).collect();
    assert_eq!(tokens.len(), 2, "a JWT and an opaque token");
    // Controls: acme's own callers see all of it.
    for t in &tokens {
        assert!(introspect(&broker, ACME_RESOURCE, t).await.unwrap());
    }
    let mut acme_watch = watch_revocations(&broker, ACME_RESOURCE, "").await.unwrap();
    let (acme_seen, _) = read_until_caught_up(&mut acme_watch).await;
    assert_eq!(
        acme_seen.len(),
        2,
        "acme hears of its ended task's credentials"
    );

    let before = store_lines(&redis);
    let unknown = begin(&broker, PARTNER_AGENT, "no-such-template")
        .await
        .unwrap_err();

    // (RPC, caller, outcome): every one refused as if the thing did not exist.
    let mut table: Vec<(&str, &str, Result<String, Status>)> = Vec::new();
    for who in [PARTNER_AGENT, PARTNER_RESOURCE] {
        table.push((
            "BeginTask(acme's template)",
            who,
            begin(&broker, who, "acme-review").await.map(|r| r.task_id),
        ));
        let mut agent = broker.broker(who).await;
        table.push((
            "RenewLease(acme's task)",
            who,
            agent
                .renew_lease(pb::RenewLeaseRequest {
                    task_id: live.task_id.clone(),
                })
                .await
                .map(|r| r.into_inner().task_id),
        ));
        for task in [&live.task_id, &ended.task_id] {
            table.push((
                "CompleteTask(acme's task)",
                who,
                complete(&broker, who, task).await.map(|()| String::new()),
            ));
        }
    }
    for (rpc, who, outcome) in &table {
        let err = outcome
            .as_ref()
            .expect_err(&format!("{rpc} as {who} must fail"));
        assert_eq!(err.code(), Code::NotFound, "{rpc} as {who}: {err:?}");
        if rpc.starts_with("BeginTask") {
            // Word for word what an unknown template gets, bar the name.
            assert_eq!(
                err.message().replace("acme-review", "X"),
                unknown.message().replace("no-such-template", "X"),
            );
        } else {
            assert!(err.message().contains("not found"), "{rpc}: {err:?}");
        }
    }
    // Introspect: a foreign tenant's tokens are simply inactive.
    for t in &tokens {
        assert!(
            !introspect(&broker, PARTNER_RESOURCE, t).await.unwrap(),
            "Introspect"
        );
    }
    // WatchRevocations: the partner's snapshot holds none of acme's revocations.
    let mut partner_watch = watch_revocations(&broker, PARTNER_RESOURCE, "")
        .await
        .unwrap();
    let (partner_seen, cursor) = read_until_caught_up(&mut partner_watch).await;
    assert!(
        partner_seen.is_empty(),
        "WatchRevocations snapshot: {partner_seen:?}"
    );
    // GetJwks holds public keys only and is open to every caller.
    broker
        .verifier(PARTNER_RESOURCE)
        .await
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap();
    assert_eq!(
        store_lines(&redis),
        before,
        "the partner's calls changed nothing"
    );

    // Live: acme's completion reaches acme's watcher, never the partner's; the
    // partner's own revocation reaches the partner's watcher.
    let mut partner_live = watch_revocations(&broker, PARTNER_RESOURCE, &cursor)
        .await
        .unwrap();
    let _ = read_until_caught_up(&mut partner_live).await;
    complete(&broker, ACME_AGENT, &live.task_id).await.unwrap();
    let own = begin(&broker, PARTNER_AGENT, "partner-review")
        .await
        .unwrap();
    complete(&broker, PARTNER_AGENT, &own.task_id)
        .await
        .unwrap();
    let mut heard = Vec::new();
    while heard.len() < 2 {
        heard.extend(leash_e2e::next_batch(&mut partner_live).await.revocations);
    }
    assert!(
        heard.iter().all(|r| r.task_id == own.task_id),
        "the partner hears only its own task: {heard:?}"
    );
    // And the partner's tokens are the partner's: acme's verifier sees none.
    for c in &own.credentials {
        assert!(!introspect(&broker, ACME_RESOURCE, &c.value).await.unwrap());
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_template_lists_the_classes_that_may_use_it() {
    let redis = RedisServer::start();
    let mut o = options(&redis, "");
    o.actors_toml = Some(format!(
        "{}\n{}",
        actors(""),
        r#"[[actors.classes]]
name = "acme-ci"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/acme/ci/*"]"#
    ));
    let broker = TestBroker::start(o).await;
    let err = begin(&broker, "acme/ci/build", "acme-review")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("actor class \"acme-ci\" may not use template \"acme-review\""),
        "{err:?}"
    );
    begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    broker.stop().await;

    // A template naming a class the config does not have stops the start.
    let mut o = options(&redis, "");
    o.templates.push(template("typo", "acme", "acme-agnet"));
    let refused = TestBroker::start(o).await;
    let err = refused
        .ended(Duration::from_secs(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"acme-agnet\" is not an actor class"),
        "{err}"
    );
    // So does one listing a class of another tenant.
    let mut o = options(&redis, "");
    o.templates.push(template("mixed", "acme", "partner-agent"));
    let refused = TestBroker::start(o).await;
    let err = refused
        .ended(Duration::from_secs(10))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("belongs to tenant \"partner\""), "{err}");
}

#[tokio::test]
async fn a_class_caps_the_lease_ttl() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(&redis, r#"max_ttl = "5s""#)).await;
    let mut agent = broker.broker(ACME_AGENT).await;
    // Asking for more than the class allows (though the template allows it).
    let mut req = begin_request("acme-review");
    req.requested_ttl = Some(prost_types::Duration {
        seconds: 20,
        nanos: 0,
    });
    let err = agent.begin_task(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("requested_ttl:")
            && err
                .message()
                .contains("max_ttl of actor class \"acme-agent\""),
        "{err:?}"
    );
    // The template's default (30 s) is capped at the class's 5 s.
    let begun = agent
        .begin_task(begin_request("acme-review"))
        .await
        .unwrap()
        .into_inner();
    let now = i64::try_from(SystemClock.now_ms()).unwrap();
    assert!(
        ms(begun.lease_expires_at) <= now + 5_000,
        "lease capped at 5 s"
    );
    // Within the ceiling, a request is honoured.
    req.requested_ttl = Some(prost_types::Duration {
        seconds: 4,
        nanos: 0,
    });
    agent.begin_task(req).await.unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_class_limits_live_tasks_per_identity_and_in_all() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(
        &redis,
        "max_concurrent_tasks = 3\nmax_concurrent_tasks_per_identity = 2",
    ))
    .await;
    let a1 = begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    let err = begin(&broker, ACME_AGENT, "acme-review").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("max_concurrent_tasks_per_identity"),
        "{err:?}"
    );
    assert!(retry_after_ms(&err) > 0);
    // Another identity of the class is not held back by a1's limit...
    let a2 = begin(&broker, ACME_AGENT_2, "acme-review").await.unwrap();
    // ...until the class as a whole is full.
    let err = begin(&broker, ACME_AGENT_2, "acme-review")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_concurrent_tasks"), "{err:?}");
    // Another class (another tenant) is unaffected.
    begin(&broker, PARTNER_AGENT, "partner-review")
        .await
        .unwrap();
    // Completing frees a slot.
    complete(&broker, ACME_AGENT, &a1.task_id).await.unwrap();
    begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    // So does an expiry: a 2 s lease that is never renewed.
    complete(&broker, ACME_AGENT_2, &a2.task_id).await.unwrap();
    let mut short = begin_request("acme-review");
    short.requested_ttl = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    let lapsing = broker
        .broker(ACME_AGENT_2)
        .await
        .begin_task(short)
        .await
        .unwrap()
        .into_inner();
    assert!(
        begin(&broker, ACME_AGENT_2, "acme-review").await.is_err(),
        "class full"
    );
    // The reaper expires the unrenewed lease and frees its slot.
    let freed = eventually(Duration::from_secs(10), || async {
        begin(&broker, ACME_AGENT_2, "acme-review").await.is_ok()
    })
    .await;
    assert!(
        freed.is_some(),
        "expiry of {} freed no slot",
        lapsing.task_id
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_begin_rate_is_shared_by_replicas_and_holds_back_only_its_identity() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    // Two begins per identity, refilled over ten minutes: the third within the
    // test's lifetime is refused, however slowly the test runs.
    let limits = r#"begin_rate_per_identity = "2/10m""#;
    let a = TestBroker::start_with_pki(options(&redis, limits), pki.clone(), "leash").await;
    let b = TestBroker::start_with_pki(options(&redis, limits), pki, "leash").await;
    begin(&a, ACME_AGENT, "acme-review").await.unwrap();
    begin(&b, ACME_AGENT, "acme-review").await.unwrap();
    let before = store_lines(&redis);
    for replica in [&a, &b] {
        let err = begin(replica, ACME_AGENT, "acme-review").await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("begin_rate_per_identity 2/10m"),
            "{err:?}"
        );
        let wait = retry_after_ms(&err);
        assert!(
            (1..=300_000).contains(&wait),
            "a token comes back within 5 min: {wait} ms"
        );
    }
    assert_eq!(
        store_lines(&redis),
        before,
        "a refused begin changes nothing"
    );
    // At the same moment, another identity of the same class begins on either replica.
    begin(&a, ACME_AGENT_2, "acme-review").await.unwrap();
    begin(&b, ACME_AGENT_2, "acme-review").await.unwrap();
    assert_eq!(
        begin(&b, ACME_AGENT_2, "acme-review")
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    a.stop().await;
    b.stop().await;
}

/// The acme classes plus `acme-ci` (`/acme/ci/*`), for template edits that
/// move a template from one class to another.
fn actors_with_ci() -> String {
    format!(
        "{}\n{}",
        actors(""),
        r#"[[actors.classes]]
name = "acme-ci"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/acme/ci/*"]"#
    )
}

#[tokio::test]
async fn a_reload_naming_an_unknown_class_keeps_the_last_good_set() {
    let redis = RedisServer::start();
    let mut o = options(&redis, "");
    o.actors_toml = Some(actors_with_ci());
    let broker = TestBroker::start(o).await;
    // Serving (with the good set) before the directory changes.
    begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    let dir = broker.templates_dir();
    std::fs::write(dir.join("new.yaml"), template("new", "acme", "acme-agnet")).unwrap();
    let rejected = eventually(Duration::from_secs(10), || async {
        let logs = leash_e2e::logs();
        logs.contains("templates not reloaded") && logs.contains("acme-agnet")
    })
    .await;
    assert!(rejected.is_some(), "the bad reload was not logged");
    // The last good set is still in force: the old template works, the new one
    // does not exist.
    begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    let err = begin(&broker, ACME_AGENT, "new").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Fixed, it loads.
    std::fs::write(dir.join("new.yaml"), template("new", "acme", "acme-agent")).unwrap();
    let loaded = eventually(Duration::from_secs(10), || async {
        begin(&broker, ACME_AGENT, "new").await.is_ok()
    })
    .await;
    assert!(loaded.is_some(), "the fixed template never loaded");
    broker.stop().await;
}

#[tokio::test]
async fn a_template_that_drops_a_class_stops_its_renewals() {
    let redis = RedisServer::start();
    let mut o = options(&redis, "");
    o.actors_toml = Some(actors_with_ci());
    let broker = TestBroker::start(o).await;
    let task = begin(&broker, ACME_AGENT, "acme-review").await.unwrap();
    let mut agent = broker.broker(ACME_AGENT).await;
    let renew = pb::RenewLeaseRequest {
        task_id: task.task_id.clone(),
    };
    agent.renew_lease(renew.clone()).await.unwrap();
    // The template now serves CI only (harness files are t<i>.yaml, in order).
    std::fs::write(
        broker.templates_dir().join("t0.yaml"),
        template("acme-review", "acme", "acme-ci"),
    )
    .unwrap();
    let refused = eventually(Duration::from_secs(10), || {
        let mut agent = agent.clone();
        let renew = renew.clone();
        async move {
            agent
                .renew_lease(renew)
                .await
                .is_err_and(|e| e.code() == Code::PermissionDenied)
        }
    })
    .await;
    assert!(
        refused.is_some(),
        "renewal still accepted after the class was dropped"
    );
    let err = agent.renew_lease(renew).await.unwrap_err();
    assert!(
        err.message()
            .contains("actor class \"acme-agent\" may not use template \"acme-review\""),
        "{err:?}"
    );
    begin(&broker, "acme/ci/build", "acme-review")
        .await
        .unwrap();
    broker.stop().await;
}

#[tokio::test]
async fn a_lowered_ttl_ceiling_caps_renewals_of_running_tasks() {
    let redis = RedisServer::start();
    let pki = Arc::new(TestPki::new());
    let before = TestBroker::start_with_pki(options(&redis, ""), pki.clone(), "leash").await;
    let task = begin(&before, ACME_AGENT, "acme-review").await.unwrap();
    // The same store, now served with a 3 s ceiling for the class.
    let after =
        TestBroker::start_with_pki(options(&redis, r#"max_ttl = "3s""#), pki, "leash").await;
    let renewed = after
        .broker(ACME_AGENT)
        .await
        .renew_lease(pb::RenewLeaseRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // A renewal never shortens a lease, and with the ceiling it no longer
    // extends it by the 30 s the task began with: the deadline stays.
    assert_eq!(
        ms(renewed.lease_expires_at),
        ms(task.lease_expires_at),
        "renewal capped at the class's 3 s"
    );
    before.stop().await;
    after.stop().await;
}
