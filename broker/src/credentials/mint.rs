//! Minting: template grant → value (signed JWT or random opaque) → checked → returned.
//!
//! Every credential's expiry is capped by every bound that applies: the grant's
//! TTL and the lease deadline. JWT times are whole seconds, rounded down, so a
//! JWT never outlives its lease either.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{CredentialError, KeySet, Secret, jwt, opaque, random_bytes, value_digest};
use crate::{
    clock::duration_ms,
    store::{CredentialId, CredentialRecord, StoredKind, TaskId},
    templates::{CredentialKind, GrantSpec, ScopeClass},
};

/// What one credential is minted for.
#[derive(Debug)]
pub struct MintRequest<'a> {
    /// The task it belongs to.
    pub task_id: &'a TaskId,
    /// The template's name.
    pub template: &'a str,
    /// The grant it fulfils.
    pub grant: &'a GrantSpec,
    /// The grant's scopes with parameters substituted.
    pub scopes: Vec<String>,
    /// The declared class of each scope, index for index with `scopes`.
    pub scope_classes: Vec<ScopeClass>,
    /// SPIFFE ID of the agent the credential is issued to (the current actor).
    pub subject: &'a str,
    /// A delegated task's chain (the task's `actors`): the current actor
    /// first, the root task's owner last. Then `sub` is the root's owner, and
    /// `act` (RFC 8693 §4.1) nests the actors, the current one outermost.
    /// Empty for a task begun directly: `sub` is `subject`, no `act`.
    pub actors: &'a [String],
    /// base64url SHA-256 of the agent's SVID, to bind the credential to (RFC 8705).
    pub cnf_x5t_s256: Option<&'a str>,
    /// Now, in Unix milliseconds.
    pub now_ms: u64,
    /// The lease deadline the credential must not outlive.
    pub lease_deadline_ms: u64,
}

/// The `sub` and the RFC 8693 `act` claim of a credential: for a delegated
/// task, `sub` is the root task's owner (on whose behalf the chain acts) and
/// `act` is `{"sub": <current actor>, "act": {"sub": <previous actor>, ...}}`
/// down to the first subagent; otherwise `sub` is the agent and no `act`.
pub fn delegation_claims<'a>(req: &MintRequest<'a>) -> (&'a str, Option<Value>) {
    match req.actors.split_last() {
        Some((root, acting)) if !acting.is_empty() => {
            let mut act: Option<Value> = None;
            for actor in acting.iter().rev() {
                let mut level = Map::new();
                level.insert("sub".into(), json!(actor));
                if let Some(inner) = act.take() {
                    level.insert("act".into(), inner);
                }
                act = Some(Value::Object(level));
            }
            (root.as_str(), act)
        }
        _ => (req.subject, None),
    }
}

/// A minted credential: its value for the agent, and its record for the store.
#[derive(Debug)]
pub struct Minted {
    /// What the store keeps (digest, not value).
    pub record: CredentialRecord,
    /// The value, for the response only.
    pub value: Secret,
}

/// Mints credentials under one issuer with one key set.
#[derive(Debug, Clone)]
pub struct Minter {
    keys: Arc<KeySet>,
    issuer: String,
}

impl Minter {
    /// A minter signing as `issuer` with `keys`.
    pub fn new(keys: Arc<KeySet>, issuer: String) -> Self {
        Self { keys, issuer }
    }

