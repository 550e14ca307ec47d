//! `leash-sdk`: the Rust client for agents of a [Leash] broker.
//!
//! An agent proves what it is with its X.509-SVID (mutual TLS), declares a
//! **task** against a template, and receives **task-scoped credentials** that
//! live as long as the task's **lease**. This crate keeps the lease alive while
//! the agent works and ends the task when it is done.
//!
//! ```no_run
//! use std::time::Duration;
//! use leash_sdk::{Client, Outcome, TaskRequest};
//!
//! # async fn run() -> Result<(), leash_sdk::Error> {
//! let client = Client::builder()
//!     .broker("https://localhost:8443")
//!     .svid_files(".leash-dev/agent.pem", ".leash-dev/agent-key.pem")
//!     .bundle_file(".leash-dev/bundle.pem")
//!     .connect()
//!     .await?;
//!
//! let task = client
//!     .begin_task(
//!         TaskRequest::new("demo")
//!             .param("repo", "acme/widgets")
//!             .intent("review PR 42")
//!             .ttl(Duration::from_secs(60)),
//!     )
//!     .await?;
//!
//! let github = task.credential("github").expect("the template has this grant");
//! // ... call the API with `github.secret()`, while watching for lease loss:
//! tokio::select! {
//!     lost = task.lease_lost() => return Err(lost),
//!     _ = tokio::time::sleep(Duration::from_secs(1)) => {}
//! }
//! task.complete(Outcome::Succeeded, "reviewed").await?;
//! # Ok(()) }
//! ```
//!
//! # Delegation
//!
//! A task hands a narrower task to a subagent with [`Task::delegate`]; the
//! subagent, another process with its own SVID, redeems it with
//! [`Client::redeem_delegation`] and gets a [`Task`] guard like any other (the
//! child dies with its parent). The [`Delegation`] travels as one string,
//! [`Delegation::to_token`], which holds a one-time secret: pass it in the
//! environment (`leash-agent redeem` reads `LEASH_DELEGATION`), never in argv.
//!
//! ```no_run
//! use std::time::Duration;
//! use leash_sdk::{Client, Delegation, DelegationRequest, Task};
//!
//! // In the parent, which holds `task`:
//! # async fn parent(task: &Task) -> Result<(), leash_sdk::Error> {
//! let delegation = task
//!     .delegate(
//!         DelegationRequest::new("spiffe://acme.test/agent/summariser")
//!             .grant("github", ["repo:acme/widgets:read"])
//!             .ttl(Duration::from_secs(120))
//!             .intent("summarise the PR discussion"),
//!     )
//!     .await?;
//! let child = tokio::process::Command::new("summariser")
//!     .env("LEASH_DELEGATION", delegation.to_token())
//!     .spawn();
//! # Ok(()) }
//!
//! // In the subagent, connected with its own SVID:
//! # async fn subagent(client: Client) -> Result<(), leash_sdk::Error> {
//! let token = std::env::var("LEASH_DELEGATION").unwrap_or_default();
//! let task = client
//!     .redeem_delegation(&Delegation::from_token(&token)?)
//!     .await?;
//! let github = task.credential("github");
//! # Ok(()) }
//! ```
//!
//! # Approvals
//!
//! A template may gate grants behind a person's approval: the task begins
//! (and renews) with its other grants while the gated ones are withheld.
//! [`Task::approval`] waits for the decision (over `WatchTask`) and, once
//! approved, renews at once so the new credentials are there when it returns.
//!
//! ```no_run
//! use leash_sdk::{ApprovalOutcome, Error, Task};
//!
//! # async fn deploy(task: &Task) -> Result<(), Error> {
//! match task.approval().await {
//!     Ok(ApprovalOutcome::Approved { by, reason }) => {
//!         println!("approved by {by}: {reason}");
//!     }
//!     Ok(_) => {} // no approval needed
//!     Err(Error::ApprovalDenied { by, reason }) => {
//!         eprintln!("denied by {by}: {reason}");
//!         return Ok(());
//!     }
//!     Err(e) => return Err(e), // expired, lease lost, broker unreachable
//! }
//! let deploy = task.credential("deploy");
//! # Ok(()) }
//! ```
//!
//! # MCP
//!
//! With feature `mcp`, [`mcp`] makes an MCP server (on rmcp) an OAuth
//! protected resource accepting Leash credentials (`mcp::LeashAuthLayer`,
//! RFC 9728 metadata, `WWW-Authenticate` challenges, per-tool scopes), and
//! gives agents rmcp's streamable HTTP transport over mutual TLS presenting
//! the task's current credential (`mcp::task_transport`). Tokens are bound to
//! the agent's certificate, so MCP servers run over TLS (`mcp::serve_tls`).
//! See `examples/mcp`.
//!
//! # Layout
//!
//! - [`Client`] / [`ClientBuilder`]: the mTLS connection, timeouts and retries.
//! - [`SvidSource`]: where the SVID and trust bundle come from ([`SvidFiles`]
//!   today; the SPIFFE Workload API plugs in here).
//! - [`Task`]: the guard for one task: background renewal, current
//!   [`Credentials`], [`LeaseStatus`], [`Task::complete`]; the broker's
//!   [`LeaseState`] and [`Approval`], [`Task::approval`].
//! - [`DelegationRequest`] / [`Delegation`]: handing a narrower task to a
//!   subagent, and its token.
//! - [`TraceParent`]: the W3C trace context sent with every call
//!   ([`ClientBuilder::traceparent`], else `TRACEPARENT`), so the broker's
//!   spans join the agent's trace.
//! - [`Error`]: one typed error, mapped from gRPC statuses in one place.
//! - The `leash-agent` binary (`leash-agent exec -- cmd`, and
//!   `leash-agent redeem -- cmd` for a subagent) does all of this for any
//!   program; see `docs/sdk.md`.
//!
//! # Security defaults
//!
//! - TLS 1.3/1.2 with the ring provider only; the broker's certificate must chain
//!   to the configured bundle and match the host name; ALPN `h2`.
//! - Credential values and delegation handles are never in `Debug` output or
//!   SDK logs; only [`Credential::secret`], [`Delegation::handle`] and
//!   [`Delegation::to_token`] return them.
//! - Only `UNAVAILABLE` is retried (with exponential backoff and jitter);
//!   BeginTask retries reuse one idempotency key, so a retry cannot create a
//!   second task.
//! - The lease is renewed at 1/2–2/3 of its remaining time (or of the
//!   earliest credential's, if that is shorter), never later than
//!   [`RENEWAL_SAFETY_MARGIN`] before its deadline. A refused renewal or a
//!   missed deadline is reported at once through [`Task::lease_lost`].
//! - A `RESOURCE_EXHAUSTED` renewal ("too soon") waits the broker's
//!   retry-after ([`Error::retry_after`], at most [`MAX_RETRY_AFTER`]).
//! - Unknown lease or approval states from the broker are errors, never
//!   guessed at.
//! - A guard dropped without [`Task::complete`] stops renewing and completes
//!   the task as cancelled (best effort), so nothing outlives the agent's work.
//!
//! [Leash]: https://example.invalid/leash
#![forbid(unsafe_code)]

mod approval;
mod client;
mod delegation;
mod error;
mod retry;
mod svid;
mod task;
mod trace;

pub use approval::{Approval, ApprovalOutcome, ApprovalState, LeaseState};
pub use client::{Client, ClientBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use delegation::{DelegatedGrant, Delegation, DelegationRequest, MAX_DELEGATION_TOKEN_BYTES};
pub use error::{Error, MAX_RETRY_AFTER};
pub use retry::RetryPolicy;
pub use svid::{MAX_PEM_BYTES, SvidFiles, SvidSource, WorkloadApiSource, client_config};
pub use task::{
    Completion, Credential, CredentialKind, Credentials, LeaseStatus, MAX_APPROVAL_RENEW_ATTEMPTS,
    MIN_RENEWAL_INTERVAL, Outcome, RENEWAL_SAFETY_MARGIN, Task, TaskRequest,
};
pub use trace::{TRACEPARENT_ENV, TRACEPARENT_HEADER, TraceParent};

/// The generated Leash v1 gRPC types and clients, for calls the SDK does not wrap.
pub use leash_proto as proto;

pub mod verifier;

#[cfg(feature = "mcp")]
pub mod mcp;
