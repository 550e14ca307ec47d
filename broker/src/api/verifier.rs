//! `leash.v1.Verifier`: Introspect, GetJwks, WatchRevocations, each caller
//! seeing only the credentials of the audiences it serves.

use std::{pin::Pin, sync::Arc, time::Duration};

use leash_proto::v1::{self as pb, verifier_server::Verifier};
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{caller, convert, status};
use crate::{
    lease::{LeaseError, LeaseService},
    revocation::{RevocationBatch, RevocationFeed},
    store::{LeaseStore, REVOCATION_GRACE_MS, RevocationCursor},
};

/// The Verifier service over a [`LeaseService`] and this replica's [`RevocationFeed`].
#[derive(Debug)]
pub struct VerifierApi<S> {
    service: Arc<LeaseService<S>>,
    feed: Arc<RevocationFeed<S>>,
}

impl<S> VerifierApi<S> {
    /// Serves `service`, with revocation watches fed by `feed`.
    pub fn new(service: Arc<LeaseService<S>>, feed: Arc<RevocationFeed<S>>) -> Self {
        Self { service, feed }
    }
}

fn batch(b: RevocationBatch) -> pb::RevocationBatch {
    pb::RevocationBatch {
        revocations: b
            .records
            .into_iter()
            .map(|r| pb::Revocation {
                task_id: r.credential_id.task_id().to_string(),
                credential_id: r.credential_id.to_string(),
                expires_at: Some(convert::timestamp(r.expires_at_ms)),
                revoked_at: (r.revoked_at_ms > 0).then(|| convert::timestamp(r.revoked_at_ms)),
                reason: r.reason.as_str().to_owned(),
                audience: r.audience,
            })
            .collect(),
        cursor: b.cursor.to_string(),
        snapshot: b.snapshot,
        reset: b.reset,
        caught_up: b.caught_up,
        revocation_grace: prost_types::Duration::try_from(Duration::from_millis(
            REVOCATION_GRACE_MS,
        ))
        .ok(),
        snapshot_complete: b.snapshot_complete,
    }
}

/// The stream type of `WatchRevocations`.
pub type RevocationStream = Pin<Box<dyn Stream<Item = Result<pb::RevocationBatch, Status>> + Send>>;

#[tonic::async_trait]
impl<S: LeaseStore> Verifier for VerifierApi<S> {
    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let who = caller(&request)?;
        let token = request.into_inner().token;
        let answer = self
            .service
            .introspect(&who, &token)
            .await
            .map_err(status)?;
        let Some(r) = answer.record.filter(|_| answer.active) else {
            return Ok(Response::new(pb::IntrospectResponse::default()));
        };
        let scope_classes = r
            .scope_class_map()
            .into_iter()
            .map(|(scope, class)| (scope, class.as_str().to_owned()))
            .collect();
        // The chain without its root, who is `sub`.
        let actors = r
            .actors
            .split_last()
            .map(|(_, acting)| acting.to_vec())
            .unwrap_or_default();
        Ok(Response::new(pb::IntrospectResponse {
            active: true,
            actors,
            scope_classes,
            scope: r.scopes.join(" "),
            sub: r.subject,
            aud: r.audience,
            iss: r.issuer,
            exp: Some(convert::timestamp(r.expires_at_ms)),
            iat: Some(convert::timestamp(r.issued_at_ms)),
            token_type: match r.kind {
                crate::store::StoredKind::Jwt => "jwt".into(),
                crate::store::StoredKind::Opaque => "opaque".into(),
            },
            task_id: r.id.task_id().to_string(),
            jti: r.id.to_string(),
            template: r.template,
            grant: r.grant,
            cnf_x5t_s256: r.cnf_x5t_s256.unwrap_or_default(),
        }))
    }

    type WatchRevocationsStream = RevocationStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let who = caller(&request)?;
        let (audiences, actor) = self
            .service
            .verifier_scope(&who, "watch revocations")
            .map_err(status)?;
        let raw = request.into_inner().cursor;
        let cursor = if raw.is_empty() {
            None
        } else {
            Some(RevocationCursor::parse(&raw).ok_or_else(|| {
                status(LeaseError::invalid(
                    "cursor",
                    "not a cursor this broker issued; omit it to start from a snapshot",
                ))
            })?)
        };
        let stream = ReceiverStream::new(self.feed.watch_tenant(
            cursor,
            audiences,
            Some(actor.tenant),
        ))
        .map(|item| item.map(batch).map_err(|e| status(LeaseError::from(e))));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_jwks(
        &self,
        request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        caller(&request)?;
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json: self.service.jwks().to_string(),
        }))
    }
}
