//! Protobuf ↔ domain conversions.

use std::time::Duration;

use leash_proto::v1 as pb;
use prost_types::Timestamp;

use crate::{
    clock::to_system_time,
    credentials::Minted,
    lease::LeaseError,
    store::{StoredKind, TaskState},
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
