//! The example end to end against a real broker: the `mcp-server` code behind
//! Leash authentication and the `mcp-agent` code's whole flow (begin, list
//! tools, call both, complete, next call refused).
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use leash_e2e::{BrokerOptions, TestBroker};
use leash_example_mcp::{agent, server};
use leash_sdk::SvidFiles;
use tokio::net::TcpListener;

const ISSUER: &str = "https://leash.acme.test";

/// `leash dev`'s `mcp-demo` template, for the test PKI's agents.
fn mcp_demo(audience: &str) -> String {
    format!(
        r#"
name: mcp-demo
version: "1"
owner: platform@acme.test
description: Call the example MCP tools.
identities:
  - spiffe://acme.test/agent/*
lease:
  ttl: 60s
  max_ttl: 2m
  max_lifetime: 5m
grants:
  - name: tools
    kind: jwt
    audience: {audience}
    scopes: [{{scope: "tools:read", class: read}}, {{scope: "tools:write", class: write}}]
    ttl: 60s
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_agent_runs_its_whole_flow() {
    flow(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_agent_runs_its_whole_flow_with_an_exchanged_token() {
    flow(true).await;
}

async fn flow(exchange: bool) {
    leash_example_mcp::install_crypto_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}/mcp",
        listener.local_addr().unwrap().port()
    );
    let mut options = BrokerOptions::memory();
    options.templates = vec![mcp_demo(&url)];
    options.verifier_toml = Some(format!(
        r#"callers = [{{ identity = "spiffe://acme.test/resource/*", audiences = ["{url}"] }}]"#
    ));
    let oauth_port = leash_e2e::free_port();
    if exchange {
        options.extra_toml = format!(
            "[oauth]\nlisten = \"127.0.0.1:{oauth_port}\"\npublic_url = \"https://localhost:{oauth_port}/\"\n"
        );
    }
    let broker = TestBroker::start(options).await;
    if exchange {
        let up = leash_e2e::eventually(std::time::Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", oauth_port))
                .await
                .is_ok()
        })
        .await;
        assert!(up.is_some(), "the OAuth listener never came up");
    }

    let dir = broker.pki.dir.path();
    let resource_svid = broker.pki.svid("resource/mcp");
    let files = server::ServerFiles {
        cert: dir.join("broker.pem"),
        key: dir.join("broker-key.pem"),
        bundle: broker.pki.bundle(),
        svid_cert: resource_svid.cert,
        svid_key: resource_svid.key,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let resource = server::resource(&url, ISSUER);
    let broker_url = broker.url();
    let serving = tokio::spawn(async move {
        server::run(&files, &broker_url, &resource, listener, async {
            let _ = stop_rx.await;
        })
        .await
    });

    let agent_svid = broker.pki.svid("agent/demo");
    let report = agent::run(&agent::AgentOptions {
        broker: broker.url(),
        svid: SvidFiles {
            cert: agent_svid.cert,
            key: agent_svid.key,
            bundle: broker.pki.bundle(),
        },
        url: url.clone(),
        template: "mcp-demo".into(),
        token_endpoint: exchange.then(|| format!("https://localhost:{oauth_port}/token")),
    })
    .await
    .unwrap();

    let mut tools = report.tools.clone();
    tools.sort();
    assert_eq!(tools, ["add_item", "list_items"]);
    assert!(report.added.contains("widget"), "{}", report.added);
    assert!(report.added.contains(&report.task_id), "{}", report.added);
    assert_eq!(report.listed, r#"{"items":["widget"]}"#);
    assert!(report.revoked_credentials >= 1);
    assert!(
        report.refusal.contains("invalid_token") && report.refusal.contains("token revoked"),
        "{}",
        report.refusal
    );
    assert!(report.refused_after < agent::REFUSAL_DEADLINE);

    let _ = stop_tx.send(());
    serving.await.unwrap().unwrap();
    // Not `stop()`: the verifier's background watch holds its broker stream
    // open until its next heartbeat, and a clean stop would wait out the drain.
    drop(broker);
}
