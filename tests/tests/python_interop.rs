//! Interop: the Python example client (stubs generated from the proto by
//! grpcio-tools) does begin → renew → complete over mutual TLS against a real
//! broker, and verifies every issued JWT with PyJWT against the broker's HTTP JWK
//! Set: a standard library, not ours, checks our JWS (EdDSA and ES256).
//!
//! The interpreter is `LEASH_TEST_PYTHON`, else `target/py-venv/bin/python`,
//! which `bash scripts/test` creates with `examples/python/requirements.txt`.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use leash_broker::credentials::Algorithm;
use leash_e2e::{BrokerOptions, RedisServer, TestBroker, pb};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn python() -> PathBuf {
    let python = std::env::var_os("LEASH_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/py-venv/bin/python"));
    assert!(
        python.exists(),
        "no Python for the interop test at {}: run `bash scripts/test` (it creates \
         target/py-venv from examples/python/requirements.txt) or set LEASH_TEST_PYTHON \
         to an interpreter with those packages",
        python.display()
    );
    python
}

async fn run_client(broker: &TestBroker) -> Value {
    let args = [
        "--template",
        "review",
        "--param",
        "repo=acme/widgets",
        "--intent",
        "interop from Python",
    ];
    run_client_as(broker, "agent/python", &args, &[]).await
}

