//! Token exchange (RFC 8693) and token revocation (RFC 7009) for the OAuth
//! front door: what they decide, without HTTP.
//!
//! An exchange turns a live credential of the caller's own task (the
//! `subject_token`) into a fresh JWT for one grant of the same task, selected
//! by its audience (RFC 8707 `resource`), narrowed to a subset of the grant's
//! scopes, bound to the caller's certificate (RFC 8705) and stored as a
//! credential of the task: it dies with the task's completion, expiry or
//! revocation like every other credential of it, and never outlives the
//! lease as it stands (an exchange does not renew).

use super::{
    LeaseError, LeaseService, Limits,
    service::{audit_issued, ended_message, records_of},
};
use crate::{
    audit,
    credentials::{self, MintRequest, Minted},
    identity::Identity,
    store::{KillTarget, LeaseStore, RenewOutcome, Renewal, TaskRecord},
    templates::CredentialKind,
};

/// The RFC 6749 §5.2 / RFC 8693 §2.2.2 error code of a refused exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeRefusal {
    /// A parameter is missing, repeated, malformed or too long.
    InvalidRequest,
    /// The subject token is not an active credential of a live task of the
    /// caller (unknown, expired, revoked, another identity's, bound to
    /// another certificate), or the task cannot be issued anything now.
    InvalidGrant,
    /// No grant of the task is for the requested resource, or the resource
    /// is not an absolute URI without a fragment (RFC 8707 §2).
    InvalidTarget,
    /// A requested scope is not a scope of the selected grant.
    InvalidScope,
}

impl ExchangeRefusal {
    /// The `error` value of the JSON error response.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidTarget => "invalid_target",
            Self::InvalidScope => "invalid_scope",
        }
    }
}

/// Longest `resource` accepted, in bytes.
pub const MAX_RESOURCE: usize = 2048;
/// Most scopes one exchange may ask for.
pub const MAX_SCOPES: usize = 64;

/// A token exchange request, as parsed from the token endpoint's form.
#[derive(Clone)]
pub struct ExchangeRequest {
    /// A live credential of the caller's task (JWT or opaque).
    pub subject_token: String,
    /// The resource (RFC 8707) whose grant of the task to issue for.
    pub resource: String,
    /// The scopes wanted, a subset of the grant's; `None` for all of them.
    pub scopes: Option<Vec<String>>,
}

impl std::fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("subject_token", &"...")
            .field("resource", &self.resource)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// What an exchange issued.
#[derive(Debug)]
pub struct Exchanged {
    /// The task, as stored after the credential was added.
    pub task: TaskRecord,
    /// The new credential (a JWT) and its record.
    pub credential: Minted,
}

fn refused(refusal: ExchangeRefusal, message: impl Into<String>) -> LeaseError {
    LeaseError::Exchange {
        refusal,
        message: message.into(),
    }
}

