//! The records a store keeps. None of them holds a credential value.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use super::SHARDS;

const TASK_PREFIX: &str = "tk_";
const TASK_HEX_LEN: usize = 32;
const CREDENTIAL_INFIX: &str = ".c";
const CREDENTIAL_HEX_LEN: usize = 16;

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A task id: `tk_` followed by 32 lower-case hex digits (128 bits).
///
/// The first hex digit picks the task's shard, so every key of the task and its
/// shard's deadline index share one hash slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    /// Builds a task id from 16 bytes (random, or a digest for idempotent begins).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut s = String::with_capacity(TASK_PREFIX.len() + TASK_HEX_LEN);
        s.push_str(TASK_PREFIX);
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// Parses a task id, returning `None` unless it has exactly the documented form.
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix(TASK_PREFIX)?;
        (hex.len() == TASK_HEX_LEN && is_lower_hex(hex)).then(|| Self(s.to_owned()))
    }

    /// The shard (0..[`SHARDS`]) this task belongs to.
    pub fn shard(&self) -> u8 {
        let nibble = self
            .0
            .as_bytes()
            .get(TASK_PREFIX.len())
            .and_then(|b| char::from(*b).to_digit(16))
            .unwrap_or(0);
        // SHARDS divides 16, so every nibble maps to a shard.
        u8::try_from(nibble).unwrap_or(0) % SHARDS
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TaskId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s).ok_or_else(|| format!("not a task id: {s:?}"))
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> Self {
        id.0
    }
}

/// A credential id: `<task id>.c` followed by 16 lower-case hex digits.
///
/// It names its task, so a credential can be found in its task's hash slot. It
/// is not secret: it is the JWT `jti` and what logs and audit records carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CredentialId(String);

impl CredentialId {
    /// Builds the id of a credential of `task` from 8 random bytes.
    pub fn new(task: &TaskId, random: [u8; 8]) -> Self {
        let mut s = format!("{task}{CREDENTIAL_INFIX}");
        for b in random {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// Parses a credential id, returning `None` unless it has exactly the documented form.
    pub fn parse(s: &str) -> Option<Self> {
        let (task, suffix) = s.split_once(CREDENTIAL_INFIX)?;
        TaskId::parse(task)?;
        (suffix.len() == CREDENTIAL_HEX_LEN && is_lower_hex(suffix)).then(|| Self(s.to_owned()))
    }

    /// The task this credential belongs to.
    pub fn task_id(&self) -> TaskId {
        let task = self.0.split_once(CREDENTIAL_INFIX).map_or("", |(t, _)| t);
        TaskId(task.to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CredentialId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s).ok_or_else(|| format!("not a credential id: {s:?}"))
    }
}

impl From<CredentialId> for String {
    fn from(id: CredentialId) -> Self {
        id.0
    }
}

/// The life state of a task and its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// The lease is live.
    Active,
    /// The owner completed the task.
    Completed,
    /// The lease lapsed without renewal.
    Expired,
}

impl TaskState {
    /// The state's name as stored and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Expired => "expired",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "completed" => Some(Self::Completed),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// Why a credential was revoked: its task ended, or it was rotated out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The owner completed the task.
    Completion,
    /// The lease was not renewed before its deadline.
    Expiry,
    /// The task is live, but the credential was the oldest of its grant when
    /// a renewal went past the per-grant cap of live credentials.
    Rotation,
}

/// A declared task and its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task id.
    pub id: TaskId,
    /// SPIFFE ID of the identity that began the task; only it may renew or complete.
    pub owner: String,
    /// Template name.
    pub template: String,
    /// Template version at the time of the begin.
    pub template_version: String,
    /// Validated parameter values.
    pub parameters: BTreeMap<String, String>,
    /// The declared intent.
    pub intent: String,
    /// Digest of what was requested, to tell an idempotent replay from a conflicting reuse of its key.
    pub fingerprint: String,
    /// When the task began.
    pub created_at_ms: u64,
    /// The lease TTL each renewal extends by.
    pub lease_ttl_ms: u64,
    /// The lease ends here unless renewed.
    pub lease_deadline_ms: u64,
    /// No renewal may extend the lease past this.
    pub max_deadline_ms: u64,
    /// Current state.
    pub state: TaskState,
    /// When the task ended, if it has.
    pub ended_at_ms: Option<u64>,
    /// The owner's declared outcome, for completed tasks.
    pub outcome: Option<String>,
    /// How the owner proved itself at begin; renew and complete must prove it the
    /// same way. Records written before this field existed read as
    /// [`TaskBinding::Unrecorded`].
    #[serde(default)]
    pub binding: TaskBinding,
    /// The actor class of the owner at begin (its quotas count this task).
    /// Empty in records written before classes existed.
    #[serde(default)]
    pub class: String,
    /// The owner's tenant at begin: no caller of another tenant can read,
    /// renew, complete or introspect the task. Empty in records written before
    /// tenants existed, which then match no tenant at all (fail closed).
    #[serde(default)]
    pub tenant: String,
}

