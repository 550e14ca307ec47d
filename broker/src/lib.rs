//! # Leash broker
//!
//! Just-in-time, task-scoped credentials for AI agents. An agent proves what it
//! is with its X.509-SVID over mutual TLS, declares a task against a template a
//! platform team wrote, and receives one short-lived credential per grant. The
//! credentials die when the task completes or its lease is not renewed.
//!
//! ## Layout
//!
//! One module per box of the flow, every arrow pointing one way:
//!
//! ```text
//! api ──▶ identity ──▶ policy ──▶ lease ──▶ credentials ──▶ store
//!                                   └──▶ reaper (expiry → revoke)
//! ```
//!
//! - [`identity`]: SPIFFE IDs, X509-SVID rules, trust bundles, serving cert.
//! - [`templates`]: task-scope templates from YAML, validated and reloaded.
//! - [`policy`]: decides whether an identity may declare a task, and with what TTLs
//!   (template rules, then Cedar policies at request time), which actor class
//!   and tenant a caller is (`[[actors.classes]]`), and which audiences a
//!   verifier (`[verifier] callers`) may learn of.
//! - [`lease`]: begin / renew / complete, and the reaper that expires leases.
//! - [`credentials`]: minting JWTs (ring: EdDSA, ES256) and opaque tokens.
//! - [`store`]: the [`store::LeaseStore`] trait, Redis and in-memory.
//! - [`revocation`]: the revocation feed that resource servers watch.
//! - [`audit`]: the audit trail of decisions, issuance and revocation.
//! - [`canary`]: the revocation canary (a probe through the SDK, the loop
//!   `[canary]` runs, its metrics) and [`doctor`]: the checks of
//!   `Admin.Diagnose` and `leash doctor`.
//! - [`api`]: the thin gRPC layer; the only place that knows `tonic::Status`.
//! - [`logging`]: text and JSON log output in which no value can forge a line.
//! - [`fuzzing`]: entry points of the fuzz targets and the corpus replay test (not
//!   used by the broker).
//!
//! ## Security defaults
//!
//! - Fail closed: an unreadable store answers UNAVAILABLE, never "active"; an
//!   identity no actor class matches is denied, and so is everyone without classes.
//! - Tenants are isolated: no call of one tenant reads, renews, completes,
//!   introspects or hears revoked another tenant's tasks and credentials.
//! - No secret is stored or logged in the clear: the store keeps SHA-256 hashes,
//!   logs carry credential ids.
//! - No credential outlives its lease, and no lease outlives its max lifetime.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod canary;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod doctor;
pub mod fuzzing;
pub mod identity;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod revocation;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod templates;
