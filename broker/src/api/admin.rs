//! `leash.v1.Admin`: inventory, approvals and kill switches.

use std::sync::Arc;

use leash_proto::v1::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::{caller, convert, status};
use crate::{
    doctor::Diagnostics,
    lease::{KillReport, LeaseService, TaskFilter},
    store::{KillTarget, LeaseStore, TaskId},
};

/// The Admin service over a [`LeaseService`].
#[derive(Debug)]
pub struct AdminApi<S> {
    service: Arc<LeaseService<S>>,
    /// The checks of Diagnose; without them Diagnose answers UNIMPLEMENTED.
    diagnostics: Option<Arc<Diagnostics<S>>>,
}

impl<S> AdminApi<S> {
    /// Serves `service`.
    pub fn new(service: Arc<LeaseService<S>>) -> Self {
        Self {
            service,
            diagnostics: None,
        }
    }

    /// Answers Diagnose with `diagnostics`.
    #[must_use]
    pub fn with_diagnostics(mut self, diagnostics: Arc<Diagnostics<S>>) -> Self {
        self.diagnostics = Some(diagnostics);
        self
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn kill_response(r: &KillReport) -> pb::KillSwitchResponse {
    pb::KillSwitchResponse {
        kill_switch: r.switch.as_ref().map(convert::kill_switch),
        revoked_tasks: count(r.tasks),
        revoked_credentials: count(r.credentials),
    }
}

fn filter(value: String) -> Option<String> {
    Some(value).filter(|v| !v.is_empty())
}

impl<S: LeaseStore> AdminApi<S> {
    async fn kill(
        &self,
        who: &crate::identity::Identity,
        target: KillTarget,
        reason: &str,
    ) -> Result<Response<pb::KillSwitchResponse>, Status> {
        let report = self
            .service
            .kill(who, target, reason)
            .await
            .map_err(status)?;
        Ok(Response::new(kill_response(&report)))
    }

    async fn decide(
        &self,
        request: Request<pb::DecideApprovalRequest>,
        approve: bool,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let task = self
            .service
            .decide_approval(&who, &req.task_id, approve, &req.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::task_info(
            &task,
            self.service.store_now_ms(),
        )))
    }
}

/// How often AuditTail reads the streams again when it found nothing new.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// How long one AuditTail call follows at most (then it ends; callers reconnect).
const TAIL_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Most tasks on a ListTasks page that lists credentials too.
const WITH_CREDENTIALS_PAGE: usize = 100;

/// Sends the events of `tails` as they come, until the caller goes away, a
/// read fails (sent as the stream's last item), or [`TAIL_MAX`] passes.
async fn tail<S: LeaseStore>(
    service: Arc<LeaseService<S>>,
    mut tails: Vec<(String, crate::audit::AuditCursor)>,
    tx: tokio::sync::mpsc::Sender<Result<pb::AuditEvent, Status>>,
) {
    let end = tokio::time::Instant::now() + TAIL_MAX;
    while tokio::time::Instant::now() < end {
        match service.audit_tail_next(&mut tails).await {
            Ok(events) if !events.is_empty() => {
                for e in &events {
                    if tx.send(Ok(convert::audit_event(e))).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(status(e))).await;
                return;
            }
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(TAIL_POLL) => {}
        }
    }
}

#[tonic::async_trait]
impl<S: LeaseStore> Admin for AdminApi<S> {
    type AuditTailStream = tokio_stream::wrappers::ReceiverStream<Result<pb::AuditEvent, Status>>;