/// The proof a task's owner gave at begin, which renew and complete must match.
///
/// Holds digests of public material only (certificate and key hashes), never a
/// secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TaskBinding {
    /// Stored before bindings were recorded: treated as begun over mTLS, with no
    /// key to compare (fail closed: never open to a JWT-SVID).
    #[default]
    Unrecorded,
    /// Begun over mutual TLS with an X509-SVID; its credentials are
    /// certificate-bound.
    Certificate {
        /// base64url SHA-256 of the leaf certificate (RFC 8705 `x5t#S256`).
        x5t_s256: String,
        /// base64url SHA-256 of the leaf's SubjectPublicKeyInfo.
        spki_s256: String,
    },
    /// Begun with a JWT-SVID (no certificate); its credentials are unbound.
    JwtSvid,
}

impl TaskRecord {
    /// True if the lease is live at `now_ms`: active and before its deadline.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.state == TaskState::Active && now_ms < self.lease_deadline_ms
    }
}

/// How a credential is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredKind {
    /// A signed JWT.
    Jwt,
    /// An opaque random token.
    Opaque,
}

/// One issued credential. Holds the SHA-256 of its value, never the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// Credential id (JWT `jti`).
    pub id: CredentialId,
    /// Template grant name.
    pub grant: String,
    /// JWT or opaque.
    pub kind: StoredKind,
    /// The one audience.
    pub audience: String,
    /// Scopes, parameters substituted.
    pub scopes: Vec<String>,
    /// The declared class of each scope, index for index with `scopes`; empty in
    /// records written before scope classes existed (their classes are unknown).
    #[serde(default)]
    pub scope_classes: Vec<crate::templates::ScopeClass>,
    /// Lower-case hex SHA-256 of the credential value.
    pub value_sha256: String,
    /// SPIFFE ID of the agent it was issued to.
    pub subject: String,
    /// Issuer.
    pub issuer: String,
    /// Template name.
    pub template: String,
    /// base64url SHA-256 of the agent's SVID it is bound to, if bound.
    pub cnf_x5t_s256: Option<String>,
    /// Issued at.
    pub issued_at_ms: u64,
    /// Expires at; never after the lease deadline at issue time.
    pub expires_at_ms: u64,
    /// The tenant of the task: only that tenant's verifiers learn of it.
    #[serde(default)]
    pub tenant: String,
}

impl CredentialRecord {
    /// Each scope with its declared class; see [`scope_class_map`].
    pub fn scope_class_map(&self) -> BTreeMap<String, crate::templates::ScopeClass> {
        scope_class_map(&self.scopes, &self.scope_classes)
    }
}

