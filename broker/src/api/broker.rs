//! `leash.v1.Broker`: BeginTask, RenewLease, CompleteTask, DelegateTask,
//! RedeemDelegation, WatchTask.

use std::{sync::Arc, time::Duration};

use leash_proto::v1::{self as pb, broker_server::Broker};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{caller, convert, status};
use crate::{
    lease::{BeginTask, DelegateTask, LeaseService},
    store::{LeaseStore, TaskRecord},
};

/// The Broker service over a [`LeaseService`].
#[derive(Debug)]
pub struct BrokerApi<S> {
    service: Arc<LeaseService<S>>,
}

impl<S> BrokerApi<S> {
    /// Serves `service`.
    pub fn new(service: Arc<LeaseService<S>>) -> Self {
        Self { service }
    }
}

#[tonic::async_trait]
impl<S: LeaseStore> Broker for BrokerApi<S> {
    async fn begin_task(
        &self,
        request: Request<pb::BeginTaskRequest>,
    ) -> Result<Response<pb::BeginTaskResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let begin = BeginTask {
            template: req.template,
            parameters: req.parameters.into_iter().collect(),
            intent: req.intent,
            requested_ttl: convert::duration("requested_ttl", req.requested_ttl).map_err(status)?,
            idempotency_key: Some(req.idempotency_key).filter(|k| !k.is_empty()),
        };
        let issued = self.service.begin(&who, begin).await.map_err(status)?;
        Ok(Response::new(convert::begin_response(
            issued,
            self.service.store_now_ms(),
        )))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let issued = self
            .service
            .renew(&who, &req.task_id)
            .await
            .map_err(status)?;
        let now_ms = self.service.store_now_ms();
        Ok(Response::new(pb::RenewLeaseResponse {
            state: convert::listed_state(&issued.task, now_ms).into(),
            approval: issued
                .task
                .approval
                .as_ref()
                .map(|a| convert::approval(a, now_ms)),
            task_id: issued.task.id.to_string(),
            lease_expires_at: Some(convert::timestamp(issued.task.lease_deadline_ms)),
            max_lifetime_at: Some(convert::timestamp(issued.task.max_deadline_ms)),
            credentials: issued
                .credentials
                .into_iter()
                .map(convert::credential)
                .collect(),
        }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let outcome = convert::outcome(req.outcome).map_err(status)?;
        let done = self
            .service
            .complete(&who, &req.task_id, outcome, &req.summary)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CompleteTaskResponse {
            task_id: done.task.id.to_string(),
            state: convert::lease_state(done.task.state).into(),
            revoked_credentials: u32::try_from(
                done.revoked.len()
                    + done
                        .descendants
                        .iter()
                        .map(|d| d.revoked.len())
                        .sum::<usize>(),
            )
            .unwrap_or(u32::MAX),
            revoked_descendants: u32::try_from(done.descendants.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn delegate_task(
        &self,
        request: Request<pb::DelegateTaskRequest>,
    ) -> Result<Response<pb::DelegateTaskResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let delegate = DelegateTask {
            parent_task_id: req.parent_task_id,
            subagent: req.subagent,
            grants: req
                .grants
                .into_iter()
                .map(|g| (g.grant, g.scopes))
                .collect(),
            requested_ttl: convert::duration("requested_ttl", req.requested_ttl).map_err(status)?,
            intent: req.intent,
        };
        let done = self
            .service
            .delegate(&who, delegate)
            .await
            .map_err(status)?;
        let t = &done.task;
        Ok(Response::new(pb::DelegateTaskResponse {
            task_id: t.id.to_string(),
            delegation_handle: done.handle.expose().to_owned(),
            lease_expires_at: Some(convert::timestamp(t.lease_deadline_ms)),
            max_lifetime_at: Some(convert::timestamp(t.max_deadline_ms)),
            depth: t.depth,
            grants: t
                .delegated
                .iter()
                .flatten()
                .map(|(grant, scopes)| pb::GrantScopes {
                    grant: grant.clone(),
                    scopes: scopes.clone(),
                })
                .collect(),
        }))
    }

    async fn redeem_delegation(
        &self,
        request: Request<pb::RedeemDelegationRequest>,
    ) -> Result<Response<pb::BeginTaskResponse>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let issued = self
            .service
            .redeem(&who, &req.task_id, &req.delegation_handle)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::begin_response(
            issued,
            self.service.store_now_ms(),
        )))
    }

    type WatchTaskStream = ReceiverStream<Result<pb::TaskEvent, Status>>;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        let first = self
            .service
            .watched_task(&who, &req.task_id)
            .await
            .map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let service = Arc::clone(&self.service);
        tokio::spawn(async move { watch(service, first, tx).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// How often WatchTask rereads the task: approvals are decided by people, so
/// a quarter second is prompt, and a reread is one small read.
const WATCH_POLL: Duration = Duration::from_millis(250);

/// Sends `task`'s state now and at every change, until it has ended or the
/// watcher goes away. Bounded: it stops at the task's max lifetime (plus a
/// poll) at the latest, when the task has certainly ended.
async fn watch<S: LeaseStore>(
    service: Arc<LeaseService<S>>,
    mut task: TaskRecord,
    tx: tokio::sync::mpsc::Sender<Result<pb::TaskEvent, Status>>,
) {
    let mut last: Option<pb::TaskEvent> = None;
    loop {
        let now_ms = service.store_now_ms();
        let event = pb::TaskEvent {
            task_id: task.id.to_string(),
            state: convert::listed_state(&task, now_ms).into(),
            approval: task.approval.as_ref().map(|a| convert::approval(a, now_ms)),
            lease_expires_at: Some(convert::timestamp(task.lease_deadline_ms)),
        };
        let ended = !task.is_live(now_ms);
        if last.as_ref() != Some(&event) {
            if tx.send(Ok(event.clone())).await.is_err() {
                return;
            }
            last = Some(event);
        }
        if ended || now_ms > task.max_deadline_ms.saturating_add(1000) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(WATCH_POLL) => {}
            () = tx.closed() => return,
        }
        match service.reread_task(&task.id).await {
            Ok(t) => task = t,
            Err(e) => {
                let _ = tx.send(Err(status(e))).await;
                return;
            }
        }
    }
}