    async fn audit_trace(
        &self,
        request: Request<pb::AuditTraceRequest>,
    ) -> Result<Response<pb::AuditTraceResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let page_size = usize::try_from(req.page_size).unwrap_or(usize::MAX);
        let trace = self
            .service
            .audit_trace(&who, &req.id, page_size, filter(req.page_token).as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::AuditTraceResponse {
            events: trace.events.iter().map(convert::audit_event).collect(),
            next_page_token: trace.next.unwrap_or_default(),
        }))
    }

    async fn audit_tail(
        &self,
        request: Request<pb::AuditTailRequest>,
    ) -> Result<Response<Self::AuditTailStream>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let tails = self
            .service
            .audit_tail_start(&who, &req.tenant)
            .await
            .map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(tail(Arc::clone(&self.service), tails, tx));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let who = caller(&request)?;
        let templates = self.service.list_templates(&who).await.map_err(status)?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates: templates
                .iter()
                .map(|(t, live)| pb::TemplateInfo {
                    name: t.name.clone(),
                    version: t.version.clone(),
                    owner: t.owner.clone(),
                    tenant: t.tenant.clone(),
                    classes: t.classes.clone(),
                    grants: t.grants.iter().map(|g| g.name.clone()).collect(),
                    approval_grants: t
                        .approval
                        .as_ref()
                        .map(|a| a.grants.clone())
                        .unwrap_or_default(),
                    max_delegation_depth: t.delegation.max_depth,
                    sensitivity: t.sensitivity.as_str().to_owned(),
                    live_tasks: live.tasks,
                    live_credentials: live.credentials,
                })
                .collect(),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let wanted = TaskFilter {
            identity: filter(req.identity),
            class: filter(req.class),
            tenant: filter(req.tenant),
            template: filter(req.template),
            state: convert::state_filter(req.state).map_err(status)?,
        };
        let mut page_size = usize::try_from(req.page_size).unwrap_or(usize::MAX);
        if req.with_credentials {
            // Each live task listed costs a read of its credentials.
            page_size = match page_size {
                0 => WITH_CREDENTIALS_PAGE,
                n => n.min(WITH_CREDENTIALS_PAGE),
            };
        }
        let token = filter(req.page_token);
        let listing = self
            .service
            .list_tasks(&who, &wanted, page_size, token.as_deref())
            .await
            .map_err(status)?;
        let held = if req.with_credentials {
            self.service
                .held_credentials(&listing.tasks)
                .await
                .map_err(status)?
        } else {
            Vec::new()
        };
        let now_ms = self.service.store_now_ms();
        Ok(Response::new(pb::ListTasksResponse {
            tasks: listing
                .tasks
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let mut info = convert::task_info(t, now_ms);
                    if let Some(creds) = held.get(i) {
                        info.credentials = creds
                            .iter()
                            .map(|c| convert::credential_info(c, now_ms))
                            .collect();
                    }
                    info
                })
                .collect(),
            next_page_token: listing.next.unwrap_or_default(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let task = self
            .service
            .get_task(&who, &req.task_id)
            .await
            .map_err(status)?;
        let held = self
            .service
            .held_credentials(std::slice::from_ref(&task))
            .await
            .map_err(status)?;
        let now_ms = self.service.store_now_ms();
        let mut info = convert::task_info(&task, now_ms);
        info.credentials = held
            .iter()
            .flatten()
            .map(|c| convert::credential_info(c, now_ms))
            .collect();
        Ok(Response::new(info))
    }

    async fn approve(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        self.decide(request, true).await
    }

    async fn deny(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::TaskInfo>, Status> {
        self.decide(request, false).await
    }

    async fn revoke_task(
        &self,
        request: Request<pb::RevokeTaskRequest>,
    ) -> Result<Response<pb::KillSwitchResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        // Admin first: a non-admin learns nothing, not even whether the id is well formed.
        self.service
            .authorize_admin(&who, "RevokeTask")
            .map_err(status)?;
        if req.task_id.is_empty() {
            return Err(Status::invalid_argument("task_id: required"));
        }
        let id = TaskId::parse(&req.task_id).ok_or_else(|| {
            Status::invalid_argument(
                "task_id: not a task id (tk_ followed by 32 lower-case hex digits)",
            )
        })?;
        self.kill(&who, KillTarget::Task(id), &req.reason).await
    }

    async fn revoke_identity(
        &self,
        request: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::KillSwitchResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let target = if req.prefix {
            KillTarget::IdentityPrefix(req.identity)
        } else {
            KillTarget::Identity(req.identity)
        };
        self.kill(&who, target, &req.reason).await
    }

    async fn revoke_template(
        &self,
        request: Request<pb::RevokeTemplateRequest>,
    ) -> Result<Response<pb::KillSwitchResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        self.kill(&who, KillTarget::Template(req.template), &req.reason)
            .await
    }

    async fn revoke_class(
        &self,
        request: Request<pb::RevokeClassRequest>,
    ) -> Result<Response<pb::KillSwitchResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        self.kill(&who, KillTarget::Class(req.class), &req.reason)
            .await
    }

    async fn revoke_tenant(
        &self,
        request: Request<pb::RevokeTenantRequest>,
    ) -> Result<Response<pb::KillSwitchResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        self.kill(&who, KillTarget::Tenant(req.tenant), &req.reason)
            .await
    }

    async fn list_kill_switches(
        &self,
        request: Request<pb::ListKillSwitchesRequest>,
    ) -> Result<Response<pb::ListKillSwitchesResponse>, Status> {
        let who = caller(&request)?;
        let all = self.service.kill_switches(&who).await.map_err(status)?;
        Ok(Response::new(pb::ListKillSwitchesResponse {
            kill_switches: all.iter().map(convert::kill_switch).collect(),
        }))
    }

    async fn diagnose(
        &self,
        request: Request<pb::DiagnoseRequest>,
    ) -> Result<Response<pb::DiagnoseResponse>, Status> {
        let who = caller(&request)?;
        self.service
            .authorize_admin(&who, "Diagnose")
            .map_err(status)?;
        let Some(diagnostics) = &self.diagnostics else {
            return Err(Status::unimplemented(
                "Diagnose: this broker was built without diagnostics",
            ));
        };
        let checks = diagnostics.run().await;
        Ok(Response::new(pb::DiagnoseResponse {
            checks: checks
                .into_iter()
                .map(|c| pb::DiagnosticCheck {
                    passed: c.passed(),
                    warning: c.status == crate::doctor::CheckStatus::Warn,
                    name: c.name,
                    detail: c.detail,
                    figure: c.figure,
                })
                .collect(),
        }))
    }

    async fn lift_kill_switch(
        &self,
        request: Request<pb::LiftKillSwitchRequest>,
    ) -> Result<Response<pb::LiftKillSwitchResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let lifted = self
            .service
            .lift_kill_switch(&who, &req.kind, &req.value, &req.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LiftKillSwitchResponse { lifted }))
    }
}
