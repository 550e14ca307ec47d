//! Audit: the trail that traces every credential from declaration to revocation.
//!
//! Each event is one structured `tracing` event with target `leash::audit` and
//! an `event` field (`task.begun`, `credential.issued`, `lease.renewed`,
//! `task.denied`, `task.completed`, `lease.expired`, `credential.revoked`,
//! `task.delegated`, `delegation.redeemed`, `task.cascaded`, `task.revoked`,
//! `approval.requested`, `approval.approved`, `approval.denied`,
//! `kill_switch.set`, `kill_switch.lifted`).
//! Events name credentials by id and never carry a credential value or digest;
//! filter on the target to ship them to a separate sink. Every event carries
//! the actor `class` and `tenant` (empty only in a denial of a caller no actor
//! class matches, and for tasks stored before classes existed).

mod event;

pub use event::{AuditCursor, AuditEvent, AuditPage, AuditRetention, NO_TENANT, merge};

use crate::store::{Approval, CredentialId, CredentialRecord, EndReason, KillSwitch, TaskRecord};

/// The W3C trace id (32 lowercase hex digits) of the request being served, or
/// "" outside one or with telemetry off: what every audit event carries as `trace`.
pub fn current_trace_id() -> String {
    crate::telemetry::current_trace_id().unwrap_or_default()
}

/// The `tracing` target of audit events.
pub const TARGET: &str = "leash::audit";

/// A task was declared and its lease begun.
pub fn task_begun(task: &TaskRecord, replayed: bool) {
    tracing::info!(
        target: TARGET,
        event = "task.begun",
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        template = %task.template,
        template_version = %task.template_version,
        intent = %task.intent,
        lease_deadline_ms = task.lease_deadline_ms,
        max_deadline_ms = task.max_deadline_ms,
        replayed,
    );
}

/// A credential was issued to a task's owner.
pub fn credential_issued(task: &TaskRecord, credential: &CredentialRecord) {
    tracing::info!(
        target: TARGET,
        event = "credential.issued",
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        credential_id = %credential.id,
        identity = %credential.subject,
        grant = %credential.grant,
        audience = %credential.audience,
        scopes = %credential.scopes.join(" "),
        expires_at_ms = credential.expires_at_ms,
        bound = credential.cnf_x5t_s256.is_some(),
    );
}

/// A lease was renewed.
pub fn lease_renewed(task: &TaskRecord) {
    tracing::info!(
        target: TARGET,
        event = "lease.renewed",
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        lease_deadline_ms = task.lease_deadline_ms,
    );
}

/// One `credential.revoked` event.
fn credential_revoked(task: &TaskRecord, id: &CredentialId, reason: EndReason) {
    tracing::info!(
        target: TARGET,
        event = "credential.revoked",
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        credential_id = %id,
        reason = reason.as_str(),
    );
}

/// Older credentials of a live task revoked because their grant went past the
/// per-grant cap of live credentials.
pub fn credentials_rotated(task: &TaskRecord, rotated: &[CredentialId]) {
    for id in rotated {
        credential_revoked(task, id, EndReason::Rotation);
    }
}

/// A request was refused by policy or ownership, before (or without) the
/// caller's actor class being known.
pub fn denied(identity: &str, action: &str, reason: &str) {
    denied_as(identity, "", "", action, reason);
}

/// A request of an identity of actor class `class` in `tenant` was refused.
pub fn denied_as(identity: &str, class: &str, tenant: &str, action: &str, reason: &str) {
    tracing::warn!(
        target: TARGET,
        event = "task.denied",
        identity,
        class,
        tenant,
        action,
        reason
    );
}

/// A Cedar policy denied `action` for `identity`: the deciding policy ids (empty
/// when no policy permits it) and the caller's message.
pub fn policy_denied(
    identity: &str,
    action: &str,
    class: &str,
    tenant: &str,
    policies: &[String],
    reason: &str,
) {
    tracing::warn!(
        target: TARGET,
        event = "task.denied",
        identity,
        action,
        class,
        tenant,
        policies = %policies.join(","),
        reason
    );
}

