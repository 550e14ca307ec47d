//! The durable audit trail (issue 9), end to end on a real `redis-server`
//! through the real gRPC edge:
//!
//! - begin, renew, delegation, redemption, approval, completion (with its
//!   cascade) and an expiry each leave their events, and `AuditTrace` tells
//!   every task's story exactly, in order, by task id or credential id;
//! - each tenant's events are in its own stream: `AuditTail` of one tenant
//!   sees none of another's, and a tenant admin reads only its own tenant;
//! - no credential value (JWT, opaque token, delegation handle) appears in
//!   any audit event or log line;
//! - a begin whose audit record cannot be written fails UNAVAILABLE and
//!   issues nothing.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::time::Duration;

use leash_e2e::{BrokerOptions, RedisServer, TestBroker, eventually, pb};
use tonic::{Code, transport::Channel};

type Broker = pb::broker_client::BrokerClient<Channel>;
type Admin = pb::admin_client::AdminClient<Channel>;

const FANOUT: &str = r#"
name: fanout
version: "3"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 20s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
delegation:
  max_depth: 2
  may_act: ["spiffe://acme.test/sub/*"]
grants:
  - name: github
    kind: jwt
    audience: https://api.github.test
    scopes: [{scope: "repo:acme/widgets:read", class: read}]
    ttl: 60s
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

const DEPLOY: &str = r#"
name: deploy
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 20s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
grants:
  - name: read
    kind: jwt
    audience: https://api.acme.test
    scopes: [{scope: "repo:read", class: read}]
    ttl: 60s
  - name: deploy
    kind: jwt
    audience: https://api.acme.test
    scopes: [{scope: "deploy:prod", class: write}]
    ttl: 60s
approval:
  grants: [deploy]
  approvers:
    identities: ["spiffe://acme.test/lead/*"]
  validity: 15m
  while_pending: issue_others
"#;

/// A lease nobody renews: the reaper ends it about a second in.
const BRIEF: &str = r#"
name: brief
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 1s, max_ttl: 1s, max_lifetime: 1m}
grants:
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

const PARTNER: &str = r#"
name: partner-sync
version: "1"
owner: partners@acme.test
tenant: partner
identities: ["spiffe://acme.test/partner/*"]
lease: {ttl: 20s, max_ttl: 1m, max_lifetime: 10m}
grants:
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

