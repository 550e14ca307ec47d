//! The agent: one Leash task, two MCP tool calls, and the refusal after the
//! task ended.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use leash_sdk::{Client, Outcome, SvidFiles, TaskRequest, mcp};
use rmcp::{
    ServiceExt as _,
    model::{CallToolRequestParams, ClientConfig},
};

use crate::ExampleError;

/// How long the agent waits, after completing its task, for the server to
/// learn of the revocation and refuse the credential (it is pushed to the
/// server's verifier at once; this bounds a slow machine).
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(15);

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The broker's agent address (`https://localhost:8443`).
    pub broker: String,
    /// The agent's SVID and the trust bundle.
    pub svid: SvidFiles,
    /// The MCP server's resource URL (`https://localhost:9443/mcp`): the
    /// audience of the template grant whose credential is presented.
    pub url: String,
    /// The template to begin (`mcp-demo`).
    pub template: String,
    /// The broker's RFC 8693 token endpoint (`https://localhost:8444/token`):
    /// when set, the MCP server is shown a token exchanged there for the
    /// task's credential, instead of the credential itself.
    pub token_endpoint: Option<String>,
}

impl AgentOptions {
    /// The options for `leash dev`'s files in `dir`.
    pub fn dev(dir: &std::path::Path, broker: &str, url: &str) -> Self {
        Self {
            broker: broker.to_owned(),
            svid: SvidFiles {
                cert: dir.join("agent.pem"),
                key: dir.join("agent-key.pem"),
                bundle: dir.join("bundle.pem"),
            },
            url: url.to_owned(),
            template: "mcp-demo".to_owned(),
            token_endpoint: None,
        }
    }
}

/// What happened, for the walk-through and the tests.
#[derive(Debug, Clone)]
pub struct Report {
    /// The task's id.
    pub task_id: String,
    /// The tools the server listed.
    pub tools: Vec<String>,
    /// `add_item`'s answer.
    pub added: String,
    /// `list_items`'s answer.
    pub listed: String,
    /// How many credentials completing the task revoked.
    pub revoked_credentials: u32,
    /// Why the call after completion was refused (the error and the server's
    /// `WWW-Authenticate` challenge).
    pub refusal: String,
    /// How long after completion the refusal came.
    pub refused_after: Duration,
}

fn text(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn call(name: &'static str, args: serde_json::Value) -> CallToolRequestParams {
    let params = CallToolRequestParams::new(name);
    match args {
        serde_json::Value::Object(map) => params.with_arguments(map),
        _ => params,
    }
}

/// Begins a task, lists the tools, calls `add_item` and `list_items`,
/// completes the task, then calls `list_items` with the same (now revoked)
/// credential until the server refuses it (within [`REFUSAL_DEADLINE`]).
///
/// # Errors
/// When the broker or the MCP server cannot be reached or refuses a call
/// that should pass, or the last call is still accepted at the deadline.
pub async fn run(options: &AgentOptions) -> Result<Report, ExampleError> {
    crate::install_crypto_provider();
    let client = Client::builder()
        .broker(&options.broker)
        .svid_files(&options.svid.cert, &options.svid.key)
        .bundle_file(&options.svid.bundle)
        .connect()
        .await?;
    let task = client
        .begin_task(TaskRequest::new(&options.template).intent("add an item over MCP"))
        .await?;
    let task_id = task.id().to_owned();
    tracing::info!(%task_id, "task begun");

    // The task's credential for the MCP server's URL, looked up afresh for
    // every request (renewals are picked up), over mTLS with the agent's SVID.
    let svid: Arc<dyn leash_sdk::SvidSource> = Arc::new(options.svid.clone());
    let transport = match &options.token_endpoint {
        None => mcp::task_transport(&task, svid, &options.url)?,
        Some(endpoint) => {
            let subject = Arc::new(mcp::TaskCredential::for_audience(&task, &options.url)?);
            let exchange = mcp::TokenExchange::new(
                mcp::http_client(svid.as_ref())?,
                endpoint,
                subject,
                &options.url,
            );
            mcp::LeashHttpClient::new(svid, Arc::new(exchange))?.transport(options.url.clone())
        }
    };
    let session = ClientConfig::default()
        .serve(transport)
        .await
        .map_err(|e| ExampleError::McpInit(e.to_string()))?;

    let tools = session
        .list_all_tools()
        .await?
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    let added = text(
        &session
            .call_tool(call("add_item", serde_json::json!({"name": "widget"})))
            .await?,
    );
    let listed = text(
        &session
            .call_tool(call("list_items", serde_json::json!({})))
            .await?,
    );

    let completion = task.complete(Outcome::Succeeded, "item added").await?;
    tracing::info!(%task_id, "task completed");
    let completed = Instant::now();
    // The credential is still in hand (as it would be in a careless agent);
    // the server must refuse it once the broker's revocation reaches it.
    let refusal = loop {
        match session
            .call_tool(call("list_items", serde_json::json!({})))
            .await
        {
            Err(e) => {
                let challenge = e.auth_challenge().map(str::to_owned);
                break match challenge {
                    Some(c) => format!("{e} (WWW-Authenticate: {c})"),
                    None => e.to_string(),
                };
            }
            Ok(_) if completed.elapsed() < REFUSAL_DEADLINE => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => {
                return Err(ExampleError::Config(format!(
                    "the server still accepted the credential {REFUSAL_DEADLINE:?} after the task ended"
                )));
            }
        }
    };
    let refused_after = completed.elapsed();
    let _ = session.cancel().await;
    Ok(Report {
        task_id,
        tools,
        added,
        listed,
        revoked_credentials: completion.revoked_credentials,
        refusal,
        refused_after,
    })
}
