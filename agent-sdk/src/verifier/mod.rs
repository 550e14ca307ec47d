//! Verification of Leash credentials by resource servers, offline.
//!
//! A [`Verifier`] checks a presented JWT credential without calling the broker
//! for each request: the signature by `kid` against the broker's JWK Set (kept
//! fresh in the background), `exp`/`nbf` with a small leeway, `iss`, the
//! audience, a required scope, and the `cnf.x5t#S256` binding to the caller's
//! client certificate when one is given. Revocations arrive at once through
//! `Verifier.WatchRevocations`; a token whose credential was revoked is refused.
//!
//! # Layout
//!
//! - [`Verifier`]: the checks above; [`Verifier::connect`] runs the background
//!   loops (JWK Set refresh, revocation watch) for as long as a clone lives.
//! - `revocations`: what is known of revocations, fed batch by batch through
//!   [`Verifier::apply_batch`] (the watch loop's only way in, and the way in for
//!   custom feeds and tests).
//! - `jwks`: [`KeySet`], the keys and the JWS check.
//! - [`VerifierLayer`] applies a verifier to every request of a tonic server.
//!
//! # Revocations: fail closed
//!
//! Every token is refused with [`VerifyError::RevocationsUnknown`] whenever
//! the verifier cannot know that its credential is not revoked:
//!
//! - the revocation stream has been silent for longer than
//!   [`VerifierConfig::fail_closed_after`] (heartbeats arrive every 5 s);
//! - a snapshot is being received: from its `reset` batch until its
//!   `snapshot_complete` end marker. The snapshot is built aside and replaces
//!   what was known in one swap at the end marker; one that breaks off is
//!   dropped, and the state stays unknown until a whole snapshot has arrived
//!   (the stream is resumed without a cursor, which asks for one);
//! - a panic under the lock of the revocation state (a poisoned lock): the
//!   state is emptied and the stream restarted for a fresh snapshot.
//!
//! Each revocation is remembered until its `expires_at` plus the
//! `revocation_grace` the broker advertises in every batch
//! ([`REVOCATION_GRACE`] until one is heard), and the `exp` leeway is capped at
//! that grace, so a token is never accepted after its revocation is forgotten.
//! Forgotten entries are pruned by the next batch, a bounded number per hold
//! of the write lock, through an expiry-ordered index; `verify` only takes a
//! read lock and never prunes.

mod jwks;
mod layer;
mod revocations;

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_proto::v1::{self as pb, verifier_client::VerifierClient};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tonic::transport::Channel;

use revocations::Revocations;

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
    /// Clock leeway for `exp` and `nbf`; capped at the revocation grace the
    /// broker advertises (a warning is logged once if it is shorter).
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
    /// Whether the credential is revoked cannot be known: the revocation
    /// stream has been silent too long, a snapshot is being received (from its
    /// reset to its end marker) or was cut off, or the revocation state was
    /// lost to a panic. Retry later.
    #[error("revocation state unknown: the revocation stream is down or resyncing")]
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

