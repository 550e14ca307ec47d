//! The durable audit trail's events, as the store keeps and returns them.
//!
//! The store writes an event in the same atomic step as the change it records
//! (see the Lua `audit` prelude and [`crate::store::MemoryStore`]), to one
//! stream per tenant and shard, and indexes it under its task and every
//! ancestor, so a task's story, descendants included, is one read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{SHARDS, TaskRecord};

/// The stream name of the events of no tenant (refusals before a caller's
/// tenant is known, kill switches not aimed at one tenant). Tenant names
/// cannot take it: they never start with `_`.
pub const NO_TENANT: &str = "_";

/// One audit event. Credentials appear by id only, never by value or digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unique per tenant: `<shard>-<stream entry id>` (empty before it is stored).
    pub id: String,
    /// What happened: `task.declared`, `policy.decided`, `task.begun`,
    /// `credential.issued`, `lease.renewed`, `task.replayed`,
    /// `credential.revoked`, `task.completed`, `lease.expired`,
    /// `task.revoked`, `task.delegated`, `delegation.redeemed`,
    /// `approval.requested`, `approval.approved`, `approval.denied`,
    /// `approval.expired`, `approval.redeemed`, `kill_switch.set`,
    /// `kill_switch.lifted`, `task.denied`, `authentication.refused`.
    pub event: String,
    /// When it happened (ms since the epoch, the deciding clock's).
    pub at_ms: u64,
    /// The task (empty for events about no task).
    pub task: String,
    /// The delegating task, for a delegated task.
    pub parent: String,
    /// The root of the delegation tree, for a delegated task.
    pub root: String,
    /// The task's owner (or the refused caller).
    pub identity: String,
    /// The delegation chain, current actor first (delegated tasks).
    pub actors: Vec<String>,
    /// The owner's actor class.
    pub class: String,
    /// The tenant.
    pub tenant: String,
    /// The template.
    pub template: String,
    /// The template's version at begin.
    pub version: String,
    /// The declared intent.
    pub intent: String,
    /// The W3C trace id of the request that caused it (empty for the reaper).
    pub trace: String,
    /// What else this kind of event says (`credential`, `reason`, `by`,
    /// `outcome`, `policies`, `deadline`, …): bounded, never a secret.
    pub detail: BTreeMap<String, String>,
}

/// The fields every event carries, in the order the store writes them.
const COMMON: [&str; 13] = [
    "event", "at", "task", "parent", "root", "identity", "actors", "class", "tenant", "template",
    "version", "intent", "trace",
];

impl AuditEvent {
    /// An event about `task`, with its identity, class, tenant, template,
    /// intent and lineage filled in.
    pub fn about(task: &TaskRecord, event: &str, at_ms: u64, trace: &str) -> Self {
        Self {
            event: event.to_owned(),
            at_ms,
            task: task.id.to_string(),
            parent: task
                .parent
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            root: task
                .root
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            identity: task.owner.clone(),
            actors: task.actors.clone(),
            class: task.class.clone(),
            tenant: task.tenant.clone(),
            template: task.template.clone(),
            version: task.template_version.clone(),
            intent: task.intent.clone(),
            trace: trace.to_owned(),
            ..Self::default()
        }
    }

