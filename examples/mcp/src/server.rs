//! The `items` MCP server: two tools behind Leash authentication.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{Router, http::request::Parts};
use leash_sdk::{
    SvidFiles,
    mcp::{self, LeashAuthLayer, ProtectedResource},
    verifier::{Verifier, VerifierConfig},
};
use rmcp::{
    ErrorData, ServerHandler,
    handler::server::{router::tool::ToolRouter, tool::Extension, wrapper::Parameters},
    model::{ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::net::TcpListener;

use crate::{ExampleError, READ_SCOPE, WRITE_SCOPE};

/// The arguments of `add_item`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct AddItem {
    /// The item to add.
    pub name: String,
}

/// The tools: a shared list of items.
#[derive(Debug, Clone)]
pub struct Items {
    items: Arc<Mutex<Vec<String>>>,
    tool_router: ToolRouter<Self>,
}

impl Items {
    /// The tools over `items`, shared by every MCP session.
    pub fn new(items: Arc<Mutex<Vec<String>>>) -> Self {
        Self {
            items,
            tool_router: Self::tool_router(),
        }
    }
}

#[tool_router]
impl Items {
    /// Lists the items; needs scope `tools:read`.
    #[tool(description = "List the items (needs scope tools:read)")]
    async fn list_items(&self, Extension(parts): Extension<Parts>) -> Result<String, ErrorData> {
        let claims = mcp::require_scope(&parts, READ_SCOPE)?;
        let items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        tracing::info!(task_id = claims.task_id(), "list_items");
        Ok(serde_json::json!({ "items": *items }).to_string())
    }

    /// Adds an item; needs scope `tools:write`.
    #[tool(description = "Add an item (needs scope tools:write)")]
    async fn add_item(
        &self,
        Extension(parts): Extension<Parts>,
        Parameters(AddItem { name }): Parameters<AddItem>,
    ) -> Result<String, ErrorData> {
        let claims = mcp::require_scope(&parts, WRITE_SCOPE)?;
        tracing::info!(
            task_id = claims.task_id(),
            subject = %claims.subject,
            class = claims.scope_class(WRITE_SCOPE).unwrap_or("?"),
            "add_item"
        );
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.push(name.clone());
        Ok(format!("added {name:?} for task {}", claims.task_id()))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Items {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// The HTTP application: rmcp's streamable HTTP service at the resource's
/// path (`/mcp`), behind [`LeashAuthLayer`], which also serves the RFC 9728
/// metadata.
///
/// # Errors
/// [`ExampleError::Mcp`] when the resource URL is unusable.
pub fn app(verifier: Verifier, resource: &ProtectedResource) -> Result<Router, ExampleError> {
    let path = resource
        .resource
        .strip_prefix("https://")
        .and_then(|r| r.find('/').map(|i| r[i..].to_owned()))
        .ok_or_else(|| {
            ExampleError::Config(format!("resource {:?} has no path", resource.resource))
        })?;
    let items = Arc::new(Mutex::new(Vec::new()));
    let service: StreamableHttpService<Items, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(Items::new(Arc::clone(&items))),
        Arc::default(),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    Ok(Router::new()
        .nest_service(&path, service)
        .layer(LeashAuthLayer::new(verifier, resource)?))
}

/// The resource as this example describes it.
pub fn resource(url: &str, issuer: &str) -> ProtectedResource {
    ProtectedResource::new(url, issuer)
        .scopes([READ_SCOPE, WRITE_SCOPE])
        .name("Leash MCP example: items")
}

/// The files of [`run`].
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The trust bundle: of the agents' client certificates, and of the broker.
    pub bundle: PathBuf,
    /// The resource server's SVID, for the broker's revocation stream.
    pub svid_cert: PathBuf,
    /// Its key.
    pub svid_key: PathBuf,
}

impl ServerFiles {
    /// The files `leash dev` writes to `dir`: the server borrows the dev
    /// broker's certificate (DNS SAN localhost) and the dev resource SVID.
    pub fn dev(dir: &std::path::Path) -> Self {
        Self {
            cert: dir.join("broker.pem"),
            key: dir.join("broker-key.pem"),
            bundle: dir.join("bundle.pem"),
            svid_cert: dir.join("resource.pem"),
            svid_key: dir.join("resource-key.pem"),
        }
    }
}

fn pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ExampleError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ExampleError::Config(format!("{}: {e}", path.display())))
}

/// The TLS configuration of the server from `files`.
///
/// # Errors
/// [`ExampleError::Config`] for unreadable files, [`ExampleError::Mcp`] for
/// unusable ones.
pub fn tls_config(files: &ServerFiles) -> Result<Arc<rustls::ServerConfig>, ExampleError> {
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| ExampleError::Config(format!("{}: {e}", files.key.display())))?;
    Ok(mcp::server_tls_config(
        pem_certs(&files.cert)?,
        key,
        pem_certs(&files.bundle)?,
    )?)
}

/// Connects the verifier to the broker at `broker` with the resource SVID,
/// builds the application and serves it on `listener` until `shutdown`.
///
/// # Errors
/// When a file, the broker or the resource URL cannot be used.
pub async fn run(
    files: &ServerFiles,
    broker: &str,
    resource: &ProtectedResource,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ExampleError> {
    let tls = tls_config(files)?;
    let issuer = resource
        .authorization_servers
        .first()
        .cloned()
        .unwrap_or_default();
    let svid = Arc::new(SvidFiles {
        cert: files.svid_cert.clone(),
        key: files.svid_key.clone(),
        bundle: files.bundle.clone(),
    });
    let verifier = mcp::connect_verifier(
        broker,
        svid,
        VerifierConfig::new(resource.resource.clone(), issuer),
    )
    .await?;
    let app = app(verifier, resource)?;
    mcp::serve_tls(listener, tls, app, shutdown).await;
    Ok(())
}