impl Claims {
    /// The task the credential belongs to (`task_id`).
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The granted scopes (`scope`, split on spaces).
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Whether `scope` is granted.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The class the template gave each scope (`scope_classes`: scope →
    /// `read`, `write` or `destructive`), in claim order; empty when the
    /// token carries none. Entries whose class is not a string are skipped.
    pub fn scope_classes(&self) -> Vec<(&str, &str)> {
        self.raw
            .get("scope_classes")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(scope, class)| Some((scope.as_str(), class.as_str()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The class of one granted scope, if the token names one.
    pub fn scope_class(&self, scope: &str) -> Option<&str> {
        self.raw
            .get("scope_classes")
            .and_then(|m| m.get(scope))
            .and_then(Value::as_str)
    }

    /// The RFC 8693 delegation chain (`act`), outermost first: the current
    /// actor, then the one that delegated to it, and so on; empty for a task
    /// begun directly, whose agent is [`subject`](Self::subject). For a
    /// delegated task the subject is the root task's owner.
    pub fn actors(&self) -> Vec<&str> {
        let mut actors = Vec::new();
        let mut level = self.raw.get("act");
        // Bounded by the token size (MAX_TOKEN_LEN); the claim is signed.
        while let Some(act) = level {
            match act.get("sub").and_then(Value::as_str) {
                Some(sub) => actors.push(sub),
                None => break,
            }
            level = act.get("act");
        }
        actors
    }

    /// The credential's expiry ([`expires_at`](Self::expires_at) as a time).
    pub fn expiry(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_at)
    }
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
    revocations: Revocations,
    /// When the revocation stream last spoke (ms); 0 before it ever did.
    last_heard_ms: AtomicU64,
    /// Set once the advertised grace was found shorter than the leeway.
    grace_warned: AtomicBool,
    refresh: Notify,
}

/// Verifies Leash JWT credentials offline; cheap to clone.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl Verifier {
    /// A verifier with a fixed key set and no revocation stream of its own: for
    /// tests, benchmarks and custom feeds (see [`Verifier::apply_batch`]). It
    /// starts knowing of no revocation, with the [`REVOCATION_GRACE`] default.
    /// With `fail_closed_after` set it refuses every token until a batch is
    /// applied, and again whenever batches stop coming for that long.
    pub fn offline(keys: KeySet, config: VerifierConfig) -> Self {
        Self::new(keys, config, true)
    }

    /// `whole`: whether "no revocation" is the whole truth from the start.
    fn new(keys: KeySet, config: VerifierConfig, whole: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                keys: RwLock::new(keys),
                revocations: Revocations::new(whole),
                last_heard_ms: AtomicU64::new(0),
                grace_warned: AtomicBool::new(false),
                refresh: Notify::new(),
            }),
        }
    }

    /// Connects to the broker's Verifier service over `channel` (an mTLS
    /// channel whose SVID is allowed to watch revocations), fetches the JWK Set,
    /// waits until the first revocation snapshot is whole (its end marker and
    /// the `caught_up` batch after it have arrived), and keeps both current in
    /// background tasks that end when every clone of the verifier is dropped.
    ///
    /// # Errors
    /// [`VerifierError`] if the JWK Set or the first snapshot cannot be had
    /// within 30 s.
    pub async fn connect(channel: Channel, config: VerifierConfig) -> Result<Self, VerifierError> {
        let mut client = VerifierClient::new(channel);
        let keys = fetch_keys(&mut client).await?;
        let verifier = Self::new(keys, config, false);
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

    /// How many revocations the verifier holds in force: a statistic for
    /// metrics and tests, never a basis for a decision. It counts entries that
    /// have fallen due (past `expires_at` + grace) until the next batch prunes
    /// them, and not the revocations of a snapshot still being received.
    pub fn revoked_count(&self) -> usize {
        self.inner.revocations.count()
    }

    /// Whether `credential_id` is revoked, by the same rules as
    /// [`Verifier::verify`]: `Ok(true)` if it is, `Ok(false)` only if the
    /// verifier knows of every revocation in force and this is not one.
    ///
    /// # Errors
    /// [`VerifyError::RevocationsUnknown`] when that cannot be known (the
    /// stream is silent past `fail_closed_after`, a snapshot is being
    /// received or was cut off, or the state was lost to a panic): fail closed.
    pub fn is_revoked(&self, credential_id: &str) -> Result<bool, VerifyError> {
        match self.revocation_check(credential_id) {
            Ok(()) => Ok(false),
            Err(VerifyError::Revoked) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// The revocation grace in force: the one the broker last advertised, or
    /// [`REVOCATION_GRACE`] before any was heard. Revocations are kept this long
    /// past their expiry, and the `exp`/`nbf` leeway is capped at it.
    pub fn revocation_grace(&self) -> Duration {
        self.inner.revocations.grace()
    }

    /// `Err(RevocationsUnknown)` if the stream has been silent too long.
    fn check_heard(&self) -> Result<(), VerifyError> {
        if let Some(limit) = self.inner.config.fail_closed_after {
            let heard = self.inner.last_heard_ms.load(Ordering::Acquire);
            let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
            if now_ms().saturating_sub(heard) > limit_ms {
                return Err(VerifyError::RevocationsUnknown);
            }
        }
        Ok(())
    }

    /// `Ok` if the credential is known not to be revoked, else why not.
    fn revocation_check(&self, credential_id: &str) -> Result<(), VerifyError> {
        self.check_heard()?;
        self.inner.revocations.check(credential_id)
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
        self.check_heard()?;
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
        let leeway = cfg.leeway.min(self.revocation_grace()).as_secs();
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
        self.revocation_check(&jti)?;
        Ok(Claims {
            subject: text("sub").unwrap_or_default().to_owned(),
            task_id: text("task_id").unwrap_or_default().to_owned(),
            credential_id: jti,
            scopes,
            expires_at: exp,
            raw: claims,
        })
    }

    /// Records revocations as a live batch would (joining the snapshot being
    /// received, if one is), without counting as a sign of life of the stream
    /// and without changing the grace; for tests and custom feeds.
    pub fn note_revoked(&self, revocations: &[pb::Revocation]) {
        let batch = pb::RevocationBatch {
            revocations: revocations.to_vec(),
            ..pb::RevocationBatch::default()
        };
        self.inner.revocations.apply(&batch, now_ms());
    }

    /// Applies one batch of `WatchRevocations`; the watch loop feeds every
    /// batch through here, and custom feeds and tests may too. It guarantees:
    ///
    /// - a `reset` batch makes every token [`VerifyError::RevocationsUnknown`]
    ///   until the snapshot's `snapshot_complete` end marker (or, from brokers
    ///   that send none, the `caught_up` batch after it); the snapshot is built
    ///   aside and then replaces what was known in one swap, and a new `reset`
    ///   drops a snapshot that was cut off;
    /// - an advertised `revocation_grace` is in force from this batch on: for
    ///   how long revocations are kept past `expires_at`, and as the cap on the
    ///   leeway (logged once if shorter than [`VerifierConfig::leeway`]);
    /// - entries past `expires_at` + grace are pruned, in bounded steps;
    /// - the batch counts as a sign of life for
    ///   [`VerifierConfig::fail_closed_after`].
    ///
    /// A custom feed must also call [`Verifier::stream_broken`] when its stream
    /// ends, and resume from [`Verifier::resume_cursor`].
    pub fn apply_batch(&self, batch: &pb::RevocationBatch) {
        let now = now_ms();
        if let Some(grace) = self.inner.revocations.apply(batch, now) {
            let leeway = self.inner.config.leeway;
            if grace < leeway && !self.inner.grace_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
                    leeway_ms = u64::try_from(leeway.as_millis()).unwrap_or(u64::MAX),
                    "the broker's revocation grace is shorter than the configured leeway; \
                     the leeway is capped at the grace"
                );
            }
        }
        self.inner.last_heard_ms.store(now, Ordering::Release);
    }

    /// Tells the verifier its revocation stream ended or failed: a snapshot
    /// still being received is dropped (its part never comes into force) and
    /// revocation state stays unknown until a whole snapshot arrives. What was
    /// in force before is kept: resuming from [`Verifier::resume_cursor`]
    /// misses nothing.
    pub fn stream_broken(&self) {
        self.inner.revocations.stream_broken();
    }

    /// The cursor to pass to `WatchRevocations` when (re)connecting: that of
    /// the last batch applied, or empty (start with a snapshot) while a
    /// snapshot is incomplete or after the state was lost, since resuming from
    /// a snapshot chunk's cursor would skip the rest of that snapshot.
    pub fn resume_cursor(&self) -> String {
        self.inner.revocations.resume_cursor()
    }
}

