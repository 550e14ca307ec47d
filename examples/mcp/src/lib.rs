//! An MCP tool server that accepts Leash credentials, and an agent that calls
//! it within a Leash task. The binaries `mcp-server` and `mcp-agent` are thin
//! wrappers over [`server`] and [`agent`], which the tests drive directly.
//!
//! # Layout
//!
//! - [`server`]: the `items` tools (`list_items` needs scope `tools:read`,
//!   `add_item` `tools:write`), behind [`leash_sdk::mcp::LeashAuthLayer`],
//!   served over TLS asking for client certificates.
//! - [`agent`]: begins a task of template `mcp-demo`, lists the tools, calls
//!   both, completes the task, and shows that the next call is refused.
//! - [`ExampleError`]: what the example's functions fail with.
#![forbid(unsafe_code)]

pub mod agent;
pub mod server;

/// The scope `list_items` requires.
pub const READ_SCOPE: &str = "tools:read";
/// The scope `add_item` requires.
pub const WRITE_SCOPE: &str = "tools:write";
/// The MCP endpoint of `leash dev`'s `mcp-demo` template (its grant's audience).
pub const DEV_RESOURCE: &str = "https://localhost:9443/mcp";
/// The issuer of `leash dev` (its OAuth listener's URL).
pub const DEV_ISSUER: &str = "https://localhost:8444";
/// The token endpoint of `leash dev`.
pub const DEV_TOKEN_ENDPOINT: &str = "https://localhost:8444/token";

/// What the example fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExampleError {
    /// A file, a URL or a setting cannot be used.
    #[error("{0}")]
    Config(String),
    /// The Leash SDK failed (broker, task).
    #[error(transparent)]
    Leash(#[from] leash_sdk::Error),
    /// The SDK's MCP support failed (TLS, verifier, tokens).
    #[error(transparent)]
    Mcp(#[from] leash_sdk::mcp::McpError),
    /// The MCP session could not be opened.
    #[error("MCP session: {0}")]
    McpInit(String),
    /// An MCP call failed.
    #[error("MCP call: {0}")]
    McpCall(#[from] rmcp::ServiceError),
}

/// Installs ring as rustls' process-wide provider (reqwest without a provider
/// of its own needs one; the SDK passes ring explicitly everywhere else).
/// Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