/// Each scope → its declared class. A scope that appears twice (two template
/// scopes rendering alike) keeps the stricter class; a scope without a class
/// (a record from before scope classes) is left out rather than guessed.
pub fn scope_class_map(
    scopes: &[String],
    classes: &[crate::templates::ScopeClass],
) -> BTreeMap<String, crate::templates::ScopeClass> {
    let mut map = BTreeMap::new();
    for (scope, class) in scopes.iter().zip(classes.iter().copied()) {
        let entry = map.entry(scope.clone()).or_insert(class);
        *entry = (*entry).max(class);
    }
    map
}

impl fmt::Debug for CredentialRecord {
    // The hash is not the secret, but there is no reason to spread it into logs either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialRecord")
            .field("id", &self.id)
            .field("grant", &self.grant)
            .field("kind", &self.kind)
            .field("audience", &self.audience)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip_and_pick_shards() {
        let id = TaskId::from_bytes([0xab; 16]);
        assert_eq!(id.as_str().len(), 35);
        assert_eq!(TaskId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id.shard(), 0xa % SHARDS);
        let cred = CredentialId::new(&id, [1; 8]);
        assert_eq!(cred.task_id(), id);
        assert_eq!(CredentialId::parse(cred.as_str()), Some(cred));
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "tk_",
            "tk_ABABABABABABABABABABABABABABABAB",
            "tk_abababababababababababababababa",
            "tk_ababababababababababababababababab",
            "xx_abababababababababababababababab",
            "tk_abababababababababababababababag",
        ] {
            assert!(TaskId::parse(bad).is_none(), "{bad}");
        }
        let id = TaskId::from_bytes([0; 16]);
        for bad in [
            format!("{id}.c"),
            format!("{id}.c0102030405060708aa"),
            format!("{id}.x0102030405060708"),
            "tk_zz.c0102030405060708".to_owned(),
        ] {
            assert!(CredentialId::parse(&bad).is_none(), "{bad}");
        }
    }
}

/// A position in one shard's revocation log: Unix milliseconds and a sequence
/// number, ordered like Redis stream ids (`<ms>-<seq>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl LogId {
    /// Parses `<ms>-<seq>`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The next id after `self` at `now_ms` (monotonic even if the clock is not).
    pub fn next(self, now_ms: u64) -> Self {
        if now_ms > self.ms {
            Self { ms: now_ms, seq: 0 }
        } else {
            Self {
                ms: self.ms,
                seq: self.seq.saturating_add(1),
            }
        }
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Where a revocation watcher is: one [`LogId`] per shard.
///
/// Encoded for clients as `v1:` followed by the shard positions, comma-separated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationCursor(pub [LogId; SHARDS as usize]);

/// Longest cursor text accepted.
pub const MAX_CURSOR_LEN: usize = 1024;

impl RevocationCursor {
    /// Parses an encoded cursor; `None` unless it has exactly the documented form.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_CURSOR_LEN {
            return None;
        }
        let body = s.strip_prefix("v1:")?;
        let mut out = [LogId::default(); SHARDS as usize];
        let mut parts = body.split(',');
        for slot in &mut out {
            *slot = LogId::parse(parts.next()?)?;
        }
        parts.next().is_none().then_some(Self(out))
    }

    /// Moves the shard's position forward to `id` (never backward).
    pub fn advance(&mut self, shard: u8, id: LogId) {
        if let Some(p) = self.0.get_mut(usize::from(shard)) {
            *p = (*p).max(id);
        }
    }

    /// True if `id` in `shard` is after this cursor.
    pub fn is_before(&self, shard: u8, id: LogId) -> bool {
        self.0.get(usize::from(shard)).is_some_and(|p| id > *p)
    }
}

impl fmt::Display for RevocationCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("v1:")?;
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// One revoked, not yet expired credential, as logged for watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The credential.
    pub credential_id: CredentialId,
    /// When it would have expired.
    pub expires_at_ms: u64,
    /// When it was revoked (0 in a snapshot, where it is not kept).
    pub revoked_at_ms: u64,
    /// Why.
    pub reason: EndReason,
    /// The credential's audience: watchers are told only of their audiences' credentials.
    pub audience: String,
    /// The credential's tenant: watchers are told only of their tenant's credentials.
    pub tenant: String,
    /// Its shard and position in that shard's log (0-0 in a snapshot).
    pub position: (u8, LogId),
}

