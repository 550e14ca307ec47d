//! The task lifecycle end to end, over real mTLS, on both stores.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_e2e::{
    BrokerOptions, RedisServer, TestBroker, assert_not_logged, is_active, ms, pb, review_request,
};
use tonic::Code;

fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// begin → introspect active → renew → complete → inactive, for both grant kinds.
async fn full_lifecycle(broker: &TestBroker) {
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    assert!(begun.task_id.starts_with("tk_"));
    assert!(!begun.replayed);
    assert_eq!(begun.credentials.len(), 2, "one credential per grant");
    let lease_end = begun.lease_expires_at.unwrap().seconds;
    let max_end = begun.max_lifetime_at.unwrap().seconds;
    assert!(lease_end <= max_end);

    let jwt = &begun.credentials[0];
    assert_eq!(jwt.kind(), pb::CredentialKind::Jwt);
    assert_eq!(jwt.grant, "github");
    assert_eq!(jwt.audience, "https://api.github.test");
    assert_eq!(jwt.scopes, vec!["repo:acme/widgets:read"]);
    assert!(
        jwt.expires_at.unwrap().seconds <= lease_end,
        "credential outlives its lease"
    );
    let claims = jwt_claims(&jwt.value);
    assert_eq!(claims["sub"], "spiffe://acme.test/agent/reviewer");
    assert_eq!(claims["aud"], "https://api.github.test");
    assert_eq!(claims["scope"], "repo:acme/widgets:read");
    assert_eq!(claims["iss"], "https://leash.acme.test");
    assert_eq!(claims["jti"], jwt.id.as_str());
    assert_eq!(claims["task_id"], begun.task_id.as_str());
    assert_eq!(claims["template"], "review");
    for c in ["iat", "nbf", "exp"] {
        assert!(claims[c].is_u64(), "{c} missing");
    }
    let x5t = claims["cnf"]["x5t#S256"].as_str().unwrap();
    assert_eq!(URL_SAFE_NO_PAD.decode(x5t).unwrap().len(), 32);

    let opaque = &begun.credentials[1];
    assert_eq!(opaque.kind(), pb::CredentialKind::Opaque);
    assert!(opaque.value.starts_with("lsh_"));

    let mut verifier = broker.verifier("resource/api").await;
    for c in &begun.credentials {
        let r = verifier
            .introspect(pb::IntrospectRequest {
                token: c.value.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.active, "{} should be active", c.grant);
        assert_eq!(r.sub, "spiffe://acme.test/agent/reviewer");
        assert_eq!(r.task_id, begun.task_id);
        assert_eq!(r.jti, c.id);
        assert_eq!(r.cnf_x5t_s256, x5t);
    }

    let renewed = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.credentials.len(), 2);
    assert!(ms(renewed.lease_expires_at) >= ms(begun.lease_expires_at));
    assert_ne!(
        renewed.credentials[0].value, jwt.value,
        "renewal returns fresh credentials"
    );
    for c in &renewed.credentials {
        assert!(is_active(broker, &c.value).await);
    }

    let done = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            summary: "approved".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), pb::LeaseState::Completed);
    assert_eq!(done.revoked_credentials, 4, "both generations revoked");
    // When CompleteTask returns, every credential is inactive.
    for c in begun.credentials.iter().chain(&renewed.credentials) {
        assert!(
            !is_active(broker, &c.value).await,
            "{} still active after completion",
            c.grant
        );
    }
    // Completing again is idempotent.
    let again = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: pb::Outcome::Succeeded.into(),
            summary: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state(), pb::LeaseState::Completed);
    assert_eq!(again.revoked_credentials, 0);
    // Renewing a completed task is refused.
    let err = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let values: Vec<String> = begun
        .credentials
        .iter()
        .chain(&renewed.credentials)
        .map(|c| c.value.clone())
        .collect();
    assert_not_logged(&values);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_in_memory() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    full_lifecycle(&broker).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_on_redis() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    full_lifecycle(&broker).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_is_stored_in_redis() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let dump = redis.dump_all();
    assert!(
        dump.contains(&begun.task_id),
        "the dump should hold the task"
    );
    for c in &begun.credentials {
        assert!(
            !dump.contains(&c.value),
            "credential value stored in the clear"
        );
        let secret = c.value.rsplit_once('.').unwrap().1;
        assert!(
            !dump.contains(secret),
            "credential secret part stored in the clear"
        );
        assert!(dump.contains(&leash_broker::credentials::value_digest(&c.value)));
    }
    broker.stop().await;
}

