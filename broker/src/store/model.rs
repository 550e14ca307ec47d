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
        s.push_str(&hex::encode(bytes));
        Self(s)
    }

    /// Builds a task id in `shard` (a delegated task shares its parent's
    /// shard) from 16 random bytes.
    pub fn in_shard(shard: u8, mut bytes: [u8; 16]) -> Self {
        if let Some(first) = bytes.first_mut() {
            *first = ((shard % SHARDS) << 4) | (*first & 0x0f);
        }
        Self::from_bytes(bytes)
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
        let mut s = String::with_capacity(task.as_str().len() + CREDENTIAL_INFIX.len() + 16);
        s.push_str(task.as_str());
        s.push_str(CREDENTIAL_INFIX);
        s.push_str(&hex::encode(random));
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
    /// A kill switch, or the end of an ancestor task, ended it.
    Revoked,
}

impl TaskState {
    /// The state's name as stored and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "completed" => Some(Self::Completed),
            "expired" => Some(Self::Expired),
            "revoked" => Some(Self::Revoked),
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
    /// An ancestor task (the one it was delegated from, or further up) ended.
    Cascade,
    /// An admin's kill switch (or RevokeTask) ended its task.
    KillSwitch,
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
    /// The task this one was delegated from; `None` for a task begun directly.
    /// A delegated task lives in its parent's shard, so a whole delegation
    /// tree ends in one atomic step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<TaskId>,
    /// The task at the top of its delegation tree (itself when begun directly:
    /// `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<TaskId>,
    /// Delegation depth: 0 for a task begun directly, the parent's plus one
    /// for a delegated task.
    #[serde(default)]
    pub depth: u32,
    /// The delegation chain: the owner (current actor) first, then the owner
    /// of each ancestor up to the root's. Empty for a task begun directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    /// The grants and scopes a delegated task holds (a subset of its
    /// parent's live ones when delegated); `None` for a task begun directly,
    /// which holds what its template renders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegated: Option<BTreeMap<String, Vec<String>>>,
    /// The approval the template asked for at begin; `None` when it gates
    /// nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// The Cedar policies that permitted the begin (recorded in the audit
    /// trail's `policy.decided`); empty when no policy set is loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// Where a task's approval stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for an approver until the deadline.
    #[default]
    Pending,
    /// Approved; to be used by a renewal before the deadline.
    Approved,
    /// Denied: the gated grants are never issued.
    Denied,
    /// Not decided, or not used, before the deadline.
    Expired,
    /// Approved and used: the gated grants are issued with every renewal.
    Redeemed,
}

impl ApprovalState {
    /// The name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Redeemed => "redeemed",
        }
    }

    /// Parses [`ApprovalState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Approved,
            Self::Denied,
            Self::Expired,
            Self::Redeemed,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// A task's approval: what the template gated at begin (kept with the task,
/// so a later template edit changes no pending request) and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The gated grants, withheld until approved and used.
    pub grants: Vec<String>,
    /// Who may decide, by SPIFFE ID pattern.
    pub approvers: Vec<String>,
    /// Who may decide, by actor class (of the task's tenant).
    pub approver_classes: Vec<String>,
    /// How long a request waits for a decision, then an approval for its use.
    pub validity_ms: u64,
    /// Whether the other grants are issued while pending.
    pub issue_others: bool,
    /// Where it stands (kept apart from the begin record by the store).
    #[serde(skip)]
    pub status: ApprovalStatus,
}

/// The changing part of an [`Approval`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApprovalStatus {
    /// The state as last written.
    pub state: ApprovalState,
    /// Pending: the request expires here; approved: the approval expires here unused.
    pub deadline_ms: u64,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// When.
    pub decided_at_ms: Option<u64>,
}

impl Approval {
    /// The state at `now_ms`: a pending or approved approval past its
    /// deadline has expired, whether or not the store wrote so yet.
    pub fn state_at(&self, now_ms: u64) -> ApprovalState {
        match self.status.state {
            ApprovalState::Pending | ApprovalState::Approved
                if now_ms >= self.status.deadline_ms =>
            {
                ApprovalState::Expired
            }
            s => s,
        }
    }

    /// Whether the gated grants are issued at `now_ms` (approved and not
    /// expired, or already used).
    pub fn grants_issued(&self, now_ms: u64) -> bool {
        matches!(
            self.state_at(now_ms),
            ApprovalState::Approved | ApprovalState::Redeemed
        )
    }
}

