//! Reading the audit trail: a task's story (`AuditTrace`) and a tenant's
//! stream as it grows (`AuditTail`).
//!
//! Guarantees: full admins (`admin.callers`) read every tenant; a tenant
//! admin (`admin.tenants`) reads only its tenant's events, and a story of
//! another tenant's task is answered as not found, never shown in part; every
//! read is bounded (one index page per call; a tail reads at most
//! [`TAIL_PAGE`] events per shard per poll).

use super::{LeaseError, LeaseService};
use crate::{
    audit::{self, AuditCursor, AuditEvent, NO_TENANT},
    identity::Identity,
    store::{CredentialId, LeaseStore, TaskId},
};

/// Default and largest AuditTrace page.
const TRACE_DEFAULT: usize = 500;
const TRACE_MAX: usize = 1000;
/// Most events a tail reads per shard per poll.
pub const TAIL_PAGE: usize = 200;

/// Which tenants a caller may read the audit trail of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailScope {
    /// Every tenant, and the events of no tenant.
    All,
    /// These tenants only.
    Tenants(Vec<String>),
}

impl TrailScope {
    /// Whether events of `tenant` ("" for none) are visible.
    pub fn admits(&self, tenant: &str) -> bool {
        match self {
            Self::All => true,
            Self::Tenants(t) => t.iter().any(|x| x == tenant),
        }
    }
}

/// One page of a task's story.
#[derive(Debug, Default)]
pub struct Trace {
    /// The events, oldest first.
    pub events: Vec<AuditEvent>,
    /// For the next page; `None` after the last.
    pub next: Option<String>,
}

impl<S: LeaseStore> LeaseService<S> {
    /// The audit scope of `caller` for `action`.
    ///
    /// # Errors
    /// `PermissionDenied` (audited) for a caller who is neither an admin nor a
    /// tenant admin.
    pub fn authorize_trail_reader(
        &self,
        caller: &Identity,
        action: &str,
    ) -> Result<TrailScope, LeaseError> {
        if self.admins.iter().any(|p| p.matches(&caller.spiffe_id)) {
            audit::admin_call(caller.spiffe_id.as_str(), action, "");
            return Ok(TrailScope::All);
        }
        let tenants: Vec<String> = self
            .tenant_admins
            .iter()
            .filter(|(_, p)| p.matches(&caller.spiffe_id))
            .map(|(t, _)| t.clone())
            .collect();
        if !tenants.is_empty() {
            audit::admin_call(caller.spiffe_id.as_str(), action, &tenants.join(","));
            return Ok(TrailScope::Tenants(tenants));
        }
        let reason = "matched by no admin.callers or admin.tenants entry";
        self.refusals
            .denied(caller.spiffe_id.as_str(), action, reason);
        Err(LeaseError::PermissionDenied(format!(
            "{} may not call Admin.{action}: {reason}",
            caller.spiffe_id
        )))
    }

    /// A page of the story of a task and its descendants, oldest first; `id`
    /// is a task id or a credential id (the story of its task).
    ///
    /// # Errors
    /// `PermissionDenied` (no reader); `InvalidArgument` (id, page size or
    /// token); `TaskNotFound` (no event of it, or only events another tenant
    /// admin may read); `Unavailable`.
    pub async fn audit_trace(
        &self,
        caller: &Identity,
        id: &str,
        page_size: usize,
        token: Option<&str>,
    ) -> Result<Trace, LeaseError> {
        let scope = self.authorize_trail_reader(caller, "AuditTrace")?;
        let task = match (TaskId::parse(id), CredentialId::parse(id)) {
            (Some(t), _) => t,
            (None, Some(c)) => c.task_id(),
            (None, None) => {
                return Err(LeaseError::invalid(
                    "id",
                    "not a task id (tk_...) or a credential id (tk_....c...)",
                ));
            }
        };
        if page_size > TRACE_MAX {
            return Err(LeaseError::invalid(
                "page_size",
                format!("{page_size}; at most {TRACE_MAX}"),
            ));
        }
        let limit = if page_size == 0 {
            TRACE_DEFAULT
        } else {
            page_size
        };
        let from = match token {
            None | Some("") => 0,
            Some(t) => t
                .parse::<u64>()
                .map_err(|_| LeaseError::invalid("page_token", "not a token AuditTrace issued"))?,
        };
        let page = self.store.audit_trace(&task, from, limit).await?;
        // A story is one tenant's (delegation never leaves it): the first
        // event tells whose, and a foreign one is not found, not shown in part.
        if page
            .events
            .first()
            .is_some_and(|e| !scope.admits(&e.tenant))
            || (page.events.is_empty() && from == 0)
        {
            return Err(LeaseError::TaskNotFound(task.to_string()));
        }
        Ok(Trace {
            events: page
                .events
                .into_iter()
                .filter(|e| scope.admits(&e.tenant))
                .collect(),
            next: page.next.map(|n| n.to_string()),
        })
    }

    /// The tenants a tail of `tenant` ("" for all the caller may read)
    /// follows, each with the cursor at its streams' current end.
    ///
    /// # Errors
    /// `PermissionDenied` (no reader, or a tenant outside the caller's
    /// scope); `Unavailable`.
    pub async fn audit_tail_start(
        &self,
        caller: &Identity,
        tenant: &str,
    ) -> Result<Vec<(String, AuditCursor)>, LeaseError> {
        let scope = self.authorize_trail_reader(caller, "AuditTail")?;
        let tenants: Vec<String> = match (&scope, tenant) {
            (_, t) if !t.is_empty() => {
                if !scope.admits(t) {
                    return Err(LeaseError::PermissionDenied(format!(
                        "{} may not read the audit trail of tenant {t:?}",
                        caller.spiffe_id
                    )));
                }
                vec![t.to_owned()]
            }
            (TrailScope::Tenants(ts), _) => ts.clone(),
            (TrailScope::All, _) => {
                let mut ts = self.actors.tenants();
                ts.push(NO_TENANT.to_owned());
                ts
            }
        };
        let mut out = Vec::with_capacity(tenants.len());
        for t in tenants {
            let cursor = self.store.audit_cursor(&t).await?;
            out.push((t, cursor));
        }
        Ok(out)
    }

    /// The next events of the tails `tails` (as [`Self::audit_tail_start`]
    /// gave them), advancing their cursors.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn audit_tail_next(
        &self,
        tails: &mut [(String, AuditCursor)],
    ) -> Result<Vec<AuditEvent>, LeaseError> {
        let mut shards = Vec::with_capacity(tails.len());
        for (tenant, cursor) in tails.iter_mut() {
            let (events, next) = self.store.audit_read(tenant, cursor, TAIL_PAGE).await?;
            *cursor = next;
            shards.push(events);
        }
        Ok(audit::merge(shards))
    }
}
