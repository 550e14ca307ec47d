//! `leash.v1.Broker`: BeginTask, RenewLease, CompleteTask.

use std::sync::Arc;

use leash_proto::v1::{self as pb, broker_server::Broker};
use tonic::{Request, Response, Status};

use super::{caller, convert, status};
use crate::{
    lease::{BeginTask, LeaseService},
    store::LeaseStore,
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
        Ok(Response::new(pb::BeginTaskResponse {
            task_id: issued.task.id.to_string(),
            lease_expires_at: Some(convert::timestamp(issued.task.lease_deadline_ms)),
            max_lifetime_at: Some(convert::timestamp(issued.task.max_deadline_ms)),
            credentials: issued
                .credentials
                .into_iter()
                .map(convert::credential)
                .collect(),
            replayed: issued.replayed,
            ..Default::default()
        }))
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
        Ok(Response::new(pb::RenewLeaseResponse {
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
            revoked_credentials: u32::try_from(done.revoked.len()).unwrap_or(u32::MAX),
            revoked_descendants: 0,
        }))
    }

    async fn delegate_task(
        &self,
        _request: Request<pb::DelegateTaskRequest>,
    ) -> Result<Response<pb::DelegateTaskResponse>, Status> {
        Err(Status::unimplemented("in progress"))
    }

    async fn redeem_delegation(
        &self,
        _request: Request<pb::RedeemDelegationRequest>,
    ) -> Result<Response<pb::BeginTaskResponse>, Status> {
        Err(Status::unimplemented("in progress"))
    }

    type WatchTaskStream = tokio_stream::wrappers::ReceiverStream<Result<pb::TaskEvent, Status>>;

    async fn watch_task(
        &self,
        _request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        Err(Status::unimplemented("in progress"))
    }
}
