//! Delegation that only narrows (issue 8), end to end on a real
//! `redis-server` through the real gRPC edge:
//!
//! - a subset of the parent's scopes is accepted, a superset denied naming
//!   each extra scope; only the parent's owner delegates; the TTL is clamped
//!   to the parent's remaining lease; the depth limit and `may_act` hold at
//!   every level; a template with `max_depth: 0` forbids delegation;
//! - the handle is one-time and only the named subagent may spend it;
//! - a 3-level tree ends in the one CompleteTask of its root: every
//!   descendant's credential is inactive when the call returns and is in the
//!   revocation stream (reason `cascade`).
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::HashSet;

use base64::Engine as _;
use leash_e2e::{BrokerOptions, RedisServer, TestBroker, is_active, ms, pb, watch_revocations};
use serde_json::Value;
use tonic::{Code, transport::Channel};

type Broker = pb::broker_client::BrokerClient<Channel>;

const FANOUT: &str = r#"
name: fanout
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
parameters:
  repo: {type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true}
lease: {ttl: 20s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
delegation:
  max_depth: 2
  may_act: ["spiffe://acme.test/sub/*"]
grants:
  - name: github
    kind: jwt
    audience: https://api.github.test
    scopes:
      - {scope: "repo:{repo}:read", class: read}
      - {scope: "repo:{repo}:write", class: write}
    ttl: 60s
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

const SOLO: &str = r#"
name: solo
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 20s, max_ttl: 1m, max_lifetime: 10m}
delegation: {max_depth: 0}
grants:
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

async fn broker(redis: &RedisServer) -> TestBroker {
    let mut options = BrokerOptions::redis(redis);
    options.templates = vec![FANOUT.to_owned(), SOLO.to_owned()];
    TestBroker::start(options).await
}

