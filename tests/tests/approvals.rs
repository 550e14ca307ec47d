//! Approval gates (issue 8), end to end on a real `redis-server` through the
//! real gRPC edge:
//!
//! - a gated task begins PENDING_APPROVAL with only its ungated credentials
//!   (none with `while_pending: issue_none`); an approver named by identity
//!   pattern or by actor class approves; the owner's next renewal carries the
//!   gated credential at once (even inside `min_renew_interval`, once), which
//!   a resource server sees active; GetTask and the audit trail name the
//!   approver and the reason;
//! - a denial withholds the gated grant for good; a pending request and an
//!   unused approval both expire after `validity`;
//! - the requester can never approve its own request, even when the
//!   approvers' pattern matches it; a non-approver is refused (NOT_FOUND from
//!   another tenant); a refused decision changes nothing and is audited;
//! - WatchTask streams PENDING, then APPROVED, and ends with the task;
//! - a replayed BeginTask follows the approval; an ended task's approval is moot;
//! - the Rust SDK's `Task::approval` resolves to the decision (approved,
//!   denied, expired).
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::time::Duration;

use leash_e2e::{BrokerOptions, RedisServer, TestBroker, eventually, is_active, pb};
use tonic::{Code, transport::Channel};

type Broker = pb::broker_client::BrokerClient<Channel>;
type Admin = pb::admin_client::AdminClient<Channel>;

/// The gated grant and the ungated one, both of an audience `resource/api`
/// serves (see `DEFAULT_VERIFIER_TOML`).
fn gated_template(name: &str, approvers: &str, validity: &str, while_pending: &str) -> String {
    gated_template_with(name, approvers, validity, while_pending, "0s")
}

fn gated_template_with(
    name: &str,
    approvers: &str,
    validity: &str,
    while_pending: &str,
    min_renew: &str,
) -> String {
    format!(
        r#"
name: {name}
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {{ttl: 20s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: {min_renew}}}
grants:
  - name: read
    kind: jwt
    audience: https://api.acme.test
    scopes: [{{scope: "repo:read", class: read}}]
    ttl: 60s
  - name: deploy
    kind: jwt
    audience: https://api.acme.test
    scopes: [{{scope: "deploy:prod", class: write}}]
    ttl: 60s
approval:
  grants: [deploy]
  approvers:
{approvers}
  validity: {validity}
  while_pending: {while_pending}
"#
    )
}

const HUMANS_AND_LEADS: &str =
    "    identities: [\"spiffe://acme.test/human/*\"]\n    classes: [approvers]";
/// Approvers that include every agent, so the requester matches the pattern.
const AGENTS_TOO: &str =
    "    identities: [\"spiffe://acme.test/agent/*\", \"spiffe://acme.test/human/*\"]";

