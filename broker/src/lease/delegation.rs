//! Delegation: a task hands a narrower task to a subagent.
//!
//! Guarantees: only the parent's owner delegates, while the parent is live;
//! the child's grants and scopes are a subset of the parent's live ones; its
//! lease and max lifetime never pass the parent's; the template bounds the
//! depth and names who may act (`delegation.may_act`), checked again at every
//! level and at every renewal; the child lives in the parent's shard, so the
//! end of any ancestor ends it in the same atomic step. No credential is
//! copied: the subagent redeems a one-time handle with its own SVID.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{
    IssuedTask, LeaseError, LeaseService, Limits, binding,
    request::check_required_text,
    service::{digest_hex, narrow_grants, records_of},
};
use crate::{
    audit,
    credentials::{self, Minted},
    identity::{Identity, SpiffeId},
    policy::{self, Decision},
    store::{DelegateOutcome, LeaseStore, RedeemOutcome, TaskBinding, TaskId, TaskRecord},
    templates::{Template, TemplateSet},
};

/// What a DelegateTask asks for.
#[derive(Debug, Clone, Default)]
pub struct DelegateTask {
    /// The parent task.
    pub parent_task_id: String,
    /// The subagent's SPIFFE ID.
    pub subagent: String,
    /// Grant → scopes wanted (empty scopes: all the parent holds of it); an
    /// empty list: every live grant of the parent.
    pub grants: Vec<(String, Vec<String>)>,
    /// Lease TTL wanted (clamped to the parent's remaining lease).
    pub requested_ttl: Option<Duration>,
    /// What the subagent will do.
    pub intent: String,
}

/// A delegated child task, before its subagent redeemed it.
#[derive(Debug)]
pub struct Delegated {
    /// The child as stored.
    pub task: TaskRecord,
    /// The one-time handle for the subagent (never stored; only its hash is).
    pub handle: credentials::Secret,
}

/// The prefix of delegation handles.
pub const HANDLE_PREFIX: &str = "lsd_";

fn handle_digest(handle: &str) -> String {
    credentials::value_digest(handle)
}

/// The scopes a task holds now, by grant, in template order.
fn held(decision: &Decision) -> Vec<(String, Vec<String>)> {
    decision
        .grants
        .iter()
        .map(|(g, scopes)| {
            (
                g.name.clone(),
                scopes.iter().map(|(s, _)| s.clone()).collect(),
            )
        })
        .collect()
}

/// The child's grants: `wanted` checked against what the parent holds.
///
/// # Errors
/// `InvalidArgument` for a grant named twice; `PermissionDenied` naming every
/// grant the parent does not hold and every extra scope.
fn narrowed(
    parent_id: &TaskId,
    parent_holds: &[(String, Vec<String>)],
    wanted: &[(String, Vec<String>)],
) -> Result<BTreeMap<String, Vec<String>>, LeaseError> {
    if wanted.is_empty() {
        return Ok(parent_holds.iter().cloned().collect());
    }
    let mut out = BTreeMap::new();
    let mut extra = Vec::new();
    for (i, (grant, scopes)) in wanted.iter().enumerate() {
        if out.contains_key(grant) {
            return Err(LeaseError::invalid(
                &format!("grants[{i}].grant"),
                format!("{grant:?} is named twice"),
            ));
        }
        let Some((_, has)) = parent_holds.iter().find(|(g, _)| g == grant) else {
            extra.push(format!("grant {grant:?} (not a live grant of the parent)"));
            continue;
        };
        if scopes.is_empty() {
            out.insert(grant.clone(), has.clone());
            continue;
        }
        let mut keep = Vec::new();
        for scope in scopes {
            if has.contains(scope) {
                if !keep.contains(scope) {
                    keep.push(scope.clone());
                }
            } else {
                extra.push(format!("scope {scope:?} of grant {grant:?}"));
            }
        }
        out.insert(grant.clone(), keep);
    }
    if extra.is_empty() {
        Ok(out)
    } else {
        Err(LeaseError::PermissionDenied(format!(
            "delegation can only narrow: parent task {parent_id} does not hold {}",
            extra.join(", ")
        )))
    }
}