/// A task ended, by completion or expiry, revoking `revoked` credentials.
pub fn task_ended(task: &TaskRecord, reason: EndReason, revoked: &[CredentialId]) {
    let event = match reason {
        EndReason::Completion => "task.completed",
        EndReason::Expiry => "lease.expired",
        EndReason::Rotation => "credential.rotated",
        EndReason::Cascade => "task.cascaded",
        EndReason::KillSwitch => "task.revoked",
    };
    tracing::info!(
        target: TARGET,
        event,
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        state = task.state.as_str(),
        outcome = task.outcome.as_deref().unwrap_or(""),
        ended_at_ms = task.ended_at_ms.unwrap_or_default(),
        revoked = revoked.len(),
    );
    for id in revoked {
        credential_revoked(task, id, reason);
    }
}

/// A task was delegated: `task` is the child, not yet redeemed.
pub fn task_delegated(task: &TaskRecord, by: &str) {
    tracing::info!(
        target: TARGET,
        event = "task.delegated",
        task_id = %task.id,
        parent_task_id = %task.parent.as_ref().map(ToString::to_string).unwrap_or_default(),
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        delegated_by = by,
        depth = task.depth,
        actors = %task.actors.join(","),
        template = %task.template,
        intent = %task.intent,
        lease_deadline_ms = task.lease_deadline_ms,
        max_deadline_ms = task.max_deadline_ms,
    );
}

/// A subagent redeemed its delegation handle.
pub fn delegation_redeemed(task: &TaskRecord) {
    tracing::info!(
        target: TARGET,
        event = "delegation.redeemed",
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        depth = task.depth,
    );
}

/// A begun task waits for an approval of its gated grants.
pub fn approval_requested(task: &TaskRecord, approval: &Approval) {
    tracing::info!(
        target: TARGET,
        event = "approval.requested",
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        grants = %approval.grants.join(","),
        expires_at_ms = approval.status.deadline_ms,
    );
}

/// An approver approved or denied a task's approval.
pub fn approval_decided(task: &TaskRecord, approved: bool, by: &str, reason: &str) {
    tracing::info!(
        target: TARGET,
        event = if approved { "approval.approved" } else { "approval.denied" },
        task_id = %task.id,
        class = %task.class,
        tenant = %task.tenant,
        identity = %task.owner,
        approver = by,
        reason,
    );
}

/// An admin put a kill switch in force (or revoked one task: kind `task`).
pub fn kill_switch_set(switch: &KillSwitch, tasks: usize, credentials: usize) {
    tracing::warn!(
        target: TARGET,
        event = "kill_switch.set",
        kind = %switch.kind,
        value = %switch.value,
        admin = %switch.set_by,
        reason = %switch.reason,
        revoked_tasks = tasks,
        revoked_credentials = credentials,
    );
}

/// An admin lifted a kill switch.
pub fn kill_switch_lifted(kind: &str, value: &str, admin: &str, reason: &str, lifted: bool) {
    tracing::warn!(
        target: TARGET,
        event = "kill_switch.lifted",
        kind,
        value,
        admin,
        reason,
        lifted,
    );
}

/// An admin call: who, what, with which result.
pub fn admin_call(admin: &str, action: &str, detail: &str) {
    tracing::info!(target: TARGET, event = "admin.call", admin, action, detail);
}

/// Refusals on their way to the durable trail. A refusal changes nothing, so
/// it has no state change to share a step with: it is logged at once and
/// queued (bounded) for a writer task, so a flood of refusals can neither
/// stall the requests refused nor grow memory; what the queue cannot take is
/// counted in [`Refusals::dropped`] and still logged.
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    tx: Option<tokio::sync::mpsc::Sender<AuditEvent>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    clock: Option<std::sync::Arc<dyn crate::clock::Clock>>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// How many refusals may wait for the writer.
pub const REFUSAL_QUEUE: usize = 4096;

