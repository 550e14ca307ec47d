//! Operators and approvers: inventory, approvals and kill switches.
//!
//! Guarantees: every call is audited; inventory and kill switches are for
//! `admin.callers` only; an approval is decided only by an approver the task's
//! template named, never by the requester or anyone in its delegation chain;
//! when a kill switch returns, every credential it ended is inactive and
//! published to revocation watchers, and begins it matches are refused until
//! it is lifted. A kill switch is many bounded store steps, never one step
//! over every key.

use super::{LeaseError, LeaseService, Limits, request::check_required_text};
use crate::{
    audit,
    identity::{Identity, IdentityPattern, SpiffeId},
    store::{
        ApprovalDecision, ApprovalOutcome, ApprovalState, EndedTask, KILL_PAGE, KillSwitch,
        KillTarget, LeaseStore, SHARDS, TaskId, TaskRecord, TaskState,
    },
    templates::Template,
};

/// The state a task is listed and watched in: its store state, or
/// [`ListedState::PendingApproval`] for a live task whose approval waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListedState {
    /// Live, nothing withheld (or its approval decided).
    Active,
    /// Live, with gated grants withheld pending an approval.
    PendingApproval,
    /// Completed by its owner.
    Completed,
    /// Its lease lapsed.
    Expired,
    /// Ended by a kill switch or with an ancestor.
    Revoked,
}

impl ListedState {
    /// The state of `task` at `now_ms`.
    pub fn of(task: &TaskRecord, now_ms: u64) -> Self {
        match task.state {
            TaskState::Active if task.lease_deadline_ms <= now_ms => Self::Expired,
            TaskState::Active
                if task
                    .approval
                    .as_ref()
                    .is_some_and(|a| a.state_at(now_ms) == ApprovalState::Pending) =>
            {
                Self::PendingApproval
            }
            TaskState::Active => Self::Active,
            TaskState::Completed => Self::Completed,
            TaskState::Expired => Self::Expired,
            TaskState::Revoked => Self::Revoked,
        }
    }
}

/// Which tasks ListTasks returns; every filter given must match.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Owner, exactly.
    pub identity: Option<String>,
    /// Actor class.
    pub class: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// Template.
    pub template: Option<String>,
    /// State.
    pub state: Option<ListedState>,
}

impl TaskFilter {
    fn admits(&self, t: &TaskRecord, now_ms: u64) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.identity, &t.owner)
            && eq(&self.class, &t.class)
            && eq(&self.tenant, &t.tenant)
            && eq(&self.template, &t.template)
            && self.state.is_none_or(|s| s == ListedState::of(t, now_ms))
    }
}

/// One page of ListTasks.
#[derive(Debug, Default)]
pub struct TaskListing {
    /// The tasks.
    pub tasks: Vec<TaskRecord>,
    /// For the next page; `None` after the last.
    pub next: Option<String>,
}

/// What a kill switch (or RevokeTask) did.
#[derive(Debug)]
pub struct KillReport {
    /// The kill switch now in force (`None` for RevokeTask).
    pub switch: Option<KillSwitch>,
    /// Tasks ended, descendants included.
    pub tasks: usize,
    /// Credentials revoked.
    pub credentials: usize,
}

/// Default and largest ListTasks page.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;
/// Most store pages one ListTasks call reads while filling its page.
const LIST_READS: usize = 32;

impl<S: LeaseStore> LeaseService<S> {
    /// Refuses `caller` unless `admin.callers` lists it.
    ///
    /// # Errors
    /// `PermissionDenied` (audited).
    pub fn authorize_admin(&self, caller: &Identity, action: &str) -> Result<(), LeaseError> {
        if self.admins.iter().any(|p| p.matches(&caller.spiffe_id)) {
            audit::admin_call(caller.spiffe_id.as_str(), action, "");
            return Ok(());
        }
        let reason = "matched by no admin.callers entry";
        self.refusals
            .denied(caller.spiffe_id.as_str(), action, reason);
        Err(LeaseError::PermissionDenied(format!(
            "{} may not call Admin.{action}: {reason}",
            caller.spiffe_id
        )))
    }

    /// Every loaded template, by name.
    ///
    /// # Errors
    /// `PermissionDenied` unless an admin.
    pub async fn list_templates(
        &self,
        caller: &Identity,
    ) -> Result<Vec<(std::sync::Arc<Template>, crate::store::LiveCount)>, LeaseError> {
        self.authorize_admin(caller, "ListTemplates")?;
        let live = self.store.live_counts(self.clock.now_ms()).await?;
        Ok(self
            .templates
            .current()
            .iter()
            .map(|t| {
                let count = live.templates.get(&t.name).copied().unwrap_or_default();
                (t.clone(), count)
            })
            .collect())
    }

