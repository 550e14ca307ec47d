//! The SDK's MCP support against a real broker and a real rmcp server over
//! TLS: the RFC 9728 challenge and metadata, refusals of tokens for another
//! audience, without the tool's scope, of another certificate, of a completed
//! task, and the client transport following renewals.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{sync::Arc, time::Duration};

use axum::{Router, http::request::Parts};
use leash_e2e::{BrokerOptions, TestBroker};
use leash_sdk::{
    Client, Outcome, SvidFiles, Task, TaskRequest,
    mcp::{self, LeashAuthLayer, McpError, ProtectedResource, TaskCredential},
    verifier::{KeySet, Verifier, VerifierConfig},
};
use rmcp::{
    ErrorData, ServerHandler, ServiceExt as _,
    handler::server::{router::tool::ToolRouter, tool::Extension},
    model::{CallToolRequestParams, ClientConfig, ErrorCode, ServerCapabilities, ServerConfig},
    tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const ISSUER: &str = "https://leash.acme.test";
const OTHER_AUDIENCE: &str = "https://other.acme.test/mcp";

/// A tool server whose tools answer with the caller's credential id.
#[derive(Debug, Clone)]
struct Tools {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Tools {
    #[tool(description = "Read (tools:read)")]
    async fn read(&self, Extension(parts): Extension<Parts>) -> Result<String, ErrorData> {
        let claims = mcp::require_scope(&parts, "tools:read")?;
        Ok(claims.credential_id.clone())
    }

    #[tool(description = "Write (tools:write)")]
    async fn write(&self, Extension(parts): Extension<Parts>) -> Result<String, ErrorData> {
        let claims = mcp::require_scope(&parts, "tools:write")?;
        assert_eq!(claims.scope_class("tools:write"), Some("write"));
        Ok(claims.credential_id.clone())
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

fn template(name: &str, audience: &str, scopes: &str, lease: &str) -> String {
    format!(
        r#"
name: {name}
version: "1"
owner: platform@acme.test
description: MCP tools.
identities:
  - spiffe://acme.test/agent/*
lease:
  ttl: {lease}
  max_ttl: 2m
  max_lifetime: 5m
  min_renew_interval: 0s
grants:
  - name: tools
    kind: jwt
    audience: {audience}
    scopes: [{scopes}]
    ttl: 60s
"#
    )
}

/// A broker, and an MCP server for `https://localhost:<port>/mcp` behind the layer.
struct Fixture {
    broker: TestBroker,
    resource: ProtectedResource,
    agent: SvidFiles,
    server: tokio::task::JoinHandle<()>,
}

impl Fixture {
    async fn start(layer_scope: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}/mcp",
            listener.local_addr().unwrap().port()
        );
        let rw = r#"{scope: "tools:read", class: read}, {scope: "tools:write", class: write}"#;
        let ro = r#"{scope: "tools:read", class: read}"#;
        let mut options = BrokerOptions::memory();
        options.templates = vec![
            template("mcp-demo", &url, rw, "60s"),
            template("mcp-readonly", &url, ro, "60s"),
            template("mcp-other", OTHER_AUDIENCE, rw, "60s"),
            template("mcp-short", &url, rw, "2s"),
        ];
        options.verifier_toml = Some(format!(
            r#"callers = [{{ identity = "spiffe://acme.test/resource/*", audiences = ["{url}", "{OTHER_AUDIENCE}"] }}]"#
        ));
        let broker = TestBroker::start(options).await;
        let verifier = Verifier::connect(
            broker.channel("resource/mcp").await,
            VerifierConfig::new(url.clone(), ISSUER),
        )
        .await
        .unwrap();
        let resource = ProtectedResource::new(url, ISSUER).scopes(["tools:read", "tools:write"]);
        let mut layer = LeashAuthLayer::new(verifier, &resource).unwrap();
        if let Some(scope) = layer_scope {
            layer = layer.require_scope(scope);
        }
        let server = tokio::spawn(serve(listener, &broker, app(layer)));
        let files = broker.pki.svid("agent/mcp");
        let agent = SvidFiles {
            cert: files.cert,
            key: files.key,
            bundle: broker.pki.bundle(),
        };
        Self {
            broker,
            resource,
            agent,
            server,
        }
    }

    fn url(&self) -> &str {
        &self.resource.resource
    }

    async fn begin(&self, template: &str) -> Task {
        let client = Client::builder()
            .broker(self.broker.url())
            .svid_files(&self.agent.cert, &self.agent.key)
            .bundle_file(&self.agent.bundle)
            .connect()
            .await
            .unwrap();
        client
            .begin_task(TaskRequest::new(template).intent("call MCP tools"))
            .await
            .unwrap()
    }

    /// An mTLS HTTP client with the agent's SVID.
    fn http(&self) -> reqwest::Client {
        mcp::http_client(&self.agent).unwrap()
    }

    /// Stops the server and the broker. Not `TestBroker::stop`: the
    /// verifier's background watch holds its broker stream open until its
    /// next heartbeat, and a clean stop would wait out the broker's drain.
    fn stop(self) {
        self.server.abort();
        drop(self.broker);
    }
}

fn app(layer: LeashAuthLayer) -> Router {
    let service: StreamableHttpService<Tools, LocalSessionManager> = StreamableHttpService::new(
        || {
            Ok(Tools {
                tool_router: Tools::tool_router(),
            })
        },
        Arc::default(),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    Router::new().nest_service("/mcp", service).layer(layer)
}

/// Serves `app` over TLS with the broker's certificate (DNS SAN localhost),
/// trusting the test PKI for client certificates.
fn serve(
    listener: TcpListener,
    broker: &TestBroker,
    app: Router,
) -> impl Future<Output = ()> + Send + 'static {
    let dir = broker.pki.dir.path();
    let chain = CertificateDer::pem_file_iter(dir.join("broker.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("broker-key.pem")).unwrap();
    let roots = vec![CertificateDer::from_pem_file(broker.pki.bundle()).unwrap()];
    let tls = mcp::server_tls_config(chain, key, roots).unwrap();
    mcp::serve_tls(listener, tls, app, std::future::pending())
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}})
}

/// POSTs an initialize to the MCP endpoint, with `token` if given.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut request = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(&initialize());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.bytes().await.unwrap();
    (
        status,
        challenge,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn install_ring() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn tool(name: &'static str) -> CallToolRequestParams {
    CallToolRequestParams::new(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_gets_the_rfc9728_challenge_and_metadata() {
    install_ring();
    let fx = Fixture::start(None).await;
    let http = fx.http();
    let metadata_url = fx.resource.metadata_url().unwrap();
    assert!(metadata_url.ends_with("/.well-known/oauth-protected-resource/mcp"));

    let (status, challenge, body) = post(&http, fx.url(), None).await;
    assert_eq!(status, 401);
    let challenge = challenge.expect("a WWW-Authenticate challenge");
    assert_eq!(
        challenge,
        format!("Bearer resource_metadata=\"{metadata_url}\"")
    );
    assert!(body["error"].is_string() && body["error_description"].is_string());

    // Another scheme is no credential either.
    let response = http
        .post(fx.url())
        .header("authorization", "Basic dXNlcjpwYXNz")
        .json(&initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // The document at the URL the challenge names, and at the plain path.
    let named = challenge
        .split("resource_metadata=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let origin = fx.url().trim_end_matches("/mcp");
    for url in [
        named,
        format!("{origin}/.well-known/oauth-protected-resource"),
    ] {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{url}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/json"
        );
        let doc: Value = response.json().await.unwrap();
        assert_eq!(doc["resource"], fx.url());
        assert_eq!(doc["authorization_servers"], json!([ISSUER]));
        assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
        assert_eq!(
            doc["scopes_supported"],
            json!(["tools:read", "tools:write"])
        );
        assert_eq!(doc["tls_client_certificate_bound_access_tokens"], true);
    }
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_refused() {
    install_ring();
    let fx = Fixture::start(None).await;
    let task = fx.begin("mcp-other").await;
    assert!(matches!(
        TaskCredential::for_audience(&task, fx.url()),
        Err(McpError::NoGrantForAudience(_))
    ));
    let token = task.credential("tools").unwrap().secret().to_owned();
    let (status, challenge, body) = post(&fx.http(), fx.url(), Some(&token)).await;
    assert_eq!(status, 401);
    let challenge = challenge.unwrap();
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\""),
        "{challenge}"
    );
    assert!(challenge.contains("error_description=\"wrong audience\""));
    assert!(challenge.contains("resource_metadata=\""));
    assert_eq!(body["error"], "invalid_token");
    leash_e2e::assert_not_logged(&[token]);
    task.complete(Outcome::Succeeded, "done").await.unwrap();
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_tools_scope_gets_a_clear_mcp_error() {
    install_ring();
    let fx = Fixture::start(None).await;
    let task = fx.begin("mcp-readonly").await;
    let svid = Arc::new(fx.agent.clone());
    let session = ClientConfig::default()
        .serve(mcp::task_transport(&task, svid, fx.url()).unwrap())
        .await
        .unwrap();
    let read = session.call_tool(tool("read")).await.unwrap();
    assert_ne!(read.is_error, Some(true));
    let err = session.call_tool(tool("write")).await.unwrap_err();
    let rmcp::ServiceError::McpError(data) = err else {
        panic!("expected an MCP error, got {err}");
    };
    assert_eq!(data.code, ErrorCode::INVALID_REQUEST);
    assert!(
        data.message.contains("insufficient_scope"),
        "{}",
        data.message
    );
    assert!(data.message.contains("tools:write"), "{}", data.message);
    let data = data.data.unwrap();
    assert_eq!(data["error"], "insufficient_scope");
    assert_eq!(data["scope"], "tools:write");
    let _ = session.cancel().await;
    task.complete(Outcome::Succeeded, "done").await.unwrap();
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_required_by_the_layer_is_a_403_insufficient_scope() {
    install_ring();
    let fx = Fixture::start(Some("tools:write")).await;
    let task = fx.begin("mcp-readonly").await;
    let token = task.credential("tools").unwrap().secret().to_owned();
    let (status, challenge, body) = post(&fx.http(), fx.url(), Some(&token)).await;
    assert_eq!(status, 403);
    let challenge = challenge.unwrap();
    assert!(
        challenge.starts_with("Bearer error=\"insufficient_scope\", scope=\"tools:write\""),
        "{challenge}"
    );
    assert!(challenge.contains("resource_metadata=\""));
    assert_eq!(body["error"], "insufficient_scope");
    task.complete(Outcome::Succeeded, "done").await.unwrap();
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_bound_to_the_agents_certificate() {
    install_ring();
    let fx = Fixture::start(None).await;
    let task = fx.begin("mcp-demo").await;
    let token = task.credential("tools").unwrap().secret().to_owned();
    let (status, _, _) = post(&fx.http(), fx.url(), Some(&token)).await;
    assert_eq!(status, 200, "the agent's own certificate passes");

    let other = fx.broker.pki.svid("agent/other");
    let thief = mcp::http_client(&SvidFiles {
        cert: other.cert,
        key: other.key,
        bundle: fx.broker.pki.bundle(),
    })
    .unwrap();
    let (status, challenge, _) = post(&thief, fx.url(), Some(&token)).await;
    assert_eq!(status, 401);
    assert!(
        challenge
            .unwrap()
            .contains("error_description=\"certificate binding mismatch\"")
    );

    // No client certificate at all (they are optional at the handshake).
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(fx.broker.pki.bundle()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anonymous = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let (status, challenge, _) = post(&anonymous, fx.url(), Some(&token)).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("certificate binding mismatch"));
    task.complete(Outcome::Succeeded, "done").await.unwrap();
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_tasks_token_is_refused_within_the_revocation_bound() {
    install_ring();
    let fx = Fixture::start(None).await;
    let task = fx.begin("mcp-demo").await;
    let token = task.credential("tools").unwrap().secret().to_owned();
    let svid = Arc::new(fx.agent.clone());
    let session = ClientConfig::default()
        .serve(mcp::task_transport(&task, svid, fx.url()).unwrap())
        .await
        .unwrap();
    session.call_tool(tool("write")).await.unwrap();
    task.complete(Outcome::Succeeded, "done").await.unwrap();

    // Revocations are pushed to the verifier at once; 10 s bounds a slow machine.
    let http = fx.http();
    let refused = leash_e2e::eventually(Duration::from_secs(10), || async {
        post(&http, fx.url(), Some(&token)).await.0 == 401
    })
    .await;
    assert!(
        refused.is_some(),
        "the completed task's token was still accepted"
    );
    let (_, challenge, body) = post(&http, fx.url(), Some(&token)).await;
    assert!(
        challenge
            .unwrap()
            .contains("error=\"invalid_token\", error_description=\"token revoked\"")
    );
    assert_eq!(body["error_description"], "token revoked");
    // The open MCP session is refused too, with the challenge.
    let err = session.call_tool(tool("read")).await.unwrap_err();
    assert!(
        err.auth_challenge()
            .is_some_and(|c| c.contains("invalid_token")),
        "{err}"
    );
    leash_e2e::assert_not_logged(&[token]);
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_presents_the_renewed_credential() {
    install_ring();
    let fx = Fixture::start(None).await;
    let task = fx.begin("mcp-short").await;
    let svid = Arc::new(fx.agent.clone());
    let session = ClientConfig::default()
        .serve(mcp::task_transport(&task, svid, fx.url()).unwrap())
        .await
        .unwrap();
    let text = |r: rmcp::model::CallToolResult| r.content[0].as_text().unwrap().text.clone();
    // A renewal may land between any two lines: compare with the credentials
    // current just before and just after each call.
    let before = task.credentials();
    let first = text(session.call_tool(tool("read")).await.unwrap());
    let after = task.credentials();
    let ids = |c: &leash_sdk::Credentials| c.get("tools").unwrap().id().to_owned();
    assert!(first == ids(&before) || first == ids(&after), "{first}");
    // The 2 s lease is renewed within about a second.
    let seen = after.generation();
    let mut watch = task.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|c| c.generation() > seen),
    )
    .await
    .unwrap()
    .unwrap();
    let before = task.credentials();
    let second = text(session.call_tool(tool("read")).await.unwrap());
    let after = task.credentials();
    assert!(
        second == ids(&before) || second == ids(&after),
        "the current credential is presented"
    );
    assert_ne!(first, second, "a renewal mints a new credential");
    let _ = session.cancel().await;
    task.complete(Outcome::Succeeded, "done").await.unwrap();
    fx.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_revocation_state_is_a_503() {
    install_ring();
    let fx = Fixture::start(None).await;
    let task = fx.begin("mcp-demo").await;
    let token = task.credential("tools").unwrap().secret().to_owned();
    // A verifier that has heard no revocation stream: it fails closed.
    let jwks = fx
        .broker
        .verifier("resource/mcp")
        .await
        .get_jwks(leash_e2e::pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks_json;
    let offline = Verifier::offline(
        KeySet::from_jwks(&jwks).unwrap(),
        VerifierConfig::new(fx.url(), ISSUER),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let resource = ProtectedResource::new(format!("https://localhost:{port}/mcp"), ISSUER);
    let server = tokio::spawn(serve(
        listener,
        &fx.broker,
        app(LeashAuthLayer::new(offline, &resource).unwrap()),
    ));
    let response = fx
        .http()
        .post(&resource.resource)
        .bearer_auth(&token)
        .json(&initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    server.abort();
    task.complete(Outcome::Succeeded, "done").await.unwrap();
    fx.stop();
}
