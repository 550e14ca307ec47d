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
    match act_claim(req.actors) {
        Some((root, act)) => (root, Some(act)),
        None => (req.subject, None),
    }
}

/// The root of a delegated chain `actors` (current actor first, root owner
/// last) and its RFC 8693 `act` claim; `None` for a chain of no subagent.
pub fn act_claim(actors: &[String]) -> Option<(&str, Value)> {
    let (root, acting) = actors.split_last()?;
    let mut act: Option<Value> = None;
    for actor in acting.iter().rev() {
        let mut level = Map::new();
        level.insert("sub".into(), json!(actor));
        if let Some(inner) = act.take() {
            level.insert("act".into(), inner);
        }
        act = Some(Value::Object(level));
    }
    act.map(|a| (root.as_str(), a))
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

    /// Checks a freshly minted credential against its request: alive now and
    /// not past the lease. The signature is not verified again here (that
    /// self-check cost more than the signature): the tests check the signer
    /// against an independent verifier instead.
    fn check(
        &self,
        req: &MintRequest<'_>,
        record: &CredentialRecord,
        _value: &Secret,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};

    use super::*;
    use crate::credentials::{Algorithm, SigningKey};

    fn grant(kind: CredentialKind) -> GrantSpec {
        GrantSpec {
            name: "api".into(),
            kind,
            audience: "https://api.test".into(),
            scopes: vec!["read".into()],
            scope_classes: vec![ScopeClass::Read],
            ttl: Duration::from_secs(300),
        }
    }

    /// Verifies a compact JWS the way a resource server would, from the
    /// published JWK alone: no code of `jwt::verify` is involved.
    fn verify_independently(token: &str, jwk: &Value) -> Map<String, Value> {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "compact JWS");
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header["alg"], jwk["alg"]);
        assert_eq!(header["kid"], jwk["kid"]);
        assert_eq!(header["typ"], "at+jwt");
        let b64 = |k: &str| {
            URL_SAFE_NO_PAD
                .decode(jwk[k].as_str().expect(k))
                .expect("b64")
        };
        let (alg, public): (&'static dyn ring::signature::VerificationAlgorithm, Vec<u8>) =
            match jwk["kty"].as_str() {
                Some("OKP") => (&ED25519, b64("x")),
                Some("EC") => (
                    &ECDSA_P256_SHA256_FIXED,
                    [vec![4u8], b64("x"), b64("y")].concat(),
                ),
                other => panic!("unexpected kty {other:?}"),
            };
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64 signature");
        UnparsedPublicKey::new(alg, public)
            .verify(signing_input.as_bytes(), &sig)
            .expect("the signature verifies under the published key");
        match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")) {
            Ok(Value::Object(m)) => m,
            other => panic!("payload is not an object: {other:?}"),
        }
    }

    #[test]
    fn minted_jwts_verify_under_the_published_key_with_the_recorded_claims() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256] {
            let (key, _) = SigningKey::generate("k1", alg).expect("key");
            let minter = Minter::new(
                Arc::new(KeySet::new(vec![key]).expect("keys")),
                "https://leash.test".into(),
            );
            let jwk = minter.keys().current().jwk();
            let task = TaskId::from_bytes([7; 16]);
            let g = grant(CredentialKind::Jwt);
            let now = 1_700_000_000_500;
            let req = MintRequest {
                task_id: &task,
                template: "review",
                grant: &g,
                scopes: vec!["read".into()],
                scope_classes: vec![ScopeClass::Read],
                subject: "spiffe://acme.test/agent/a",
                actors: &[],
                cnf_x5t_s256: Some("thumb"),
                now_ms: now,
                lease_deadline_ms: now + 60_000,
            };
            let minted = minter.mint(&req).expect("mint");
            let claims = verify_independently(minted.value.expose(), &jwk);
            assert_eq!(claims["iss"], "https://leash.test");
            assert_eq!(claims["sub"], "spiffe://acme.test/agent/a");
            assert_eq!(claims["aud"], "https://api.test");
            assert_eq!(claims["jti"], minted.record.id.as_str());
            assert_eq!(claims["exp"], minted.record.expires_at_ms / 1000);
            assert_eq!(claims["cnf"]["x5t#S256"], "thumb");
            // The JWT's whole-second expiry never outlives the lease.
            assert!(minted.record.expires_at_ms <= req.lease_deadline_ms);
            assert_eq!(
                minted.record.value_sha256,
                crate::credentials::value_digest(minted.value.expose())
            );
            // And a tampered payload does not verify.
            let mut parts: Vec<String> = minted
                .value
                .expose()
                .split('.')
                .map(str::to_owned)
                .collect();
            let mut payload = claims.clone();
            payload.insert("scope".into(), json!("write"));
            parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).expect("json"));
            let forged = parts.join(".");
            assert!(crate::credentials::jwt::verify(&forged, minter.keys()).is_err());
        }
    }

    #[test]
    fn a_lease_ending_within_the_second_refuses_a_jwt() {
        let (key, _) = SigningKey::generate("k1", Algorithm::EdDSA).expect("key");
        let minter = Minter::new(
            Arc::new(KeySet::new(vec![key]).expect("keys")),
            "https://leash.test".into(),
        );
        let task = TaskId::from_bytes([8; 16]);
        let g = grant(CredentialKind::Jwt);
        let now = 1_700_000_000_200;
        let req = MintRequest {
            task_id: &task,
            template: "review",
            grant: &g,
            scopes: vec!["read".into()],
            scope_classes: vec![ScopeClass::Read],
            subject: "spiffe://acme.test/agent/a",
            actors: &[],
            cnf_x5t_s256: None,
            now_ms: now,
            lease_deadline_ms: now + 500,
        };
        assert!(matches!(
            minter.mint(&req),
            Err(CredentialError::LeaseEndsTooSoon { .. })
        ));
    }
}
