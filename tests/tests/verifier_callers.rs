//! Verifiers see only the audiences they serve (issue 6, item 11), end to end on
//! real `redis-server`: `[verifier] callers` maps each verifier identity to its
//! audiences, Introspect answers a token of any other audience exactly like an
//! unknown token, and WatchRevocations delivers only the verifier's audiences,
//! in the snapshot, live and on resume.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::HashSet;

use leash_e2e::{
    BrokerOptions, RedisServer, TestBroker, begin_and_complete, next_batch, pb,
    read_until_caught_up, review_request, watch_revocations,
};
use tonic::{Code, Streaming};

/// The audience of the review template's `github` grant (a JWT).
const GITHUB: &str = "https://api.github.test";
/// The audience of the review template's `db` grant (an opaque token).
const DB: &str = "postgres://db.acme.test/app";

/// Serves [`GITHUB`] only, though the `resource/*` entry below matches it too:
/// the first matching entry wins.
const GITHUB_SERVER: &str = "resource/github";
/// Matched by `resource/*`: serves [`DB`] only.
const DB_SERVER: &str = "resource/db";
/// `audiences = ["*"]`: serves every audience.
const AUDITOR: &str = "ops/revocation-auditor";
/// Matched by no entry.
const STRANGER: &str = "ops/stranger";

/// The `[verifier]` body every test here runs with.
fn callers() -> String {
    format!(
        r#"callers = [
  {{ identity = "spiffe://acme.test/{GITHUB_SERVER}", audiences = ["{GITHUB}"] }},
  {{ identity = "spiffe://acme.test/resource/*", audiences = ["{DB}"] }},
  {{ identity = "spiffe://acme.test/{AUDITOR}", audiences = ["*"] }},
]"#
    )
}

async fn start(redis: &RedisServer) -> TestBroker {
    let mut options = BrokerOptions::redis(redis);
    options.verifier_toml = Some(callers());
    TestBroker::start(options).await
}

