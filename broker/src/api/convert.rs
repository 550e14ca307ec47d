//! Protobuf ↔ domain conversions.

use std::time::Duration;

use leash_proto::v1 as pb;
use prost_types::Timestamp;

use crate::{
    clock::to_system_time,
    credentials::Minted,
    lease::{IssuedTask, LeaseError, ListedState},
    store::{
        Approval, ApprovalState, CredentialRecord, KillSwitch, StoredKind, TaskRecord, TaskState,
    },
};

/// Unix milliseconds to a protobuf timestamp.
pub(super) fn timestamp(ms: u64) -> Timestamp {
    Timestamp::from(to_system_time(ms))
}

/// A protobuf duration to a positive std duration, naming `field` on failure.
pub(super) fn duration(
    field: &str,
    d: Option<prost_types::Duration>,
) -> Result<Option<Duration>, LeaseError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err(LeaseError::invalid(field, "must be positive"));
    }
    Duration::try_from(d)
        .map(Some)
        .map_err(|_| LeaseError::invalid(field, "not a valid duration"))
}

pub(super) fn kind(k: StoredKind) -> pb::CredentialKind {
    match k {
        StoredKind::Jwt => pb::CredentialKind::Jwt,
        StoredKind::Opaque => pb::CredentialKind::Opaque,
    }
}

pub(super) fn credential(m: Minted) -> pb::Credential {
    let r = m.record;
    pb::Credential {
        id: r.id.to_string(),
        grant: r.grant,
        kind: kind(r.kind).into(),
        audience: r.audience,
        scopes: r.scopes,
        value: m.value.expose().to_owned(),
        expires_at: Some(timestamp(r.expires_at_ms)),
    }
}

pub(super) fn lease_state(s: TaskState) -> pb::LeaseState {
    match s {
        TaskState::Active => pb::LeaseState::Active,
        TaskState::Completed => pb::LeaseState::Completed,
        TaskState::Expired => pb::LeaseState::Expired,
        TaskState::Revoked => pb::LeaseState::Revoked,
    }
}

pub(super) fn outcome(raw: i32) -> Result<&'static str, LeaseError> {
    match pb::Outcome::try_from(raw) {
        Ok(pb::Outcome::Unspecified) => Ok("unspecified"),
        Ok(pb::Outcome::Succeeded) => Ok("succeeded"),
        Ok(pb::Outcome::Failed) => Ok("failed"),
        Ok(pb::Outcome::Cancelled) => Ok("cancelled"),
        Err(_) => Err(LeaseError::invalid(
            "outcome",
            format!("unknown outcome value {raw}"),
        )),
    }
}

/// The listed state of a task at `now_ms` (PENDING_APPROVAL for a live task
/// whose approval waits).
pub(super) fn listed_state(task: &TaskRecord, now_ms: u64) -> pb::LeaseState {
    match ListedState::of(task, now_ms) {
        ListedState::Active => pb::LeaseState::Active,
        ListedState::PendingApproval => pb::LeaseState::PendingApproval,
        ListedState::Completed => pb::LeaseState::Completed,
        ListedState::Expired => pb::LeaseState::Expired,
        ListedState::Revoked => pb::LeaseState::Revoked,
    }
}

/// A protobuf state filter to the domain's; UNSPECIFIED is no filter.
pub(super) fn state_filter(raw: i32) -> Result<Option<ListedState>, LeaseError> {
    Ok(match pb::LeaseState::try_from(raw) {
        Ok(pb::LeaseState::Unspecified) => None,
        Ok(pb::LeaseState::Active) => Some(ListedState::Active),
        Ok(pb::LeaseState::PendingApproval) => Some(ListedState::PendingApproval),
        Ok(pb::LeaseState::Completed) => Some(ListedState::Completed),
        Ok(pb::LeaseState::Expired) => Some(ListedState::Expired),
        Ok(pb::LeaseState::Revoked) => Some(ListedState::Revoked),
        Err(_) => {
            return Err(LeaseError::invalid(
                "state",
                format!("unknown state value {raw}"),
            ));
        }
    })
}