    /// The credentials each of `tasks` holds now (none for an ended task), for
    /// an inventory an admin asked for: ids and expiries, never values. One
    /// store read per live task.
    ///
    /// # Errors
    /// `Unavailable`.
    pub(crate) async fn held_credentials(
        &self,
        tasks: &[TaskRecord],
    ) -> Result<Vec<Vec<crate::store::CredentialRecord>>, LeaseError> {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(if t.state == crate::store::TaskState::Active {
                self.store.task_credentials(&t.id).await?
            } else {
                Vec::new()
            });
        }
        Ok(out)
    }

    /// A page of the tasks the store holds that `filter` admits.
    ///
    /// # Errors
    /// `PermissionDenied` unless an admin; `InvalidArgument` for a page size
    /// over the maximum or a token not issued by this broker; `Unavailable`.
    pub async fn list_tasks(
        &self,
        caller: &Identity,
        filter: &TaskFilter,
        page_size: usize,
        token: Option<&str>,
    ) -> Result<TaskListing, LeaseError> {
        self.authorize_admin(caller, "ListTasks")?;
        if page_size > PAGE_MAX {
            return Err(LeaseError::invalid(
                "page_size",
                format!("{page_size}; at most {PAGE_MAX}"),
            ));
        }
        let want = if page_size == 0 {
            PAGE_DEFAULT
        } else {
            page_size
        };
        if token.is_some_and(|t| t.len() > 64) {
            return Err(LeaseError::invalid(
                "page_token",
                "not a token ListTasks issued",
            ));
        }
        let now_ms = self.now_ms();
        let mut out = TaskListing::default();
        let mut next = token.map(str::to_owned);
        for _ in 0..LIST_READS {
            let page = self
                .store
                .list_tasks(next.as_deref(), want)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::Corrupt(_) => {
                        LeaseError::invalid("page_token", "not a token ListTasks issued")
                    }
                    other => LeaseError::from(other),
                })?;
            out.tasks
                .extend(page.tasks.into_iter().filter(|t| filter.admits(t, now_ms)));
            next = page.next;
            if next.is_none() || out.tasks.len() >= want {
                break;
            }
        }
        out.next = next;
        Ok(out)
    }

    /// One task (its credentials: [`LeaseService::held_credentials`]).
    ///
    /// # Errors
    /// `PermissionDenied` unless an admin; `InvalidArgument`, `TaskNotFound`, `Unavailable`.
    pub async fn get_task(
        &self,
        caller: &Identity,
        task_id: &str,
    ) -> Result<TaskRecord, LeaseError> {
        self.authorize_admin(caller, "GetTask")?;
        let id = Self::parse_task_id(task_id)?;
        self.store
            .task(&id)
            .await?
            .ok_or_else(|| LeaseError::TaskNotFound(id.to_string()))
    }

    /// Records an approver's decision on `task_id`'s pending approval.
    ///
    /// # Errors
    /// `InvalidArgument` (task id, reason); `TaskNotFound` (also for a caller
    /// outside the task's tenant who is no approver of it); `PermissionDenied`
    /// (not an approver, or the requester or one of its delegators);
    /// `FailedPrecondition` (no approval, or not pending); `Unavailable`.
    pub async fn decide_approval(
        &self,
        caller: &Identity,
        task_id: &str,
        approve: bool,
        reason: &str,
    ) -> Result<TaskRecord, LeaseError> {
        let action = if approve { "Approve" } else { "Deny" };
        let id = Self::parse_task_id(task_id)?;
        check_required_text("reason", reason, Limits::REASON)?;
        let who = caller.spiffe_id.as_str();
        let task = self
            .store
            .task(&id)
            .await?
            .ok_or_else(|| LeaseError::TaskNotFound(id.to_string()))?;
        let class = self.actors.classify(&caller.spiffe_id).ok();
        let Some(approval) = &task.approval else {
            if class.is_none_or(|a| a.tenant != task.tenant) {
                return Err(LeaseError::TaskNotFound(id.to_string()));
            }
            return Err(LeaseError::FailedPrecondition(format!(
                "task {id} has no approval to decide: its template gates no grant"
            )));
        };
        let by_identity = approval
            .approvers
            .iter()
            .any(|p| IdentityPattern::parse(p).is_ok_and(|p| p.matches(&caller.spiffe_id)));
        let by_class = class.is_some_and(|a| {
            a.tenant == task.tenant && approval.approver_classes.contains(&a.class)
        });
        if !(by_identity || by_class) {
            let reason = format!("{who} is not an approver of task {id}");
            self.refusals.denied(who, action, &reason);
            if class.is_none_or(|a| a.tenant != task.tenant) {
                return Err(LeaseError::TaskNotFound(id.to_string()));
            }
            return Err(LeaseError::PermissionDenied(reason));
        }
        if task.owner == who || task.actors.iter().any(|a| a == who) {
            let reason = format!(
                "{who} requested task {id} (or delegated it): the requester can never approve its own request"
            );
            self.refusals.denied(who, action, &reason);
            return Err(LeaseError::PermissionDenied(reason));
        }
        let decision = ApprovalDecision {
            approve,
            by: who.to_owned(),
            reason: reason.to_owned(),
            validity_ms: approval.validity_ms,
        };
        let now_ms = self.now_ms();
        match self.store.decide_approval(&id, &decision, now_ms).await? {
            ApprovalOutcome::Decided(t) => {
                audit::approval_decided(&t, approve, who, reason);
                Ok(*t)
            }
            ApprovalOutcome::NotPending(t) => {
                let state = if t.is_live(now_ms) {
                    t.approval
                        .as_ref()
                        .map_or("absent", |a| a.state_at(now_ms).as_str())
                } else {
                    "moot: the task has ended"
                };
                Err(LeaseError::FailedPrecondition(format!(
                    "the approval of task {id} is not pending ({state})"
                )))
            }
            ApprovalOutcome::NotFound => Err(LeaseError::TaskNotFound(id.to_string())),
        }
    }

    /// The task `caller` owns, as WatchTask reports it.
    ///
    /// # Errors
    /// As the owner checks of RenewLease.
    pub async fn watched_task(
        &self,
        caller: &Identity,
        task_id: &str,
    ) -> Result<TaskRecord, LeaseError> {
        let id = Self::parse_task_id(task_id)?;
        self.owned_task_any_binding(caller, &id, "watch").await
    }

    /// The same task again, for the next WatchTask poll (no new checks).
    ///
    /// # Errors
    /// `TaskNotFound` once the store no longer holds it; `Unavailable`.
    pub async fn reread_task(&self, id: &TaskId) -> Result<TaskRecord, LeaseError> {
        self.store
            .task(id)
            .await?
            .ok_or_else(|| LeaseError::TaskNotFound(id.to_string()))
    }

    /// Now, as deadlines are judged.
    pub fn store_now_ms(&self) -> u64 {
        self.now_ms()
    }

    /// Ends what `target` aims at: one task with its descendants, or (a kill
    /// switch, recorded first so no new begin slips past) every live task it
    /// matches, shard by shard in pages of [`KILL_PAGE`].
    ///
    /// # Errors
    /// `PermissionDenied` unless an admin; `InvalidArgument` (target, reason);
    /// `TaskNotFound` (RevokeTask of an unknown task); `Unavailable` (the work
    /// done so far stays done; calling again finishes it).
    pub async fn kill(
        &self,
        caller: &Identity,
        target: KillTarget,
        reason: &str,
    ) -> Result<KillReport, LeaseError> {
        let action = match &target {
            KillTarget::Task(_) => "RevokeTask",
            KillTarget::Identity(_) | KillTarget::IdentityPrefix(_) => "RevokeIdentity",
            KillTarget::Template(_) => "RevokeTemplate",
            KillTarget::Class(_) => "RevokeClass",
            KillTarget::Tenant(_) => "RevokeTenant",
        };
        self.authorize_admin(caller, action)?;
        check_required_text("reason", reason, Limits::REASON)?;
        check_target(&target)?;
        let who = caller.spiffe_id.as_str();
        let now_ms = self.now_ms();
        let outcome = format!(
            "revoked by {who} ({} {}): {reason}",
            target.kind().replace('_', " "),
            target.value()
        );
        // What is recorded (and audited) for this call; stored as a kill
        // switch unless it aims at one task.
        let record = KillSwitch {
            kind: target.kind().to_owned(),
            value: target.value().to_owned(),
            reason: reason.to_owned(),
            set_by: who.to_owned(),
            set_at_ms: self.clock.now_ms(),
        };
        let mut ended: Vec<EndedTask> = Vec::new();
        let switch = match &target {
            KillTarget::Task(id) => {
                if self.store.task(id).await?.is_none() {
                    return Err(LeaseError::TaskNotFound(id.to_string()));
                }
                ended = self
                    .store
                    .revoke_tasks(
                        id.shard(),
                        std::slice::from_ref(id),
                        &target,
                        &outcome,
                        who,
                        now_ms,
                    )
                    .await?;
                None
            }
            _ => {
                self.store.set_kill_switch(&record).await?;
                for shard in 0..SHARDS {
                    let mut cursor = 0;
                    // Bounded: a pass over one shard's live tasks (each page
                    // moves the cursor; the store ends the pass).
                    loop {
                        let page = self.store.live_tasks(shard, cursor, KILL_PAGE).await?;
                        if !page.ids.is_empty() {
                            let done = self
                                .store
                                .revoke_tasks(shard, &page.ids, &target, &outcome, who, now_ms)
                                .await?;
                            ended.extend(done);
                        }
                        match page.next {
                            Some(next) => cursor = next,
                            None => break,
                        }
                    }
                }
                Some(record.clone())
            }
        };
        let credentials: usize = ended.iter().map(|e| e.revoked.len()).sum();
        for e in &ended {
            audit::task_ended(&e.task, e.reason, &e.revoked);
            self.metrics.task_ended(e.reason);
        }
        audit::kill_switch_set(&record, ended.len(), credentials);
        Ok(KillReport {
            switch,
            tasks: ended.len(),
            credentials,
        })
    }

    /// The kill switches in force.
    ///
    /// # Errors
    /// `PermissionDenied` unless an admin; `Unavailable`.
    pub async fn kill_switches(&self, caller: &Identity) -> Result<Vec<KillSwitch>, LeaseError> {
        self.authorize_admin(caller, "ListKillSwitches")?;
        Ok(self.store.kill_switches().await?)
    }

    /// Lifts a kill switch; true if one was in force.
    ///
    /// # Errors
    /// `PermissionDenied` unless an admin; `InvalidArgument` (kind, value,
    /// reason); `Unavailable`.
    pub async fn lift_kill_switch(
        &self,
        caller: &Identity,
        kind: &str,
        value: &str,
        reason: &str,
    ) -> Result<bool, LeaseError> {
        self.authorize_admin(caller, "LiftKillSwitch")?;
        check_required_text("reason", reason, Limits::REASON)?;
        if value.is_empty() {
            return Err(LeaseError::invalid("value", "required"));
        }
        match KillTarget::parse(kind, value) {
            Some(KillTarget::Task(_)) | None => {
                return Err(LeaseError::invalid(
                    "kind",
                    format!(
                        "{kind:?} is not a kill-switch kind; use identity, identity_prefix, template, class or tenant"
                    ),
                ));
            }
            Some(_) => {}
        }
        let who = caller.spiffe_id.as_str();
        let lifted = self
            .store
            .lift_kill_switch(kind, value, who, reason, self.clock.now_ms())
            .await?;
        audit::kill_switch_lifted(kind, value, caller.spiffe_id.as_str(), reason, lifted);
        Ok(lifted)
    }
}

