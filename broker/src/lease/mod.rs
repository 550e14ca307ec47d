//! Lease: the life of a task — begin, renew, complete — and the reaper that
//! expires leases nobody renewed.
//!
//! [`LeaseService`] is the domain behind the Broker and Verifier APIs; it knows
//! nothing of gRPC. [`Reaper`] runs on every replica; store claims keep two
//! replicas from expiring the same lease.

mod admin;
mod binding;
mod delegation;
mod error;
mod exchange;
mod reaper;
mod request;
mod service;
mod trail;

pub use admin::{KillReport, ListedState, TaskFilter, TaskListing};
pub use binding::BindingRule;
pub use delegation::{DelegateTask, Delegated, HANDLE_PREFIX};
pub use error::LeaseError;
pub use exchange::{ExchangeRefusal, ExchangeRequest, Exchanged, MAX_RESOURCE, MAX_SCOPES};
pub use reaper::{Reaper, ReaperSettings};
pub use request::{BeginTask, Limits};
pub use service::{Completed, Introspection, IssuedTask, LeaseService};
pub use trail::{TAIL_PAGE, Trace, TrailScope};

#[cfg(test)]
mod tests;
