//! Lease logic on an injected clock: no sleeps, exact instants.

use std::{sync::Arc, time::Duration, time::UNIX_EPOCH};

use super::*;
use crate::{
    clock::{Clock, ManualClock},
    credentials::{Algorithm, KeySet, Minter, SigningKey},
    identity::{Identity, SpiffeId},
    policy::VerifierCallers,
    revocation::Audiences,
    store::{MemoryStore, TaskState},
    templates::TemplateCatalog,
};

const T0: u64 = 1_800_000_000_000;

const TEMPLATE: &str = r#"
name: review
version: "1"
owner: platform@acme.test
description: Review one pull request.
identities: [spiffe://acme.test/agent/*]
parameters:
  repo: { type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true }
lease: { ttl: 10s, max_ttl: 20s, max_lifetime: 25s }
grants:
  - { name: github, kind: jwt, audience: https://api.github.test, scopes: [{scope: "repo:{repo}:read", class: read}], ttl: 60s }
  - { name: db, kind: opaque, audience: postgres://db/app, scopes: [{scope: "db:select", class: read}], ttl: 4s }
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    clock: Arc<ManualClock>,
    catalog: Arc<TemplateCatalog>,
    service: LeaseService<MemoryStore>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_owned();
    std::fs::write(dir.join("review.yaml"), TEMPLATE).expect("write");
    let catalog = Arc::new(TemplateCatalog::new(dir.clone()).expect("templates"));
    let (key, _) = SigningKey::generate("k1", Algorithm::EdDSA).expect("key");
    let minter = Minter::new(
        Arc::new(KeySet::new(vec![key]).expect("keys")),
        "https://leash.test".into(),
    );
    let clock = Arc::new(ManualClock::new(T0));
    let service = LeaseService::new(
        Arc::new(MemoryStore::new(3_600_000)),
        catalog.clone(),
        minter,
        clock.clone() as Arc<dyn Clock>,
        VerifierCallers::parse(
            "verifier.callers",
            [
                (
                    "spiffe://acme.test/resource/github",
                    vec!["https://api.github.test"],
                ),
                ("spiffe://acme.test/resource/*", vec!["*"]),
            ],
        )
        .expect("callers"),
    )
    .with_actors(
        crate::policy::ActorClasses::parse(
            "actors.classes",
            [crate::policy::ClassSpec {
                name: "any",
                tenant: "default",
                owner: "platform@acme.test",
                identities: vec!["spiffe://acme.test/*"],
                ..crate::policy::ClassSpec::default()
            }],
        )
        .expect("classes"),
    );
    Fixture {
        _dir: tmp,
        dir,
        clock,
        catalog,
        service,
    }
}

fn who(path: &str) -> Identity {
    Identity {
        spiffe_id: SpiffeId::parse(&format!("spiffe://acme.test/{path}")).expect("id"),
        svid_not_after: UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        thumbprint_s256: Some([7; 32]),
        spki_s256: Some([8; 32]),
    }
}

fn request() -> BeginTask {
    BeginTask {
        template: "review".into(),
        parameters: [("repo".to_owned(), "acme/widgets".to_owned())]
            .into_iter()
            .collect(),
        intent: "review PR 1".into(),
        ..BeginTask::default()
    }
}

#[tokio::test]
async fn credentials_are_capped_by_every_bound() {
    let f = fixture();
    let issued = f
        .service
        .begin(&who("agent/a"), request())
        .await
        .expect("begin");
    assert_eq!(issued.task.lease_deadline_ms, T0 + 10_000);
    assert_eq!(issued.task.max_deadline_ms, T0 + 25_000);
    // JWT: grant TTL 60 s, capped by the 10 s lease.
    assert_eq!(issued.credentials[0].record.expires_at_ms, T0 + 10_000);
    // Opaque: grant TTL 4 s, shorter than the lease.
    assert_eq!(issued.credentials[1].record.expires_at_ms, T0 + 4_000);
}

#[tokio::test]
async fn renewals_extend_by_the_ttl_and_stop_at_max_lifetime() {
    let f = fixture();
    let me = who("agent/a");
    let task = f.service.begin(&me, request()).await.expect("begin").task;
    let id = task.id.to_string();
    f.clock.advance(Duration::from_secs(8));
    let r = f.service.renew(&me, &id).await.expect("renew");
    assert_eq!(r.task.lease_deadline_ms, T0 + 18_000);
    f.clock.advance(Duration::from_secs(8));
    let r = f.service.renew(&me, &id).await.expect("renew");
    assert_eq!(
        r.task.lease_deadline_ms,
        T0 + 25_000,
        "capped at max lifetime"
    );
    for c in &r.credentials {
        assert!(c.record.expires_at_ms <= T0 + 25_000);
    }
    f.clock.advance(Duration::from_secs(1));
    let e = f.service.renew(&me, &id).await.expect_err("max lifetime");
    assert!(
        matches!(e, LeaseError::FailedPrecondition(ref m) if m.contains("max lifetime")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_lapsed_lease_is_inactive_at_its_deadline_even_before_the_reaper_runs() {
    let f = fixture();
    let me = who("agent/a");
    let resource = who("resource/api");
    let issued = f.service.begin(&me, request()).await.expect("begin");
    let token = issued.credentials[0].value.expose().to_owned();
    assert!(
        f.service
            .introspect(&resource, &token)
            .await
            .expect("introspect")
            .active
    );
    f.clock.advance(Duration::from_millis(9_999));
    assert!(
        f.service
            .introspect(&resource, &token)
            .await
            .expect("introspect")
            .active
    );
    f.clock.advance(Duration::from_millis(1));
    assert!(
        !f.service
            .introspect(&resource, &token)
            .await
            .expect("introspect")
            .active
    );
    let e = f
        .service
        .renew(&me, issued.task.id.as_str())
        .await
        .expect_err("lapsed");
    assert!(
        matches!(e, LeaseError::FailedPrecondition(ref m) if m.contains("not renewed in time")),
        "{e:?}"
    );
    let done = f
        .service
        .complete(&me, issued.task.id.as_str(), "succeeded", "")
        .await
        .expect("complete");
    assert_eq!(done.task.state, TaskState::Expired);
}

#[tokio::test]
async fn a_narrowed_template_applies_at_the_next_renewal() {
    let f = fixture();
    let me = who("agent/a");
    let task = f.service.begin(&me, request()).await.expect("begin").task;
    // The platform team removes agents from the template.
    let narrowed = TEMPLATE.replace(
        "spiffe://acme.test/agent/*",
        "spiffe://acme.test/agent/other",
    );
    std::fs::write(f.dir.join("review.yaml"), narrowed).expect("write");
    // Make sure the change is seen even within the same mtime second.
    assert!(f.catalog.reload().expect("reload"));
    let e = f
        .service
        .renew(&me, task.id.as_str())
        .await
        .expect_err("narrowed");
    assert!(matches!(e, LeaseError::PermissionDenied(_)), "{e:?}");
    // Completion is still allowed: ending a task never needs permission beyond ownership.
    f.service
        .complete(&me, task.id.as_str(), "cancelled", "")
        .await
        .expect("complete");
}

#[tokio::test]
async fn a_verifier_learns_nothing_of_audiences_it_does_not_serve() {
    let f = fixture();
    let issued = f
        .service
        .begin(&who("agent/a"), request())
        .await
        .expect("begin");
    let github = issued.credentials[0].value.expose().to_owned();
    let db = issued.credentials[1].value.expose().to_owned();
    let only_github = who("resource/github");
    assert_eq!(
        f.service
            .authorize_verifier(&only_github, "watch revocations")
            .expect("a verifier"),
        Audiences::Only(["https://api.github.test".to_owned()].into())
    );
    let mine = f
        .service
        .introspect(&only_github, &github)
        .await
        .expect("introspect");
    assert!(mine.active);
    let theirs = f
        .service
        .introspect(&only_github, &db)
        .await
        .expect("introspect");
    assert!(!theirs.active && theirs.record.is_none(), "{theirs:?}");
    // `["*"]` serves both.
    let any = who("resource/api");
    assert_eq!(
        f.service
            .authorize_verifier(&any, "introspect")
            .expect("a verifier"),
        Audiences::All
    );
    assert!(
        f.service
            .introspect(&any, &db)
            .await
            .expect("introspect")
            .active
    );
    // No entry matches an agent.
    let e = f
        .service
        .introspect(&who("agent/a"), &github)
        .await
        .expect_err("not a verifier");
    assert!(
        matches!(e, LeaseError::PermissionDenied(ref m) if m.contains("verifier.callers")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_forged_opaque_token_for_a_real_credential_id_is_inactive() {
    let f = fixture();
    let issued = f
        .service
        .begin(&who("agent/a"), request())
        .await
        .expect("begin");
    let real = issued.credentials[1].value.expose().to_owned();
    let (head, _) = real.rsplit_once('.').expect("dot");
    let forged = format!("{head}.{}", "B".repeat(43));
    let resource = who("resource/api");
    assert!(
        f.service
            .introspect(&resource, &real)
            .await
            .expect("real")
            .active
    );
    assert!(
        !f.service
            .introspect(&resource, &forged)
            .await
            .expect("forged")
            .active
    );
}

/// Found by the fault test (broker/tests/faults.rs): a JWT's expiry is whole
/// seconds rounded down, so in the last fraction of a second of a lease no JWT
/// fits inside it. A call landing there must be refused as the task's state
/// (FAILED_PRECONDITION, naming what to do), never an INTERNAL error: the SDK
/// does not retry INTERNAL and reports its outcome as unknown.
#[tokio::test]
async fn no_room_for_a_jwt_in_the_lease_is_a_failed_precondition_not_internal() {
    let f = fixture();
    let me = who("agent/a");
    let too_soon = |e: &LeaseError| matches!(e, LeaseError::FailedPrecondition(m) if m.contains("too soon to issue"));
    let mut wrong = Vec::new();

    // A BeginTask retry (same idempotency key) 200 ms before its lease ends.
    f.clock.advance(Duration::from_millis(300));
    let keyed = BeginTask {
        idempotency_key: Some("job-1".into()),
        ..request()
    };
    let first = f.service.begin(&me, keyed.clone()).await.expect("begin");
    assert_eq!(first.task.lease_deadline_ms, T0 + 10_300);
    f.clock.advance(Duration::from_millis(9_800));
    let e = f.service.begin(&me, keyed).await.expect_err("no room");
    if !too_soon(&e) {
        wrong.push(format!("replay: {e:?}"));
    }

    // A renewal 30 ms before its lease ends and 50 ms before the max lifetime,
    // which caps the new deadline (begun at 10.1 s: max lifetime at 35.1 s).
    let task = f.service.begin(&me, request()).await.expect("begin").task;
    let id = task.id.to_string();
    assert_eq!(task.max_deadline_ms, T0 + 35_100);
    f.clock.advance(Duration::from_secs(8));
    f.service.renew(&me, &id).await.expect("renew");
    f.clock.advance(Duration::from_millis(6_980));
    let r = f.service.renew(&me, &id).await.expect("renew");
    assert_eq!(r.task.lease_deadline_ms, T0 + 35_080);
    f.clock.advance(Duration::from_millis(9_970));
    let e = f.service.renew(&me, &id).await.expect_err("no room");
    // Capped at the max lifetime: the task is at its end, and says so.
    if !matches!(&e, LeaseError::FailedPrecondition(m) if m.contains("max lifetime")) {
        wrong.push(format!("renew: {e:?}"));
    }

    // Now 35.05 s: a begin asking for 500 ms would end at 35.55 s, its JWT at 35 s.
    let short = BeginTask {
        requested_ttl: Some(Duration::from_millis(500)),
        ..request()
    };
    let e = f.service.begin(&me, short).await.expect_err("no room");
    if !too_soon(&e) {
        wrong.push(format!("short begin: {e:?}"));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The fixture with classes: `agent/*` (tenant `default`, the template's) with
/// a 5 s TTL ceiling and one begin per identity per minute; `partner/*` in
/// tenant `partner`; nothing else classified.
fn fixture_with_classes() -> Fixture {
    let mut f = fixture();
    let classes = crate::policy::ActorClasses::parse(
        "actors.classes",
        [
            crate::policy::ClassSpec {
                name: "agent",
                tenant: "default",
                owner: "platform@acme.test",
                identities: vec!["spiffe://acme.test/agent/*"],
                max_ttl: Some(Duration::from_secs(5)),
                begin_rate_per_identity: Some("1/1m"),
                ..crate::policy::ClassSpec::default()
            },
            crate::policy::ClassSpec {
                name: "partner",
                tenant: "partner",
                owner: "partner@partner.test",
                identities: vec!["spiffe://acme.test/partner/*"],
                ..crate::policy::ClassSpec::default()
            },
        ],
    )
    .expect("classes");
    f.service = f.service.with_actors(classes);
    f
}

#[tokio::test]
async fn an_unclassified_identity_is_denied_before_anything_else() {
    let f = fixture_with_classes();
    let mut bad = request();
    bad.template = "no-such-template".into();
    for req in [request(), bad] {
        let err = f
            .service
            .begin(&who("ops/x"), req)
            .await
            .expect_err("denied");
        assert!(
            matches!(&err, LeaseError::PermissionDenied(m) if m.contains("no actor class matches")),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn another_tenants_template_is_answered_like_an_unknown_one() {
    let f = fixture_with_classes();
    let err = f
        .service
        .begin(&who("partner/p"), request())
        .await
        .expect_err("foreign");
    let mut unknown = request();
    unknown.template = "nope".into();
    let want = f
        .service
        .begin(&who("partner/p"), unknown)
        .await
        .expect_err("unknown");
    assert!(matches!(err, LeaseError::TemplateNotFound(_)), "{err:?}");
    assert_eq!(
        err.to_string().replace("review", "X"),
        want.to_string().replace("nope", "X")
    );
    // And the owner's task is not found for the partner either.
    let task = f
        .service
        .begin(&who("agent/a"), request())
        .await
        .expect("begin")
        .task;
    for res in [
        f.service
            .renew(&who("partner/p"), task.id.as_str())
            .await
            .map(|_| ()),
        f.service
            .complete(&who("partner/p"), task.id.as_str(), "succeeded", "")
            .await
            .map(|_| ()),
    ] {
        assert!(matches!(res, Err(LeaseError::TaskNotFound(_))), "{res:?}");
    }
    assert_eq!(task.class, "agent");
    assert_eq!(task.tenant, "default");
}

#[tokio::test]
async fn the_class_ceiling_refuses_longer_requests_and_caps_the_default() {
    let f = fixture_with_classes();
    let mut long = request();
    long.requested_ttl = Some(Duration::from_secs(6));
    match f.service.begin(&who("agent/a"), long).await {
        Err(LeaseError::InvalidArgument(ps)) => {
            assert_eq!(ps.len(), 1);
            assert_eq!(ps[0].field, "requested_ttl");
            assert!(
                ps[0].reason.contains("max_ttl of actor class \"agent\""),
                "{ps:?}"
            );
        }
        other => panic!("want requested_ttl refused: {other:?}"),
    }
    // The template's 10 s default is capped at 5 s; the refusal spent no token.
    let task = f
        .service
        .begin(&who("agent/a"), request())
        .await
        .expect("begin")
        .task;
    assert_eq!(task.lease_ttl_ms, 5_000);
    assert_eq!(task.lease_deadline_ms, T0 + 5_000);
}

#[tokio::test]
async fn a_begin_rate_holds_back_only_its_identity_until_it_refills() {
    let f = fixture_with_classes();
    f.service
        .begin(&who("agent/a"), request())
        .await
        .expect("first");
    match f.service.begin(&who("agent/a"), request()).await {
        Err(LeaseError::QuotaExceeded {
            message,
            retry_after_ms,
        }) => {
            assert_eq!(retry_after_ms, 60_000);
            assert!(
                message.contains("begin_rate_per_identity 1/1m"),
                "{message}"
            );
        }
        other => panic!("want the rate refused: {other:?}"),
    }
    f.service
        .begin(&who("agent/b"), request())
        .await
        .expect("other identity");
    f.clock.advance(Duration::from_secs(60));
    f.service
        .begin(&who("agent/a"), request())
        .await
        .expect("refilled");
}