const ACTORS: &str = r#"[[actors.classes]]
name = "partners"
tenant = "partner"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/partner/*"]

[[actors.classes]]
name = "any"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/*"]"#;

const ADMINS: &str = r#"[admin]
callers = ["spiffe://acme.test/admin/ops"]
[admin.tenants]
partner = ["spiffe://acme.test/partner-ops/*"]
"#;

async fn broker(redis: &RedisServer) -> TestBroker {
    let mut options = BrokerOptions::redis(redis);
    options.templates = vec![
        FANOUT.to_owned(),
        DEPLOY.to_owned(),
        BRIEF.to_owned(),
        PARTNER.to_owned(),
    ];
    options.actors_toml = Some(ACTORS.to_owned());
    options.extra_toml = ADMINS.to_owned();
    TestBroker::start(options).await
}

fn begin_request(template: &str) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: template.into(),
        intent: format!("audit test: {template}"),
        ..Default::default()
    }
}

async fn trace(admin: &mut Admin, id: &str) -> Vec<pb::AuditEvent> {
    let mut out = Vec::new();
    let mut request = pb::AuditTraceRequest {
        id: id.into(),
        page_size: 5,
        page_token: String::new(),
    };
    for _ in 0..100 {
        let page = admin
            .audit_trace(request.clone())
            .await
            .unwrap()
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        request.page_token = page.next_page_token;
    }
    panic!("the trace of {id} did not end in 100 pages");
}

fn names(events: &[pb::AuditEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// `n` times `event`.
fn times(event: &'static str, n: usize) -> Vec<&'static str> {
    vec![event; n]
}

/// Every credential value a response handed out.
fn values(r: &pb::BeginTaskResponse) -> Vec<String> {
    r.credentials.iter().map(|c| c.value.clone()).collect()
}

fn renew_values(r: &pb::RenewLeaseResponse) -> Vec<String> {
    r.credentials.iter().map(|c| c.value.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_story_is_told_whole_in_order_per_tenant_and_holds_no_secret() {
    leash_e2e::capture_logs();
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent: Broker = broker.broker("agent/auditor").await;
    let mut sub: Broker = broker.broker("sub/a").await;
    let mut admin: Admin = broker.admin("admin/ops").await;
    let mut secrets: Vec<String> = Vec::new();

    // Tails opened first see everything after; each tenant its own.
    let mut tail_default = admin
        .audit_tail(pb::AuditTailRequest {
            tenant: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut tail_partner = admin
        .audit_tail(pb::AuditTailRequest {
            tenant: "partner".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // Begin, renew, delegate, redeem, complete (the child cascades).
    let begun = agent
        .begin_task(begin_request("fanout"))
        .await
        .unwrap()
        .into_inner();
    secrets.extend(values(&begun));
    let renewed = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    secrets.extend(renew_values(&renewed));
    let delegated = agent
        .delegate_task(pb::DelegateTaskRequest {
            parent_task_id: begun.task_id.clone(),
            subagent: "spiffe://acme.test/sub/a".into(),
            grants: vec![pb::GrantScopes {
                grant: "github".into(),
                scopes: vec!["repo:acme/widgets:read".into()],
            }],
            intent: "read the repo".into(),
            requested_ttl: None,
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(delegated.delegation_handle.clone());
    let redeemed = sub
        .redeem_delegation(pb::RedeemDelegationRequest {
            task_id: delegated.task_id.clone(),
            delegation_handle: delegated.delegation_handle.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    secrets.extend(values(&redeemed));
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            summary: "fanned out to one subagent".into(),
        })
        .await
        .unwrap();

    let story = trace(&mut admin, &begun.task_id).await;
    let issued = begun.credentials.len();
    let reissued = renewed.credentials.len();
    let live = issued + reissued;
    let mut want = vec!["task.declared", "policy.decided", "task.begun"];
    want.extend(times("credential.issued", issued));
    want.push("lease.renewed");
    want.extend(times("credential.issued", reissued));
    want.push("task.delegated");
    want.push("delegation.redeemed");
    want.extend(times("credential.issued", redeemed.credentials.len()));
    want.push("task.completed");
    want.extend(times("credential.revoked", live));
    want.push("task.revoked");
    want.extend(times("credential.revoked", redeemed.credentials.len()));
    assert_eq!(names(&story), want);
    for e in &story {
        assert_eq!(e.tenant, "default");
        assert_eq!(e.template, "fanout");
        assert_eq!(e.template_version, "3");
        assert!(e.at.is_some());
        assert!(!e.id.is_empty());
    }
    let completed = story.iter().find(|e| e.event == "task.completed").unwrap();
    assert_eq!(completed.detail["outcome"], "succeeded");
    assert_eq!(completed.detail["summary"], "fanned out to one subagent");
    assert_eq!(completed.detail["by"], "spiffe://acme.test/agent/auditor");
    let cascade = story.iter().find(|e| e.event == "task.revoked").unwrap();
    assert_eq!(cascade.task_id, delegated.task_id);
    assert_eq!(cascade.parent_task_id, begun.task_id);
    assert_eq!(cascade.detail["reason"], "cascade");
    // The issued events name exactly the credentials handed out, by id.
    let issued_ids: Vec<&str> = story
        .iter()
        .filter(|e| e.event == "credential.issued")
        .map(|e| e.detail["credential"].as_str())
        .collect();
    let handed: Vec<&str> = begun
        .credentials
        .iter()
        .chain(&renewed.credentials)
        .chain(&redeemed.credentials)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(issued_ids, handed);
    // A credential id tells its task's story; the child's is its part of it.
    assert_eq!(trace(&mut admin, &begun.credentials[0].id).await, story);
    let child: Vec<_> = story
        .iter()
        .filter(|e| e.task_id == delegated.task_id)
        .cloned()
        .collect();
    assert_eq!(trace(&mut admin, &delegated.task_id).await, child);

    // An approval: requested at begin, approved, redeemed at the next renewal.
    let gated = agent
        .begin_task(begin_request("deploy"))
        .await
        .unwrap()
        .into_inner();
    secrets.extend(values(&gated));
    let mut lead = broker.admin("lead/alice").await;
    lead.approve(pb::DecideApprovalRequest {
        task_id: gated.task_id.clone(),
        reason: "change 7 reviewed".into(),
    })
    .await
    .unwrap();
    let after = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: gated.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    secrets.extend(renew_values(&after));
    let story = trace(&mut admin, &gated.task_id).await;
    let mut want = vec![
        "task.declared",
        "policy.decided",
        "task.begun",
        "approval.requested",
    ];
    want.extend(times("credential.issued", gated.credentials.len()));
    want.extend(["approval.approved", "approval.redeemed", "lease.renewed"]);
    want.extend(times("credential.issued", after.credentials.len()));
    assert_eq!(names(&story), want);
    let approved = story
        .iter()
        .find(|e| e.event == "approval.approved")
        .unwrap();
    assert_eq!(approved.detail["by"], "spiffe://acme.test/lead/alice");
    assert_eq!(approved.detail["reason"], "change 7 reviewed");

    // An expiry, by the reaper.
    let brief = agent
        .begin_task(begin_request("brief"))
        .await
        .unwrap()
        .into_inner();
    secrets.extend(values(&brief));
    let expired_at = eventually(Duration::from_secs(15), || {
        let mut admin = admin.clone();
        let id = brief.task_id.clone();
        async move {
            trace(&mut admin, &id)
                .await
                .iter()
                .any(|e| e.event == "lease.expired")
        }
    })
    .await;
    assert!(expired_at.is_some(), "the lease expired in the trail");
    let story = trace(&mut admin, &brief.task_id).await;
    let mut want = vec!["task.declared", "policy.decided", "task.begun"];
    want.extend(times("credential.issued", brief.credentials.len()));
    // Its credentials ended with the lease (their expiry is the lease's
    // deadline), so none was left to revoke.
    want.push("lease.expired");
    assert_eq!(names(&story), want);
    let expired_ms: u64 = story[3].detail["expires_at"].parse().unwrap();
    let deadline_ms: u64 = story[2].detail["deadline"].parse().unwrap();
    assert!(expired_ms <= deadline_ms);
    let expired = story.iter().find(|e| e.event == "lease.expired").unwrap();
    assert_eq!(expired.detail["reason"], "expiry");
    assert_eq!(expired.detail.get("by").map(String::as_str), Some(""));

    // Another tenant's task: only in its own stream.
    let mut partner: Broker = broker.broker("partner/p1").await;
    let theirs = partner
        .begin_task(begin_request("partner-sync"))
        .await
        .unwrap()
        .into_inner();
    secrets.extend(values(&theirs));

    // A refusal is recorded too (an agent renewing a task it does not own).
    let refused = sub
        .renew_lease(pb::RenewLeaseRequest {
            task_id: gated.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);

    // The tails: the default tenant's saw every default event (and the
    // refusal), none of the partner's; the partner's only its own.
    let mut seen_default = Vec::new();
    while !seen_default
        .iter()
        .any(|e: &pb::AuditEvent| e.event == "task.denied")
    {
        let next = tokio::time::timeout(Duration::from_secs(10), tail_default.message())
            .await
            .expect("the default tail went quiet")
            .unwrap()
            .unwrap();
        seen_default.push(next);
    }
    assert!(seen_default.iter().all(|e| e.tenant == "default"));
    assert!(
        seen_default
            .iter()
            .any(|e| e.task_id == brief.task_id && e.event == "lease.expired")
    );
    let first_partner = tokio::time::timeout(Duration::from_secs(10), tail_partner.message())
        .await
        .expect("the partner tail went quiet")
        .unwrap()
        .unwrap();
    assert_eq!(first_partner.task_id, theirs.task_id);
    assert_eq!(first_partner.tenant, "partner");

    // A tenant admin reads its tenant, and nothing of another's.
    let mut ops = broker.admin("partner-ops/o1").await;
    let theirs_story = trace(&mut ops, &theirs.task_id).await;
    assert_eq!(theirs_story.len(), 3 + theirs.credentials.len());
    let denied = ops
        .audit_trace(pb::AuditTraceRequest {
            id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::NotFound, "{denied:?}");
    let denied = ops
        .audit_tail(pb::AuditTailRequest {
            tenant: "default".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // Nor may it use the rest of the Admin service.
    let denied = ops
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // An agent reads no trail at all.
    let mut not_admin = broker.admin("agent/auditor").await;
    let denied = not_admin
        .audit_trace(pb::AuditTraceRequest {
            id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // No credential value in any event, any log line, or the store's streams.
    let mut all = Vec::new();
    for id in [
        &begun.task_id,
        &gated.task_id,
        &brief.task_id,
        &theirs.task_id,
    ] {
        all.extend(trace(&mut admin, id).await);
    }
    all.extend(seen_default);
    let (code, metrics) = leash_e2e::http_get(broker.ops_addr, "/metrics").await;
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("leash_tasks_begun_total"), "{metrics}");
    // No task id, credential id or identity is a label value.
    for id in [
        &begun.task_id,
        &gated.task_id,
        &brief.task_id,
        &theirs.task_id,
    ] {
        assert!(
            !metrics.contains(id.as_str()),
            "a task id in a metric label"
        );
    }
    assert!(
        !metrics.contains("spiffe://"),
        "an identity in a metric label"
    );
    let text = format!("{all:?}\n{metrics}");
    let streams = redis.dump_all();
    assert!(!secrets.is_empty());
    for s in &secrets {
        let tail = s.rsplit_once('.').map_or(s.as_str(), |(_, t)| t);
        assert!(
            !text.contains(s.as_str()),
            "a credential value in the trail"
        );
        assert!(
            !text.contains(tail),
            "a credential's secret part in the trail"
        );
        assert!(
            !streams.contains(tail),
            "a credential's secret part in Redis"
        );
    }
    leash_e2e::assert_not_logged(&secrets);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_whose_record_cannot_be_written_fails_unavailable_and_issues_nothing() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent: Broker = broker.broker("agent/auditor").await;
    let mut admin: Admin = broker.admin("admin/ops").await;
    // Every shard's stream of the tenant is damaged: a string, not a stream.
    let keys: Vec<String> = (0..16)
        .map(|s| format!("{{leash:s{s:x}}}:audit:default"))
        .collect();
    for k in &keys {
        assert_eq!(redis.command(&format!("SET {k} damaged")).trim(), "+OK");
    }
    let err = agent.begin_task(begin_request("fanout")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("audit"), "{err:?}");
    let tasks = admin
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(tasks.tasks.is_empty(), "nothing begun: {tasks:?}");
    // Repaired, begins work again and are recorded.
    for k in &keys {
        redis.command(&format!("DEL {k}"));
    }
    let begun = agent
        .begin_task(begin_request("fanout"))
        .await
        .unwrap()
        .into_inner();
    let story = trace(&mut admin, &begun.task_id).await;
    assert_eq!(story[2].event, "task.begun");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_streams_off_nothing_reaches_the_trail_and_tasks_still_work() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates = vec![FANOUT.to_owned()];
    options.actors_toml = Some(ACTORS.to_owned());
    options.extra_toml = format!("{ADMINS}\n[audit]\nstreams = false\n");
    let broker = TestBroker::start(options).await;
    let mut agent: Broker = broker.broker("agent/auditor").await;
    let mut admin: Admin = broker.admin("admin/ops").await;
    let begun = agent
        .begin_task(begin_request("fanout"))
        .await
        .unwrap()
        .into_inner();
    let refused = agent.begin_task(begin_request("nope")).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            summary: String::new(),
        })
        .await
        .unwrap();
    // The trail knows nothing of the task.
    let none = admin
        .audit_trace(pb::AuditTraceRequest {
            id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    let keys = redis.command("KEYS *");
    assert!(!keys.contains(":audit:"), "{keys}");
    broker.stop().await;
}