/// `approvers` (the leads) before the catch-all class, all in tenant
/// `default`; partners are of another tenant.
const ACTORS: &str = r#"[[actors.classes]]
name = "approvers"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/lead/*"]

[[actors.classes]]
name = "partners"
tenant = "partner"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/partner/*"]

[[actors.classes]]
name = "any"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/*"]"#;

async fn broker(redis: &RedisServer) -> TestBroker {
    let mut options = BrokerOptions::redis(redis);
    options.templates = vec![
        gated_template("deploy", HUMANS_AND_LEADS, "15m", "issue_others"),
        gated_template("deploy-none", HUMANS_AND_LEADS, "15m", "issue_none"),
        gated_template("deploy-brief", HUMANS_AND_LEADS, "1s", "issue_others"),
        gated_template("deploy-short", HUMANS_AND_LEADS, "2s", "issue_others"),
        gated_template("deploy-self", AGENTS_TOO, "15m", "issue_others"),
        gated_template_with(
            "deploy-slow",
            HUMANS_AND_LEADS,
            "15m",
            "issue_others",
            "10s",
        ),
    ];
    options.actors_toml = Some(ACTORS.to_owned());
    options.extra_toml = "[admin]\ncallers = [\"spiffe://acme.test/ops/*\"]\n".to_owned();
    TestBroker::start(options).await
}

async fn begin(agent: &mut Broker, template: &str) -> pb::BeginTaskResponse {
    agent
        .begin_task(pb::BeginTaskRequest {
            template: template.into(),
            intent: "deploy the release".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn renew(agent: &mut Broker, task_id: &str) -> pb::RenewLeaseResponse {
    agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: task_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn decide(task_id: &str, reason: &str) -> pb::DecideApprovalRequest {
    pb::DecideApprovalRequest {
        task_id: task_id.into(),
        reason: reason.into(),
    }
}

fn grants(credentials: &[pb::Credential]) -> Vec<&str> {
    let mut g: Vec<&str> = credentials.iter().map(|c| c.grant.as_str()).collect();
    g.sort_unstable();
    g
}

fn credential<'a>(credentials: &'a [pb::Credential], grant: &str) -> &'a pb::Credential {
    credentials
        .iter()
        .find(|c| c.grant == grant)
        .unwrap_or_else(|| panic!("no {grant} credential in {credentials:?}"))
}

fn approval_state(approval: Option<&pb::Approval>) -> pb::ApprovalState {
    pb::ApprovalState::try_from(approval.expect("an approval").state).unwrap()
}

/// The task as GetTask reports it, less the times left (which move with the
/// clock), so that two reads compare equal when nothing changed.
async fn task_info(ops: &mut Admin, task_id: &str) -> pb::TaskInfo {
    let mut t = ops
        .get_task(pb::GetTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    t.time_left = None;
    for c in &mut t.credentials {
        c.time_left = None;
    }
    t
}

/// Waits (at most 10 s) until GetTask reports the approval in `state`.
async fn until_approval(ops: &mut Admin, task_id: &str, state: pb::ApprovalState) {
    let ops = tokio::sync::Mutex::new(ops);
    let reached = eventually(Duration::from_secs(10), || async {
        let mut ops = ops.lock().await;
        approval_state(task_info(&mut ops, task_id).await.approval.as_ref()) == state
    })
    .await;
    assert!(reached.is_some(), "the approval never became {state:?}");
}

fn audit_line(event: &str, task_id: &str) -> Option<String> {
    leash_e2e::logs()
        .lines()
        .find(|l| l.contains(event) && l.contains(task_id))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_by_identity_or_class_releases_the_gated_grant() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let mut ops = broker.admin("ops/oncall").await;

    for (approver, reason) in [
        ("human/alice", "release 1.2 reviewed"),
        ("lead/bob", "lead sign-off"),
    ] {
        let begun = begin(&mut agent, "deploy").await;
        assert_eq!(begun.state, pb::LeaseState::PendingApproval as i32);
        assert_eq!(grants(&begun.credentials), ["read"]);
        let approval = begun.approval.as_ref().unwrap();
        assert_eq!(approval_state(Some(approval)), pb::ApprovalState::Pending);
        assert_eq!(approval.grants, ["deploy"]);
        assert!(approval.expires_at.is_some());
        assert!(audit_line("approval.requested", &begun.task_id).is_some());

        let decided = broker
            .admin(approver)
            .await
            .approve(decide(&begun.task_id, reason))
            .await
            .unwrap()
            .into_inner();
        let approval = decided.approval.as_ref().unwrap();
        assert_eq!(approval_state(Some(approval)), pb::ApprovalState::Approved);
        let approver_id = format!("spiffe://acme.test/{approver}");
        assert_eq!(approval.decided_by, approver_id);

        let renewed = renew(&mut agent, &begun.task_id).await;
        assert_eq!(grants(&renewed.credentials), ["deploy", "read"]);
        assert_eq!(renewed.state, pb::LeaseState::Active as i32);
        let deploy = credential(&renewed.credentials, "deploy");
        assert_eq!(deploy.scopes, ["deploy:prod"]);
        assert!(is_active(&broker, &deploy.value).await);
        assert_eq!(
            approval_state(renewed.approval.as_ref()),
            pb::ApprovalState::Redeemed
        );

        let info = task_info(&mut ops, &begun.task_id).await;
        assert_eq!(info.state, pb::LeaseState::Active as i32);
        let approval = info.approval.as_ref().unwrap();
        assert_eq!(approval_state(Some(approval)), pb::ApprovalState::Redeemed);
        assert_eq!(approval.decided_by, approver_id);
        assert_eq!(approval.reason, reason);
        assert!(approval.decided_at.is_some());

        // Later renewals keep the gated grant.
        let again = renew(&mut agent, &begun.task_id).await;
        assert_eq!(grants(&again.credentials), ["deploy", "read"]);

        let line = audit_line("approval.approved", &begun.task_id)
            .expect("no approval.approved audit record");
        assert!(line.contains("leash::audit"), "{line}");
        assert!(line.contains(&approver_id), "{line}");
        assert!(line.contains(reason), "{line}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_used_at_once_even_inside_the_min_renew_interval() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let begun = begin(&mut agent, "deploy-slow").await;
    let early = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::ResourceExhausted, "{early:?}");

    broker
        .admin("human/alice")
        .await
        .approve(decide(&begun.task_id, "go"))
        .await
        .unwrap();
    let renewed = renew(&mut agent, &begun.task_id).await;
    assert_eq!(grants(&renewed.credentials), ["deploy", "read"]);
    // Only once: the next renewal waits out the interval again.
    let again = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_withholds_the_gated_grant_for_good() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let mut ops = broker.admin("ops/oncall").await;
    let mut alice = broker.admin("human/alice").await;
    let begun = begin(&mut agent, "deploy").await;

    let denied = alice
        .deny(decide(&begun.task_id, "not during the freeze"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        approval_state(denied.approval.as_ref()),
        pb::ApprovalState::Denied
    );
    for _ in 0..3 {
        let renewed = renew(&mut agent, &begun.task_id).await;
        assert_eq!(grants(&renewed.credentials), ["read"]);
        assert_eq!(
            approval_state(renewed.approval.as_ref()),
            pb::ApprovalState::Denied
        );
    }
    let info = task_info(&mut ops, &begun.task_id).await;
    let approval = info.approval.as_ref().unwrap();
    assert_eq!(approval_state(Some(approval)), pb::ApprovalState::Denied);
    assert_eq!(approval.decided_by, "spiffe://acme.test/human/alice");
    assert_eq!(approval.reason, "not during the freeze");
    // The lease goes on without the gated grant.
    assert_eq!(info.state, pb::LeaseState::Active as i32);

    for who in ["human/alice", "lead/bob"] {
        let e = broker
            .admin(who)
            .await
            .approve(decide(&begun.task_id, "changed my mind"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    let renewed = renew(&mut agent, &begun.task_id).await;
    assert_eq!(grants(&renewed.credentials), ["read"]);
    let line = audit_line("approval.denied", &begun.task_id).expect("no approval.denied record");
    assert!(line.contains("spiffe://acme.test/human/alice"), "{line}");
    assert!(line.contains("not during the freeze"), "{line}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_request_expires_and_cannot_be_approved_after() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let mut ops = broker.admin("ops/oncall").await;
    let begun = begin(&mut agent, "deploy-brief").await;
    assert_eq!(begun.state, pb::LeaseState::PendingApproval as i32);

    until_approval(&mut ops, &begun.task_id, pb::ApprovalState::Expired).await;
    // The watch reports it too, and the task is no longer pending.
    let mut watch = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        approval_state(first.approval.as_ref()),
        pb::ApprovalState::Expired
    );
    assert_eq!(first.state, pb::LeaseState::Active as i32);

    let e = broker
        .admin("human/alice")
        .await
        .approve(decide(&begun.task_id, "too late"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let renewed = renew(&mut agent, &begun.task_id).await;
    assert_eq!(grants(&renewed.credentials), ["read"]);
    assert_eq!(
        approval_state(renewed.approval.as_ref()),
        pb::ApprovalState::Expired
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_left_unused_expires() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let mut ops = broker.admin("ops/oncall").await;
    // 2 s to decide (the approval below comes at once), then 2 s to use it.
    let begun = begin(&mut agent, "deploy-short").await;
    let approved = broker
        .admin("human/alice")
        .await
        .approve(decide(&begun.task_id, "go ahead"))
        .await
        .unwrap()
        .into_inner();
    let approval = approved.approval.as_ref().unwrap();
    assert_eq!(approval_state(Some(approval)), pb::ApprovalState::Approved);
    assert!(
        leash_e2e::ms(approval.expires_at) > leash_e2e::ms(approval.decided_at),
        "{approval:?}"
    );

    until_approval(&mut ops, &begun.task_id, pb::ApprovalState::Expired).await;
    let info = task_info(&mut ops, &begun.task_id).await;
    assert_eq!(
        info.approval.as_ref().unwrap().decided_by,
        "spiffe://acme.test/human/alice"
    );
    // The renewal goes on without the gated grant.
    let renewed = leash_e2e::renew_when_allowed(&mut agent, &begun.task_id)
        .await
        .unwrap();
    assert_eq!(grants(&renewed.credentials), ["read"]);
    assert_eq!(
        approval_state(renewed.approval.as_ref()),
        pb::ApprovalState::Expired
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_and_non_approvers_cannot_decide() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let mut ops = broker.admin("ops/oncall").await;
    let begun = begin(&mut agent, "deploy-self").await;
    let before = task_info(&mut ops, &begun.task_id).await;

    // The owner matches the approvers' pattern, and is still refused.
    let mut own = broker.admin("agent/deployer").await;
    for approve in [true, false] {
        let request = decide(&begun.task_id, "looks fine to me");
        let e = if approve {
            own.approve(request).await.unwrap_err()
        } else {
            own.deny(request).await.unwrap_err()
        };
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message()
                .contains("the requester can never approve its own request"),
            "{e:?}"
        );
    }
    // Neither an agent outside the pattern nor an admin is an approver.
    for who in ["robot/other", "ops/oncall", "lead/bob"] {
        let e = broker
            .admin(who)
            .await
            .approve(decide(&begun.task_id, "sure"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
        assert!(e.message().contains("is not an approver"), "{e:?}");
    }
    // Outside the task's tenant, the task does not exist.
    let e = broker
        .admin("partner/eve")
        .await
        .approve(decide(&begun.task_id, "sure"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Nothing changed.
    let after = task_info(&mut ops, &begun.task_id).await;
    assert_eq!(after, before);
    assert_eq!(
        approval_state(after.approval.as_ref()),
        pb::ApprovalState::Pending
    );
    assert_eq!(after.state, pb::LeaseState::PendingApproval as i32);
    let renewed = renew(&mut agent, &begun.task_id).await;
    assert_eq!(grants(&renewed.credentials), ["read"]);
    assert!(audit_line("approval.approved", &begun.task_id).is_none());
    // Each refusal is in the audit trail, naming who tried.
    let logs = leash_e2e::logs();
    let refused = logs.lines().find(|l| {
        l.contains("task.denied")
            && l.contains(&begun.task_id)
            && l.contains("spiffe://acme.test/agent/deployer")
            && l.contains("never approve its own request")
    });
    assert!(
        refused.is_some(),
        "the self-approval refusal was not audited"
    );
    assert!(audit_line("approval.denied", &begun.task_id).is_none());
    // A real approver still can.
    broker
        .admin("human/alice")
        .await
        .approve(decide(&begun.task_id, "checked"))
        .await
        .unwrap();
    broker.stop().await;
}

async fn next_event(stream: &mut tonic::Streaming<pb::TaskEvent>) -> Option<pb::TaskEvent> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no task event within 10 s")
        .expect("stream error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_task_streams_pending_then_approved_and_ends_with_the_task() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let begun = begin(&mut agent, "deploy").await;
    let mut stream = agent
        .watch_task(pb::WatchTaskRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut stream).await.expect("a first event");
    assert_eq!(first.task_id, begun.task_id);
    assert_eq!(first.state, pb::LeaseState::PendingApproval as i32);
    assert_eq!(
        approval_state(first.approval.as_ref()),
        pb::ApprovalState::Pending
    );
    assert!(first.lease_expires_at.is_some());

    broker
        .admin("human/alice")
        .await
        .approve(decide(&begun.task_id, "ship it"))
        .await
        .unwrap();
    let approved = loop {
        let e = next_event(&mut stream).await.expect("stream ended early");
        if approval_state(e.approval.as_ref()) != pb::ApprovalState::Pending {
            break e;
        }
    };
    assert_eq!(
        approval_state(approved.approval.as_ref()),
        pb::ApprovalState::Approved
    );
    assert_eq!(approved.state, pb::LeaseState::Active as i32);
    let a = approved.approval.as_ref().unwrap();
    assert_eq!(a.decided_by, "spiffe://acme.test/human/alice");
    assert_eq!(a.reason, "ship it");

    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut last = approved;
    while let Some(e) = next_event(&mut stream).await {
        last = e;
    }
    assert_eq!(last.state, pb::LeaseState::Completed as i32);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_none_withholds_everything_until_approved() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let begun = begin(&mut agent, "deploy-none").await;
    assert_eq!(begun.state, pb::LeaseState::PendingApproval as i32);
    assert!(begun.credentials.is_empty(), "{begun:?}");
    let renewed = renew(&mut agent, &begun.task_id).await;
    assert!(renewed.credentials.is_empty(), "{renewed:?}");
    assert_eq!(renewed.state, pb::LeaseState::PendingApproval as i32);

    broker
        .admin("lead/bob")
        .await
        .approve(decide(&begun.task_id, "all of it"))
        .await
        .unwrap();
    let renewed = renew(&mut agent, &begun.task_id).await;
    assert_eq!(grants(&renewed.credentials), ["deploy", "read"]);
    for c in &renewed.credentials {
        assert!(is_active(&broker, &c.value).await, "{}", c.grant);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_keeps_running_while_pending() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let begun = begin(&mut agent, "deploy").await;
    let read = credential(&begun.credentials, "read").value.clone();
    let mut deadline = leash_e2e::ms(begun.lease_expires_at);
    for _ in 0..3 {
        let renewed = renew(&mut agent, &begun.task_id).await;
        assert_eq!(renewed.state, pb::LeaseState::PendingApproval as i32);
        assert_eq!(grants(&renewed.credentials), ["read"]);
        assert_eq!(
            approval_state(renewed.approval.as_ref()),
            pb::ApprovalState::Pending
        );
        let next = leash_e2e::ms(renewed.lease_expires_at);
        assert!(next >= deadline, "the lease went backwards");
        deadline = next;
        for c in &renewed.credentials {
            assert!(is_active(&broker, &c.value).await);
        }
    }
    assert!(is_active(&broker, &read).await);
    broker.stop().await;
}

async fn sdk_client(broker: &TestBroker, path: &str) -> leash_sdk::Client {
    let svid = broker.pki.svid(path);
    leash_sdk::Client::builder()
        .broker(broker.url())
        .svid_files(&svid.cert, &svid.key)
        .bundle_file(broker.pki.bundle())
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_waits_for_the_decision() {
    use leash_sdk::{ApprovalOutcome, Error, TaskRequest};

    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let client = sdk_client(&broker, "agent/sdk").await;
    let request = || TaskRequest::new("deploy").intent("deploy the release");

    let task = std::sync::Arc::new(client.begin_task(request()).await.unwrap());
    assert!(task.credential("read").is_some());
    assert!(task.credential("deploy").is_none());
    let waiting = tokio::spawn({
        let task = std::sync::Arc::clone(&task);
        async move { task.approval().await }
    });
    broker
        .admin("human/alice")
        .await
        .approve(decide(task.id(), "sdk release"))
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("approval() did not resolve")
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        ApprovalOutcome::Approved {
            by: "spiffe://acme.test/human/alice".into(),
            reason: "sdk release".into(),
        }
    );
    let deploy = task.credential("deploy").expect("the gated credential");
    assert!(is_active(&broker, deploy.secret()).await);

    let denied = std::sync::Arc::new(client.begin_task(request()).await.unwrap());
    let waiting = tokio::spawn({
        let task = std::sync::Arc::clone(&denied);
        async move { task.approval().await }
    });
    broker
        .admin("lead/bob")
        .await
        .deny(decide(denied.id(), "no"))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("approval() did not resolve")
        .unwrap()
        .unwrap_err();
    match e {
        Error::ApprovalDenied { by, reason } => {
            assert_eq!(by, "spiffe://acme.test/lead/bob");
            assert_eq!(reason, "no");
        }
        other => panic!("expected ApprovalDenied, got {other:?}"),
    }
    assert!(denied.credential("deploy").is_none());

    // Nobody decides within the 1 s validity.
    let brief = client
        .begin_task(TaskRequest::new("deploy-brief").intent("deploy the release"))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), brief.approval())
        .await
        .expect("approval() did not resolve")
        .unwrap_err();
    assert!(matches!(e, Error::ApprovalExpired), "{e:?}");
    assert!(brief.credential("deploy").is_none());
    assert!(brief.credential("read").is_some());
    drop((task, denied, brief));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_begin_follows_the_approval_and_an_ended_task_is_moot() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut agent = broker.broker("agent/deployer").await;
    let mut alice = broker.admin("human/alice").await;
    let request = pb::BeginTaskRequest {
        template: "deploy".into(),
        intent: "deploy the release".into(),
        idempotency_key: "release-1.2".into(),
        ..Default::default()
    };
    let begun = agent
        .begin_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    let replay = agent
        .begin_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);
    assert_eq!(grants(&replay.credentials), ["read"]);
    assert_eq!(replay.state, pb::LeaseState::PendingApproval as i32);

    alice.approve(decide(&begun.task_id, "ok")).await.unwrap();
    // A replay is the answer as it stands now: the approval is used.
    let replay = agent.begin_task(request).await.unwrap().into_inner();
    assert_eq!(replay.task_id, begun.task_id);
    assert_eq!(grants(&replay.credentials), ["deploy", "read"]);
    assert_eq!(
        approval_state(replay.approval.as_ref()),
        pb::ApprovalState::Redeemed
    );

    // Once a task has ended, its approval cannot be decided.
    let ended = begin(&mut agent, "deploy").await;
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: ended.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = alice
        .approve(decide(&ended.task_id, "late"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("the task has ended"), "{e:?}");
    broker.stop().await;
}
