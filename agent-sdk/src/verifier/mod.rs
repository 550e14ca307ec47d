//! Verification of Leash credentials by resource servers, offline.
//!
//! A [`Verifier`] checks a presented JWT credential without calling the broker
//! for each request: the signature by `kid` against the broker's JWK Set (kept
//! fresh in the background), `exp`/`nbf` with a small leeway, `iss`, the
//! audience, a required scope, and the `cnf.x5t#S256` binding to the caller's
//! client certificate when one is given. Revocations arrive at once through
//! `Verifier.WatchRevocations`; a token whose credential was revoked is refused.
//!
//! Fail closed: if the revocation stream has been silent for longer than
//! [`VerifierConfig::fail_closed_after`] (heartbeats arrive every 5 s), every
//! token is refused with [`VerifyError::RevocationsUnknown`] until it is back.
//!
//! [`VerifierLayer`] applies a verifier to every request of a tonic server.

mod jwks;
mod layer;

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_proto::v1::{self as pb, verifier_client::VerifierClient};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tonic::transport::Channel;

pub use jwks::KeySet;
pub use layer::{VerifiedToken, VerifierLayer, VerifierService};

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// How a [`Verifier`] judges tokens.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// The audience this resource server is (`aud` must equal it).
    pub audience: String,
    /// The broker's issuer (`iss` must equal it).
    pub issuer: String,
    /// Clock leeway for `exp` and `nbf`.
    pub leeway: Duration,
    /// Refuse every token once the revocation stream has been silent this long;
    /// `None` to keep accepting on stale revocation knowledge (not recommended).
    pub fail_closed_after: Option<Duration>,
    /// How often the JWK Set is refreshed (also refreshed on an unknown `kid`).
    pub jwks_refresh: Duration,
}

