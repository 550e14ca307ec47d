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
//! # Layout
//!
//! - [`Client`] / [`ClientBuilder`]: the mTLS connection, timeouts and retries.
//! - [`SvidSource`]: where the SVID and trust bundle come from ([`SvidFiles`]
//!   today; the SPIFFE Workload API plugs in here).
//! - [`Task`]: the guard for one task: background renewal, current
//!   [`Credentials`], [`LeaseStatus`], [`Task::complete`].
//! - [`Error`]: one typed error, mapped from gRPC statuses in one place.
//! - The `leash-agent` binary (`leash-agent exec -- cmd`) does all of this for
//!   any program; see `docs/sdk.md`.
//!
//! # Security defaults
//!
//! - TLS 1.3/1.2 with the ring provider only; the broker's certificate must chain
//!   to the configured bundle and match the host name; ALPN `h2`.
//! - Credential values are never in `Debug` output or SDK logs; only
//!   [`Credential::secret`] returns them.
//! - Only `UNAVAILABLE` is retried (with exponential backoff and jitter);
//!   BeginTask retries reuse one idempotency key, so a retry cannot create a
//!   second task.
//! - The lease is renewed at 1/2–2/3 of its remaining time (or of the
//!   earliest credential's, if that is shorter), never later than
//!   [`RENEWAL_SAFETY_MARGIN`] before its deadline. A refused renewal or a
//!   missed deadline is reported at once through [`Task::lease_lost`].
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

/// The generated Leash v1 gRPC types and clients, for calls the SDK does not wrap.
pub use leash_proto as proto;

pub mod verifier;