/// The longest refusal reason kept in the durable trail (longer ones are cut).
pub const MAX_REASON: usize = 1024;

impl Refusals {
    /// A queue of refusals timed by `clock`, and its receiving end for
    /// [`write_refusals`].
    pub fn new(
        clock: std::sync::Arc<dyn crate::clock::Clock>,
    ) -> (Self, tokio::sync::mpsc::Receiver<AuditEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(REFUSAL_QUEUE);
        (
            Self {
                tx: Some(tx),
                dropped: std::sync::Arc::default(),
                clock: Some(clock),
                metrics: None,
            },
            rx,
        )
    }

    /// Counts refused handshakes in `metrics` too (calls refused after the
    /// handshake are counted by the RPC layer).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Refusals that did not fit the queue (logged only).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn queue(&self, mut event: AuditEvent) {
        let Some(tx) = &self.tx else { return };
        event.at_ms = self.clock.as_ref().map_or(0, |c| c.now_ms());
        event.trace = current_trace_id();
        if tx.try_send(event).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A request was refused before (or without) the caller's class being known.
    pub fn denied(&self, identity: &str, action: &str, reason: &str) {
        self.denied_as(identity, "", "", action, reason);
    }

    /// A request of `identity` (class `class`, in `tenant`) was refused.
    pub fn denied_as(&self, identity: &str, class: &str, tenant: &str, action: &str, reason: &str) {
        denied_as(identity, class, tenant, action, reason);
        self.queue(refusal(identity, class, tenant, action, reason));
    }

    /// A Cedar policy denied `action`: the deciding policy ids and the message.
    pub fn policy_denied(
        &self,
        identity: &str,
        action: &str,
        class: &str,
        tenant: &str,
        policies: &[String],
        reason: &str,
    ) {
        policy_denied(identity, action, class, tenant, policies, reason);
        self.queue(
            refusal(identity, class, tenant, action, reason)
                .with("decision", "deny")
                .with("policies", policies.join(",")),
        );
    }

    /// A connection's authentication failed (bad, expired or foreign
    /// certificate; no certificate bytes are kept), from `trust_domain` when
    /// the certificate named one.
    pub fn authentication_refused(&self, trust_domain: &str, reason: &str) {
        tracing::warn!(target: TARGET, event = "authentication.refused", trust_domain, reason);
        if let Some(m) = &self.metrics {
            m.rpc_refused_at_handshake();
        }
        self.queue(
            AuditEvent {
                event: "authentication.refused".into(),
                ..AuditEvent::default()
            }
            .with("trust_domain", trust_domain)
            .with("reason", cut(reason)),
        );
    }
}

fn refusal(identity: &str, class: &str, tenant: &str, action: &str, reason: &str) -> AuditEvent {
    AuditEvent {
        event: "task.denied".into(),
        identity: identity.to_owned(),
        class: class.to_owned(),
        tenant: tenant.to_owned(),
        ..AuditEvent::default()
    }
    .with("action", action)
    .with("reason", cut(reason))
}

/// `s`, cut to at most [`MAX_REASON`] bytes at a character boundary.
fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_REASON);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Writes queued refusals to the store until every [`Refusals`] handle is
/// gone. A write that fails is logged and the refusal left out of the
/// durable trail (it is in the log).
pub async fn write_refusals<S: crate::store::LeaseStore>(
    store: std::sync::Arc<S>,
    mut rx: tokio::sync::mpsc::Receiver<AuditEvent>,
) {
    while let Some(event) = rx.recv().await {
        if let Err(e) = store.record_audit(&event).await {
            tracing::warn!(error = %e, event = %event.event, "a refusal could not be written to the audit trail");
        }
    }
}