impl VerifierConfig {
    /// Defaults: 5 s leeway, fail closed after 15 s of silence, JWKS refresh every 5 min.
    pub fn new(audience: impl Into<String>, issuer: impl Into<String>) -> Self {
        Self {
            audience: audience.into(),
            issuer: issuer.into(),
            leeway: Duration::from_secs(5),
            fail_closed_after: Some(Duration::from_secs(15)),
            jwks_refresh: Duration::from_secs(300),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not a compact JWS of the expected shape, or too long.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not EdDSA or ES256, or differs from the key's.
    #[error("algorithm not allowed")]
    Algorithm,
    /// No key with the token's `kid` (a refresh has been requested).
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is past (beyond the leeway) or missing.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` is not this resource server.
    #[error("wrong audience")]
    WrongAudience,
    /// The required scope is not granted.
    #[error("missing scope {0:?}")]
    MissingScope(String),
    /// The token is bound to another client certificate, or the binding could
    /// not be checked because no certificate was presented.
    #[error("certificate binding mismatch")]
    CertificateBinding,
    /// The credential has been revoked.
    #[error("token revoked")]
    Revoked,
    /// The revocation stream has been down too long to trust any token.
    #[error("revocation state unknown: the revocation stream is down")]
    RevocationsUnknown,
}

/// Why a [`Verifier`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifierError {
    /// The broker refused or could not be reached.
    #[error("broker: {0}")]
    Broker(#[from] tonic::Status),
    /// The JWK Set could not be read.
    #[error("JWK Set: {0}")]
    Jwks(String),
}

/// The claims of a verified token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// SPIFFE ID of the agent (`sub`).
    pub subject: String,
    /// Credential id (`jti`).
    pub credential_id: String,
    /// Task id.
    pub task_id: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// All claims as sent.
    pub raw: Map<String, Value>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug)]
struct Inner {
    config: VerifierConfig,
    keys: RwLock<KeySet>,
    /// Revoked credential id → when it may be forgotten (ms): its expiry plus [`REVOCATION_GRACE`].
    revoked: RwLock<HashMap<String, u64>>,
    /// When the revocation stream last spoke (ms); 0 before it ever did.
    last_heard_ms: AtomicU64,
    refresh: Notify,
}

/// Verifies Leash JWT credentials offline; cheap to clone.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl Verifier {
    /// A verifier with a fixed key set and no revocation stream: for tests and
    /// benchmarks. With `fail_closed_after` set it refuses everything, since it
    /// never hears from the stream.
    pub fn offline(keys: KeySet, config: VerifierConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                keys: RwLock::new(keys),
                revoked: RwLock::new(HashMap::new()),
                last_heard_ms: AtomicU64::new(0),
                refresh: Notify::new(),
            }),
        }
    }

    /// Connects to the broker's Verifier service over `channel` (an mTLS
    /// channel whose SVID is allowed to watch revocations), fetches the JWK Set,
    /// waits until the revocation snapshot is loaded, and keeps both current in
    /// background tasks that end when every clone of the verifier is dropped.
    ///
    /// # Errors
    /// [`VerifierError`] if the JWK Set or the first snapshot cannot be had.
    pub async fn connect(channel: Channel, config: VerifierConfig) -> Result<Self, VerifierError> {
        let mut client = VerifierClient::new(channel);
        let keys = fetch_keys(&mut client).await?;
        let verifier = Self::offline(keys, config);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let weak = Arc::downgrade(&verifier.inner);
        tokio::spawn(watch_revocations(
            client.clone(),
            weak.clone(),
            Some(ready_tx),
        ));
        tokio::spawn(refresh_keys(client, weak));
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(())) => Ok(verifier),
            Ok(Err(_)) | Err(_) => Err(VerifierError::Broker(tonic::Status::unavailable(
                "revocation snapshot not received",
            ))),
        }
    }

    /// How many revoked, unexpired credentials the verifier knows of.
    pub fn revoked_count(&self) -> usize {
        self.inner.revoked.read().map_or(0, |r| r.len())
    }

    /// True if the credential id is known to be revoked.
    pub fn is_revoked(&self, credential_id: &str) -> bool {
        self.inner
            .revoked
            .read()
            .is_ok_and(|r| r.contains_key(credential_id))
    }

    /// Verifies `token`. `required_scope` must be among its scopes when given;
    /// `client_cert_der` is the caller's TLS client certificate (leaf, DER),
    /// which must match the token's `cnf.x5t#S256` binding when the token has one.
    ///
    /// # Errors
    /// The first [`VerifyError`] found.
    pub fn verify(
        &self,
        token: &str,
        required_scope: Option<&str>,
        client_cert_der: Option<&[u8]>,
    ) -> Result<Claims, VerifyError> {
        let cfg = &self.inner.config;
        if let Some(limit) = cfg.fail_closed_after {
            let heard = self.inner.last_heard_ms.load(Ordering::Acquire);
            let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
            if now_ms().saturating_sub(heard) > limit_ms {
                return Err(VerifyError::RevocationsUnknown);
            }
        }
        let claims = {
            let keys = self
                .inner
                .keys
                .read()
                .map_err(|_| VerifyError::UnknownKey)?;
            match keys.verify(token) {
                Err(VerifyError::UnknownKey) => {
                    self.inner.refresh.notify_one();
                    return Err(VerifyError::UnknownKey);
                }
                other => other?,
            }
        };
        let now_s = now_ms() / 1000;
        // A leeway longer than the broker's revocation grace would accept a
        // revoked token after its revocation was forgotten: capped.
        let leeway = cfg.leeway.min(REVOCATION_GRACE).as_secs();
        let num = |k: &str| claims.get(k).and_then(Value::as_u64);
        let text = |k: &str| claims.get(k).and_then(Value::as_str);
        let exp = num("exp").ok_or(VerifyError::Expired)?;
        if now_s >= exp.saturating_add(leeway) {
            return Err(VerifyError::Expired);
        }
        if num("nbf").is_some_and(|nbf| nbf > now_s.saturating_add(leeway)) {
            return Err(VerifyError::NotYetValid);
        }
        if text("iss") != Some(cfg.issuer.as_str()) {
            return Err(VerifyError::WrongIssuer);
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == cfg.audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&cfg.audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(VerifyError::WrongAudience);
        }
        let scopes: Vec<String> = text("scope")
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(want) = required_scope
            && !scopes.iter().any(|s| s == want)
        {
            return Err(VerifyError::MissingScope(want.to_owned()));
        }
        if let Some(bound) = claims
            .get("cnf")
            .and_then(|c| c.get("x5t#S256"))
            .and_then(Value::as_str)
        {
            let presented = client_cert_der.map(|der| {
                URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der))
            });
            if presented.as_deref() != Some(bound) {
                return Err(VerifyError::CertificateBinding);
            }
        }
        let jti = text("jti")
            .ok_or(VerifyError::Malformed("no jti"))?
            .to_owned();
        if self.is_revoked(&jti) {
            return Err(VerifyError::Revoked);
        }
        Ok(Claims {
            subject: text("sub").unwrap_or_default().to_owned(),
            task_id: text("task_id").unwrap_or_default().to_owned(),
            credential_id: jti,
            scopes,
            expires_at: exp,
            raw: claims,
        })
    }

    /// Records revocations (as the watch stream does); for tests and custom feeds.
    pub fn note_revoked(&self, revocations: &[pb::Revocation]) {
        if let Ok(mut set) = self.inner.revoked.write() {
            apply(&mut set, revocations);
        }
    }