impl<S: LeaseStore> LeaseService<S> {
    /// Creates a child task of `caller`'s live task `req.parent_task_id`,
    /// owned by `req.subagent`, holding at most what the parent holds, and
    /// returns it with its one-time delegation handle.
    ///
    /// # Errors
    /// `InvalidArgument` (every field problem), `TaskNotFound`,
    /// `PermissionDenied` (not the owner, extra scopes, depth, `may_act`, the
    /// subagent's class or tenant, a policy, a kill switch),
    /// `FailedPrecondition` (parent ended or unredeemed, template gone),
    /// `QuotaExceeded` (too many children), `Unavailable`, `Internal`.
    pub async fn delegate(
        &self,
        caller: &Identity,
        req: DelegateTask,
    ) -> Result<Delegated, LeaseError> {
        let parent_id = Self::parse_task_id(&req.parent_task_id).map_err(|_| {
            LeaseError::invalid(
                "parent_task_id",
                "not a task id (tk_ followed by 32 lower-case hex digits)",
            )
        })?;
        let subagent = check_subagent(&req.subagent)?;
        check_required_text("intent", &req.intent, Limits::INTENT)?;
        check_grants(&req.grants)?;
        if req.requested_ttl.is_some_and(|t| t.is_zero()) {
            return Err(LeaseError::invalid("requested_ttl", "must be positive"));
        }
        let parent = self.owned_task(caller, &parent_id, "delegate").await?;
        let now_ms = self.now_ms();
        if !parent.is_live(now_ms) {
            return Err(LeaseError::FailedPrecondition(
                super::service::ended_message(&parent, now_ms),
            ));
        }
        let actor = self.actor(caller, "delegate")?;
        let who = caller.spiffe_id.as_str();
        let templates = self.templates.current();
        let template = templates.get(&parent.template).ok_or_else(|| {
            LeaseError::FailedPrecondition(format!(
                "template {:?} of task {parent_id} is no longer loaded; it cannot be delegated",
                parent.template
            ))
        })?;
        let depth = parent.depth + 1;
        let max_depth = template.delegation.max_depth;
        if depth > max_depth {
            let reason = if max_depth == 0 {
                format!(
                    "template {:?} forbids delegation (delegation.max_depth = 0)",
                    template.name
                )
            } else {
                format!(
                    "a child of task {parent_id} would be at delegation depth {depth}; template {:?} allows at most {max_depth} (delegation.max_depth)",
                    template.name
                )
            };
            self.refusals
                .denied_as(who, &actor.class, &actor.tenant, "delegate", &reason);
            return Err(LeaseError::PermissionDenied(reason));
        }
        let sub_actor = self.actors.classify(&subagent).cloned().map_err(|e| {
            let reason = format!("subagent {subagent}: {e}");
            self.refusals
                .denied_as(who, &actor.class, &actor.tenant, "delegate", &reason);
            LeaseError::PermissionDenied(reason)
        })?;
        if sub_actor.tenant != parent.tenant {
            // Another tenant's name is not this caller's to learn.
            let reason = format!("subagent {subagent} is not in the tenant of task {parent_id}");
            self.refusals
                .denied_as(who, &actor.class, &actor.tenant, "delegate", &reason);
            return Err(LeaseError::PermissionDenied(reason));
        }
        if !template.admits_class(&sub_actor.class, &sub_actor.tenant) {
            let reason = format!(
                "subagent {subagent} is of actor class {:?}, which template {:?} does not admit",
                sub_actor.class, template.name
            );
            self.refusals
                .denied_as(who, &actor.class, &actor.tenant, "delegate", &reason);
            return Err(LeaseError::PermissionDenied(reason));
        }
        let mut actors = vec![subagent.to_string()];
        if parent.actors.is_empty() {
            actors.push(parent.owner.clone());
        } else {
            actors.extend(parent.actors.iter().cloned());
        }
        let child_probe = TaskRecord {
            actors: actors.clone(),
            parent: Some(parent_id.clone()),
            ..parent.clone()
        };
        self.check_may_act(&templates, &child_probe, "delegate")?;
        // What the parent holds now: the template as it is, narrowed to the
        // parent's own delegated grants and withheld approvals.
        let principal = self.principal_of(&parent, caller)?;
        let mut parent_decision = policy::decide(
            &templates,
            &principal,
            &parent.template,
            &parent.parameters,
            None,
            now_ms,
        )
        .map_err(|e| {
            LeaseError::FailedPrecondition(format!(
                "template {:?} no longer accepts task {parent_id}: {}",
                parent.template,
                LeaseError::from(e)
            ))
        })?;
        narrow_grants(&mut parent_decision, &parent, now_ms);
        // An approval not yet used (approved, awaiting the parent's renewal)
        // may still expire unused: its grants are the parent's only once used.
        if let Some(a) = &parent.approval
            && a.state_at(now_ms) != crate::store::ApprovalState::Redeemed
        {
            parent_decision
                .grants
                .retain(|(g, _)| !a.grants.contains(&g.name));
        }
        let grants =
            narrowed(&parent_id, &held(&parent_decision), &req.grants).inspect_err(|e| {
                self.refusals.denied_as(
                    who,
                    &actor.class,
                    &actor.tenant,
                    "delegate",
                    &e.to_string(),
                );
            })?;
        if grants.is_empty() {
            return Err(LeaseError::FailedPrecondition(format!(
                "parent task {parent_id} holds no live grant to delegate"
            )));
        }
        let mut ttl_ms = self.child_ttl(&template, &parent, req.requested_ttl, now_ms)?;
        // The subagent's class caps its leases, as at its renewals.
        if let Some(max) = sub_actor.limits.max_ttl {
            ttl_ms = ttl_ms.min(crate::clock::duration_ms(max));
        }
        let max_deadline_ms = now_ms
            .saturating_add(crate::clock::duration_ms(template.lease.max_lifetime))
            .min(parent.max_deadline_ms);
        let lease_deadline_ms = now_ms
            .saturating_add(ttl_ms)
            .min(parent.lease_deadline_ms)
            .min(max_deadline_ms);
        // Policies see the child as its subagent would begin it.
        let mut child_decision = parent_decision.clone();
        let child_shape = TaskRecord {
            delegated: Some(grants.clone()),
            approval: None,
            ..parent.clone()
        };
        narrow_grants(&mut child_decision, &child_shape, now_ms);
        child_decision.lease_ttl_ms = ttl_ms;
        child_decision.lease_deadline_ms = lease_deadline_ms;
        child_decision.max_deadline_ms = max_deadline_ms;
        child_decision.delegation_depth = depth;
        child_decision.actors = actors.clone();
        let mut permitted = Vec::new();
        if let Some(policies) = &self.policies {
            let as_subagent = Identity {
                spiffe_id: subagent.clone(),
                ..caller.clone()
            };
            permitted = policy::authorize(
                &policies.current(),
                &as_subagent,
                &sub_actor.class,
                &sub_actor.tenant,
                &child_decision,
                self.clock.now_ms(),
            )
            .inspect_err(|e| {
                if let policy::PolicyError::Forbidden { policies, message } = e {
                    self.refusals.policy_denied(
                        who,
                        "delegate",
                        &actor.class,
                        &actor.tenant,
                        policies,
                        message,
                    );
                }
            })?;
        }
        let handle = credentials::Secret::new(format!(
            "{HANDLE_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(credentials::random_bytes::<32>()?)
        ));
        let id = TaskId::in_shard(parent_id.shard(), credentials::random_bytes::<16>()?);
        let grant_text: Vec<String> = grants
            .iter()
            .map(|(g, s)| format!("{g}={}", s.join(" ")))
            .collect();
        let mut parts = vec![
            "leash-delegation-v1",
            parent_id.as_str(),
            subagent.as_str(),
            req.intent.as_str(),
        ];
        parts.extend(grant_text.iter().map(String::as_str));
        let child = TaskRecord {
            id,
            owner: subagent.to_string(),
            template: parent.template.clone(),
            template_version: parent.template_version.clone(),
            parameters: parent.parameters.clone(),
            intent: req.intent.clone(),
            fingerprint: digest_hex(&parts),
            created_at_ms: now_ms,
            lease_ttl_ms: ttl_ms,
            lease_deadline_ms,
            max_deadline_ms,
            state: crate::store::TaskState::Active,
            ended_at_ms: None,
            outcome: None,
            binding: TaskBinding::Delegated,
            class: sub_actor.class.clone(),
            tenant: parent.tenant.clone(),
            parent: Some(parent_id.clone()),
            root: Some(parent.root.clone().unwrap_or_else(|| parent_id.clone())),
            depth,
            actors,
            delegated: Some(grants),
            approval: None,
            policies: permitted,
        };
        match self
            .store
            .delegate(&child, &handle_digest(handle.expose()))
            .await?
        {
            DelegateOutcome::Created(stored) => {
                let task = *stored;
                audit::task_delegated(&task, who);
                Ok(Delegated { task, handle })
            }
            DelegateOutcome::ParentNotFound => Err(LeaseError::TaskNotFound(parent_id.to_string())),
            DelegateOutcome::ParentNotActive(p) => Err(LeaseError::FailedPrecondition(
                super::service::ended_message(&p, now_ms),
            )),
            DelegateOutcome::TooMany { bound } => {
                let message = match bound {
                    "children" => format!(
                        "task {parent_id} already has {} live delegated children, the most allowed; complete one first",
                        crate::store::MAX_CHILDREN
                    ),
                    _ => format!(
                        "the delegation tree of task {parent_id} already holds {} live tasks, the most allowed",
                        crate::store::MAX_DESCENDANTS
                    ),
                };
                self.refusals
                    .denied_as(who, &actor.class, &actor.tenant, "delegate", &message);
                Err(LeaseError::QuotaExceeded {
                    message,
                    retry_after_ms: crate::store::CONCURRENCY_RETRY_MS,
                })
            }
            DelegateOutcome::Killed(switch) => Err(self.killed(who, &actor, "delegate", &switch)),
        }
    }

