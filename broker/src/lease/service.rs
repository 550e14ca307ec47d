//! The task lifecycle and introspection, over any [`LeaseStore`].

use std::sync::Arc;

use serde_json::Value;

use super::{
    BeginTask, LeaseError, Limits,
    binding::{self, BindingRule},
};
use crate::{
    audit,
    clock::Clock,
    credentials::{self, CredentialError, MintRequest, Minted, Minter, jwt, opaque},
    identity::Identity,
    policy::{self, Actor, ActorClasses, Decision, VerifierCallers, cedar::PolicyCatalog},
    revocation::Audiences,
    store::{
        Approval, ApprovalState, ApprovalStatus, BeginOutcome, BeginQuota, Bucket, CompleteOutcome,
        CredentialId, CredentialRecord, EndReason, EndedTask, KillSwitch, LeaseStore, QuotaKind,
        RenewOutcome, Renewal, StoredKind, TaskId, TaskRecord, TaskState,
    },
    templates::TemplateCatalog,
};

/// A task with the credentials just minted for it.
#[derive(Debug)]
pub struct IssuedTask {
    /// The task as stored after the call.
    pub task: TaskRecord,
    /// One fresh credential per grant, in template order.
    pub credentials: Vec<Minted>,
    /// True when this answers a retry with the same idempotency key.
    pub replayed: bool,
}

/// The result of completing a task.
#[derive(Debug)]
pub struct Completed {
    /// The task as stored after the call.
    pub task: TaskRecord,
    /// Credentials of the task this call revoked (empty on a repeated call).
    pub revoked: Vec<CredentialId>,
    /// Delegated descendants this call ended with the task, each with its
    /// revoked credentials.
    pub descendants: Vec<EndedTask>,
}

/// An introspection answer (RFC 7662): `record` only when active.
#[derive(Debug)]
pub struct Introspection {
    /// Active only for a known, unexpired, unrevoked credential.
    pub active: bool,
    /// The credential's record, when active.
    pub record: Option<CredentialRecord>,
}

impl Introspection {
    fn inactive() -> Self {
        Self {
            active: false,
            record: None,
        }
    }
}

/// Begins, renews and completes tasks, and answers introspection.
#[derive(Debug)]
pub struct LeaseService<S> {
    pub(super) store: Arc<S>,
    pub(super) templates: Arc<TemplateCatalog>,
    pub(super) minter: Minter,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) verifier_callers: VerifierCallers,
    pub(super) binding_rule: BindingRule,
    pub(super) actors: ActorClasses,
    pub(super) policies: Option<Arc<PolicyCatalog>>,
    pub(super) admins: Vec<crate::identity::IdentityPattern>,
    pub(super) refusals: audit::Refusals,
    pub(super) tenant_admins: Vec<(String, crate::identity::IdentityPattern)>,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
}

pub(super) fn digest(parts: &[&str]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        // Length-prefix each part so that ("ab","c") and ("a","bc") differ.
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p.as_bytes());
    }
    ctx.finish()
}

pub(super) fn digest_hex(parts: &[&str]) -> String {
    hex::encode(digest(parts).as_ref())
}

/// The store records of freshly minted credentials of a task of `tenant`.
pub(super) fn records_of(minted: &[Minted], tenant: &str) -> Vec<CredentialRecord> {
    minted
        .iter()
        .map(|m| CredentialRecord {
            tenant: tenant.to_owned(),
            ..m.record.clone()
        })
        .collect()
}

/// One `credential.issued` audit event per credential.
pub(super) fn audit_issued(task: &TaskRecord, records: &[CredentialRecord]) {
    for r in records {
        audit::credential_issued(task, r);
    }
}

/// Caps a decision's lease TTL at the class's `max_ttl` (a template default
/// above it; an explicit request above it was refused before).
fn cap_to_class(decision: &mut Decision, actor: &Actor, now_ms: u64) {
    if let Some(max) = actor.limits.max_ttl {
        let max_ms = crate::clock::duration_ms(max);
        if decision.lease_ttl_ms > max_ms {
            decision.lease_ttl_ms = max_ms;
            decision.lease_deadline_ms =
                now_ms.saturating_add(max_ms).min(decision.max_deadline_ms);
        }
    }
}

/// The store quota of an actor's limits.
fn quota_of(actor: &Actor) -> BeginQuota {
    let bucket = |r: Option<policy::Rate>| {
        r.map(|r| Bucket {
            burst: r.burst,
            refill_ms: r.refill_ms(),
        })
    };
    BeginQuota {
        identity_max_live: actor.limits.max_concurrent_tasks_per_identity,
        class_max_live: actor.limits.max_concurrent_tasks,
        identity_rate: bucket(actor.limits.begin_rate_per_identity),
        class_rate: bucket(actor.limits.begin_rate),
    }
}