    /// Applies one batch of `WatchRevocations`, exactly as the watch loop does;
    /// for custom feeds and tests.
    pub fn apply_batch(&self, batch: &pb::RevocationBatch) {
        if let Ok(mut set) = self.inner.revoked.write() {
            if batch.reset {
                set.clear();
            }
            apply(&mut set, &batch.revocations);
            let now = now_ms();
            set.retain(|_, exp| *exp > now);
        }
        self.inner.last_heard_ms.store(now_ms(), Ordering::Release);
    }
}

/// How long past its `exp` a revocation is remembered: the broker keeps revoked
/// credentials in its snapshots 30 s past their `exp` (`REVOCATION_GRACE_MS`),
/// and a verifier accepts a token up to `exp + leeway`, so an entry must outlive
/// that (the leeway is capped at this grace).
pub const REVOCATION_GRACE: Duration = Duration::from_secs(30);

fn apply(set: &mut HashMap<String, u64>, revocations: &[pb::Revocation]) {
    let now = now_ms();
    for r in revocations {
        let exp = r.expires_at.map_or(u64::MAX, |t| {
            u64::try_from(t.seconds).unwrap_or(0).saturating_mul(1000)
        });
        // Kept until exp + the grace, never dropped at exp: a token is accepted
        // up to exp + leeway.
        let keep_until = exp.saturating_add(grace_ms());
        if keep_until > now {
            set.insert(r.credential_id.clone(), keep_until);
        }
    }
}

fn grace_ms() -> u64 {
    u64::try_from(REVOCATION_GRACE.as_millis()).unwrap_or(u64::MAX)
}

async fn fetch_keys(client: &mut VerifierClient<Channel>) -> Result<KeySet, VerifierError> {
    let json = client
        .get_jwks(pb::GetJwksRequest {})
        .await?
        .into_inner()
        .jwks_json;
    KeySet::from_jwks(&json).map_err(VerifierError::Jwks)
}

/// Refreshes the keys every `jwks_refresh`, or at once when asked (unknown kid,
/// at most once a second).
async fn refresh_keys(mut client: VerifierClient<Channel>, inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let every = strong.config.jwks_refresh;
        let notified = async {
            strong.refresh.notified().await;
        };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = notified => {}
        }
        drop(strong);
        match fetch_keys(&mut client).await {
            Ok(keys) => match inner.upgrade() {
                Some(i) => {
                    if let Ok(mut k) = i.keys.write() {
                        *k = keys;
                    }
                }
                None => return,
            },
            Err(e) => tracing::warn!(error = %e, "JWK Set refresh failed; keeping the last set"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Follows WatchRevocations, reconnecting with the last cursor after a failure.
async fn watch_revocations(
    mut client: VerifierClient<Channel>,
    inner: std::sync::Weak<Inner>,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut cursor = String::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        if inner.strong_count() == 0 {
            return;
        }
        let stream = client
            .watch_revocations(pb::WatchRevocationsRequest {
                cursor: cursor.clone(),
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                tracing::warn!(status = %e.code(), "revocation watch refused; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        while let Ok(Some(batch)) = stream.message().await {
            {
                backoff = Duration::from_millis(100);
                let Some(i) = inner.upgrade() else { return };
                Verifier { inner: i }.apply_batch(&batch);
                cursor = batch.cursor;
                if batch.caught_up
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]
mod tests {
    use leash_broker::credentials::{Algorithm, SigningKey, jwt};
    use serde_json::json;

    use super::*;

    /// A verifier trusting a fresh key, and a valid, unrevoked token it signed.
    fn verifier_and_token() -> (Verifier, String) {
        let (key, _) = SigningKey::generate("unit-1", Algorithm::EdDSA).unwrap();
        let keys = KeySet::from_jwks(&json!({"keys": [key.jwk()]}).to_string()).unwrap();
        let config = VerifierConfig {
            fail_closed_after: None,
            ..VerifierConfig::new("aud", "iss")
        };
        let now = now_ms() / 1000;
        let Value::Object(claims) = json!({"iss": "iss", "aud": "aud", "jti": "j-1",
            "exp": now + 600, "nbf": now - 60})
        else {
            unreachable!()
        };
        (
            Verifier::offline(keys, config),
            jwt::sign(&key, &claims).unwrap(),
        )
    }

    #[test]
    fn a_poisoned_revocation_set_means_revocations_unknown() {
        let (v, token) = verifier_and_token();
        assert!(v.verify(&token, None, None).is_ok());
        let inner = Arc::clone(&v.inner);
        let poisoner = std::thread::spawn(move || {
            let _held = inner.revoked.write().unwrap();
            panic!("poisoning the revocation set on purpose");
        });
        assert!(poisoner.join().is_err());
        assert!(v.inner.revoked.is_poisoned());
        assert_eq!(
            v.verify(&token, None, None).unwrap_err(),
            VerifyError::RevocationsUnknown,
            "a revocation set that cannot be read must not pass a token"
        );
    }
}