    /// The child's lease TTL: the one asked for (at most the template's
    /// `max_ttl`) or the parent's, never more than the parent's remaining lease.
    fn child_ttl(
        &self,
        template: &Template,
        parent: &TaskRecord,
        requested: Option<Duration>,
        now_ms: u64,
    ) -> Result<u64, LeaseError> {
        let remaining = parent.lease_deadline_ms.saturating_sub(now_ms);
        let wanted = match requested {
            Some(t) if t > template.lease.max_ttl => {
                return Err(LeaseError::invalid(
                    "requested_ttl",
                    format!(
                        "{} exceeds the template's max_ttl, {}",
                        humantime::format_duration(t),
                        humantime::format_duration(template.lease.max_ttl)
                    ),
                ));
            }
            Some(t) => crate::clock::duration_ms(t),
            None => parent.lease_ttl_ms,
        };
        Ok(wanted.min(remaining).max(1))
    }

    /// Refuses a delegated `task` unless every actor below its root matches
    /// the template's `delegation.may_act` (when it names any).
    ///
    /// # Errors
    /// `PermissionDenied` (audited) naming the actor; `FailedPrecondition` if
    /// the template is gone.
    pub(super) fn check_may_act(
        &self,
        templates: &TemplateSet,
        task: &TaskRecord,
        action: &str,
    ) -> Result<(), LeaseError> {
        let Some(template) = templates.get(&task.template) else {
            return Err(LeaseError::FailedPrecondition(format!(
                "template {:?} is no longer loaded",
                task.template
            )));
        };
        let patterns = &template.delegation.may_act;
        if patterns.is_empty() {
            return Ok(());
        }
        let acting = task.actors.split_last().map_or(&[][..], |(_, a)| a);
        for actor in acting {
            let ok = SpiffeId::parse(actor).is_ok_and(|id| patterns.iter().any(|p| p.matches(&id)));
            if !ok {
                let reason = format!(
                    "{actor} may not act in a delegation of template {:?}: delegation.may_act does not match it",
                    template.name
                );
                self.refusals.denied(actor, action, &reason);
                return Err(LeaseError::PermissionDenied(reason));
            }
        }
        Ok(())
    }