/// What an approver decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalDecision {
    /// Approved (true) or denied.
    pub approve: bool,
    /// SPIFFE ID of the approver.
    pub by: String,
    /// The approver's reason.
    pub reason: String,
    /// How long an approval stays usable (the task's `Approval::validity_ms`,
    /// read by the caller with the task it checked the approver against).
    pub validity_ms: u64,
}

/// What an admin's kill switch or RevokeTask aims at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KillTarget {
    /// One task (and its descendants); sets no kill switch.
    Task(TaskId),
    /// Tasks owned by exactly this SPIFFE ID.
    Identity(String),
    /// Tasks owned by any SPIFFE ID starting with this.
    IdentityPrefix(String),
    /// Tasks of this template.
    Template(String),
    /// Tasks of owners of this actor class.
    Class(String),
    /// Tasks of this tenant.
    Tenant(String),
}

impl KillTarget {
    /// The kind's name (`task`, `identity`, `identity_prefix`, `template`, `class`, `tenant`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Task(_) => "task",
            Self::Identity(_) => "identity",
            Self::IdentityPrefix(_) => "identity_prefix",
            Self::Template(_) => "template",
            Self::Class(_) => "class",
            Self::Tenant(_) => "tenant",
        }
    }

    /// The value aimed at.
    pub fn value(&self) -> &str {
        match self {
            Self::Task(id) => id.as_str(),
            Self::Identity(v)
            | Self::IdentityPrefix(v)
            | Self::Template(v)
            | Self::Class(v)
            | Self::Tenant(v) => v,
        }
    }

    /// Builds a target from [`KillTarget::kind`] and [`KillTarget::value`].
    pub fn parse(kind: &str, value: &str) -> Option<Self> {
        let v = value.to_owned();
        Some(match kind {
            "task" => Self::Task(TaskId::parse(value)?),
            "identity" => Self::Identity(v),
            "identity_prefix" => Self::IdentityPrefix(v),
            "template" => Self::Template(v),
            "class" => Self::Class(v),
            "tenant" => Self::Tenant(v),
            _ => return None,
        })
    }

    /// Whether `task` is aimed at (its own fields; descendants go with it).
    pub fn matches(&self, task: &TaskRecord) -> bool {
        match self {
            Self::Task(id) => task.id == *id,
            Self::Identity(v) => task.owner == *v,
            Self::IdentityPrefix(v) => task.owner.starts_with(v.as_str()),
            Self::Template(v) => task.template == *v,
            Self::Class(v) => task.class == *v,
            Self::Tenant(v) => task.tenant == *v,
        }
    }

    /// Whether a begin (or delegation) of `task` is refused by a kill switch
    /// of this target.
    pub fn refuses(&self, task: &TaskRecord) -> bool {
        !matches!(self, Self::Task(_)) && self.matches(task)
    }
}

/// A kill switch in force: begins matching it are refused until lifted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillSwitch {
    /// Kind ([`KillTarget::kind`], never `task`).
    pub kind: String,
    /// Value.
    pub value: String,
    /// Why it was set.
    pub reason: String,
    /// The admin who set it.
    pub set_by: String,
    /// When.
    pub set_at_ms: u64,
}

impl KillSwitch {
    /// The target it aims at.
    pub fn target(&self) -> Option<KillTarget> {
        KillTarget::parse(&self.kind, &self.value).filter(|t| !matches!(t, KillTarget::Task(_)))
    }
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
    /// A delegated task its subagent has not redeemed yet: nobody may renew
    /// or complete it until the subagent redeems the delegation handle, which
    /// records the proof the subagent gave then.
    Delegated,
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
    /// The JWT `sub`: SPIFFE ID of the agent it was issued to, or for a
    /// delegated task the root task's owner (see `actors`).
    pub subject: String,
    /// A delegated task's chain, current actor first (the holder), root
    /// owner last; empty for a task begun directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
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
        for shard in 0..SHARDS {
            assert_eq!(TaskId::in_shard(shard, [0xff; 16]).shard(), shard);
        }
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
    /// When what revoked it happened: the lease deadline for an expiry, else
    /// the revocation itself (0 in a snapshot). The revocation lag is the time
    /// from this to the record being read from the log.
    pub due_ms: u64,
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
            Self::Cascade => "cascade",
            Self::KillSwitch => "kill_switch",
        }
    }

    /// Parses a reason name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completion" => Some(Self::Completion),
            "expiry" => Some(Self::Expiry),
            "rotation" => Some(Self::Rotation),
            "cascade" => Some(Self::Cascade),
            "kill_switch" => Some(Self::KillSwitch),
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
