//! Inventory: what is live now, per template (owner, live counts) and per
//! identity (its live tasks, their credentials and time left), never a value.

use leash_e2e::{BrokerOptions, RedisServer, TestBroker};
use leash_proto::v1 as pb;
use tonic::Code;

const INV: &str = r#"
name: inv
version: "2"
owner: inventory-team@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 30s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
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

fn begin() -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: "inv".into(),
        intent: "inventory test".into(),
        ..Default::default()
    }
}

async fn template(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> pb::TemplateInfo {
    admin
        .list_templates(pb::ListTemplatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .templates
        .into_iter()
        .find(|t| t.name == "inv")
        .unwrap()
}

fn secs(d: Option<&prost_types::Duration>) -> i64 {
    d.map_or(-1, |d| d.seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_what_is_live_per_template_and_identity() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates = vec![INV.to_owned()];
    options.extra_toml = "[admin]\ncallers = [\"spiffe://acme.test/admin/ops\"]\n".into();
    let broker = TestBroker::start(options).await;
    let mut a = broker.broker("agent/a").await;
    let mut b = broker.broker("agent/b").await;
    let mut admin = broker.admin("admin/ops").await;

    let t = template(&mut admin).await;
    assert_eq!(
        (t.owner.as_str(), t.live_tasks, t.live_credentials),
        ("inventory-team@acme.test", 0, 0)
    );

    let a1 = a.begin_task(begin()).await.unwrap().into_inner();
    let a2 = a.begin_task(begin()).await.unwrap().into_inner();
    let b1 = b.begin_task(begin()).await.unwrap().into_inner();
    let values: Vec<String> = [&a1, &a2, &b1]
        .iter()
        .flat_map(|r| r.credentials.iter().map(|c| c.value.clone()))
        .collect();

    let t = template(&mut admin).await;
    assert_eq!((t.live_tasks, t.live_credentials), (3, 6));

    // Per identity: its live tasks, with credentials and time left.
    let listing = admin
        .list_tasks(pb::ListTasksRequest {
            identity: "spiffe://acme.test/agent/a".into(),
            state: pb::LeaseState::Active.into(),
            with_credentials: true,
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut listed: Vec<&str> = listing.tasks.iter().map(|t| t.task_id.as_str()).collect();
    listed.sort_unstable();
    let mut want = vec![a1.task_id.as_str(), a2.task_id.as_str()];
    want.sort_unstable();
    assert_eq!(listed, want);
    for task in &listing.tasks {
        let left = secs(task.time_left.as_ref());
        assert!((1..=30).contains(&left), "time left {left}s");
        let begun = if task.task_id == a1.task_id { &a1 } else { &a2 };
        let mut ids: Vec<&str> = task.credentials.iter().map(|c| c.id.as_str()).collect();
        ids.sort_unstable();
        let mut want: Vec<&str> = begun.credentials.iter().map(|c| c.id.as_str()).collect();
        want.sort_unstable();
        assert_eq!(ids, want);
        for c in &task.credentials {
            let left = secs(c.time_left.as_ref());
            assert!((1..=30).contains(&left), "credential time left {left}s");
            assert!(!c.grant.is_empty() && !c.audience.is_empty());
        }
    }
    // Without asking, no credentials; GetTask always lists them.
    let plain = admin
        .list_tasks(pb::ListTasksRequest {
            identity: "spiffe://acme.test/agent/b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.tasks.len(), 1);
    assert!(plain.tasks[0].credentials.is_empty());
    let got = admin
        .get_task(pb::GetTaskRequest {
            task_id: b1.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.credentials.len(), 2);
    // No value anywhere in what the inventory answered.
    let text = format!("{listing:?}{plain:?}{got:?}");
    for v in &values {
        assert!(
            !text.contains(v.as_str()),
            "a credential value in the inventory"
        );
    }

    // An ended task leaves the counts and holds nothing.
    a.complete_task(pb::CompleteTaskRequest {
        task_id: a1.task_id.clone(),
        outcome: pb::Outcome::Succeeded.into(),
        summary: String::new(),
    })
    .await
    .unwrap();
    let t = template(&mut admin).await;
    assert_eq!((t.live_tasks, t.live_credentials), (2, 4));
    let ended = admin
        .get_task(pb::GetTaskRequest {
            task_id: a1.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ended.credentials.is_empty());
    assert_eq!(secs(ended.time_left.as_ref()), 0);

    // Inventory is for admins only.
    let mut agent_admin = broker.admin("agent/a").await;
    let denied = agent_admin
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = agent_admin
        .list_templates(pb::ListTemplatesRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    broker.stop().await;
}
