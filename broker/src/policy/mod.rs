//! Policy: may this identity declare this task, and on what terms? And which
//! verifiers may learn of which audiences' credentials ([`verifiers`])?
//!
//! Runs after the caller's SVID has been verified (authentication is the
//! `identity` module's job). A decision is a pure function of the template set,
//! the caller, the request and the time, so it is tested without a server.
//!
//! Two steps, in this order, both before anything is issued: [`decide`] (the
//! template rules: identity patterns, parameters, TTL bounds), then [`authorize`]
//! (the Cedar policies of [`cedar`], when configured; default deny once any
//! policy is loaded, `forbid` wins).

pub mod actors;
pub mod cedar;
pub mod verifiers;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::{
    clock::duration_ms,
    identity::{Identity, SpiffeId},
    templates::{GrantSpec, ScopeClass, Template, TemplateSet},
};

pub use actors::{Actor, ActorClasses, ClassLimits, ClassSpec, Rate, Unclassified};
pub use verifiers::{VerifierCaller, VerifierCallers};

/// A field of a request and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// The request field, e.g. `parameters.repo` or `requested_ttl`.
    pub field: String,
    /// Why, in words a client developer can act on.
    pub reason: String,
}

impl FieldProblem {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Why a task may not begin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No template has this name.
    #[error("template {0:?} not found")]
    UnknownTemplate(String),
    /// The template exists but does not list the caller among its identities.
    #[error("{identity} may not declare tasks of template {template:?}")]
    NotAllowed {
        /// The caller.
        identity: String,
        /// The template.
        template: String,
    },
    /// Parameters or TTL do not fit the template.
    #[error("invalid request")]
    Invalid(Vec<FieldProblem>),
    /// A Cedar policy forbids the request, or no policy permits it.
    #[error("{message}")]
    Forbidden {
        /// The ids of the deciding policies (empty: no policy permits it).
        policies: Vec<String>,
        /// The message for the caller, naming those policies.
        message: String,
    },
    /// The policy request could not be built (a bug); denied.
    #[error("policy evaluation failed: {0}")]
    Evaluation(String),
}

/// The terms a task begins on.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The template, as it was at decision time (a reload does not change a begun task).
    pub template: Arc<Template>,
    /// Validated parameter values.
    pub parameters: BTreeMap<String, String>,
    /// The lease TTL: requested, or the template's default.
    pub lease_ttl_ms: u64,
    /// The first lease deadline.
    pub lease_deadline_ms: u64,
    /// The max lifetime bound.
    pub max_deadline_ms: u64,
    /// Each grant with its substituted scopes and their declared classes, in
    /// template order.
    pub grants: Vec<(GrantSpec, Vec<(String, ScopeClass)>)>,
    /// 0 for a task declared directly; a delegated task's depth.
    pub delegation_depth: u32,
    /// A delegated task's chain: the subagent first, then each delegating
    /// owner up to the root's (empty for a task declared directly).
    pub actors: Vec<String>,
}

/// Decides whether `identity` may begin a task of `template` with `parameters`
/// and `requested_ttl` at `now_ms`.
///
/// # Errors
/// [`PolicyError::UnknownTemplate`], then [`PolicyError::NotAllowed`] (so that a
/// caller learns nothing about a template's parameters it may not use), then
/// [`PolicyError::Invalid`] with every parameter and TTL problem at once.
#[tracing::instrument(skip_all, name = "policy.decide")]
pub fn decide(
    templates: &TemplateSet,
    identity: &SpiffeId,
    template: &str,
    parameters: &BTreeMap<String, String>,
    requested_ttl: Option<Duration>,
    now_ms: u64,
) -> Result<Decision, PolicyError> {
    let tpl = templates
        .get(template)
        .ok_or_else(|| PolicyError::UnknownTemplate(template.to_owned()))?;
    if !tpl.allows(identity) {
        return Err(PolicyError::NotAllowed {
            identity: identity.to_string(),
            template: template.to_owned(),
        });
    }
    let mut problems = Vec::new();
    let bound = match tpl.bind_parameters(parameters) {
        Ok(b) => b,
        Err(ps) => {
            problems.extend(ps.into_iter().map(|p| FieldProblem::new(p.field, p.reason)));
            BTreeMap::new()
        }
    };
    let ttl = match requested_ttl {
        None => tpl.lease.ttl,
        Some(t) if t.is_zero() => {
            problems.push(FieldProblem::new("requested_ttl", "must be positive"));
            tpl.lease.ttl
        }
        Some(t) if t > tpl.lease.max_ttl => {
            problems.push(FieldProblem::new(
                "requested_ttl",
                format!(
                    "{} exceeds the template's max_ttl of {}",
                    humantime::format_duration(t),
                    humantime::format_duration(tpl.lease.max_ttl)
                ),
            ));
            tpl.lease.ttl
        }
        Some(t) => t,
    };
    if !problems.is_empty() {
        return Err(PolicyError::Invalid(problems));
    }
    let max_deadline_ms = now_ms.saturating_add(duration_ms(tpl.lease.max_lifetime));
    let lease_ttl_ms = duration_ms(ttl);
    let lease_deadline_ms = now_ms.saturating_add(lease_ttl_ms).min(max_deadline_ms);
    let grants = tpl
        .grants
        .iter()
        .map(|g| (g.clone(), tpl.classified_scopes_for(g, &bound)))
        .collect();
    Ok(Decision {
        template: tpl,
        parameters: bound,
        lease_ttl_ms,
        lease_deadline_ms,
        max_deadline_ms,
        grants,
        delegation_depth: 0,
        actors: Vec::new(),
    })
}