/// Runs the Python client as `spiffe://acme.test/<path>` with `args` after
/// the connection flags, and `env` set; returns what it printed.
async fn run_client_as(
    broker: &TestBroker,
    path: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Value {
    let svid = broker.pki.svid(path);
    let mut child = tokio::process::Command::new(python())
        .arg(workspace().join("examples/python/client.py"))
        .args([
            "--broker",
            &format!("localhost:{}", broker.agent_addr.port()),
        ])
        .arg("--ca")
        .arg(broker.pki.bundle())
        .arg("--cert")
        .arg(&svid.cert)
        .arg("--key")
        .arg(&svid.key)
        .args([
            "--jwks",
            &format!("http://{}/.well-known/jwks.json", broker.ops_addr),
            "--issuer",
            "https://leash.acme.test",
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (out, err) = tokio::time::timeout(Duration::from_secs(120), async {
        use tokio::io::AsyncReadExt as _;
        let (mut out, mut err) = (String::new(), String::new());
        let (a, b) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        a.unwrap();
        b.unwrap();
        (out, err)
    })
    .await
    .expect("the Python client did not finish within 120 s");
    let status = child.wait().await.unwrap();
    assert!(
        status.success(),
        "the Python client failed ({status}):\nstdout: {out}\nstderr: {err}"
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

async fn interop(options: BrokerOptions, alg: &str) {
    let broker = TestBroker::start(options).await;
    let result = run_client(&broker).await;
    assert_eq!(result["began"], true);
    assert_eq!(result["renewed"], true);
    assert_eq!(result["completed"], true);
    assert_eq!(result["state"], "LEASE_STATE_COMPLETED");
    let task_id = result["task_id"].as_str().unwrap();
    assert!(task_id.starts_with("tk_"));

    // PyJWT verified the JWT of the grant `github`, before and after renewal.
    for key in ["jwts_verified", "renewed_jwts_verified"] {
        let verified = result[key].as_array().unwrap();
        assert_eq!(verified.len(), 1, "{key}: {result}");
        assert_eq!(verified[0]["alg"], alg);
        assert_eq!(verified[0]["sub"], "spiffe://acme.test/agent/python");
        assert_eq!(verified[0]["aud"], "https://api.github.test");
        assert_eq!(verified[0]["scope"], "repo:acme/widgets:read");
        assert_eq!(verified[0]["bound"], true);
    }
    let kinds: Vec<&str> = result["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["CREDENTIAL_KIND_JWT", "CREDENTIAL_KIND_OPAQUE"]);
    // Two from begin and two from the renewal, all revoked by the completion.
    assert_eq!(result["revoked_credentials"], 4);

    // The client prints ids, never values: the revocation feed's snapshot must
    // list every credential the task ever had.
    let mut ids: HashSet<String> = HashSet::new();
    for c in result["credentials"].as_array().unwrap() {
        ids.insert(c["id"].as_str().unwrap().to_owned());
    }
    for id in result["renewed_credential_ids"].as_array().unwrap() {
        ids.insert(id.as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 4);
    let mut stream = broker
        .verifier("resource/api")
        .await
        .watch_revocations(pb::WatchRevocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut revoked = HashSet::new();
    loop {
        let batch = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("no revocation snapshot")
            .unwrap()
            .unwrap();
        revoked.extend(batch.revocations.into_iter().map(|r| r.credential_id));
        if batch.caught_up {
            break;
        }
    }
    assert!(
        ids.is_subset(&revoked),
        "not revoked: {:?}",
        ids.difference(&revoked)
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_with_eddsa_tokens_on_redis() {
    let redis = RedisServer::start();
    interop(BrokerOptions::redis(&redis), "EdDSA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_with_es256_tokens_in_memory() {
    let mut options = BrokerOptions::memory();
    options.signing_alg = Algorithm::ES256;
    interop(options, "ES256").await;
}

/// Issue 13: plain `requests` over mutual TLS exchanges the task's JWT at the
/// OAuth token endpoint (RFC 8693) for a narrower one and introspects it as
/// a resource server (RFC 7662); PyJWT checks the issued token's signature,
/// audience and issuer against the metadata, and its binding to the
/// client's own certificate; after the completion it is inactive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_exchanges_a_token_over_mtls_and_introspects_it() {
    let redis = RedisServer::start();
    let port = leash_e2e::free_port();
    let mut options = BrokerOptions::redis(&redis);
    options.extra_toml = format!(
        "[oauth]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://localhost:{port}\"\n"
    );
    let broker = TestBroker::start(options).await;
    let resource = broker.pki.svid("resource/python");
    let oauth = format!("https://localhost:{port}");
    let result = run_client_as(
        &broker,
        "agent/python",
        &[
            "--template",
            "review",
            "--param",
            "repo=acme/widgets",
            "--oauth",
            &oauth,
            "--exchange-resource",
            "https://api.github.test",
            "--exchange-scope",
            "repo:acme/widgets:read",
            "--introspect-cert",
            resource.cert.to_str().unwrap(),
            "--introspect-key",
            resource.key.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let x = &result["exchange"];
    assert_eq!(x["metadata_issuer"], "https://leash.acme.test", "{result}");
    assert_eq!(x["token_type"], "Bearer");
    assert_eq!(
        x["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(x["aud"], "https://api.github.test");
    assert_eq!(x["scope"], "repo:acme/widgets:read");
    assert_eq!(x["task_id"], result["task_id"]);
    assert_eq!(x["bound_to_my_certificate"], true);
    assert_eq!(
        x["without_certificate"],
        serde_json::json!([401, "invalid_client"])
    );
    let i = &x["introspected"];
    assert_eq!(i["active"], true, "{result}");
    assert_eq!(i["aud"], "https://api.github.test");
    assert_eq!(i["sub"], "spiffe://acme.test/agent/python");
    assert_eq!(i["task_id"], result["task_id"]);
    assert!(i["exp"].as_u64().unwrap() > 0);
    assert_eq!(
        x["introspected_after_completion"],
        serde_json::json!({"active": false})
    );
}

/// A template whose tasks delegate two levels, to `sub/*` subagents.
const DELEGATING: &str = r#"
name: fanout
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
parameters:
  repo: {type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+", required: true}
lease: {ttl: 30s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
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
"#;

/// A depth-2 delegated JWT (root agent → sub/one → sub/python), redeemed by
/// the Python client with its own SVID: PyJWT verifies it, and its RFC 8693
/// `act` claim nests the chain with the current actor outermost, while `sub`
/// stays the root task's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_subagent_redeems_a_depth_two_delegation_and_pyjwt_checks_the_act_chain() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates = vec![DELEGATING.to_owned()];
    let broker = TestBroker::start(options).await;
    let mut root = broker.broker("agent/root").await;
    let begun = root
        .begin_task(pb::BeginTaskRequest {
            template: "fanout".into(),
            parameters: [("repo".to_owned(), "acme/widgets".to_owned())].into(),
            intent: "fan out a review".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let one = root
        .delegate_task(pb::DelegateTaskRequest {
            parent_task_id: begun.task_id.clone(),
            subagent: "spiffe://acme.test/sub/one".into(),
            intent: "review the backend".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut sub_one = broker.broker("sub/one").await;
    sub_one
        .redeem_delegation(pb::RedeemDelegationRequest {
            task_id: one.task_id.clone(),
            delegation_handle: one.delegation_handle.clone(),
        })
        .await
        .unwrap();
    let two = sub_one
        .delegate_task(pb::DelegateTaskRequest {
            parent_task_id: one.task_id.clone(),
            subagent: "spiffe://acme.test/sub/python".into(),
            grants: vec![pb::GrantScopes {
                grant: "github".into(),
                scopes: vec!["repo:acme/widgets:read".into()],
            }],
            intent: "read the tests".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(two.depth, 2);
    let result = run_client_as(
        &broker,
        "sub/python",
        &["--redeem-task", &two.task_id],
        &[("LEASH_DELEGATION_HANDLE", two.delegation_handle.as_str())],
    )
    .await;
    assert_eq!(result["began"], true, "{result}");
    assert_eq!(result["completed"], true, "{result}");
    assert_eq!(
        result["actors"],
        serde_json::json!([
            "spiffe://acme.test/sub/python",
            "spiffe://acme.test/sub/one",
            "spiffe://acme.test/agent/root"
        ])
    );
    for key in ["jwts_verified", "renewed_jwts_verified"] {
        let verified = result[key].as_array().unwrap();
        assert_eq!(verified.len(), 1, "{key}: {result}");
        let claims = &verified[0];
        assert_eq!(claims["sub"], "spiffe://acme.test/agent/root", "{claims}");
        assert_eq!(
            claims["scope"], "repo:acme/widgets:read",
            "narrowed: {claims}"
        );
        assert_eq!(claims["bound"], true);
        assert_eq!(
            claims["act"],
            serde_json::json!({
                "sub": "spiffe://acme.test/sub/python",
                "act": {"sub": "spiffe://acme.test/sub/one"}
            }),
            "{claims}"
        );
    }
    broker.stop().await;
}
