//! Kill switches (issue 8), end to end on a real `redis-server` through the
//! real gRPC edge: each of RevokeIdentity (exact and prefix), RevokeTemplate,
//! RevokeClass, RevokeTenant and RevokeTask over a population of at least
//! 1,000 live credentials spread over every shard. When the call returns,
//! every one is inactive at Introspect and in the revocation stream; tasks
//! it does not aim at are untouched; a later BeginTask it matches is refused
//! until it is lifted, also by a broker started afterwards (it lives in
//! Redis). Admin calls by non-admins are denied.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::collections::HashSet;

use leash_e2e::{
    BrokerOptions, RedisServer, TestBroker, pb, read_until_caught_up, watch_revocations,
};
use tokio::task::JoinSet;
use tonic::{Code, transport::Channel};

type Broker = pb::broker_client::BrokerClient<Channel>;

fn template(name: &str, tenant: &str) -> String {
    format!(
        r#"
name: {name}
version: "1"
owner: platform@acme.test
tenant: {tenant}
identities: ["spiffe://acme.test/*"]
lease: {{ttl: 5m, max_ttl: 10m, max_lifetime: 30m, min_renew_interval: 0s}}
grants:
  - name: api
    kind: jwt
    audience: https://api.acme.test
    scopes: [{{scope: "read", class: read}}]
    ttl: 5m
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{{scope: "sales:read", class: read}}]
    ttl: 5m
"#
    )
}