/// What a refusal by `quota` says.
fn quota_message(quota: QuotaKind, actor: &Actor, owner: &str) -> String {
    let l = &actor.limits;
    let rate = |r: Option<policy::Rate>| {
        r.map(|r| format!("{}/{}", r.burst, humantime::format_duration(r.per)))
            .unwrap_or_default()
    };
    let class = &actor.class;
    match quota {
        QuotaKind::IdentityTasks => format!(
            "{owner} has {} live tasks, the most actor class {class:?} allows one identity (max_concurrent_tasks_per_identity); complete one first",
            l.max_concurrent_tasks_per_identity.unwrap_or_default()
        ),
        QuotaKind::ClassTasks => format!(
            "actor class {class:?} has {} live tasks, its max_concurrent_tasks; retry when one ends",
            l.max_concurrent_tasks.unwrap_or_default()
        ),
        QuotaKind::IdentityRate => format!(
            "{owner} begins tasks faster than actor class {class:?} allows one identity (begin_rate_per_identity {})",
            rate(l.begin_rate_per_identity)
        ),
        QuotaKind::ClassRate => format!(
            "actor class {class:?} begins tasks faster than its begin_rate {} allows",
            rate(l.begin_rate)
        ),
    }
}

/// Narrows `decision` (the template's grants now) to what `task` may be
/// issued at `now_ms`: a delegated task only its delegated grants and scopes,
/// an approval-gated task its gated grants only once approved (and, if the
/// template says so, nothing at all before). True when gated grants are
/// included, so the store must see the approval usable.
pub(super) fn narrow_grants(decision: &mut Decision, task: &TaskRecord, now_ms: u64) -> bool {
    if let Some(held) = &task.delegated {
        decision
            .grants
            .retain_mut(|(g, scopes)| match held.get(&g.name) {
                Some(allowed) => {
                    scopes.retain(|(s, _)| allowed.contains(s));
                    !scopes.is_empty()
                }
                None => false,
            });
    }
    let Some(approval) = &task.approval else {
        return false;
    };
    if approval.grants_issued(now_ms) {
        return decision
            .grants
            .iter()
            .any(|(g, _)| approval.grants.contains(&g.name));
    }
    if approval.issue_others {
        decision
            .grants
            .retain(|(g, _)| !approval.grants.contains(&g.name));
    } else {
        decision.grants.clear();
    }
    false
}

/// The answer to a renewal whose approval expired between read and write.
fn approval_lapsed(task: &TaskRecord) -> LeaseError {
    LeaseError::FailedPrecondition(format!(
        "the approval of task {} expired before it was used; renew again to go on without the gated grants",
        task.id
    ))
}

pub(super) fn ended_message(task: &TaskRecord, now_ms: u64) -> String {
    match task.state {
        TaskState::Active if task.lease_deadline_ms <= now_ms => {
            format!(
                "task {} has expired: its lease was not renewed in time",
                task.id
            )
        }
        TaskState::Active => match &task.parent {
            Some(parent) => format!(
                "task {} can no longer be renewed: task {parent}, which it was delegated from, has ended",
                task.id
            ),
            None => format!("task {} is not live", task.id),
        },
        state => format!("task {} has ended ({})", task.id, state.as_str()),
    }
}

impl<S: LeaseStore> LeaseService<S> {
    /// A service over `store`, deciding with `templates`, minting with `minter`.
    /// Introspection and revocation watches are answered only for identities
    /// that `verifier_callers` lists, and only about their audiences' credentials.
    pub fn new(
        store: Arc<S>,
        templates: Arc<TemplateCatalog>,
        minter: Minter,
        clock: Arc<dyn Clock>,
        verifier_callers: VerifierCallers,
    ) -> Self {
        Self {
            store,
            templates,
            minter,
            clock,
            verifier_callers,
            binding_rule: BindingRule::SpiffeId,
            actors: ActorClasses::default(),
            policies: None,
            admins: Vec::new(),
            refusals: audit::Refusals::default(),
            tenant_admins: Vec::new(),
            metrics: Arc::default(),
        }
    }

    /// Now, on the store's clock as best this replica knows it: what credentials
    /// are minted with (`iat`, `nbf`, `exp`), so a replica whose clock is off
    /// still issues credentials whose times agree with the lease deadlines.
    pub(super) fn now_ms(&self) -> u64 {
        self.store.now_ms(self.clock.now_ms())
    }

    /// The store (for readiness checks and the reaper).
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The minter (for the JWK Set).
    pub fn minter(&self) -> &Minter {
        &self.minter
    }