/// RFC 8707 §2: an absolute URI (a scheme, then `:`) without a fragment.
fn check_resource(resource: &str) -> Result<(), LeaseError> {
    if resource.is_empty() {
        return Err(refused(
            ExchangeRefusal::InvalidRequest,
            "resource is required: it selects the grant of the task to issue for",
        ));
    }
    if resource.len() > MAX_RESOURCE {
        return Err(refused(
            ExchangeRefusal::InvalidTarget,
            format!("resource is longer than {MAX_RESOURCE} bytes"),
        ));
    }
    let scheme_ok = resource.split_once(':').is_some_and(|(scheme, rest)| {
        !rest.is_empty()
            && scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    if !scheme_ok || resource.contains('#') || resource.chars().any(char::is_whitespace) {
        return Err(refused(
            ExchangeRefusal::InvalidTarget,
            "resource must be an absolute URI without a fragment (RFC 8707 section 2)",
        ));
    }
    Ok(())
}

impl<S: LeaseStore> LeaseService<S> {
    /// Exchanges a live credential of `caller`'s task for a JWT of one grant
    /// of the same task (RFC 8693): the grant whose audience is
    /// `req.resource`, with `req.scopes` (all of the grant's by default),
    /// bound to `caller`'s certificate, expiring with the grant's TTL or the
    /// lease, whichever ends first, and recorded as a credential of the task
    /// in one atomic step with its audit event. A delegated task's token
    /// carries its `act` chain like every credential of it.
    ///
    /// # Errors
    /// [`LeaseError::Exchange`] with the OAuth error code for every refusal
    /// of the request; `PermissionDenied` if `caller` is of no actor class or
    /// may no longer be issued the task's grants; `Unavailable`,
    /// `OutcomeUnknown`, `Internal` as for a renewal.
    pub async fn exchange(
        &self,
        caller: &Identity,
        req: ExchangeRequest,
    ) -> Result<Exchanged, LeaseError> {
        let actor = self.actor(caller, "exchange")?;
        let result = self.exchange_as(caller, &actor, req).await;
        // Every refusal is in the audit trail, with why.
        if let Err(LeaseError::Exchange { refusal, message }) = &result {
            self.refusals.denied_as(
                caller.spiffe_id.as_str(),
                &actor.class,
                &actor.tenant,
                "exchange",
                &format!("{}: {message}", refusal.as_str()),
            );
        }
        result
    }

    async fn exchange_as(
        &self,
        caller: &Identity,
        actor: &crate::policy::Actor,
        req: ExchangeRequest,
    ) -> Result<Exchanged, LeaseError> {
        if req.subject_token.is_empty() {
            return Err(refused(
                ExchangeRefusal::InvalidRequest,
                "subject_token is required",
            ));
        }
        if req.subject_token.len() > Limits::TOKEN {
            return Err(refused(
                ExchangeRefusal::InvalidRequest,
                format!("subject_token is longer than {} bytes", Limits::TOKEN),
            ));
        }
        check_resource(&req.resource)?;
        if let Some(scopes) = &req.scopes
            && scopes.len() > MAX_SCOPES
        {
            return Err(refused(
                ExchangeRefusal::InvalidScope,
                format!("at most {MAX_SCOPES} scopes per exchange"),
            ));
        }
        let deny = |reason: String| refused(ExchangeRefusal::InvalidGrant, reason);
        let not_active = "subject_token is not an active Leash credential";
        let Some((id, kind, nbf_ms)) = self.parse_token(&req.subject_token) else {
            return Err(deny(not_active.into()));
        };
        let now_ms = self.now_ms();
        let Some(view) = self.store.credential(&id.task_id(), &id, now_ms).await? else {
            return Err(deny(not_active.into()));
        };
        let c = &view.credential;
        let task = view.task;
        let genuine = c.kind == kind
            && credentials::digests_match(
                &credentials::value_digest(&req.subject_token),
                &c.value_sha256,
            );
        if !genuine || view.now_ms >= c.expires_at_ms || nbf_ms > view.now_ms {
            return Err(deny(not_active.into()));
        }
        // Another tenant's task is answered like another identity's: the
        // caller learns nothing of whose it is.
        if task.tenant != actor.tenant || task.owner != caller.spiffe_id.as_str() {
            return Err(deny(format!(
                "subject_token {} was issued to another identity than the caller",
                c.id
            )));
        }
        if let Some(bound) = &c.cnf_x5t_s256
            && caller.thumbprint_b64url().as_deref() != Some(bound.as_str())
        {
            return Err(deny(format!(
                "subject_token {} is bound to another certificate than the caller's (RFC 8705)",
                c.id
            )));
        }
        if !task.is_live(view.now_ms) {
            return Err(deny(ended_message(&task, view.now_ms)));
        }
        self.check_binding(&task, caller, "exchange")
            .map_err(|e| refused(ExchangeRefusal::InvalidGrant, e.to_string()))?;
        let (decision, _) = self.current_decision(caller, actor, &task, now_ms, "exchange")?;
        let Some((grant, scopes)) = decision
            .grants
            .iter()
            .find(|(g, _)| g.audience == req.resource)
        else {
            let mut audiences: Vec<&str> = decision
                .grants
                .iter()
                .map(|(g, _)| g.audience.as_str())
                .collect();
            audiences.dedup();
            return Err(refused(
                ExchangeRefusal::InvalidTarget,
                format!(
                    "no grant of task {} is for resource {:?}; it may be issued for {audiences:?}",
                    task.id, req.resource
                ),
            ));
        };
        let chosen: Vec<_> = match &req.scopes {
            None => scopes.clone(),
            Some(wanted) => {
                let mut chosen = Vec::with_capacity(wanted.len());
                for w in wanted {
                    match scopes.iter().find(|(s, _)| s == w) {
                        Some(found) if !chosen.contains(found) => chosen.push(found.clone()),
                        Some(_) => {}
                        None => {
                            return Err(refused(
                                ExchangeRefusal::InvalidScope,
                                format!(
                                    "scope {w:?} is not a scope of grant {:?} of task {}",
                                    grant.name, task.id
                                ),
                            ));
                        }
                    }
                }
                chosen
            }
        };
        if chosen.is_empty() {
            return Err(refused(
                ExchangeRefusal::InvalidScope,
                "scope names no scope; omit it for every scope of the grant",
            ));
        }
        // Always a JWT: the resource verifies it offline (RFC 9068 style).
        let mut spec = grant.clone();
        spec.kind = CredentialKind::Jwt;
        let minted = self
            .minter
            .mint(&MintRequest {
                task_id: &task.id,
                template: &task.template,
                grant: &spec,
                scopes: chosen.iter().map(|(s, _)| s.clone()).collect(),
                scope_classes: chosen.iter().map(|(_, c)| *c).collect(),
                subject: caller.spiffe_id.as_str(),
                actors: &task.actors,
                cnf_x5t_s256: caller.thumbprint_b64url().as_deref(),
                now_ms,
                lease_deadline_ms: task.lease_deadline_ms,
            })
            .map_err(|e| match e {
                e @ credentials::CredentialError::LeaseEndsTooSoon { .. } => refused(
                    ExchangeRefusal::InvalidGrant,
                    format!("{e}: renew the task's lease first"),
                ),
                other => LeaseError::from(other),
            })?;
        let records = records_of(std::slice::from_ref(&minted), &task.tenant);
        let redeems_approval = task
            .approval
            .as_ref()
            .is_some_and(|a| a.grants.contains(&grant.name));
        let renewal = Renewal {
            now_ms,
            // The lease stays as it is: an exchange is not a renewal.
            extend_by_ms: 0,
            min_interval_ms: None,
            credentials: &records,
            redeems_approval,
        };
        match self.store.renew(&task.id, renewal).await? {
            RenewOutcome::Renewed { task, rotated } => {
                audit_issued(&task, &records);
                audit::credentials_rotated(&task, &rotated);
                tracing::info!(
                    target: audit::TARGET,
                    event = "token.exchanged",
                    task_id = %task.id,
                    subject_credential = %id,
                    credential_id = %minted.record.id,
                    resource = %req.resource,
                    "token exchanged"
                );
                Ok(Exchanged {
                    task,
                    credential: minted,
                })
            }
            RenewOutcome::NotActive(task) => Err(deny(ended_message(&task, now_ms))),
            RenewOutcome::ApprovalLapsed(task) => Err(deny(format!(
                "the approval of task {} for grant {:?} is no longer usable",
                task.id, grant.name
            ))),
            RenewOutcome::TooSoon { .. } => Err(LeaseError::Internal(
                "an exchange was limited as a renewal".into(),
            )),
            RenewOutcome::NotFound => Err(deny(not_active.into())),
        }
    }

    /// Revokes `token` (RFC 7009) for `caller`: the identity it was issued to,
    /// or a verifier (`verifier.callers`) serving its audience in the same
    /// tenant. Revoking a credential ends its task — every credential of the
    /// task and of its delegated descendants — because a credential whose
    /// secrecy is in doubt puts the task in doubt (RFC 7009 §2.1 lets a
    /// revocation take related tokens with it). True if a live task was ended.
    /// A token that is unknown, inactive or not the caller's to revoke
    /// changes nothing and is answered the same (false), so nothing about it
    /// leaks; the refusal is audited.
    ///
    /// # Errors
    /// `PermissionDenied` if `caller` is of no actor class; `InvalidArgument`
    /// for an empty or oversized token; `Unavailable`, `OutcomeUnknown`.
    pub async fn revoke_token(&self, caller: &Identity, token: &str) -> Result<bool, LeaseError> {
        let actor = self.actor(caller, "revoke")?;
        if token.is_empty() {
            return Err(LeaseError::invalid("token", "required"));
        }
        if token.len() > Limits::TOKEN {
            return Err(LeaseError::invalid(
                "token",
                format!("longer than {} bytes", Limits::TOKEN),
            ));
        }
        let Some((id, kind, _)) = self.parse_token(token) else {
            return Ok(false);
        };
        let now_ms = self.now_ms();
        let Some(view) = self.store.credential(&id.task_id(), &id, now_ms).await? else {
            return Ok(false);
        };
        let c = &view.credential;
        let genuine = c.kind == kind
            && credentials::digests_match(&credentials::value_digest(token), &c.value_sha256);
        if !genuine || !view.task.is_live(view.now_ms) {
            return Ok(false);
        }
        let same_tenant = view.task.tenant == actor.tenant && c.tenant == actor.tenant;
        let owner = view.task.owner == caller.spiffe_id.as_str();
        let verifier = self
            .verifier_callers
            .audiences_of(&caller.spiffe_id)
            .is_some_and(|a| a.admits(&c.audience));
        if !same_tenant || !(owner || verifier) {
            self.refusals.denied_as(
                caller.spiffe_id.as_str(),
                &actor.class,
                &actor.tenant,
                "revoke",
                &format!(
                    "credential {} is neither the caller's nor of an audience it serves",
                    c.id
                ),
            );
            return Ok(false);
        }
        let task_id = view.task.id.clone();
        let who = caller.spiffe_id.as_str();
        let ended = self
            .store
            .revoke_tasks(
                task_id.shard(),
                std::slice::from_ref(&task_id),
                &KillTarget::Task(task_id.clone()),
                &format!("revoked by {who} (RFC 7009, credential {})", c.id),
                who,
                now_ms,
            )
            .await?;
        for e in &ended {
            audit::task_ended(&e.task, e.reason, &e.revoked);
            self.metrics.task_ended(e.reason);
        }
        Ok(!ended.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_must_be_an_absolute_uri_without_a_fragment() {
        for ok in [
            "https://mcp.example/mcp",
            "https://localhost:9443/mcp",
            "urn:example:resource",
            "postgres://db.example/app",
        ] {
            assert!(check_resource(ok).is_ok(), "{ok}");
        }
        for (bad, code) in [
            ("", ExchangeRefusal::InvalidRequest),
            ("mcp.example/mcp", ExchangeRefusal::InvalidTarget),
            ("/mcp", ExchangeRefusal::InvalidTarget),
            (
                "https://mcp.example/mcp#frag",
                ExchangeRefusal::InvalidTarget,
            ),
            ("1http://x", ExchangeRefusal::InvalidTarget),
            ("https:", ExchangeRefusal::InvalidTarget),
            ("https://a b", ExchangeRefusal::InvalidTarget),
        ] {
            match check_resource(bad) {
                Err(LeaseError::Exchange { refusal, .. }) => assert_eq!(refusal, code, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let long = format!("https://x/{}", "a".repeat(MAX_RESOURCE));
        assert!(check_resource(&long).is_err());
    }
}