/// The revocation grace in force until the broker advertises one (the broker
/// keeps revoked credentials in its snapshots 30 s past their `exp` today); it
/// is also the grace of a [`Verifier::offline`] that is never told one. A
/// revocation is remembered this long past its `exp`, and the leeway is capped
/// at it, since a token is accepted up to `exp + leeway`.
pub const REVOCATION_GRACE: Duration = Duration::from_secs(30);

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

/// Follows WatchRevocations, feeding every batch to [`Verifier::apply_batch`]
/// and resuming from [`Verifier::resume_cursor`] after a failure; `ready` is
/// told once the first snapshot is whole and caught up. Ends when every clone
/// of the verifier is gone (noticed at the next batch; heartbeats come every 5 s).
async fn watch_revocations(
    mut client: VerifierClient<Channel>,
    inner: std::sync::Weak<Inner>,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(cursor) = inner.upgrade().map(|i| i.revocations.resume_cursor()) else {
            return;
        };
        match client
            .watch_revocations(pb::WatchRevocationsRequest { cursor })
            .await
        {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let batch = match stream.message().await {
                        Ok(Some(batch)) => batch,
                        Ok(None) => {
                            tracing::debug!("revocation watch ended; resuming");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(status = %e.code(), "revocation watch failed; resuming");
                            break;
                        }
                    };
                    backoff = Duration::from_millis(100);
                    let Some(i) = inner.upgrade() else { return };
                    let verifier = Verifier { inner: i };
                    verifier.apply_batch(&batch);
                    if batch.caught_up
                        && verifier.inner.revocations.is_whole()
                        && let Some(tx) = ready.take()
                    {
                        let _ = tx.send(());
                    }
                    if verifier.inner.revocations.take_resync() {
                        tracing::warn!("restarting the revocation watch for a fresh snapshot");
                        break;
                    }
                }
                if let Some(i) = inner.upgrade() {
                    i.revocations.stream_broken();
                }
            }
            Err(e) => tracing::warn!(status = %e.code(), "revocation watch refused; retrying"),
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
        let poisoner = std::thread::spawn(move || inner.revocations.poison());
        assert!(poisoner.join().is_err());
        assert_eq!(
            v.verify(&token, None, None).unwrap_err(),
            VerifyError::RevocationsUnknown,
            "a revocation set that cannot be read must not pass a token"
        );
        assert_eq!(v.is_revoked("j-1"), Err(VerifyError::RevocationsUnknown));

        // The next batch finds the poison: the state is emptied and stays
        // unknown, the watch is told to start over without a cursor ...
        v.apply_batch(&pb::RevocationBatch {
            cursor: "live-9".into(),
            ..Default::default()
        });
        assert_eq!(
            v.verify(&token, None, None).unwrap_err(),
            VerifyError::RevocationsUnknown
        );
        assert!(v.inner.revocations.take_resync());
        assert!(!v.inner.revocations.take_resync(), "asked for once");
        assert_eq!(v.resume_cursor(), "");
        // ... and a whole snapshot makes it known again.
        v.apply_batch(&pb::RevocationBatch {
            reset: true,
            snapshot_complete: true,
            cursor: "snap".into(),
            ..Default::default()
        });
        assert!(v.verify(&token, None, None).is_ok());
        assert_eq!(v.resume_cursor(), "snap");
    }
}