    pub(super) fn mint_all(
        &self,
        caller: &Identity,
        task: (&TaskId, &[String]),
        decision: &Decision,
        now_ms: u64,
        lease_deadline_ms: u64,
    ) -> Result<Vec<Minted>, CredentialError> {
        let (task_id, actors) = task;
        let cnf = caller.thumbprint_b64url();
        decision
            .grants
            .iter()
            .map(|(grant, scopes)| {
                self.minter.mint(&MintRequest {
                    task_id,
                    template: &decision.template.name,
                    grant,
                    scopes: scopes.iter().map(|(s, _)| s.clone()).collect(),
                    scope_classes: scopes.iter().map(|(_, c)| *c).collect(),
                    subject: caller.spiffe_id.as_str(),
                    actors,
                    cnf_x5t_s256: cnf.as_deref(),
                    now_ms,
                    lease_deadline_ms,
                })
            })
            .collect()
    }

    /// Declares a task for `caller` and issues its credentials.
    ///
    /// # Errors
    /// `InvalidArgument` (every field problem), `TemplateNotFound`,
    /// `PermissionDenied`, `FailedPrecondition` (idempotency key reused for a
    /// different request, or its task has ended; or the lease ends too soon to
    /// issue a credential inside it), `Unavailable`, `Internal`.
    pub async fn begin(&self, caller: &Identity, req: BeginTask) -> Result<IssuedTask, LeaseError> {
        req.check_shape().map_err(LeaseError::InvalidArgument)?;
        let actor = self.actor(caller, "begin")?;
        let now_ms = self.now_ms();
        let owner = caller.spiffe_id.as_str();
        let templates = self.templates.current();
        self.admit_class(&templates, &actor, caller, &req.template, "begin")?;
        if let (Some(t), Some(max)) = (req.requested_ttl, actor.limits.max_ttl)
            && t > max
        {
            return Err(LeaseError::invalid(
                "requested_ttl",
                format!(
                    "{} exceeds the max_ttl of actor class {:?}, {}",
                    humantime::format_duration(t),
                    actor.class,
                    humantime::format_duration(max)
                ),
            ));
        }
        let mut decision = policy::decide(
            &templates,
            &caller.spiffe_id,
            &req.template,
            &req.parameters,
            req.requested_ttl,
            now_ms,
        )
        .inspect_err(|e| {
            if matches!(e, policy::PolicyError::NotAllowed { .. }) {
                self.refusals.denied_as(
                    owner,
                    &actor.class,
                    &actor.tenant,
                    "begin",
                    &e.to_string(),
                );
            }
        })?;
        cap_to_class(&mut decision, &actor, now_ms);
        let mut permitted = Vec::new();
        if let Some(policies) = &self.policies {
            // `context.time` is this replica's own (injectable) clock: policy
            // windows are minutes wide, and the store's clock offset is for deadlines.
            let policy_now_ms = self.clock.now_ms();
            permitted = policy::authorize(
                &policies.current(),
                caller,
                &actor.class,
                &actor.tenant,
                &decision,
                policy_now_ms,
            )
            .inspect_err(|e| {
                if let policy::PolicyError::Forbidden { policies, message } = e {
                    self.refusals.policy_denied(
                        owner,
                        "begin",
                        &actor.class,
                        &actor.tenant,
                        policies,
                        message,
                    );
                }
            })?;
        }
        let params: Vec<String> = decision
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let ttl = decision.lease_ttl_ms.to_string();
        let mut parts = vec![
            decision.template.name.as_str(),
            decision.template.version.as_str(),
            req.intent.as_str(),
            ttl.as_str(),
        ];
        parts.extend(params.iter().map(String::as_str));
        let fingerprint = digest_hex(&parts);
        let task_id = match &req.idempotency_key {
            // The id is derived from (owner, key), so a retry lands on the same
            // task in the same hash slot, and one atomic create-if-absent decides.
            Some(key) => {
                let d = digest(&["leash-idempotency-v1", owner, key]);
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&d.as_ref()[..16]);
                TaskId::from_bytes(bytes)
            }
            None => TaskId::from_bytes(credentials::random_bytes::<16>()?),
        };
        let task = TaskRecord {
            id: task_id.clone(),
            owner: owner.to_owned(),
            template: decision.template.name.clone(),
            template_version: decision.template.version.clone(),
            parameters: decision.parameters.clone(),
            intent: req.intent.clone(),
            fingerprint: fingerprint.clone(),
            created_at_ms: now_ms,
            lease_ttl_ms: decision.lease_ttl_ms,
            lease_deadline_ms: decision.lease_deadline_ms,
            max_deadline_ms: decision.max_deadline_ms,
            state: TaskState::Active,
            ended_at_ms: None,
            outcome: None,
            binding: binding::binding_of(caller),
            class: actor.class.clone(),
            tenant: actor.tenant.clone(),
            parent: None,
            root: None,
            depth: 0,
            actors: Vec::new(),
            delegated: None,
            approval: decision.template.approval.as_ref().map(|gate| Approval {
                grants: gate.grants.clone(),
                approvers: gate.approvers.iter().map(ToString::to_string).collect(),
                approver_classes: gate.approver_classes.clone(),
                validity_ms: crate::clock::duration_ms(gate.validity),
                issue_others: gate.issue_others,
                status: ApprovalStatus {
                    state: ApprovalState::Pending,
                    deadline_ms: now_ms.saturating_add(crate::clock::duration_ms(gate.validity)),
                    ..ApprovalStatus::default()
                },
            }),
            policies: permitted,
        };
        // Policies decided the whole task; what is issued now may be less.
        let mut issued = decision.clone();
        narrow_grants(&mut issued, &task, now_ms);
        let minted = self.mint_all(
            caller,
            (&task_id, &task.actors),
            &issued,
            now_ms,
            task.lease_deadline_ms,
        )?;
        let records = records_of(&minted, &task.tenant);
        match self
            .store
            .begin_with_quota(&task, &records, quota_of(&actor))
            .await?
        {
            BeginOutcome::Exhausted {
                quota,
                retry_after_ms,
            } => {
                let message = quota_message(quota, &actor, owner);
                self.refusals
                    .denied_as(owner, &actor.class, &actor.tenant, "begin", &message);
                Err(LeaseError::QuotaExceeded {
                    message,
                    retry_after_ms,
                })
            }
            BeginOutcome::Killed(switch) => Err(self.killed(owner, &actor, "begin", &switch)),
            BeginOutcome::Created(stored) => {
                // The store's clock decided the deadlines; answer with those.
                let task = *stored;
                audit::task_begun(&task, false);
                self.metrics.task_begun(&task.template);
                if let Some(a) = &task.approval {
                    audit::approval_requested(&task, a);
                }
                audit_issued(&task, &records);
                Ok(IssuedTask {
                    task,
                    credentials: minted,
                    replayed: false,
                })
            }
            BeginOutcome::Existing(existing) => {
                self.replay(caller, *existing, &fingerprint, &decision, now_ms)
                    .await
            }
        }
    }

    /// Answers a retry: the same task, with fresh credentials (the first
    /// response's values were never stored, so they cannot be returned again).
    async fn replay(
        &self,
        caller: &Identity,
        existing: TaskRecord,
        fingerprint: &str,
        decision: &Decision,
        now_ms: u64,
    ) -> Result<IssuedTask, LeaseError> {
        if existing.owner != caller.spiffe_id.as_str() || existing.fingerprint != fingerprint {
            return Err(LeaseError::FailedPrecondition(
                "idempotency_key was already used for a different request; use a new key".into(),
            ));
        }
        self.check_binding(&existing, caller, "begin")?;
        if !existing.is_live(now_ms) {
            return Err(LeaseError::FailedPrecondition(format!(
                "{}; begin a new task with a new idempotency_key",
                ended_message(&existing, now_ms)
            )));
        }
        let mut issued = decision.clone();
        let redeems_approval = narrow_grants(&mut issued, &existing, now_ms);
        let minted = self.mint_all(
            caller,
            (&existing.id, &existing.actors),
            &issued,
            now_ms,
            existing.lease_deadline_ms,
        )?;
        let records = records_of(&minted, &existing.tenant);
        let replay = Renewal {
            now_ms,
            extend_by_ms: 0,
            min_interval_ms: None,
            credentials: &records,
            redeems_approval,
        };
        match self.store.renew(&existing.id, replay).await? {
            RenewOutcome::Renewed { task, rotated } => {
                audit::task_begun(&task, true);
                audit_issued(&task, &records);
                audit::credentials_rotated(&task, &rotated);
                Ok(IssuedTask {
                    task,
                    credentials: minted,
                    replayed: true,
                })
            }
            RenewOutcome::NotActive(task) => {
                Err(LeaseError::FailedPrecondition(ended_message(&task, now_ms)))
            }
            RenewOutcome::ApprovalLapsed(task) => Err(approval_lapsed(&task)),
            // A replay is never rate-limited; the store does not answer this for one.
            RenewOutcome::TooSoon { retry_after_ms } => Err(LeaseError::TooSoon { retry_after_ms }),
            RenewOutcome::NotFound => Err(LeaseError::TaskNotFound(existing.id.to_string())),
        }
    }

    pub(super) fn parse_task_id(task_id: &str) -> Result<TaskId, LeaseError> {
        if task_id.is_empty() {
            return Err(LeaseError::invalid("task_id", "required"));
        }
        TaskId::parse(task_id).ok_or_else(|| {
            LeaseError::invalid(
                "task_id",
                "not a task id (tk_ followed by 32 lower-case hex digits)",
            )
        })
    }

    pub(super) async fn owned_task(
        &self,
        caller: &Identity,
        task_id: &TaskId,
        action: &str,
    ) -> Result<TaskRecord, LeaseError> {
        let task = self.owned_task_any_binding(caller, task_id, action).await?;
        self.check_binding(&task, caller, action)?;
        Ok(task)
    }

    /// The task, if `caller` (of its tenant) owns it; the proof-of-key binding
    /// is not checked (watching a task changes nothing).
    pub(super) async fn owned_task_any_binding(
        &self,
        caller: &Identity,
        task_id: &TaskId,
        action: &str,
    ) -> Result<TaskRecord, LeaseError> {
        let task = self
            .store
            .task(task_id)
            .await?
            .ok_or_else(|| LeaseError::TaskNotFound(task_id.to_string()))?;
        let actor = self.actor(caller, action)?;
        if task.tenant != actor.tenant {
            // Answered like an unknown task: a tenant learns nothing of another's.
            self.refusals.denied_as(
                caller.spiffe_id.as_str(),
                &actor.class,
                &actor.tenant,
                action,
                &format!("task {task_id} belongs to another tenant"),
            );
            return Err(LeaseError::TaskNotFound(task_id.to_string()));
        }
        if task.owner != caller.spiffe_id.as_str() {
            let reason = format!("task {task_id} belongs to another identity");
            self.refusals.denied_as(
                caller.spiffe_id.as_str(),
                &actor.class,
                &actor.tenant,
                action,
                &reason,
            );
            return Err(LeaseError::PermissionDenied(reason));
        }
        Ok(task)
    }

    /// Extends the lease of `caller`'s task and issues fresh credentials. The
    /// template is consulted as it is now: a narrowed template narrows renewals,
    /// and an identity removed from it can no longer renew.
    ///
    /// # Errors
    /// `InvalidArgument` (task id), `TaskNotFound`, `PermissionDenied` (not the
    /// owner, or no longer allowed by the template), `FailedPrecondition` (task
    /// ended, lease expired, max lifetime reached or too close to issue a
    /// credential inside it, template gone or changed so the task's parameters
    /// no longer fit), `Unavailable`, `Internal`.
    pub async fn renew(&self, caller: &Identity, task_id: &str) -> Result<IssuedTask, LeaseError> {
        let task_id = Self::parse_task_id(task_id)?;
        let task = self.owned_task(caller, &task_id, "renew").await?;
        let now_ms = self.now_ms();
        // Only the state is judged here; whether the deadline has passed is the
        // store's decision, on the store's clock (this replica's may be off).
        if task.state != TaskState::Active {
            return Err(LeaseError::FailedPrecondition(ended_message(&task, now_ms)));
        }
        let actor = self.actor(caller, "renew")?;
        // A class whose TTL ceiling was lowered since the begin caps renewals too.
        let lease_ttl_ms = actor.limits.max_ttl.map_or(task.lease_ttl_ms, |max| {
            task.lease_ttl_ms.min(crate::clock::duration_ms(max))
        });
        let deadline = policy::renewed_deadline(
            now_ms,
            lease_ttl_ms,
            task.lease_deadline_ms,
            task.max_deadline_ms,
        )
        .ok_or_else(|| {
            LeaseError::FailedPrecondition(format!(
                "task {task_id} has reached its max lifetime; complete it and begin a new task"
            ))
        })?;
        let (decision, redeems_approval) =
            self.current_decision(caller, &actor, &task, now_ms, "renew")?;
        // An approval just granted is used at once, whatever the renewal
        // interval: the agent is waiting for it.
        let first_use = task
            .approval
            .as_ref()
            .is_some_and(|a| a.status.state == ApprovalState::Approved);
        let minted = self
            .mint_all(caller, (&task_id, &task.actors), &decision, now_ms, deadline)
            .map_err(|e| match e {
                // The renewal was capped at the max lifetime and what is left of it
                // holds no whole-second JWT: the task is at its end, say so.
                CredentialError::LeaseEndsTooSoon { .. } if deadline >= task.max_deadline_ms => {
                    LeaseError::FailedPrecondition(format!(
                        "task {task_id} has reached its max lifetime; complete it and begin a new task"
                    ))
                }
                other => LeaseError::from(other),
            })?;
        let records = records_of(&minted, &task.tenant);
        let renewal = Renewal {
            now_ms,
            extend_by_ms: lease_ttl_ms,
            min_interval_ms: (!(first_use && redeems_approval))
                .then(|| crate::clock::duration_ms(decision.template.lease.min_renew_interval)),
            credentials: &records,
            redeems_approval,
        };
        match self.store.renew(&task_id, renewal).await? {
            RenewOutcome::Renewed { task, rotated } => {
                audit::lease_renewed(&task);
                self.metrics.lease_renewed(&task.template);
                audit_issued(&task, &records);
                audit::credentials_rotated(&task, &rotated);
                Ok(IssuedTask {
                    task,
                    credentials: minted,
                    replayed: false,
                })
            }
            RenewOutcome::NotActive(task) => {
                Err(LeaseError::FailedPrecondition(ended_message(&task, now_ms)))
            }
            RenewOutcome::ApprovalLapsed(task) => Err(approval_lapsed(&task)),
            RenewOutcome::TooSoon { retry_after_ms } => {
                self.refusals.denied(
                    caller.spiffe_id.as_str(),
                    "renew",
                    &format!(
                        "renewed again within the template's min_renew_interval; retry after {retry_after_ms} ms"
                    ),
                );
                Err(LeaseError::TooSoon { retry_after_ms })
            }
            RenewOutcome::NotFound => Err(LeaseError::TaskNotFound(task_id.to_string())),
        }
    }

    /// What `caller` may be issued for `task` now: the template as it is now
    /// decides (a narrowed template narrows, an identity removed from it is
    /// refused), narrowed to the task's delegation and approval. True with
    /// gated grants included (see [`narrow_grants`]).
    ///
    /// # Errors
    /// `PermissionDenied`, `FailedPrecondition` (template gone or changed so
    /// the task's parameters no longer fit), `Internal`.
    pub(super) fn current_decision(
        &self,
        caller: &Identity,
        actor: &Actor,
        task: &TaskRecord,
        now_ms: u64,
        action: &str,
    ) -> Result<(Decision, bool), LeaseError> {
        let templates = self.templates.current();
        self.admit_class(&templates, actor, caller, &task.template, action)
            .map_err(|e| match e {
                LeaseError::TemplateNotFound(t) => LeaseError::FailedPrecondition(format!(
                    "template {t:?} no longer accepts this task: it is gone or belongs to another tenant"
                )),
                other => other,
            })?;
        let principal = self.principal_of(task, caller)?;
        if task.parent.is_some() {
            self.check_may_act(&templates, task, action)?;
        }
        let mut decision = policy::decide(
            &templates,
            &principal,
            &task.template,
            &task.parameters,
            None,
            now_ms,
        )
        .map_err(|e| match e {
            policy::PolicyError::NotAllowed { .. } => {
                self.refusals
                    .denied(caller.spiffe_id.as_str(), action, &e.to_string());
                LeaseError::PermissionDenied(e.to_string())
            }
            other => LeaseError::FailedPrecondition(format!(
                "template {:?} no longer accepts this task: {}",
                task.template,
                LeaseError::from(other)
            )),
        })?;
        let redeems_approval = narrow_grants(&mut decision, task, now_ms);
        Ok((decision, redeems_approval))
    }

    /// Completes `caller`'s task; every credential of the task is inactive when
    /// this returns. Completing an ended task again succeeds and revokes nothing.
    ///
    /// # Errors
    /// `InvalidArgument` (task id, summary), `TaskNotFound`, `PermissionDenied`,
    /// `Unavailable`, `Internal`.
    pub async fn complete(
        &self,
        caller: &Identity,
        task_id: &str,
        outcome: &str,
        summary: &str,
    ) -> Result<Completed, LeaseError> {
        let task_id = Self::parse_task_id(task_id)?;
        super::request::check_summary(summary)?;
        self.owned_task(caller, &task_id, "complete").await?;
        let now_ms = self.now_ms();
        match self
            .store
            .complete_with_summary(&task_id, now_ms, outcome, summary)
            .await?
        {
            CompleteOutcome::Ended {
                task,
                revoked,
                descendants,
            } => {
                let reason = if task.state == TaskState::Expired {
                    EndReason::Expiry
                } else {
                    EndReason::Completion
                };
                audit::task_ended(&task, reason, &revoked);
                self.metrics.task_ended(reason);
                if reason == EndReason::Completion {
                    self.metrics.task_completed(&task.template, outcome);
                }
                for d in &descendants {
                    audit::task_ended(&d.task, d.reason, &d.revoked);
                    self.metrics.task_ended(d.reason);
                }
                if !summary.is_empty() {
                    tracing::info!(target: audit::TARGET, event = "task.summary", task_id = %task.id, summary);
                }
                Ok(Completed {
                    task,
                    revoked,
                    descendants,
                })
            }
            CompleteOutcome::AlreadyEnded(task) => Ok(Completed {
                task,
                revoked: Vec::new(),
                descendants: Vec::new(),
            }),
            CompleteOutcome::NotFound => Err(LeaseError::TaskNotFound(task_id.to_string())),
        }
    }

    /// Reports whether `token` is an active credential (RFC 7662). A token that
    /// is malformed, forged, unknown, expired or revoked is simply inactive, and
    /// so is one issued for an audience `caller` does not serve: the answer is
    /// the same as for a token never issued, so nothing about it leaks.
    ///
    /// # Errors
    /// `PermissionDenied` if `caller` may not introspect; `InvalidArgument` for an
    /// empty or oversized token; `Unavailable` if the credential's state cannot
    /// be read (never "active" then).
    pub async fn introspect(
        &self,
        caller: &Identity,
        token: &str,
    ) -> Result<Introspection, LeaseError> {
        let (audiences, verifier) = self.verifier_scope(caller, "introspect")?;
        let tenant = &verifier.tenant;
        if token.is_empty() {
            return Err(LeaseError::invalid("token", "required"));
        }
        if token.len() > Limits::TOKEN {
            return Err(LeaseError::invalid(
                "token",
                format!("longer than {} bytes", Limits::TOKEN),
            ));
        }
        let now_ms = self.now_ms();
        let Some((id, kind, nbf_ms)) = self.parse_token(token) else {
            return Ok(Introspection::inactive());
        };
        let Some(view) = self.store.credential(&id.task_id(), &id, now_ms).await? else {
            return Ok(Introspection::inactive());
        };
        // Liveness is judged on the store's clock, like every deadline decision.
        let now_ms = view.now_ms;
        let c = &view.credential;
        let genuine = c.kind == kind
            && credentials::digests_match(&credentials::value_digest(token), &c.value_sha256);
        let refused = if !genuine {
            None
        } else if view.task.tenant != *tenant || c.tenant != *tenant {
            Some(format!(
                "credential {} belongs to another tenant than this verifier's ({tenant:?})",
                c.id
            ))
        } else if !audiences.admits(&c.audience) {
            Some(format!(
                "credential {} is for audience {:?}, which this verifier does not serve",
                c.id, c.audience
            ))
        } else {
            None
        };
        if let Some(reason) = refused {
            // Answered like an unknown token; only the audit trail hears of it.
            self.refusals.denied_as(
                caller.spiffe_id.as_str(),
                &verifier.class,
                tenant,
                "introspect",
                &reason,
            );
            return Ok(Introspection::inactive());
        }
        let active =
            genuine && view.task.is_live(now_ms) && now_ms < c.expires_at_ms && nbf_ms <= now_ms;
        Ok(if active {
            Introspection {
                active,
                record: Some(view.credential),
            }
        } else {
            Introspection::inactive()
        })
    }

    /// The credential id a presented token names, how it is presented, and
    /// its `nbf` (ms; 0 for opaque tokens): `None` for a token that is
    /// malformed, or a JWT whose signature no key of this broker verifies.
    /// Whether the token is the credential's genuine value is the caller's
    /// check ([`credentials::value_digest`] against the record).
    pub(super) fn parse_token(&self, token: &str) -> Option<(CredentialId, StoredKind, u64)> {
        if token.starts_with(opaque::PREFIX) {
            return opaque::credential_id(token).map(|id| (id, StoredKind::Opaque, 0));
        }
        let claims = jwt::verify(token, self.minter.keys()).ok()?;
        let id = claims
            .get("jti")
            .and_then(Value::as_str)
            .and_then(CredentialId::parse)?;
        let nbf = claims.get("nbf").and_then(Value::as_u64).unwrap_or(0);
        Some((id, StoredKind::Jwt, nbf.saturating_mul(1000)))
    }

    /// Checks that `caller` may use the Verifier's credential-state calls
    /// (introspection, revocation watch) and returns the audiences it serves:
    /// those of the first `verifier.callers` entry matching it. It must learn
    /// nothing of credentials of any other audience.
    ///
    /// # Errors
    /// `PermissionDenied` (audited) when no `verifier.callers` entry matches `caller`.
    pub fn authorize_verifier(
        &self,
        caller: &Identity,
        action: &str,
    ) -> Result<Audiences, LeaseError> {
        if let Some(audiences) = self.verifier_callers.audiences_of(&caller.spiffe_id) {
            return Ok(audiences.clone());
        }
        self.refusals.denied(
            caller.spiffe_id.as_str(),
            action,
            "matched by no verifier.callers entry",
        );
        Err(LeaseError::PermissionDenied(format!(
            "{} may not {action}: no verifier.callers entry matches it",
            caller.spiffe_id
        )))
    }

    /// The audiences and the actor (its tenant) whose credentials `caller` may learn of as
    /// a verifier: [`LeaseService::authorize_verifier`], and the caller's actor
    /// class must place it in a tenant.
    ///
    /// # Errors
    /// `PermissionDenied` (audited) when no `verifier.callers` entry or no
    /// actor class matches `caller`.
    pub fn verifier_scope(
        &self,
        caller: &Identity,
        action: &str,
    ) -> Result<(Audiences, Actor), LeaseError> {
        let audiences = self.authorize_verifier(caller, action)?;
        let actor = self.actor(caller, action)?;
        Ok((audiences, actor))
    }

    /// Sets the actor classes callers are classified by (default: none, so
    /// every call that reads or changes a task or credential is denied).
    #[must_use]
    pub fn with_actors(mut self, actors: ActorClasses) -> Self {
        self.actors = actors;
        self
    }

    /// The class of `caller`.
    ///
    /// # Errors
    /// `PermissionDenied` (audited) when no actor class matches it.
    #[tracing::instrument(skip_all, name = "identity.actor_class")]
    pub(super) fn actor(&self, caller: &Identity, action: &str) -> Result<Actor, LeaseError> {
        self.actors
            .classify(&caller.spiffe_id)
            .cloned()
            .map_err(|e| {
                self.refusals
                    .denied(caller.spiffe_id.as_str(), action, &e.to_string());
                LeaseError::PermissionDenied(e.to_string())
            })
    }

    /// Refuses a template of another tenant as if it did not exist, and one
    /// of the caller's tenant that does not list its class; both audited.
    pub(super) fn admit_class(
        &self,
        templates: &crate::templates::TemplateSet,
        actor: &Actor,
        caller: &Identity,
        template: &str,
        action: &str,
    ) -> Result<(), LeaseError> {
        let Some(t) = templates.get(template) else {
            return Ok(()); // decide() answers an unknown template
        };
        if t.admits_class(&actor.class, &actor.tenant) {
            return Ok(());
        }
        let who = caller.spiffe_id.as_str();
        if t.tenant != actor.tenant {
            self.refusals.denied_as(
                who,
                &actor.class,
                &actor.tenant,
                action,
                &format!("template {template:?} belongs to another tenant"),
            );
            return Err(LeaseError::TemplateNotFound(template.to_owned()));
        }
        let reason = format!(
            "actor class {:?} may not use template {template:?} (its classes: {})",
            actor.class,
            t.classes.join(", ")
        );
        self.refusals
            .denied_as(who, &actor.class, &actor.tenant, action, &reason);
        Err(LeaseError::PermissionDenied(format!("{who}: {reason}")))
    }

    /// A begin or delegation refused by `switch`: audited, PERMISSION_DENIED.
    pub(super) fn killed(
        &self,
        who: &str,
        actor: &Actor,
        action: &str,
        switch: &KillSwitch,
    ) -> LeaseError {
        let reason = format!(
            "refused by the kill switch on {} {:?} (set by {}: {}); an admin must lift it first",
            switch.kind.replace('_', " "),
            switch.value,
            switch.set_by,
            switch.reason
        );
        self.refusals
            .denied_as(who, &actor.class, &actor.tenant, action, &reason);
        LeaseError::PermissionDenied(reason)
    }

    /// The identity the template rules judge a task by: its owner for a task
    /// begun directly, the root task's owner for a delegated one (a subagent
    /// is judged by `delegation.may_act` instead).
    pub(super) fn principal_of(
        &self,
        task: &TaskRecord,
        caller: &Identity,
    ) -> Result<crate::identity::SpiffeId, LeaseError> {
        match task.actors.last() {
            Some(root) if task.parent.is_some() => crate::identity::SpiffeId::parse(root)
                .map_err(|e| LeaseError::Internal(format!("task {}: root owner: {e}", task.id))),
            _ => Ok(caller.spiffe_id.clone()),
        }
    }

    /// Sets who may call the Admin service (`admin.callers`).
    #[must_use]
    pub fn with_admins(mut self, admins: Vec<crate::identity::IdentityPattern>) -> Self {
        self.admins = admins;
        self
    }

    /// Lets each `(tenant, pattern)` read that tenant's audit trail and
    /// inventory (and nothing else of the Admin service).
    pub fn with_tenant_admins(
        mut self,
        tenant_admins: Vec<(String, crate::identity::IdentityPattern)>,
    ) -> Self {
        self.tenant_admins = tenant_admins;
        self
    }

    /// Counts begins, renewals and ends in `metrics` (without it, in metrics
    /// of its own that nothing serves).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// This service's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Sends every refusal to `refusals` for the durable audit trail too
    /// (without it, refusals are only logged).
    pub fn with_refusals(mut self, refusals: audit::Refusals) -> Self {
        self.refusals = refusals;
        self
    }

    /// Where this service's refusals go.
    pub fn refusals(&self) -> &audit::Refusals {
        &self.refusals
    }

    /// The JWK Set of the signing keys.
    pub fn jwks(&self) -> Value {
        self.minter.keys().jwks()
    }

    /// Decides every BeginTask with these Cedar policies too, after the template
    /// rules (`None`, the default: template rules only).
    #[must_use]
    pub fn with_policies(mut self, policies: Option<Arc<PolicyCatalog>>) -> Self {
        self.policies = policies;
        self
    }

    /// Sets how a task begun over mTLS is tied to the key that began it
    /// (default [`BindingRule::SpiffeId`]); see [`BindingRule`].
    #[must_use]
    pub fn with_binding_rule(mut self, rule: BindingRule) -> Self {
        self.binding_rule = rule;
        self
    }

    /// Refuses `caller` unless it proves itself as `task`'s owner did at begin
    /// (the rule is in `lease/binding.rs`); a refusal is audited.
    pub(super) fn check_binding(
        &self,
        task: &TaskRecord,
        caller: &Identity,
        action: &str,
    ) -> Result<(), LeaseError> {
        binding::check(&task.binding, caller, self.binding_rule, task.id.as_str()).map_err(
            |reason| {
                self.refusals
                    .denied(caller.spiffe_id.as_str(), action, &reason);
                LeaseError::PermissionDenied(reason)
            },
        )
    }
}