const ACTORS: &str = r#"
[[actors.classes]]
name = "cls"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/cls/*"]

[[actors.classes]]
name = "t2"
tenant = "t2"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/t2/*"]

[[actors.classes]]
name = "t2-resource"
tenant = "t2"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/t2res/*"]

[[actors.classes]]
name = "any"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/*"]
"#;

const VERIFIERS: &str = r#"callers = [
  { identity = "spiffe://acme.test/resource/*", audiences = ["*"] },
  { identity = "spiffe://acme.test/t2res/*", audiences = ["*"] },
]"#;

fn options(redis: &RedisServer) -> BrokerOptions {
    let mut o = BrokerOptions::redis(redis);
    o.templates = vec![
        template("fleet", "default"),
        template("other", "default"),
        template("t2-fleet", "t2"),
    ];
    o.actors_toml = Some(ACTORS.to_owned());
    o.verifier_toml = Some(VERIFIERS.to_owned());
    o.extra_toml = "[admin]\ncallers = [\"spiffe://acme.test/ops/*\"]\n".to_owned();
    o
}

fn begin_request(template: &str) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: template.into(),
        intent: "kill switch population".into(),
        ..Default::default()
    }
}

/// One live task: its id and its credentials' (id, value).
struct Live {
    task_id: String,
    credentials: Vec<(String, String)>,
}

/// Begins `per_identity` tasks of `template` for each identity path, 16 at a time.
async fn populate(
    broker: &TestBroker,
    paths: &[String],
    template: &str,
    per_identity: usize,
) -> Vec<Live> {
    let mut out = Vec::new();
    for path in paths {
        let client = broker.broker(path).await;
        let mut set: JoinSet<Live> = JoinSet::new();
        for i in 0..per_identity {
            let mut c: Broker = client.clone();
            let req = begin_request(template);
            set.spawn(async move {
                let r = c.begin_task(req).await.unwrap().into_inner();
                Live {
                    task_id: r.task_id,
                    credentials: r.credentials.into_iter().map(|c| (c.id, c.value)).collect(),
                }
            });
            if set.len() >= 16 || i + 1 == per_identity {
                while let Some(done) = set.join_next().await {
                    out.push(done.unwrap());
                }
            }
        }
    }
    out
}

/// How many of `tokens` are active, asked as `verifier` (8 at a time).
async fn active_count(broker: &TestBroker, verifier: &str, tokens: &[String]) -> usize {
    let v = broker.verifier(verifier).await;
    let mut n = 0;
    for chunk in tokens.chunks(8) {
        let mut set = JoinSet::new();
        for t in chunk {
            let mut v = v.clone();
            let token = t.clone();
            set.spawn(async move {
                v.introspect(pb::IntrospectRequest { token })
                    .await
                    .unwrap()
                    .into_inner()
                    .active
            });
        }
        while let Some(a) = set.join_next().await {
            n += usize::from(a.unwrap());
        }
    }
    n
}

fn values(tasks: &[Live]) -> Vec<String> {
    tasks
        .iter()
        .flat_map(|t| t.credentials.iter().map(|(_, v)| v.clone()))
        .collect()
}

fn ids(tasks: &[Live]) -> HashSet<String> {
    tasks
        .iter()
        .flat_map(|t| t.credentials.iter().map(|(id, _)| id.clone()))
        .collect()
}

fn shards(tasks: &[Live]) -> HashSet<char> {
    tasks
        .iter()
        .filter_map(|t| t.task_id.chars().nth(3))
        .collect()
}

/// Reads the revocation stream until every id of `want` has been told.
async fn told_all(stream: &mut tonic::Streaming<pb::RevocationBatch>, want: &HashSet<String>) {
    let mut seen = HashSet::new();
    for _ in 0..10_000 {
        if want.is_subset(&seen) {
            return;
        }
        let b = leash_e2e::next_batch(stream).await;
        seen.extend(b.revocations.into_iter().map(|r| r.credential_id));
    }
    panic!("not told: {}", want.difference(&seen).count());
}

/// Runs one kill switch over `victims` (≥ 1,000 credentials), with
/// `bystanders` that must survive; checks the counts, Introspect and the stream.
async fn kill_and_check(
    broker: &TestBroker,
    stream: &mut tonic::Streaming<pb::RevocationBatch>,
    verifier: &str,
    victims: &[Live],
    bystanders: &[Live],
    kill: impl std::future::Future<
        Output = Result<tonic::Response<pb::KillSwitchResponse>, tonic::Status>,
    >,
) -> pb::KillSwitchResponse {
    let victim_values = values(victims);
    assert!(
        victim_values.len() >= 1000,
        "population {}",
        victim_values.len()
    );
    assert_eq!(
        shards(victims).len(),
        16,
        "the population spans every shard"
    );
    let answer = kill.await.unwrap().into_inner();
    assert_eq!(answer.revoked_tasks as usize, victims.len(), "{answer:?}");
    assert_eq!(
        answer.revoked_credentials as usize,
        victim_values.len(),
        "{answer:?}"
    );
    // Inactive when the call returned: no waiting.
    assert_eq!(active_count(broker, verifier, &victim_values).await, 0);
    let survivors = values(bystanders);
    let bystander_verifier = if verifier == "t2res/api" {
        "resource/api"
    } else {
        verifier
    };
    assert_eq!(
        active_count(broker, bystander_verifier, &survivors).await,
        survivors.len(),
        "a kill switch ended tasks it does not aim at"
    );
    if verifier == "resource/api" {
        told_all(stream, &ids(victims)).await;
    }
    answer
}

fn refused_by_kill_switch(status: &tonic::Status) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("kill switch"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kill_switch_over_a_thousand_live_credentials() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(&redis)).await;
    let mut admin = broker.admin("ops/alice").await;
    let mut stream = watch_revocations(&broker, "resource/api", "")
        .await
        .unwrap();
    read_until_caught_up(&mut stream).await;
    let bystanders = populate(&broker, &["agent/bystander".to_owned()], "fleet", 20).await;

    // RevokeIdentity, exact: one identity's 500 tasks (1,000 credentials).
    let victims = populate(&broker, &["agent/rogue".to_owned()], "fleet", 500).await;
    let answer = kill_and_check(
        &broker,
        &mut stream,
        "resource/api",
        &victims,
        &bystanders,
        admin.revoke_identity(pb::RevokeIdentityRequest {
            identity: "spiffe://acme.test/agent/rogue".into(),
            prefix: false,
            reason: "key leaked".into(),
        }),
    )
    .await;
    let switch = answer.kill_switch.unwrap();
    assert_eq!(
        (switch.kind.as_str(), switch.value.as_str()),
        ("identity", "spiffe://acme.test/agent/rogue")
    );
    assert_eq!(switch.set_by, "spiffe://acme.test/ops/alice");
    let mut rogue = broker.broker("agent/rogue").await;
    refused_by_kill_switch(&rogue.begin_task(begin_request("fleet")).await.unwrap_err());

    // RevokeIdentity, prefix: ten identities under fleet/p/.
    let paths: Vec<String> = (0..10).map(|i| format!("fleet/p/{i}")).collect();
    let victims = populate(&broker, &paths, "fleet", 50).await;
    kill_and_check(
        &broker,
        &mut stream,
        "resource/api",
        &victims,
        &bystanders,
        admin.revoke_identity(pb::RevokeIdentityRequest {
            identity: "spiffe://acme.test/fleet/p/".into(),
            prefix: true,
            reason: "compromised fleet".into(),
        }),
    )
    .await;
    let mut p9 = broker.broker("fleet/p/9").await;
    refused_by_kill_switch(&p9.begin_task(begin_request("fleet")).await.unwrap_err());

    // RevokeTemplate.
    let paths: Vec<String> = (0..4).map(|i| format!("agent/t{i}")).collect();
    let victims = populate(&broker, &paths, "other", 125).await;
    kill_and_check(
        &broker,
        &mut stream,
        "resource/api",
        &victims,
        &bystanders,
        admin.revoke_template(pb::RevokeTemplateRequest {
            template: "other".into(),
            reason: "template scoped too wide".into(),
        }),
    )
    .await;
    let mut t0 = broker.broker("agent/t0").await;
    refused_by_kill_switch(&t0.begin_task(begin_request("other")).await.unwrap_err());
    t0.begin_task(begin_request("fleet"))
        .await
        .expect("another template is fine");

    // RevokeClass.
    let paths: Vec<String> = (0..4).map(|i| format!("cls/{i}")).collect();
    let victims = populate(&broker, &paths, "fleet", 125).await;
    kill_and_check(
        &broker,
        &mut stream,
        "resource/api",
        &victims,
        &bystanders,
        admin.revoke_class(pb::RevokeClassRequest {
            class: "cls".into(),
            reason: "class misbehaves".into(),
        }),
    )
    .await;
    let mut c0 = broker.broker("cls/new").await;
    refused_by_kill_switch(&c0.begin_task(begin_request("fleet")).await.unwrap_err());

    // RevokeTenant (its own resource server checks its tokens).
    let paths: Vec<String> = (0..4).map(|i| format!("t2/{i}")).collect();
    let victims = populate(&broker, &paths, "t2-fleet", 125).await;
    kill_and_check(
        &broker,
        &mut stream,
        "t2res/api",
        &victims,
        &bystanders,
        admin.revoke_tenant(pb::RevokeTenantRequest {
            tenant: "t2".into(),
            reason: "tenant offboarded".into(),
        }),
    )
    .await;
    let mut t2 = broker.broker("t2/9").await;
    refused_by_kill_switch(&t2.begin_task(begin_request("t2-fleet")).await.unwrap_err());

    // RevokeTask: one task among many; sets no kill switch.
    let target = &bystanders[0];
    let answer = admin
        .revoke_task(pb::RevokeTaskRequest {
            task_id: target.task_id.clone(),
            reason: "this one only".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.revoked_tasks, answer.revoked_credentials), (1, 2));
    assert!(answer.kill_switch.is_none());
    let tokens: Vec<String> = target.credentials.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(active_count(&broker, "resource/api", &tokens).await, 0);
    assert_eq!(
        active_count(&broker, "resource/api", &values(&bystanders[1..])).await,
        2 * (bystanders.len() - 1)
    );

    // Five kill switches in force; they outlive this broker.
    let listed = admin
        .list_kill_switches(pb::ListKillSwitchesRequest {})
        .await
        .unwrap()
        .into_inner()
        .kill_switches;
    let kinds: Vec<(String, String)> = listed
        .iter()
        .map(|k| (k.kind.clone(), k.value.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("class".to_owned(), "cls".to_owned()),
            (
                "identity".to_owned(),
                "spiffe://acme.test/agent/rogue".to_owned()
            ),
            (
                "identity_prefix".to_owned(),
                "spiffe://acme.test/fleet/p/".to_owned()
            ),
            ("template".to_owned(), "other".to_owned()),
            ("tenant".to_owned(), "t2".to_owned()),
        ]
    );
    broker.stop().await;
    let broker = TestBroker::start(options(&redis)).await;
    let mut rogue = broker.broker("agent/rogue").await;
    refused_by_kill_switch(&rogue.begin_task(begin_request("fleet")).await.unwrap_err());
    // Lifted: the identity may begin again; what was revoked stays revoked.
    let mut admin = broker.admin("ops/alice").await;
    let lifted = admin
        .lift_kill_switch(pb::LiftKillSwitchRequest {
            kind: "identity".into(),
            value: "spiffe://acme.test/agent/rogue".into(),
            reason: "key rotated".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(lifted.lifted);
    rogue
        .begin_task(begin_request("fleet"))
        .await
        .expect("lifted");
    let again = admin
        .lift_kill_switch(pb::LiftKillSwitchRequest {
            kind: "identity".into(),
            value: "spiffe://acme.test/agent/rogue".into(),
            reason: "twice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.lifted);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_by_non_admins_are_denied_and_bad_input_is_named() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(&redis)).await;
    let mut agent = broker.broker("agent/a").await;
    let live = agent
        .begin_task(begin_request("fleet"))
        .await
        .unwrap()
        .into_inner();
    let before = redis.dump_state();
    let mut not_admin = broker.admin("agent/a").await;
    let id = live.task_id.clone();
    let reason = || "x".to_owned();
    let calls: Vec<(&str, tonic::Status)> = vec![
        (
            "ListTemplates",
            not_admin
                .list_templates(pb::ListTemplatesRequest {})
                .await
                .unwrap_err(),
        ),
        (
            "ListTasks",
            not_admin
                .list_tasks(pb::ListTasksRequest::default())
                .await
                .unwrap_err(),
        ),
        (
            "GetTask",
            not_admin
                .get_task(pb::GetTaskRequest {
                    task_id: id.clone(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "RevokeTask",
            not_admin
                .revoke_task(pb::RevokeTaskRequest {
                    task_id: id.clone(),
                    reason: reason(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "RevokeIdentity",
            not_admin
                .revoke_identity(pb::RevokeIdentityRequest {
                    identity: "spiffe://acme.test/agent/a".into(),
                    prefix: false,
                    reason: reason(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "RevokeTemplate",
            not_admin
                .revoke_template(pb::RevokeTemplateRequest {
                    template: "fleet".into(),
                    reason: reason(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "RevokeClass",
            not_admin
                .revoke_class(pb::RevokeClassRequest {
                    class: "any".into(),
                    reason: reason(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "RevokeTenant",
            not_admin
                .revoke_tenant(pb::RevokeTenantRequest {
                    tenant: "default".into(),
                    reason: reason(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "ListKillSwitches",
            not_admin
                .list_kill_switches(pb::ListKillSwitchesRequest {})
                .await
                .unwrap_err(),
        ),
        (
            "LiftKillSwitch",
            not_admin
                .lift_kill_switch(pb::LiftKillSwitchRequest {
                    kind: "tenant".into(),
                    value: "default".into(),
                    reason: reason(),
                })
                .await
                .unwrap_err(),
        ),
    ];
    for (call, status) in calls {
        assert_eq!(status.code(), Code::PermissionDenied, "{call}: {status:?}");
        assert!(
            status.message().contains("admin.callers"),
            "{call}: {}",
            status.message()
        );
    }
    assert_eq!(
        redis.dump_state(),
        before,
        "a refused admin call changed the store"
    );

    // Admins get clear errors for bad input, and nothing changes.
    let mut admin = broker.admin("ops/bob").await;
    let bad = [
        admin
            .revoke_identity(pb::RevokeIdentityRequest {
                identity: "spiffe://acme.test".into(),
                prefix: true,
                reason: reason(),
            })
            .await
            .unwrap_err(),
        admin
            .revoke_identity(pb::RevokeIdentityRequest {
                identity: "not an id".into(),
                prefix: false,
                reason: reason(),
            })
            .await
            .unwrap_err(),
        admin
            .revoke_template(pb::RevokeTemplateRequest {
                template: "fleet".into(),
                reason: String::new(),
            })
            .await
            .unwrap_err(),
        admin
            .revoke_task(pb::RevokeTaskRequest {
                task_id: "tk_nope".into(),
                reason: reason(),
            })
            .await
            .unwrap_err(),
        admin
            .lift_kill_switch(pb::LiftKillSwitchRequest {
                kind: "task".into(),
                value: "x".into(),
                reason: reason(),
            })
            .await
            .unwrap_err(),
        admin
            .list_tasks(pb::ListTasksRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ];
    for status in bad {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert_eq!(
        redis.dump_state(),
        before,
        "a refused admin call changed the store"
    );

    // Inventory for admins: the live task is listed and readable.
    let listed = admin
        .list_tasks(pb::ListTasksRequest {
            identity: "spiffe://acme.test/agent/a".into(),
            state: pb::LeaseState::Active.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1, "{listed:?}");
    assert_eq!(listed.tasks[0].task_id, live.task_id);
    let got = admin
        .get_task(pb::GetTaskRequest {
            task_id: live.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.owner, "spiffe://acme.test/agent/a");
    assert_eq!(got.state, pb::LeaseState::Active as i32);
    let templates = admin
        .list_templates(pb::ListTemplatesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(templates.templates.len(), 3);
    broker.stop().await;
}

/// ListTasks pages through every task with a filter, each task once, and a
/// token it did not issue is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_tasks_pages_through_everything_it_filters() {
    let redis = RedisServer::start();
    let broker = TestBroker::start(options(&redis)).await;
    let mine = populate(&broker, &["agent/lister".to_owned()], "fleet", 30).await;
    populate(&broker, &["agent/else".to_owned()], "other", 10).await;
    let mut admin = broker.admin("ops/carol").await;
    let mut seen = HashSet::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = admin
            .list_tasks(pb::ListTasksRequest {
                identity: "spiffe://acme.test/agent/lister".into(),
                template: "fleet".into(),
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for t in page.tasks {
            assert_eq!(t.owner, "spiffe://acme.test/agent/lister");
            seen.insert(t.task_id);
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let want: HashSet<String> = mine.iter().map(|t| t.task_id.clone()).collect();
    assert_eq!(seen, want);
    let err = admin
        .list_tasks(pb::ListTasksRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    broker.stop().await;
}
