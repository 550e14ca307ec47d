//! MCP (Model Context Protocol) with Leash credentials, on [rmcp] (feature
//! `mcp`).
//!
//! An MCP server becomes an OAuth 2.0 protected resource (RFC 9728) whose
//! access tokens are Leash credentials; an agent reaches it from within a
//! Leash [`Task`](crate::Task), presenting the task's credential for the
//! server's URL.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::Router;
//! use leash_sdk::mcp::{LeashAuthLayer, ProtectedResource};
//! use leash_sdk::verifier::Verifier;
//!
//! # fn wire<S>(mcp: S, verifier: Verifier) -> Result<Router, leash_sdk::mcp::McpError>
//! # where S: tower::Service<axum::extract::Request, Error = std::convert::Infallible>
//! #     + Clone + Send + Sync + 'static,
//! #     S::Response: axum::response::IntoResponse, S::Future: Send + 'static {
//! // `mcp` is rmcp's StreamableHttpService; `verifier`'s audience is the resource.
//! let resource = ProtectedResource::new("https://mcp.acme.test/mcp", "https://leash.acme.test")
//!     .scopes(["tools:read", "tools:write"]);
//! let app = Router::new()
//!     .nest_service("/mcp", mcp)
//!     .layer(LeashAuthLayer::new(verifier, &resource)?);
//! // serve `app` with leash_sdk::mcp::serve_tls, which passes the client certificate
//! # Ok(app) }
//! ```
//!
//! # Layout
//!
//! - Server: [`ProtectedResource`] (the RFC 9728 metadata), [`LeashAuthLayer`]
//!   (metadata, bearer check, `WWW-Authenticate` challenges),
//!   [`require_scope`] / [`verified_claims`] for tools, [`serve_tls`] and
//!   [`server_tls_config`] (TLS with optional client certificates, passed to
//!   the layer as [`PeerCertificate`]), [`connect_verifier`] (the verifier
//!   fed by the broker, connected with the server's SVID).
//! - Client: [`LeashHttpClient`], rmcp's `StreamableHttpClient` over mutual
//!   TLS, asking a [`TokenSource`] for the token of every request:
//!   [`TaskCredential`] (the task's credential for the server's audience,
//!   following renewals) or [`TokenExchange`] (RFC 8693 at the broker's
//!   token endpoint); [`task_transport`] wires the first.
//! - [`McpError`]: what can go wrong outside rmcp.
//!
//! # Security defaults
//!
//! - Leash tokens are bound to the agent's certificate (`cnf.x5t#S256`): an
//!   MCP server must run over TLS and ask for client certificates, or every
//!   bound token is refused. [`serve_tls`] does so; without it, put the leaf
//!   certificate into the request extensions as [`PeerCertificate`] yourself.
//! - Only `Authorization: Bearer` is accepted (`bearer_methods_supported:
//!   ["header"]`); the token is never logged, by either side.
//! - The verifier fails closed: while revocation state is unknown every call
//!   gets 503 with `Retry-After`.
//! - The client follows no redirects, so a token goes only to the URL given.
//!
//! [rmcp]: https://docs.rs/rmcp

mod client;
mod server;

pub use client::{
    ACCESS_TOKEN_TYPE, AccessToken, CONNECT_TIMEOUT, LeashHttpClient, MAX_TOKEN_RESPONSE_BYTES,
    TOKEN_EXCHANGE_GRANT, TaskCredential, TokenExchange, TokenFuture, TokenSource, http_client,
    task_transport,
};
pub use server::{
    DRAIN_TIMEOUT, HANDSHAKE_TIMEOUT, LeashAuthLayer, LeashAuthService, PeerCertificate,
    ProtectedResource, RETRY_AFTER_SECS, WELL_KNOWN_PATH, connect_verifier, require_scope,
    serve_tls, server_tls_config, verified_claims,
};

/// What can go wrong in the SDK's MCP support (outside rmcp's own errors).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum McpError {
    /// A setting cannot be used: a resource URL that is not `https://`, an
    /// unusable certificate, key or bundle, an ambiguous grant.
    #[error("MCP configuration: {0}")]
    Config(String),
    /// No JWT grant of the task has the MCP server's URL as its audience.
    #[error("no grant of the task has audience {0:?}")]
    NoGrantForAudience(String),
    /// The task's credential of this grant is gone or expired (the lease was
    /// lost, or the task ended).
    #[error("the credential of grant {0:?} is not available")]
    CredentialUnavailable(String),
    /// The broker could not be reached or refused (a verifier's connection).
    #[error("broker: {0}")]
    Broker(String),
    /// The token endpoint could not be reached or gave an unusable answer.
    #[error("token endpoint: {0}")]
    TokenEndpoint(String),
    /// The token endpoint refused the exchange (an OAuth error answer).
    #[error("token exchange refused ({status}): {error}: {description}")]
    ExchangeRefused {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code, e.g. `invalid_target`.
        error: String,
        /// The `error_description`.
        description: String,
    },
}