async fn introspect(broker: &TestBroker, path: &str, token: &str) -> pb::IntrospectResponse {
    broker
        .verifier(path)
        .await
        .introspect(pb::IntrospectRequest {
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The review task's credential for `audience`.
fn of(credentials: &[pb::Credential], audience: &str) -> pb::Credential {
    credentials
        .iter()
        .find(|c| c.audience == audience)
        .unwrap_or_else(|| panic!("no credential for {audience}"))
        .clone()
}

fn ids(revocations: &[pb::Revocation]) -> HashSet<String> {
    revocations
        .iter()
        .map(|r| r.credential_id.clone())
        .collect()
}

/// Reads live batches until every id of `want` has come; panics on any
/// revocation of another audience than `audience` (`None`: any is fine).
async fn read_until(
    stream: &mut Streaming<pb::RevocationBatch>,
    want: &HashSet<String>,
    audience: Option<&str>,
) -> String {
    let mut seen = HashSet::new();
    loop {
        let b = next_batch(stream).await;
        for r in &b.revocations {
            if let Some(a) = audience {
                assert_eq!(
                    r.audience, a,
                    "a watcher serving {a} was told of {} ({})",
                    r.credential_id, r.audience
                );
            }
        }
        seen.extend(ids(&b.revocations));
        if want.is_subset(&seen) {
            return b.cursor;
        }
    }
}

/// (a), (c): a live token of an audience the caller does not serve is answered
/// exactly like a token the broker never issued; its own audience's is active;
/// `["*"]` sees both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_answers_only_for_the_callers_audiences() {
    let redis = RedisServer::start();
    let broker = start(&redis).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    let github = of(&begun.credentials, GITHUB);
    let db = of(&begun.credentials, DB);
    let unknown = introspect(&broker, GITHUB_SERVER, "lsh_nothing-the-broker-issued").await;
    assert_eq!(unknown, pb::IntrospectResponse::default());

    for (server, own, foreign) in [(GITHUB_SERVER, &github, &db), (DB_SERVER, &db, &github)] {
        let mine = introspect(&broker, server, &own.value).await;
        assert!(mine.active, "{server} must see its own audience's token");
        assert_eq!(mine.aud, own.audience);
        assert_eq!(mine.jti, own.id);
        assert_eq!(mine.sub, "spiffe://acme.test/agent/reviewer");
        let theirs = introspect(&broker, server, &foreign.value).await;
        assert_eq!(
            theirs, unknown,
            "{server} learned something of a {} token: {theirs:?}",
            foreign.audience
        );
    }
    // The caller learns nothing, but the audit trail records the attempt by id.
    let logs = leash_e2e::logs();
    for c in [&github, &db] {
        assert!(
            logs.lines().any(|l| l.contains("task.denied")
                && l.contains(&c.id)
                && l.contains("does not serve")),
            "no audit event for the refused introspection of {}",
            c.id
        );
    }
    for c in [&github, &db] {
        let all = introspect(&broker, AUDITOR, &c.value).await;
        assert!(all.active, "audiences = [\"*\"] must see {}", c.audience);
        assert_eq!(all.aud, c.audience);
    }

    // Once revoked, even the serving verifier hears "inactive".
    agent
        .complete_task(pb::CompleteTaskRequest {
            task_id: begun.task_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        introspect(&broker, GITHUB_SERVER, &github.value).await,
        unknown
    );
    assert_eq!(introspect(&broker, AUDITOR, &db.value).await, unknown);
    broker.stop().await;
}

/// (b), (c): a watcher hears of its own audiences' revocations only, in the
/// snapshot, live and when resuming from a cursor; `["*"]` hears of all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_hear_only_of_their_audiences() {
    let redis = RedisServer::start();
    let broker = start(&redis).await;
    let mut agent = broker.broker("agent/reviewer").await;

    // Revoked before anyone watches: in the snapshot of those who serve it.
    let early = begin_and_complete(&mut agent).await;
    let mut github_watch = watch_revocations(&broker, GITHUB_SERVER, "").await.unwrap();
    let mut db_watch = watch_revocations(&broker, DB_SERVER, "").await.unwrap();
    let mut all_watch = watch_revocations(&broker, AUDITOR, "").await.unwrap();
    for (stream, audience) in [(&mut github_watch, GITHUB), (&mut db_watch, DB)] {
        let (snapshot, _) = read_until_caught_up(stream).await;
        assert_eq!(
            ids(&snapshot),
            HashSet::from([of(&early, audience).id]),
            "the snapshot of a watcher serving {audience}: {snapshot:?}"
        );
    }
    let (snapshot, _) = read_until_caught_up(&mut all_watch).await;
    assert_eq!(ids(&snapshot), early.iter().map(|c| c.id.clone()).collect());

    // Live. Both credentials of a task are revoked in one atomic step and reach
    // a watcher in one batch, so the absence of the other is seen with its twin.
    let live = begin_and_complete(&mut agent).await;
    let github_cursor = read_until(
        &mut github_watch,
        &HashSet::from([of(&live, GITHUB).id]),
        Some(GITHUB),
    )
    .await;
    read_until(&mut db_watch, &HashSet::from([of(&live, DB).id]), Some(DB)).await;
    read_until(
        &mut all_watch,
        &live.iter().map(|c| c.id.clone()).collect(),
        None,
    )
    .await;

    // Resuming from a cursor (catch-up) filters too.
    drop(github_watch);
    let missed = begin_and_complete(&mut agent).await;
    let mut resumed = watch_revocations(&broker, GITHUB_SERVER, &github_cursor)
        .await
        .unwrap();
    let (caught_up, _) = read_until_caught_up(&mut resumed).await;
    assert_eq!(
        ids(&caught_up),
        HashSet::from([of(&missed, GITHUB).id]),
        "catch-up of a watcher serving {GITHUB}: {caught_up:?}"
    );
    // Open watches would hold the broker's drain up for its whole timeout.
    drop((resumed, db_watch, all_watch));
    broker.stop().await;
}

/// (d): an identity matched by no entry may neither introspect nor watch, and
/// is told where the rule lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_matched_by_no_entry_is_permission_denied() {
    let redis = RedisServer::start();
    let broker = start(&redis).await;
    let mut agent = broker.broker("agent/reviewer").await;
    let begun = agent
        .begin_task(review_request())
        .await
        .unwrap()
        .into_inner();
    // An agent is no verifier either, even of its own tokens.
    for who in [STRANGER, "agent/reviewer"] {
        let e = broker
            .verifier(who)
            .await
            .introspect(pb::IntrospectRequest {
                token: begun.credentials[0].value.clone(),
            })
            .await
            .expect_err("introspection by an unlisted identity");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("verifier.callers"), "{}", e.message());
        let e = watch_revocations(&broker, who, "")
            .await
            .expect_err("a watch by an unlisted identity");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("verifier.callers"), "{}", e.message());
    }
    broker.stop().await;
}