async fn begin(agent: &mut Broker, template: &str) -> pb::BeginTaskResponse {
    agent
        .begin_task(pb::BeginTaskRequest {
            template: template.into(),
            parameters: if template == "fanout" {
                [("repo".to_owned(), "acme/widgets".to_owned())].into()
            } else {
                Default::default()
            },
            intent: "fan out".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn delegation(parent: &str, subagent: &str, grants: &[(&str, &[&str])]) -> pb::DelegateTaskRequest {
    pb::DelegateTaskRequest {
        parent_task_id: parent.into(),
        subagent: format!("spiffe://acme.test/{subagent}"),
        grants: grants
            .iter()
            .map(|(g, s)| pb::GrantScopes {
                grant: (*g).into(),
                scopes: s.iter().map(|s| (*s).to_owned()).collect(),
            })
            .collect(),
        intent: "a narrower part".into(),
        requested_ttl: None,
    }
}

async fn redeem(sub: &mut Broker, d: &pb::DelegateTaskResponse) -> pb::BeginTaskResponse {
    sub.redeem_delegation(pb::RedeemDelegationRequest {
        task_id: d.task_id.clone(),
        delegation_handle: d.delegation_handle.clone(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// The JWT's claims, unverified (verification is PyJWT's job in the
/// interop test; here only their content matters).
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_only_narrows_at_every_level() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut root = broker.broker("agent/root").await;
    let parent = begin(&mut root, "fanout").await;

    // A superset is denied, naming each extra scope and grant; nothing is created.
    let err = root
        .delegate_task(delegation(
            &parent.task_id,
            "sub/one",
            &[
                (
                    "github",
                    &["repo:acme/widgets:read", "repo:acme/widgets:admin"],
                ),
                ("vault", &[]),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("\"repo:acme/widgets:admin\"")
            && err.message().contains("\"vault\""),
        "{}",
        err.message()
    );
    assert!(
        !err.message().contains("\"repo:acme/widgets:read\""),
        "only the extra scopes are named: {}",
        err.message()
    );

    // Only the parent's owner may delegate.
    let mut other = broker.broker("agent/other").await;
    let err = other
        .delegate_task(delegation(&parent.task_id, "sub/one", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A subset is accepted; a TTL above the parent's remaining lease is clamped.
    let mut wanted = delegation(
        &parent.task_id,
        "sub/one",
        &[("github", &["repo:acme/widgets:read"])],
    );
    wanted.requested_ttl = Some(prost_types::Duration {
        seconds: 50,
        nanos: 0,
    });
    let one = root.delegate_task(wanted).await.unwrap().into_inner();
    assert_eq!(one.depth, 1);
    assert!(one.delegation_handle.starts_with("lsd_"));
    assert!(
        ms(one.lease_expires_at) <= ms(parent.lease_expires_at),
        "the child's lease never passes the parent's"
    );
    assert!(ms(one.max_lifetime_at) <= ms(parent.max_lifetime_at));
    assert_eq!(one.grants.len(), 1);
    assert_eq!(one.grants[0].scopes, ["repo:acme/widgets:read"]);

    // The handle is the named subagent's, once; the child cannot be renewed before.
    let mut sub_one = broker.broker("sub/one").await;
    let err = sub_one
        .renew_lease(pb::RenewLeaseRequest {
            task_id: one.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut intruder = broker.broker("sub/intruder").await;
    let err = intruder
        .redeem_delegation(pb::RedeemDelegationRequest {
            task_id: one.task_id.clone(),
            delegation_handle: one.delegation_handle.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The handle with its last character changed (to another one: a handle
    // ending in 'A' once made this "forgery" the real handle, 1 run in 64).
    let mut forged = one.delegation_handle.clone();
    let last = forged.pop();
    forged.push(if last == Some('A') { 'B' } else { 'A' });
    assert_ne!(forged, one.delegation_handle);
    let err = sub_one
        .redeem_delegation(pb::RedeemDelegationRequest {
            task_id: one.task_id.clone(),
            delegation_handle: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let got = redeem(&mut sub_one, &one).await;
    assert_eq!(
        got.actors,
        [
            "spiffe://acme.test/sub/one",
            "spiffe://acme.test/agent/root"
        ]
    );
    assert_eq!(got.credentials.len(), 1, "only the delegated grant");
    let c = claims(&got.credentials[0].value);
    assert_eq!(c["sub"], "spiffe://acme.test/agent/root");
    assert_eq!(
        c["act"],
        serde_json::json!({"sub": "spiffe://acme.test/sub/one"})
    );
    assert_eq!(c["client_id"], "spiffe://acme.test/sub/one");
    assert_eq!(c["scope"], "repo:acme/widgets:read");
    assert!(
        c["cnf"]["x5t#S256"].is_string(),
        "bound to the subagent's SVID"
    );
    let err = sub_one
        .redeem_delegation(pb::RedeemDelegationRequest {
            task_id: one.task_id.clone(),
            delegation_handle: one.delegation_handle.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "a second use: {err:?}"
    );
    // Now the subagent renews its own task.
    sub_one
        .renew_lease(pb::RenewLeaseRequest {
            task_id: one.task_id.clone(),
        })
        .await
        .unwrap();

    // The child can narrow further, never widen back to what the root holds.
    let err = sub_one
        .delegate_task(delegation(
            &one.task_id,
            "sub/two",
            &[("github", &["repo:acme/widgets:write"])],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("repo:acme/widgets:write"),
        "{}",
        err.message()
    );
    // may_act holds at every level.
    let err = sub_one
        .delegate_task(delegation(&one.task_id, "agent/elsewhere", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("may_act"), "{}", err.message());
    let two = sub_one
        .delegate_task(delegation(&one.task_id, "sub/two", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(two.depth, 2);
    let mut sub_two = broker.broker("sub/two").await;
    let got_two = redeem(&mut sub_two, &two).await;
    let c = claims(&got_two.credentials[0].value);
    assert_eq!(
        c["act"],
        serde_json::json!({"sub": "spiffe://acme.test/sub/two", "act": {"sub": "spiffe://acme.test/sub/one"}})
    );
    // Depth 3 is past the template's max_depth 2.
    let err = sub_two
        .delegate_task(delegation(&two.task_id, "sub/three", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("max_depth"), "{}", err.message());

    // A template with max_depth 0 forbids delegation.
    let solo = begin(&mut root, "solo").await;
    let err = root
        .delegate_task(delegation(&solo.task_id, "sub/one", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("forbids delegation"),
        "{}",
        err.message()
    );

    // Bad input is named.
    let mut bad = delegation(&parent.task_id, "x", &[]);
    bad.subagent = "not-a-spiffe-id".into();
    let err = root.delegate_task(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("subagent"), "{}", err.message());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_the_root_ends_a_three_level_tree_in_one_call() {
    let redis = RedisServer::start();
    let broker = broker(&redis).await;
    let mut stream = watch_revocations(&broker, "resource/api", "")
        .await
        .unwrap();
    let (_, _) = leash_e2e::read_until_caught_up(&mut stream).await;

    let mut root = broker.broker("agent/root").await;
    let top = begin(&mut root, "fanout").await;
    let mut tokens: Vec<(String, String)> = top
        .credentials
        .iter()
        .map(|c| (c.id.clone(), c.value.clone()))
        .collect();
    let mut subs = Vec::new();
    for name in ["sub/a", "sub/b"] {
        let d = root
            .delegate_task(delegation(&top.task_id, name, &[]))
            .await
            .unwrap()
            .into_inner();
        let mut sub = broker.broker(name).await;
        let got = redeem(&mut sub, &d).await;
        tokens.extend(
            got.credentials
                .iter()
                .map(|c| (c.id.clone(), c.value.clone())),
        );
        subs.push((sub, d.task_id));
    }
    let (sub_a, a_task) = &mut subs[0];
    let g = sub_a
        .delegate_task(delegation(a_task, "sub/grandchild", &[("db", &[])]))
        .await
        .unwrap()
        .into_inner();
    let mut grandchild = broker.broker("sub/grandchild").await;
    let got = redeem(&mut grandchild, &g).await;
    tokens.extend(
        got.credentials
            .iter()
            .map(|c| (c.id.clone(), c.value.clone())),
    );
    for (_, value) in &tokens {
        assert!(is_active(&broker, value).await);
    }

    let done = root
        .complete_task(pb::CompleteTaskRequest {
            task_id: top.task_id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            summary: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.revoked_descendants, 3, "{done:?}");
    assert_eq!(done.revoked_credentials as usize, tokens.len());
    // Inactive as soon as the call returned.
    for (id, value) in &tokens {
        assert!(!is_active(&broker, value).await, "{id} still active");
    }
    // The revocation stream tells of every one.
    let want: HashSet<String> = tokens.iter().map(|(id, _)| id.clone()).collect();
    let mut seen = HashSet::new();
    let mut reasons = HashSet::new();
    for _ in 0..50 {
        if want.is_subset(&seen) {
            break;
        }
        let batch = leash_e2e::next_batch(&mut stream).await;
        for r in batch.revocations {
            reasons.insert(r.reason.clone());
            seen.insert(r.credential_id);
        }
    }
    assert!(
        want.is_subset(&seen),
        "missing: {:?}",
        want.difference(&seen)
    );
    assert!(
        reasons.contains("cascade") && reasons.contains("completion"),
        "{reasons:?}"
    );
    // The descendants are revoked, and say so.
    let err = grandchild
        .renew_lease(pb::RenewLeaseRequest {
            task_id: g.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());
    broker.stop().await;
}