    /// The key set (for the JWK Set and introspection).
    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// The `iss` of every JWT this minter signs.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Mints one credential for `req` and checks it before returning it.
    ///
    /// # Errors
    /// [`CredentialError::LeaseEndsTooSoon`] if the lease leaves no time for a
    /// credential (a JWT needs the lease to reach the next whole second);
    /// [`CredentialError::Mint`] if the minted credential fails its check;
    /// [`CredentialError::Random`] if the OS random source fails.
    #[tracing::instrument(skip_all, name = "credentials.mint", fields(grant = %req.grant.name))]
    pub fn mint(&self, req: &MintRequest<'_>) -> Result<Minted, CredentialError> {
        let id = CredentialId::new(req.task_id, random_bytes::<8>()?);
        let cap_ms = req
            .now_ms
            .saturating_add(duration_ms(req.grant.ttl))
            .min(req.lease_deadline_ms);
        let (kind, value, expires_at_ms) = match req.grant.kind {
            CredentialKind::Opaque => (StoredKind::Opaque, opaque::generate(&id)?, cap_ms),
            CredentialKind::Jwt => {
                let exp_s = cap_ms / 1000;
                let token = jwt::sign(self.keys.current(), &self.claims(req, &id, exp_s))?;
                (StoredKind::Jwt, Secret::new(token), exp_s * 1000)
            }
        };
        let record = CredentialRecord {
            id,
            grant: req.grant.name.clone(),
            kind,
            audience: req.grant.audience.clone(),
            scopes: req.scopes.clone(),
            scope_classes: req.scope_classes.clone(),
            value_sha256: value_digest(value.expose()),
            subject: delegation_claims(req).0.to_owned(),
            actors: req.actors.to_vec(),
            issuer: self.issuer.clone(),
            template: req.template.to_owned(),
            cnf_x5t_s256: req.cnf_x5t_s256.map(str::to_owned),
            issued_at_ms: req.now_ms,
            expires_at_ms,
            // The lease service sets the task's tenant.
            tenant: String::new(),
        };
        self.check(req, &record, &value)?;
        Ok(Minted { record, value })
    }

    fn claims(&self, req: &MintRequest<'_>, id: &CredentialId, exp_s: u64) -> Map<String, Value> {
        let iat = req.now_ms / 1000;
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.issuer));
        let (sub, act) = delegation_claims(req);
        claims.insert("sub".into(), json!(sub));
        if let Some(act) = act {
            claims.insert("act".into(), act);
        }
        claims.insert("aud".into(), json!(req.grant.audience));
        claims.insert("scope".into(), json!(req.scopes.join(" ")));
        // `scope_classes`: each scope → `read` | `write` | `destructive`, so a
        // resource server can separate them without parsing scope names.
        let classes: Map<String, Value> =
            crate::store::scope_class_map(&req.scopes, &req.scope_classes)
                .into_iter()
                .map(|(scope, class)| (scope, json!(class.as_str())))
                .collect();
        claims.insert("scope_classes".into(), Value::Object(classes));
        claims.insert("client_id".into(), json!(req.subject));
        claims.insert("iat".into(), json!(iat));
        claims.insert("nbf".into(), json!(iat));
        claims.insert("exp".into(), json!(exp_s));
        claims.insert("jti".into(), json!(id.as_str()));
        claims.insert("task_id".into(), json!(req.task_id.as_str()));
        claims.insert("template".into(), json!(req.template));
        claims.insert("grant".into(), json!(req.grant.name));
        match req.cnf_x5t_s256 {
            Some(x5t) => claims.insert("cnf".into(), json!({ "x5t#S256": x5t })),
            // Issued to a JWT-SVID caller: a bearer token, and it says so.
            None => claims.insert("leash_binding".into(), json!("none")),
        };
        claims
    }

    /// Checks a freshly minted credential against its request: alive now, not
    /// past the lease, and (for JWTs) verifying under our keys with the intended claims.
    fn check(
        &self,
        req: &MintRequest<'_>,
        record: &CredentialRecord,
        value: &Secret,
    ) -> Result<(), CredentialError> {
        if record.expires_at_ms <= req.now_ms {
            return Err(CredentialError::LeaseEndsTooSoon {
                remaining_ms: req.lease_deadline_ms.saturating_sub(req.now_ms),
            });
        }
        if record.expires_at_ms > req.lease_deadline_ms {
            return Err(CredentialError::Mint(
                "credential would outlive its lease".into(),
            ));
        }
        if record.kind == StoredKind::Jwt {
            let claims = jwt::verify(value.expose(), &self.keys)
                .map_err(|e| CredentialError::Mint(format!("self-check: {e}")))?;
            let exp_ok =
                claims.get("exp").and_then(Value::as_u64) == Some(record.expires_at_ms / 1000);
            let jti_ok = claims.get("jti").and_then(Value::as_str) == Some(record.id.as_str());
            if !(exp_ok && jti_ok) {
                return Err(CredentialError::Mint("self-check: claims differ".into()));
            }
        }
        Ok(())
    }
}