/// How `caller` authenticated, as policies see it.
pub fn connection_of(caller: &Identity) -> cedar::Connection {
    match caller.thumbprint_s256 {
        Some(_) => cedar::Connection::Mtls,
        None => cedar::Connection::JwtSvid,
    }
}

/// The policy request for a task the template rules accepted.
pub fn policy_request<'a>(
    caller: &'a Identity,
    class: &str,
    tenant: &str,
    decision: &'a Decision,
    now_ms: u64,
) -> cedar::Request<'a> {
    cedar::Request {
        identity: &caller.spiffe_id,
        connection: connection_of(caller),
        class: class.to_owned(),
        tenant: tenant.to_owned(),
        template: &decision.template,
        parameters: &decision.parameters,
        grants: &decision.grants,
        ttl_ms: decision.lease_ttl_ms,
        delegation_depth: decision.delegation_depth,
        actors: &decision.actors,
        now_ms,
    }
}

/// Decides a task the template rules accepted ([`decide`]) with the Cedar
/// `policies`: the one hook between the template decision and issuing. With no
/// policy loaded, everything the template rules accepted is allowed. Answers
/// the policies that permitted it (none when no policy set is loaded).
///
/// # Errors
/// [`PolicyError::Forbidden`] naming the deciding policies (a `forbid` that
/// applied, one that failed to evaluate, or none when no `permit` applied);
/// [`PolicyError::Evaluation`] if the request could not be built.
#[tracing::instrument(skip_all, name = "policy.authorize")]
pub fn authorize(
    policies: &cedar::Policies,
    caller: &Identity,
    class: &str,
    tenant: &str,
    decision: &Decision,
    now_ms: u64,
) -> Result<Vec<String>, PolicyError> {
    if policies.is_empty() {
        return Ok(Vec::new());
    }
    let request = policy_request(caller, class, tenant, decision, now_ms);
    let verdict = policies
        .evaluate(&request)
        .map_err(|e| PolicyError::Evaluation(e.to_string()))?;
    if verdict.allowed {
        return Ok(verdict.determining);
    }
    Err(PolicyError::Forbidden {
        message: policies.denial_message(&verdict),
        policies: verdict.determining,
    })
}

/// The deadline a renewal at `now_ms` sets: one lease TTL from now, never past
/// the max lifetime. `None` once the max lifetime is reached.
pub fn renewed_deadline(
    now_ms: u64,
    lease_ttl_ms: u64,
    current_ms: u64,
    max_ms: u64,
) -> Option<u64> {
    (current_ms < max_ms).then(|| {
        now_ms
            .saturating_add(lease_ttl_ms)
            .min(max_ms)
            .max(current_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_never_passes_max_lifetime() {
        assert_eq!(renewed_deadline(1_000, 500, 1_200, 10_000), Some(1_500));
        assert_eq!(renewed_deadline(9_800, 500, 9_900, 10_000), Some(10_000));
        assert_eq!(renewed_deadline(9_950, 500, 10_000, 10_000), None);
        // A renewal never shortens a lease.
        assert_eq!(renewed_deadline(1_000, 100, 5_000, 10_000), Some(5_000));
    }
}