/// Checks what a kill switch aims at is well formed.
fn check_target(target: &KillTarget) -> Result<(), LeaseError> {
    match target {
        KillTarget::Task(_) => Ok(()),
        KillTarget::Identity(id) => SpiffeId::parse(id)
            .map(|_| ())
            .map_err(|e| LeaseError::invalid("identity", e.to_string())),
        KillTarget::IdentityPrefix(p) => {
            let ok = p.len() <= Limits::SPIFFE_ID
                && p.strip_prefix("spiffe://").is_some_and(|rest| {
                    rest.split_once('/')
                        .is_some_and(|(td, _)| crate::identity::validate_trust_domain(td).is_ok())
                });
            if ok {
                Ok(())
            } else {
                Err(LeaseError::invalid(
                    "identity",
                    format!(
                        "{p:?} is not a SPIFFE ID prefix: give at least the trust domain and a slash, e.g. spiffe://example.org/"
                    ),
                ))
            }
        }
        KillTarget::Template(v) | KillTarget::Class(v) | KillTarget::Tenant(v) => {
            let field = match target {
                KillTarget::Template(_) => "template",
                KillTarget::Class(_) => "class",
                _ => "tenant",
            };
            if v.is_empty() {
                Err(LeaseError::invalid(field, "required"))
            } else if v.len() > Limits::TEMPLATE_NAME || v.contains(char::is_whitespace) {
                Err(LeaseError::invalid(field, format!("{v:?} is not a name")))
            } else {
                Ok(())
            }
        }
    }
}
