//! Audit: the trail that traces every credential from declaration to revocation.
//!
//! Each event is one structured `tracing` event with target `leash::audit` and
//! an `event` field (`task.begun`, `credential.issued`, `lease.renewed`,
//! `task.denied`, `task.completed`, `lease.expired`, `credential.revoked`).
//! Events name credentials by id and never carry a credential value or digest;
//! filter on the target to ship them to a separate sink. Every event carries
//! the actor `class` and `tenant` (empty only in a denial of a caller no actor
//! class matches, and for tasks stored before classes existed).

use crate::store::{CredentialId, CredentialRecord, EndReason, TaskRecord};

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