impl EndReason {
    /// The reason's name as logged and sent to watchers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completion => "completion",
            Self::Expiry => "expiry",
            Self::Rotation => "rotation",
        }
    }

    /// Parses a reason name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completion" => Some(Self::Completion),
            "expiry" => Some(Self::Expiry),
            "rotation" => Some(Self::Rotation),
            _ => None,
        }
    }
}

/// What [`super::LeaseStore::read_revocations`] found.
#[derive(Debug, Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "built once per read and consumed at once; boxing buys nothing"
)]
pub enum RevocationRead {
    /// Revocations after the cursor (maybe none), and the cursor after them.
    Records(Vec<RevocationRecord>, RevocationCursor),
    /// Part of the history after the cursor is gone (trimmed, or lost in a
    /// restart or failover, so the cursor is ahead of the log): start over
    /// from a snapshot.
    Gap,
}

/// Where a page of one shard's revoked set starts: entries whose expiry is at
/// least `min_expires_at_ms`, after skipping the first `skip` entries that
/// expire exactly then (entries of one expiry are in a fixed order, so paging
/// never depends on an offset into the whole set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagePosition {
    /// Smallest expiry (ms) on the page.
    pub min_expires_at_ms: u64,
    /// Entries with exactly that expiry already read.
    pub skip: u64,
}

impl PagePosition {
    /// The first page of a snapshot taken at `now_ms`: every revoked credential
    /// whose expiry plus [`super::REVOCATION_GRACE_MS`] is after `now_ms`.
    pub fn start(now_ms: u64) -> Self {
        Self {
            min_expires_at_ms: now_ms.saturating_sub(super::REVOCATION_GRACE_MS) + 1,
            skip: 0,
        }
    }

    /// The position after a page read from `self` whose entries expire at
    /// `expiries` (in page order); `None` when the page was shorter than
    /// `limit`, so the shard is done.
    pub fn after(self, expiries: &[u64], limit: usize) -> Option<Self> {
        let last = *expiries.last()?;
        if expiries.len() < limit {
            return None;
        }
        let same = expiries.iter().rev().take_while(|e| **e == last).count() as u64;
        Some(if last == self.min_expires_at_ms {
            Self {
                min_expires_at_ms: last,
                skip: self.skip + same,
            }
        } else {
            Self {
                min_expires_at_ms: last,
                skip: same,
            }
        })
    }
}

/// One page of a shard's revoked set ([`super::LeaseStore::revoked_page`]).
#[derive(Debug, Clone, Default)]
pub struct RevokedPage {
    /// Revoked credentials, by expiry (`revoked_at_ms` 0, position 0-0: a
    /// snapshot does not keep them).
    pub records: Vec<RevocationRecord>,
    /// Where the next page starts; `None` after the last page.
    pub next: Option<PagePosition>,
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let mut c = RevocationCursor::default();
        c.advance(3, LogId { ms: 5, seq: 2 });
        c.advance(3, LogId { ms: 4, seq: 9 });
        assert_eq!(c.0[3], LogId { ms: 5, seq: 2 }, "never backward");
        assert!(c.is_before(3, LogId { ms: 5, seq: 3 }));
        assert!(!c.is_before(3, LogId { ms: 5, seq: 2 }));
        assert_eq!(RevocationCursor::parse(&c.to_string()), Some(c.clone()));
        let text = c.to_string();
        for bad in [
            "",
            "v1:",
            "v2:0-0",
            &text[..text.len() - 4],
            &format!("{text},0-0"),
            "v1:a-b",
        ] {
            assert!(RevocationCursor::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(LogId { ms: 7, seq: 1 }.next(6), LogId { ms: 7, seq: 2 });
        assert_eq!(LogId { ms: 7, seq: 1 }.next(9), LogId { ms: 9, seq: 0 });
    }
}