    /// The subagent named by a delegation spends its handle with its own SVID
    /// and receives the child task's credentials (their JWTs carry the `act`
    /// chain). The handle works once.
    ///
    /// # Errors
    /// `InvalidArgument`, `TaskNotFound`, `PermissionDenied` (another caller,
    /// wrong or spent handle, `may_act`), `FailedPrecondition` (task ended, or
    /// not a delegated task awaiting redemption), `Unavailable`, `Internal`.
    pub async fn redeem(
        &self,
        caller: &Identity,
        task_id: &str,
        handle: &str,
    ) -> Result<IssuedTask, LeaseError> {
        let task_id = Self::parse_task_id(task_id)?;
        if handle.is_empty() {
            return Err(LeaseError::invalid("delegation_handle", "required"));
        }
        if handle.len() > Limits::HANDLE || !handle.starts_with(HANDLE_PREFIX) {
            return Err(LeaseError::invalid(
                "delegation_handle",
                "not a delegation handle (lsd_ followed by 43 base64url characters)",
            ));
        }
        let actor = self.actor(caller, "redeem")?;
        let who = caller.spiffe_id.as_str();
        let task = self
            .store
            .task(&task_id)
            .await?
            .filter(|t| t.tenant == actor.tenant)
            .ok_or_else(|| LeaseError::TaskNotFound(task_id.to_string()))?;
        if task.owner != who {
            let reason = format!("task {task_id} was delegated to another identity");
            self.refusals
                .denied_as(who, &actor.class, &actor.tenant, "redeem", &reason);
            return Err(LeaseError::PermissionDenied(reason));
        }
        if task.binding != TaskBinding::Delegated {
            return Err(LeaseError::FailedPrecondition(format!(
                "task {task_id} is not a delegation awaiting redemption (already redeemed, or begun directly)"
            )));
        }
        let now_ms = self.now_ms();
        if !task.is_live(now_ms) {
            return Err(LeaseError::FailedPrecondition(
                super::service::ended_message(&task, now_ms),
            ));
        }
        let templates = self.templates.current();
        self.admit_class(&templates, &actor, caller, &task.template, "redeem")?;
        self.check_may_act(&templates, &task, "redeem")?;
        let principal = self.principal_of(&task, caller)?;
        let mut decision = policy::decide(
            &templates,
            &principal,
            &task.template,
            &task.parameters,
            None,
            now_ms,
        )
        .map_err(|e| {
            LeaseError::FailedPrecondition(format!(
                "template {:?} no longer accepts task {task_id}: {}",
                task.template,
                LeaseError::from(e)
            ))
        })?;
        narrow_grants(&mut decision, &task, now_ms);
        let minted: Vec<Minted> = self.mint_all(
            caller,
            (&task_id, &task.actors),
            &decision,
            now_ms,
            task.lease_deadline_ms,
        )?;
        let records = records_of(&minted, &task.tenant);
        let bound = TaskRecord {
            binding: binding::binding_of(caller),
            ..task.clone()
        };
        match self
            .store
            .redeem(&bound, &handle_digest(handle), now_ms, &records)
            .await?
        {
            RedeemOutcome::Redeemed(stored) => {
                let task = *stored;
                audit::delegation_redeemed(&task);
                super::service::audit_issued(&task, &records);
                Ok(IssuedTask {
                    task,
                    credentials: minted,
                    replayed: false,
                })
            }
            RedeemOutcome::BadHandle => {
                let reason = format!(
                    "the delegation handle of task {task_id} does not match, or was already used"
                );
                self.refusals
                    .denied_as(who, &actor.class, &actor.tenant, "redeem", &reason);
                Err(LeaseError::PermissionDenied(reason))
            }
            RedeemOutcome::NotActive(t) => Err(LeaseError::FailedPrecondition(
                super::service::ended_message(&t, now_ms),
            )),
            RedeemOutcome::NotFound => Err(LeaseError::TaskNotFound(task_id.to_string())),
        }
    }
}