    /// This event with one more detail.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.detail.insert(key.to_owned(), value.into());
        self
    }

    /// The stream it belongs to: its tenant, or [`NO_TENANT`].
    pub fn stream(&self) -> &str {
        if self.tenant.is_empty() {
            NO_TENANT
        } else {
            &self.tenant
        }
    }

    /// The field-value pairs the store writes, common fields first.
    pub fn to_fields(&self) -> Vec<(String, String)> {
        let common = [
            self.event.clone(),
            self.at_ms.to_string(),
            self.task.clone(),
            self.parent.clone(),
            self.root.clone(),
            self.identity.clone(),
            self.actors.join(","),
            self.class.clone(),
            self.tenant.clone(),
            self.template.clone(),
            self.version.clone(),
            self.intent.clone(),
            self.trace.clone(),
        ];
        let mut out: Vec<(String, String)> =
            COMMON.iter().map(|k| (*k).to_owned()).zip(common).collect();
        out.extend(self.detail.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }

    /// Rebuilds an event from the store's field-value pairs; unknown fields go
    /// to [`AuditEvent::detail`], so later kinds of detail are kept, not lost.
    pub fn from_fields(id: String, fields: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut e = Self {
            id,
            ..Self::default()
        };
        for (k, v) in fields {
            match k.as_str() {
                "event" => e.event = v,
                "at" => e.at_ms = v.parse().unwrap_or_default(),
                "task" => e.task = v,
                "parent" => e.parent = v,
                "root" => e.root = v,
                "identity" => e.identity = v,
                "actors" => {
                    e.actors = v
                        .split(',')
                        .filter(|a| !a.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                "class" => e.class = v,
                "tenant" => e.tenant = v,
                "template" => e.template = v,
                "version" => e.version = v,
                "intent" => e.intent = v,
                "trace" => e.trace = v,
                _ => {
                    e.detail.insert(k, v);
                }
            }
        }
        e
    }

    /// A detail, or "".
    pub fn detail(&self, key: &str) -> &str {
        self.detail.get(key).map_or("", String::as_str)
    }
}

/// One page of a task's story.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    /// The events, oldest first.
    pub events: Vec<AuditEvent>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<u64>,
}

/// A position in every shard's stream of one tenant: the last entry id read
/// per shard (`0-0` before the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCursor(pub Vec<String>);

impl Default for AuditCursor {
    fn default() -> Self {
        Self(vec!["0-0".to_owned(); usize::from(SHARDS)])
    }
}

/// How long and how much of the trail the store keeps, per tenant stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// Each stream (one per tenant and shard) keeps about this many events.
    pub max_len: u64,
    /// Events older than this leave the streams.
    pub max_age_ms: u64,
    /// Whether events are written to the durable trail at all (they are
    /// always logged). `false` only to measure the trail's cost: a change is
    /// then recorded nowhere durable.
    pub streams: bool,
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self {
            max_len: 100_000,
            max_age_ms: 30 * 24 * 3600 * 1000,
            streams: true,
        }
    }
}

/// Merges the events of several shards, each in its stream's order, into one
/// story by time: every shard's own order is kept (a stream's order is the
/// order its changes happened in, whatever clocks said).
pub fn merge(shards: Vec<Vec<AuditEvent>>) -> Vec<AuditEvent> {
    let total = shards.iter().map(Vec::len).sum();
    let mut heads: Vec<std::iter::Peekable<std::vec::IntoIter<AuditEvent>>> = shards
        .into_iter()
        .map(|s| s.into_iter().peekable())
        .collect();
    let mut out = Vec::with_capacity(total);
    loop {
        let next = heads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, h)| h.peek().map(|e| (e.at_ms, i)))
            .min();
        match next
            .and_then(|(_, i)| heads.get_mut(i))
            .and_then(Iterator::next)
        {
            Some(e) => out.push(e),
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_with_unknown_details_kept() {
        let mut e = AuditEvent {
            id: "3-17-0".into(),
            event: "credential.issued".into(),
            at_ms: 17,
            task: "t".into(),
            actors: vec!["spiffe://a/b".into(), "spiffe://a/c".into()],
            tenant: "acme".into(),
            ..AuditEvent::default()
        };
        e = e.with("credential", "t.c1");
        let back = AuditEvent::from_fields(e.id.clone(), e.to_fields());
        assert_eq!(back, e);
        let odd = AuditEvent::from_fields("x".into(), [("later".into(), "kept".into())]);
        assert_eq!(odd.detail("later"), "kept");
    }

    #[test]
    fn a_merge_keeps_each_shards_order() {
        let e = |id: &str, at_ms| AuditEvent {
            id: id.into(),
            at_ms,
            ..AuditEvent::default()
        };
        let merged = merge(vec![
            vec![e("a1", 5), e("a2", 3), e("a3", 9)],
            vec![e("b1", 4), e("b2", 6)],
        ]);
        let ids: Vec<_> = merged.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["b1", "a1", "a2", "b2", "a3"]);
    }

    #[test]
    fn events_of_no_tenant_go_to_their_own_stream() {
        assert_eq!(AuditEvent::default().stream(), NO_TENANT);
    }
}