/// A task's approval as the proto says it, at `now_ms`.
pub(super) fn approval(a: &Approval, now_ms: u64) -> pb::Approval {
    let state = match a.state_at(now_ms) {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Approved => pb::ApprovalState::Approved,
        ApprovalState::Denied => pb::ApprovalState::Denied,
        ApprovalState::Expired => pb::ApprovalState::Expired,
        ApprovalState::Redeemed => pb::ApprovalState::Redeemed,
    };
    pb::Approval {
        state: state.into(),
        grants: a.grants.clone(),
        expires_at: Some(timestamp(a.status.deadline_ms)),
        decided_by: a.status.decided_by.clone().unwrap_or_default(),
        reason: a.status.reason.clone().unwrap_or_default(),
        decided_at: a.status.decided_at_ms.map(timestamp),
    }
}

/// What the broker knows of a task, at `now_ms`.
pub(super) fn task_info(t: &TaskRecord, now_ms: u64) -> pb::TaskInfo {
    pb::TaskInfo {
        task_id: t.id.to_string(),
        owner: t.owner.clone(),
        template: t.template.clone(),
        template_version: t.template_version.clone(),
        class: t.class.clone(),
        tenant: t.tenant.clone(),
        intent: t.intent.clone(),
        state: listed_state(t, now_ms).into(),
        created_at: Some(timestamp(t.created_at_ms)),
        lease_expires_at: Some(timestamp(t.lease_deadline_ms)),
        max_lifetime_at: Some(timestamp(t.max_deadline_ms)),
        ended_at: t.ended_at_ms.map(timestamp),
        outcome: t.outcome.clone().unwrap_or_default(),
        parent_task_id: t
            .parent
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        depth: t.depth,
        actors: t.actors.clone(),
        approval: t.approval.as_ref().map(|a| approval(a, now_ms)),
        parameters: t.parameters.clone().into_iter().collect(),
        time_left: Some(left(
            (t.state == TaskState::Active).then_some(t.lease_deadline_ms),
            now_ms,
        )),
        credentials: Vec::new(),
    }
}

/// The time from `now_ms` until `until` (zero if past or `None`).
fn left(until: Option<u64>, now_ms: u64) -> prost_types::Duration {
    let ms = until.map_or(0, |u| u.saturating_sub(now_ms));
    prost_types::Duration::try_from(Duration::from_millis(ms)).unwrap_or_default()
}

/// A held credential as an inventory lists it: never its value.
pub(super) fn credential_info(c: &CredentialRecord, now_ms: u64) -> pb::CredentialInfo {
    pb::CredentialInfo {
        id: c.id.to_string(),
        grant: c.grant.clone(),
        kind: kind(c.kind).into(),
        audience: c.audience.clone(),
        scopes: c.scopes.clone(),
        expires_at: Some(timestamp(c.expires_at_ms)),
        time_left: Some(left(Some(c.expires_at_ms), now_ms)),
        bound: c.cnf_x5t_s256.is_some(),
    }
}

/// The answer to BeginTask or RedeemDelegation.
pub(super) fn begin_response(issued: IssuedTask, now_ms: u64) -> pb::BeginTaskResponse {
    let t = &issued.task;
    pb::BeginTaskResponse {
        task_id: t.id.to_string(),
        lease_expires_at: Some(timestamp(t.lease_deadline_ms)),
        max_lifetime_at: Some(timestamp(t.max_deadline_ms)),
        state: listed_state(t, now_ms).into(),
        approval: t.approval.as_ref().map(|a| approval(a, now_ms)),
        actors: t.actors.clone(),
        replayed: issued.replayed,
        credentials: issued.credentials.into_iter().map(credential).collect(),
    }
}

/// A kill switch as the proto says it.
pub(super) fn kill_switch(k: &KillSwitch) -> pb::KillSwitch {
    pb::KillSwitch {
        kind: k.kind.clone(),
        value: k.value.clone(),
        reason: k.reason.clone(),
        set_by: k.set_by.clone(),
        set_at: Some(timestamp(k.set_at_ms)),
    }
}

/// An audit event as the proto carries it.
pub fn audit_event(e: &crate::audit::AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id.clone(),
        event: e.event.clone(),
        at: Some(timestamp(e.at_ms)),
        task_id: e.task.clone(),
        parent_task_id: e.parent.clone(),
        root_task_id: e.root.clone(),
        identity: e.identity.clone(),
        actors: e.actors.clone(),
        class: e.class.clone(),
        tenant: e.tenant.clone(),
        template: e.template.clone(),
        template_version: e.version.clone(),
        intent: e.intent.clone(),
        trace_id: e.trace.clone(),
        detail: e.detail.clone().into_iter().collect(),
    }
}