const SHORT_LIFETIME: &str = r#"
name: short
version: "1"
owner: platform@acme.test
description: A task that may live three seconds.
identities: [spiffe://acme.test/agent/*]
parameters:
  repo: { type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true }
lease: { ttl: 2s, max_ttl: 2s, max_lifetime: 3s }
grants:
  - { name: github, kind: jwt, audience: https://api.github.test, scopes: [{scope: "repo:{repo}:read", class: read}], ttl: 10s }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_past_max_lifetime_is_refused() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates.push(SHORT_LIFETIME.to_owned());
    let broker = TestBroker::start(options).await;
    let mut req = review_request();
    req.template = "short".into();
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent.begin_task(req).await.unwrap().into_inner();
    // Credential TTL (10s) is capped by the lease (2s).
    assert!(ms(begun.credentials[0].expires_at) <= ms(begun.lease_expires_at));
    lifetime_is_bounded_for(&broker, "short").await;
    broker.stop().await;
}

async fn lifetime_is_bounded_for(broker: &TestBroker, template: &str) {
    let mut req = review_request();
    req.template = template.into();
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent.begin_task(req).await.unwrap().into_inner();
    let max = ms(begun.max_lifetime_at);
    let mut refused = None;
    for _ in 0..40 {
        match agent
            .renew_lease(pb::RenewLeaseRequest {
                task_id: begun.task_id.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                assert!(ms(r.lease_expires_at) <= max, "lease passed max lifetime");
                for c in &r.credentials {
                    assert!(ms(c.expires_at) <= max);
                }
            }
            // Sooner than the template's min_renew_interval (500 ms here): wait on.
            Err(e) if e.code() == Code::ResourceExhausted => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let e = refused.expect("renewal past max lifetime must be refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("max lifetime"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_past_max_lifetime_is_refused_in_memory() {
    let mut options = BrokerOptions::memory();
    options.templates.push(SHORT_LIFETIME.to_owned());
    let broker = TestBroker::start(options).await;
    lifetime_is_bounded_for(&broker, "short").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_cannot_renew_or_complete() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let mut owner = broker.broker("agent/owner").await;
    let mut other = broker.broker("agent/intruder").await;
    let begun = owner
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let e = other
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = other
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nothing changed: the owner's credentials still work, and the owner can still renew.
    for c in &begun.credentials {
        assert!(is_active(&broker, &c.value).await);
    }
    owner
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .unwrap();
    broker.stop().await;
}

async fn idempotent_begin(broker: &TestBroker) {
    let mut agent = broker.broker("agent/reviewer").await;
    let mut req = review_request();
    req.idempotency_key = "retry-7".into();
    let first = agent.begin_task(req.clone()).await.unwrap().into_inner();
    let second = agent.begin_task(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.task_id, second.task_id, "same key, same task");
    assert!(!first.replayed);
    assert!(second.replayed);
    assert_eq!(
        first.lease_expires_at, second.lease_expires_at,
        "a replay does not extend the lease"
    );
    // The same key from another identity is another task.
    let mut other = broker.broker("agent/other").await;
    let third = other.begin_task(req.clone()).await.unwrap().into_inner();
    assert_ne!(third.task_id, first.task_id);
    // The same key with a different request is refused and changes nothing.
    let mut changed = req.clone();
    changed.intent = "something else".into();
    let e = agent.begin_task(changed).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("idempotency_key"));
    // After completion, a replay is refused rather than resurrecting the task.
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: first.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = agent.begin_task(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_begin_in_memory() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    idempotent_begin(&broker).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_begin_on_redis() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    idempotent_begin(&broker).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_and_caller_checks() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    // Unknown template: NOT_FOUND.
    let mut agent = broker.broker("agent/reviewer").await;
    let mut req = review_request();
    req.template = "nope".into();
    assert_eq!(
        agent.begin_task(req).await.unwrap_err().code(),
        Code::NotFound
    );
    // An identity outside the template's identities: PERMISSION_DENIED.
    let mut service = broker.broker("service/batch").await;
    let e = service.begin_task(review_request()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Unknown task: NOT_FOUND.
    let e = agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: format!("tk_{}", "0".repeat(32)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Only allowed callers may introspect.
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let mut not_allowed = broker.verifier("agent/reviewer").await;
    let e = not_allowed
        .introspect(pb::IntrospectRequest {
            token: begun.credentials[0].value.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Garbage and forged tokens are simply inactive.
    let forged = {
        let v = &begun.credentials[0].value;
        let (head, _) = v.rsplit_once('.').unwrap();
        format!("{head}.{}", URL_SAFE_NO_PAD.encode([0u8; 64]))
    };
    let opaque_guess = {
        let v = &begun.credentials[1].value;
        let (head, _) = v.rsplit_once('.').unwrap();
        format!("{head}.{}", "A".repeat(43))
    };
    for t in [
        "garbage",
        "a.b.c",
        "lsh_nothing",
        forged.as_str(),
        opaque_guess.as_str(),
    ] {
        assert!(!is_active(&broker, t).await, "{t} should be inactive");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_name_the_field_and_change_nothing() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(BrokerOptions::redis(&redis)).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let keys_before = redis.command("DBSIZE");
    let with = |f: &dyn Fn(&mut pb::BeginTaskRequest)| {
        let mut r = review_request();
        f(&mut r);
        r
    };
    let cases: Vec<(&str, pb::BeginTaskRequest)> = vec![
        ("template", with(&|r| r.template.clear())),
        ("intent", with(&|r| r.intent.clear())),
        ("intent", with(&|r| r.intent = "x".repeat(1025))),
        (
            "parameters.repo",
            with(&|r| {
                r.parameters.clear();
            }),
        ),
        (
            "parameters.repo",
            with(&|r| {
                r.parameters.insert("repo".into(), "Not A Repo!".into());
            }),
        ),
        (
            "parameters.env",
            with(&|r| {
                r.parameters.insert("env".into(), "dev".into());
            }),
        ),
        (
            "parameters.bogus",
            with(&|r| {
                r.parameters.insert("bogus".into(), "x".into());
            }),
        ),
        (
            "requested_ttl",
            with(&|r| {
                r.requested_ttl = Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                })
            }),
        ),
        (
            "requested_ttl",
            with(&|r| {
                r.requested_ttl = Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                })
            }),
        ),
        (
            "requested_ttl",
            with(&|r| {
                r.requested_ttl = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                })
            }),
        ),
        (
            "idempotency_key",
            with(&|r| r.idempotency_key = "has space".into()),
        ),
        (
            "idempotency_key",
            with(&|r| r.idempotency_key = "k".repeat(129)),
        ),
    ];
    for (field, req) in cases {
        let e = agent.begin_task(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(field),
            "message {:?} should name {field}",
            e.message()
        );
    }
    for bad in ["", "tk_short", "TK_00000000000000000000000000000000"] {
        let e = agent
            .renew_lease(pb::RenewLeaseRequest {
                task_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("task_id"));
        let e = agent
            .complete_task(pb::CompleteTaskRequest {
                task_id: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let e = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: 99,
            summary: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("outcome"));
    let e = agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: 1,
            summary: "s".repeat(1025),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("summary"));
    // The rejected completions changed nothing.
    assert!(is_active(&broker, &begun.credentials[0].value).await);
    let mut verifier = broker.verifier("resource/api").await;
    for bad in [String::new(), "x".repeat(8 * 1024 + 1)] {
        let e = verifier
            .introspect(pb::IntrospectRequest { token: bad })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("token"));
    }
    // Only the one successful begin wrote to Redis (its task keys plus the shard index).
    assert_ne!(keys_before, redis.command("DBSIZE"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_tells_each_credentials_whole_story() {
    let broker = TestBroker::start(BrokerOptions::memory()).await;
    let mut agent = broker.broker("agent/audited").await;
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id.clone(),
            outcome: pb::Outcome::Failed.into(),
            summary: "could not finish".into(),
        })
        .await
        .unwrap();
    let mut outsider = broker.broker("service/outsider").await;
    let _ = outsider.begin_task(review_request()).await.unwrap_err();

    let logs = leash_e2e::logs();
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("leash::audit"))
        .collect();
    let story = |needle: &str| -> Vec<&str> {
        audit
            .iter()
            .copied()
            .filter(|l| l.contains(needle))
            .collect()
    };
    let task = story(&begun.task_id);
    assert!(
        task.iter()
            .any(|l| l.contains("task.begun") && l.contains("review pull request 42"))
    );
    assert!(
        task.iter()
            .any(|l| l.contains("task.completed") && l.contains("failed"))
    );
    for c in &begun.credentials {
        let lines = story(&c.id);
        let issued = lines.iter().position(|l| l.contains("credential.issued"));
        let revoked = lines
            .iter()
            .position(|l| l.contains("credential.revoked") && l.contains("completion"));
        assert!(
            issued.is_some() && revoked.is_some(),
            "story of {} incomplete: {lines:#?}",
            c.id
        );
        assert!(issued < revoked, "issued after revoked?");
        assert!(lines.iter().all(|l| !l.contains(&c.value)));
    }
    assert!(
        audit.iter().any(|l| l.contains("task.denied") && l.contains("spiffe://acme.test/service/outsider")),
        "denials are audited"
    );
    broker.stop().await;
}