fn check_subagent(subagent: &str) -> Result<SpiffeId, LeaseError> {
    if subagent.is_empty() {
        return Err(LeaseError::invalid("subagent", "required"));
    }
    if subagent.len() > Limits::SPIFFE_ID {
        return Err(LeaseError::invalid(
            "subagent",
            format!("longer than {} bytes", Limits::SPIFFE_ID),
        ));
    }
    SpiffeId::parse(subagent).map_err(|e| LeaseError::invalid("subagent", e.to_string()))
}

fn check_grants(grants: &[(String, Vec<String>)]) -> Result<(), LeaseError> {
    if grants.len() > Limits::DELEGATED_GRANTS {
        return Err(LeaseError::invalid(
            "grants",
            format!(
                "{} grants; at most {}",
                grants.len(),
                Limits::DELEGATED_GRANTS
            ),
        ));
    }
    for (i, (grant, scopes)) in grants.iter().enumerate() {
        if grant.is_empty() {
            return Err(LeaseError::invalid(
                &format!("grants[{i}].grant"),
                "required",
            ));
        }
        if grant.len() > Limits::TEMPLATE_NAME {
            return Err(LeaseError::invalid(
                &format!("grants[{i}].grant"),
                format!("longer than {} bytes", Limits::TEMPLATE_NAME),
            ));
        }
        if scopes.len() > Limits::DELEGATED_SCOPES {
            return Err(LeaseError::invalid(
                &format!("grants[{i}].scopes"),
                format!(
                    "{} scopes; at most {}",
                    scopes.len(),
                    Limits::DELEGATED_SCOPES
                ),
            ));
        }
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.len() > 256 || s.contains(char::is_whitespace))
        {
            return Err(LeaseError::invalid(
                &format!("grants[{i}].scopes"),
                format!("{bad:?} is not a scope"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds() -> Vec<(String, Vec<String>)> {
        vec![
            ("github".into(), vec!["repo:read".into(), "pr:write".into()]),
            ("db".into(), vec!["sales:read".into()]),
        ]
    }

    #[test]
    fn narrowing_keeps_subsets_and_names_every_extra_scope() {
        let parent = TaskId::from_bytes([1; 16]);
        let all = narrowed(&parent, &holds(), &[]).expect("all");
        assert_eq!(all.len(), 2);
        let one = narrowed(
            &parent,
            &holds(),
            &[("github".into(), vec!["repo:read".into()])],
        )
        .expect("subset");
        assert_eq!(one.get("github"), Some(&vec!["repo:read".to_owned()]));
        assert!(!one.contains_key("db"));
        let err = narrowed(
            &parent,
            &holds(),
            &[
                (
                    "github".into(),
                    vec!["repo:read".into(), "repo:admin".into()],
                ),
                ("vault".into(), vec![]),
            ],
        )
        .expect_err("superset");
        let text = err.to_string();
        assert!(matches!(err, LeaseError::PermissionDenied(_)), "{text}");
        assert!(
            text.contains("\"repo:admin\"") && text.contains("\"vault\""),
            "{text}"
        );
        let twice = narrowed(
            &parent,
            &holds(),
            &[("db".into(), vec![]), ("db".into(), vec![])],
        )
        .expect_err("twice");
        assert!(matches!(twice, LeaseError::InvalidArgument(_)));
    }
}
