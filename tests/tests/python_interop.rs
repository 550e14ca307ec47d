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
    let svid = broker.pki.svid("agent/python");
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
            "--template",
            "review",
            "--param",
            "repo=acme/widgets",
            "--intent",
            "interop from Python",
        ])
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
