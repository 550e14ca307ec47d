//! Redis [`LeaseStore`]: every state change is one Lua script on one hash slot.
//!
//! Keys (`P` is the configured prefix, `s` the task's shard, `ID` the task id):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{P:s}:task:ID` | hash | `rec` (task JSON at begin), `state`, `deadline`, `max`, `ended`, `outcome`, `renewed`; `appr`, `appr_dl`, `appr_by`, `appr_why`, `appr_at` (the approval); `handle` (SHA-256 of an unredeemed delegation handle); `desc` (live descendants of a root) |
//! | `{P:s}:kids:ID` | set | the tasks delegated from ID (they share its shard) |
//! | `{P:s}:creds:ID` | hash | credential id → credential record JSON (hash of the value, never the value) |
//! | `{P:s}:cexp:ID` | zset | credential id by expiry |
//! | `{P:s}:cgr:ID` | hash | grant → its live credential ids, oldest first (the per-grant cap) |
//! | `{P:s}:deadlines` | zset | task id by lease deadline: the reaper's work list |
//! | `{P:s}:revlog` | stream | one entry per revocation, for watchers |
//! | `{P:s}:revoked` | zset | `<credential id> <audience> <tenant>` by expiry, for snapshots |
//! | `P:q:id:<owner>`, `P:q:class:<class>` | zset | live task ids by max lifetime (concurrency quotas) |
//! | `P:q:rate:id:<owner>`, `P:q:rate:class:<class>` | hash | token bucket `t` (tokens), `ts` (ms) |
//! | `P:kill` | hash | `<kind> <value>` → kill switch JSON |
//! | `P:killpfx` | set | the identity prefixes among the kill switches |
//!
//! The quota and kill-switch keys (`P:q:…`, `P:kill…`) are not per task, so they carry no
//! shard hash tag: the begin, complete and reap scripts touch them beside the
//! task's slot, which one Redis node allows; Redis Cluster (issue 11) needs
//! them moved.
//!
//! Deadlines are decided with Redis's own `TIME` inside each script
//! ([`StoreClock::Store`]), so replicas whose clocks differ agree. Every script
//! does bounded work (see [`super::MAX_LIVE_CREDENTIALS_PER_GRANT`]). A live
//! task's keys expire (PEXPIREAT) at its max lifetime plus the retention; ending
//! a task deletes its credential keys and leaves the task record for the
//! retention. Scripts go through EVALSHA with a fallback to EVAL, so a restarted
//! Redis that lost its script cache keeps working.
//!
//! Before the first state change, and at every readiness check, the server is
//! checked ([`ServerFacts`]): Redis 7.0 or newer, `maxmemory-policy noeviction`,
//! and the persistence the configured [`Durability`] needs. A failed check makes
//! every state change fail closed with [`StoreError::Misconfigured`].

use std::{
    fmt,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use redis::Script;

use super::link::{Access, Link, Target, Timeouts, Topology};

use crate::audit::{AuditCursor, AuditEvent, AuditPage, AuditRetention};

use super::{
    ApprovalDecision, ApprovalOutcome, ApprovalState, BeginOutcome, BeginQuota, CompleteOutcome,
    CredentialId, CredentialRecord, CredentialView, DelegateOutcome, EndReason, EndedTask,
    KILL_PAGE, KillSwitch, KillTarget, LeaseStore, LiveCounts, LiveTaskPage, LogId, MAX_CHILDREN,
    MAX_DESCENDANTS, MAX_KILL_SWITCHES, MAX_LIVE_CREDENTIALS_PER_GRANT, PRUNE_PAGE, PagePosition,
    QuotaKind, REVOCATION_GRACE_MS, REVOCATION_LOG_MAX, Reaped, RedeemOutcome, RenewOutcome,
    Renewal, RevocationCursor, RevocationRead, RevocationRecord, RevokedPage, SHARDS, StoreClock,
    StoreError, TaskId, TaskPage, TaskRecord, TaskState,
};

/// When a state change counts as acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// As soon as Redis has applied the script. An explicit opt-out: a Redis
    /// crash may lose acknowledged changes (a completed task may come back
    /// active). Logged loudly at start.
    None,
    /// Once the change is on the Redis node's disk: on Redis 7.2 and newer
    /// `WAITAOF 1 0` after each change (needs `appendonly yes`); on older Redis
    /// `appendonly yes` with `appendfsync always` (Redis fsyncs before it replies).
    Fsync,
    /// Once this many replicas acknowledged the change (`WAIT N timeout`).
    Replicas(u32),
}

impl Durability {
    /// Parses `none`, `fsync` or `replicas = N` (N ≥ 1; spaces optional).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "none" => Some(Self::None),
            "fsync" => Some(Self::Fsync),
            other => {
                let (key, n) = other.split_once('=')?;
                if key.trim() != "replicas" {
                    return None;
                }
                let n: u32 = n.trim().parse().ok()?;
                (n >= 1).then_some(Self::Replicas(n))
            }
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Fsync => f.write_str("fsync"),
            Self::Replicas(n) => write!(f, "replicas = {n}"),
        }
    }
}

/// Options for [`RedisStore::connect`].
#[derive(Debug, Clone)]
pub struct RedisStoreOptions {
    /// Key prefix; brokers sharing a prefix share state.
    pub prefix: String,
    /// Bound on connecting and on each command; past it the call fails UNAVAILABLE.
    pub timeout: Duration,
    /// How long ended tasks stay readable after they end.
    pub retention: Duration,
    /// When a state change counts as acknowledged.
    pub durability: Durability,
    /// Whose clock decides deadlines; [`StoreClock::Store`] in production.
    pub clock: StoreClock,
    /// This replica's clock, to learn how far Redis's clock is from it.
    pub local_clock: Arc<dyn crate::clock::Clock>,
    /// How much of the audit trail each stream keeps, and for how long.
    pub audit: AuditRetention,
}

/// What a check of the Redis server found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    /// `redis_version` as (major, minor, patch).
    pub version: (u32, u32, u32),
    /// `maxmemory-policy`.
    pub maxmemory_policy: String,
    /// `appendonly`.
    pub appendonly: bool,
    /// `appendfsync`.
    pub appendfsync: String,
}

impl ServerFacts {
    /// True if the server has `WAITAOF` (Redis 7.2 and newer).
    pub fn has_waitaof(&self) -> bool {
        self.version >= (7, 2, 0)
    }

    /// Every reason this server cannot give Leash's guarantees with `durability`.
    pub fn problems(&self, durability: Durability) -> Vec<String> {
        let mut out = Vec::new();
        let (major, minor, patch) = self.version;
        if self.version < (7, 0, 0) {
            out.push(format!(
                "Redis {major}.{minor}.{patch} is older than 7.0, whose streams cannot report trimmed revocation history; upgrade Redis"
            ));
        }
        if self.maxmemory_policy != "noeviction" {
            out.push(format!(
                "maxmemory-policy is {:?}: Redis could evict leases and revocation records; set maxmemory-policy noeviction",
                self.maxmemory_policy
            ));
        }
        if durability == Durability::Fsync {
            if !self.appendonly {
                out.push(
                    "store.durability = \"fsync\" needs appendonly yes on the Redis server (or choose \"replicas = N\", or \"none\" to opt out)".to_owned(),
                );
            } else if !self.has_waitaof() && self.appendfsync != "always" {
                out.push(format!(
                    "store.durability = \"fsync\" on Redis {major}.{minor} (no WAITAOF) needs appendfsync always, not {:?}",
                    self.appendfsync
                ));
            }
        }
        out
    }
}

/// A [`LeaseStore`] on a single Redis node (or a Sentinel-managed master).
///
/// The connection is made lazily and remade after errors: an unreachable Redis
/// makes calls fail with [`StoreError::Unavailable`] until it is back, without
/// restarting the broker.
#[derive(Clone)]
pub struct RedisStore {
    conn: Link,
    /// State changes and their WAIT/WAITAOF go on a connection of their own, so
    /// a slow acknowledgement never holds up reads (introspection).
    writes: Link,
    target: Target,
    /// Redis Cluster: every command stays on one slot (see the module docs).
    cluster: bool,
    /// Redis Cluster: one watcher per shard wakes waiting revocation reads.
    bells: Option<Arc<super::bells::Bells>>,
    timeout: Duration,
    /// A connection of its own for blocking stream reads, which would stall
    /// every other call on the shared multiplexed connection.
    feed: Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    prefix: String,
    retention_ms: u64,
    durability: Durability,
    clock: StoreClock,
    /// The last passing server check; `None` until one passes, and again after
    /// one fails.
    facts: Arc<RwLock<Option<ServerFacts>>>,
    /// This replica's clock and how far Redis's clock is ahead of it (ms),
    /// learned from `TIME` at every check and from every script reply.
    local_clock: Arc<dyn crate::clock::Clock>,
    offset_ms: Arc<AtomicI64>,
    scripts: Arc<Scripts>,
    audit: AuditRetention,
}

impl fmt::Debug for RedisStore {
    // The connection holds the URL, which may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    begin: Script,
    renew: Script,
    complete: Script,
    read_credential: Script,
    reap: Script,
    log_end: Script,
    read_log: Script,
    delegate: Script,
    redeem: Script,
    approve: Script,
    revoke: Script,
    kill: Script,
    audit_append: Script,
    audit_trace: Script,
    quota: Script,
}

const PRELUDE: &str = include_str!("lua/prelude.lua");
const AUDIT: &str = include_str!("lua/audit.lua");

/// A script that records what it changes in the audit trail: ARGV[2] is its
/// audit context (see `audit.lua`), taken out before the body reads ARGV.
fn audited_script(body: &str) -> Script {
    prelude_script("local AUD = cjson.decode(table.remove(ARGV, 2))", body)
}

/// A script that reads a task as the write scripts do (clock, task fields,
/// reply shape) and records nothing: only the prelude's first part, up to the
/// audit functions, so a read does not pay for defining what it never calls.
fn read_script(body: &str) -> Script {
    let core = PRELUDE.split("__AUDIT__").next().unwrap_or(PRELUDE);
    Script::new(&format!("{core}\n{body}"))
}

/// The shared prelude (with its constants and the audit functions) and the body.
fn prelude_script(context: &str, body: &str) -> Script {
    let prelude = PRELUDE
        .replace("__AUDIT__", AUDIT)
        .replace(
            "__MAXDEPTH__",
            &crate::templates::MAX_DELEGATION_DEPTH.to_string(),
        )
        .replace("__GRACE__", &REVOCATION_GRACE_MS.to_string())
        .replace("__PAGE__", &PRUNE_PAGE.to_string());
    let body = body
        .replace("__CONC__", &super::CONCURRENCY_RETRY_MS.to_string())
        .replace("__MAXKIDS__", &MAX_CHILDREN.to_string())
        .replace("__MAXKILL__", &MAX_KILL_SWITCHES.to_string());
    let script = format!("{context}\n{prelude}\n{body}")
        .replace("__MAXDESC__", &MAX_DESCENDANTS.to_string());
    Script::new(&script)
}

impl Scripts {
    fn new() -> Self {
        Self {
            log_end: Script::new(include_str!("lua/log_end.lua")),
            read_log: Script::new(include_str!("lua/read_log.lua")),
            begin: audited_script(include_str!("lua/begin.lua")),
            renew: audited_script(include_str!("lua/renew.lua")),
            complete: audited_script(include_str!("lua/complete.lua")),
            read_credential: read_script(include_str!("lua/read_credential.lua")),
            reap: audited_script(include_str!("lua/reap.lua")),
            delegate: audited_script(include_str!("lua/delegate.lua")),
            redeem: audited_script(include_str!("lua/redeem.lua")),
            approve: audited_script(include_str!("lua/approve.lua")),
            revoke: audited_script(include_str!("lua/revoke.lua")),
            kill: audited_script(include_str!("lua/kill.lua")),
            audit_append: audited_script(include_str!("lua/audit_append.lua")),
            audit_trace: Script::new(include_str!("lua/audit_trace.lua")),
            quota: read_script(include_str!("lua/quota.lua")),
        }
    }
}

fn unavailable(e: &redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {}", e.kind_description()))
}

/// A failed state change: unchanged only if the request never reached Redis or
/// Redis refused it before running it; otherwise the outcome is unknown.
fn write_failed(e: &redis::RedisError) -> StoreError {
    let refused_before_running = e.is_connection_refusal()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        );
    if refused_before_running {
        unavailable(e)
    } else {
        StoreError::OutcomeUnknown(format!(
            "redis: {}; the change may or may not have been applied",
            e.kind_description()
        ))
    }
}

trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for redis::RedisError {
    // The error's Display may carry the server address; the kind and category
    // are enough for a client-facing message, and the detail goes to the log.
    fn kind_description(&self) -> String {
        tracing::debug!(error = %self, "redis call failed");
        let detail = self.to_string();
        if self.is_timeout() {
            "timed out".to_owned()
        } else if matches!(self.kind(), redis::ErrorKind::AuthenticationFailed)
            || self.code() == Some("WRONGPASS")
        {
            "authentication failed (check [store] username and password_file)".to_owned()
        } else if self.code() == Some("NOAUTH") {
            "the server requires authentication ([store] username and password_file)".to_owned()
        } else if self.code() == Some("NOPERM") {
            "NOPERM: the ACL user may not run a command or touch a key the store needs (README, Redis ACL)".to_owned()
        } else if detail.contains("certificate") || detail.contains("Certificate") {
            "TLS: the server's certificate is not trusted ([store] ca_file) or does not name it"
                .to_owned()
        } else if self.is_connection_refusal() || self.is_io_error() || self.is_connection_dropped()
        {
            "connection failed".to_owned()
        } else {
            format!("{:?}", self.kind())
        }
    }
}

/// One stream entry as Redis answers it: its id and its field-value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// The refusal of a script that could not write the audit trail (and so
/// changed nothing): unavailable, like a store that cannot be written.
fn audit_refusal(reply: &[Option<String>]) -> Result<(), StoreError> {
    if reply.first().and_then(Option::as_deref) != Some("unaudited") {
        return Ok(());
    }
    let field = |i: usize| reply.get(i).and_then(Option::as_deref).unwrap_or("?");
    tracing::error!(key = field(1), holds = field(2), "audit stream unwritable");
    Err(StoreError::Unavailable(format!(
        "the audit trail cannot be written ({} holds a {}); nothing was changed",
        field(1),
        field(2)
    )))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// The task hash fields every script returns, in this order (`FIELDS` in
/// `lua/prelude.lua`).
const TASK_FIELDS: [&str; 11] = [
    "rec", "state", "deadline", "ended", "outcome", "max", "appr", "appr_dl", "appr_by",
    "appr_why", "appr_at",
];

/// Index of the time a script decided at in its reply (after the status and
/// the task fields).
const DECIDED_AT: usize = TASK_FIELDS.len() + 1;

/// Rebuilds a task record from the stored fields (TASK_FIELDS order).
fn task_from_fields(fields: &[Option<String>]) -> Result<TaskRecord, StoreError> {
    let field = |i: usize| fields.get(i).and_then(Option::as_deref);
    let rec = field(0).ok_or_else(|| corrupt("task without record"))?;
    let mut task: TaskRecord =
        serde_json::from_str(rec).map_err(|e| corrupt(&format!("task record: {e}")))?;
    task.state = field(1)
        .and_then(TaskState::parse)
        .ok_or_else(|| corrupt("task state"))?;
    task.lease_deadline_ms = field(2)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("task deadline"))?;
    task.ended_at_ms = field(3)
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse().ok());
    task.outcome = field(4).filter(|s| !s.is_empty()).map(str::to_owned);
    if let Some(max) = field(5).and_then(|s| s.parse().ok()) {
        task.max_deadline_ms = max;
    }
    if let Some(approval) = &mut task.approval {
        let status = &mut approval.status;
        status.state = field(6)
            .and_then(ApprovalState::parse)
            .ok_or_else(|| corrupt("approval state"))?;
        status.deadline_ms = field(7).and_then(|s| s.parse().ok()).unwrap_or(0);
        status.decided_by = field(8).map(str::to_owned);
        status.reason = field(9).map(str::to_owned);
        status.decided_at_ms = field(10).and_then(|s| s.parse().ok());
    }
    Ok(task)
}

/// The task fields that follow the status word of a script reply.
fn task_part(reply: &[Option<String>]) -> Result<&[Option<String>], StoreError> {
    reply
        .get(1..DECIDED_AT)
        .ok_or_else(|| corrupt("short script reply"))
}

/// The time a script decided at (after the task fields).
fn decided_at(reply: &[Option<String>]) -> Result<u64, StoreError> {
    reply
        .get(DECIDED_AT)
        .and_then(Option::as_deref)
        .ok_or_else(|| corrupt("script reply without time"))
        .and_then(parse_score)
}

/// What a reply carries after its time: credential ids.
fn trailing_ids(reply: &[Option<String>]) -> Result<Vec<CredentialId>, StoreError> {
    credential_ids(reply.get(DECIDED_AT + 1..).unwrap_or_default())
}

/// One ended-task entry of a reply (`expired`, `cascade` or `revoked`): the
/// task fields, the time, the credential ids.
fn ended_entry(value: &redis::Value) -> Result<Option<EndedTask>, StoreError> {
    let entry: Vec<Option<String>> =
        redis::from_redis_value_ref(value).map_err(|_| corrupt("ended task entry"))?;
    let reason = match entry.first().and_then(Option::as_deref) {
        Some("expired") => EndReason::Expiry,
        Some("cascade") => EndReason::Cascade,
        Some("revoked") => EndReason::KillSwitch,
        _ => return Ok(None),
    };
    Ok(Some(EndedTask {
        task: task_from_fields(task_part(&entry)?)?,
        revoked: trailing_ids(&entry)?,
        reason,
    }))
}

/// A reply's leading strings (status, fields, time), from a mixed reply.
fn strings_of(values: &[redis::Value]) -> Vec<Option<String>> {
    values
        .iter()
        .map(|v| {
            redis::from_redis_value_ref::<Option<String>>(v)
                .ok()
                .flatten()
        })
        .collect()
}

fn credential_ids(items: &[Option<String>]) -> Result<Vec<CredentialId>, StoreError> {
    items
        .iter()
        .map(|c| {
            c.as_deref()
                .and_then(CredentialId::parse)
                .ok_or_else(|| corrupt("credential id"))
        })
        .collect()
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| corrupt(&format!("encode: {e}")))
}

/// Reads `redis_version` out of `INFO server`.
/// The value of `key` in an `INFO` reply (`key:value` lines).
fn info_value<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.trim()
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
    })
}

/// The persistence settings from `CONFIG GET` answers, else from
/// `INFO persistence` (for a Redis user without `CONFIG`), else why neither.
fn persistence_of(
    config: Result<(String, String, String), String>,
    info: Result<String, String>,
) -> super::Persistence {
    match (config, info) {
        (Ok((appendonly, appendfsync, save)), _) => super::Persistence::Redis {
            appendonly: appendonly == "yes",
            appendfsync,
            save: Some(save),
            source: "CONFIG GET",
        },
        (Err(config), Ok(info)) => match info_value(&info, "aof_enabled") {
            Some(aof) => super::Persistence::Redis {
                appendonly: aof.trim() == "1",
                // INFO does not tell the fsync policy.
                appendfsync: "unknown".to_owned(),
                save: None,
                source: "INFO persistence",
            },
            None => super::Persistence::Unknown(format!(
                "{config}; INFO persistence has no aof_enabled"
            )),
        },
        (Err(config), Err(info)) => super::Persistence::Unknown(format!("{config}; {info}")),
    }
}

/// The eviction policy from `CONFIG GET maxmemory-policy`, else from
/// `INFO memory`, else why neither.
fn eviction_of(config: Result<String, String>, info: Result<String, String>) -> super::Eviction {
    match (config, info) {
        (Ok(value), _) => super::Eviction::Policy {
            value,
            source: "CONFIG GET",
        },
        (Err(config), Ok(info)) => match info_value(&info, "maxmemory_policy") {
            Some(v) => super::Eviction::Policy {
                value: v.trim().to_owned(),
                source: "INFO memory",
            },
            None => {
                super::Eviction::Unknown(format!("{config}; INFO memory has no maxmemory_policy"))
            }
        },
        (Err(config), Err(info)) => super::Eviction::Unknown(format!("{config}; {info}")),
    }
}

fn parse_version(info: &str) -> Option<(u32, u32, u32)> {
    let v = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
    ))
}

impl RedisStore {
    /// Prepares a store on one Redis node at `url` (`redis://` or
    /// `rediss://`). Does not connect: the first call does, and every call
    /// after a failure retries.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the URL is malformed.
    pub fn connect(url: &str, options: RedisStoreOptions) -> Result<Self, StoreError> {
        Self::open(
            &Topology::Standalone {
                url: url.to_owned(),
            },
            &Access::default(),
            options,
        )
    }

    /// Prepares a store on `topology` (a single node, a Sentinel-managed
    /// master or a Redis Cluster), logging in with `access`. Does not connect:
    /// the first call does, and every call after a failure retries.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if an address or URL is malformed.
    pub fn open(
        topology: &Topology,
        access: &Access,
        options: RedisStoreOptions,
    ) -> Result<Self, StoreError> {
        let bad = |e: redis::RedisError| {
            StoreError::Unavailable(format!(
                "redis {} address: {}",
                topology.name(),
                e.kind_description()
            ))
        };
        let target = Target::open(topology, access, options.timeout).map_err(bad)?;
        let link = |response: Duration| {
            target
                .link(Timeouts {
                    connect: options.timeout,
                    response,
                })
                .map_err(|e| unavailable(&e))
        };
        let conn = link(options.timeout)?;
        // A WAIT may use up to half the timeout on top of the script itself.
        let writes = link(options.timeout + options.timeout / 2)?;
        let cluster = topology.is_cluster();
        let bells = cluster.then(|| {
            Arc::new(super::bells::Bells::new(
                target.clone(),
                options.prefix.clone(),
                options.timeout,
            ))
        });
        Ok(Self {
            conn,
            writes,
            target,
            cluster,
            bells,
            timeout: options.timeout,
            feed: Arc::new(tokio::sync::Mutex::new(None)),
            prefix: options.prefix,
            retention_ms: crate::clock::duration_ms(options.retention),
            durability: options.durability,
            clock: options.clock,
            facts: Arc::new(RwLock::new(None)),
            local_clock: options.local_clock,
            offset_ms: Arc::new(AtomicI64::new(0)),
            scripts: Arc::new(Scripts::new()),
            audit: options.audit,
        })
    }

    /// Learns the offset of Redis's clock from a time a script decided at.
    fn observe(&self, store_now_ms: u64) {
        if self.clock == StoreClock::Caller {
            return;
        }
        let local = i128::from(self.local_clock.now_ms());
        let offset = i128::from(store_now_ms) - local;
        let offset = i64::try_from(offset).unwrap_or(0);
        self.offset_ms.store(offset, Ordering::Relaxed);
    }

    /// Reads the time of a script reply and learns the clock offset from it.
    fn decided(&self, reply: &[Option<String>]) {
        if let Ok(t) = decided_at(reply) {
            self.observe(t);
        }
    }

    /// The durability this store confirms before acknowledging a change.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Checks the server: version, eviction policy and the persistence the
    /// configured durability needs. Remembered on success; forgotten on failure,
    /// so state changes then fail closed until a check passes.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if Redis cannot be reached;
    /// [`StoreError::Misconfigured`] listing every problem found (including a
    /// Redis user not allowed to run `INFO` or `CONFIG GET`).
    pub async fn verify(&self) -> Result<ServerFacts, StoreError> {
        let result = self.read_facts().await.and_then(|facts| {
            let problems = facts.problems(self.durability);
            if problems.is_empty() {
                Ok(facts)
            } else {
                Err(StoreError::Misconfigured(problems.join("; ")))
            }
        });
        if let Ok(mut slot) = self.facts.write() {
            *slot = result.as_ref().ok().cloned();
        }
        result
    }

    async fn read_facts(&self) -> Result<ServerFacts, StoreError> {
        let mut conn = self.conn.clone();
        let time: Vec<String> = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if let (Some(Ok(secs)), Some(Ok(micros))) = (
            time.first().map(|s| s.parse::<u64>()),
            time.get(1).map(|s| s.parse::<u64>()),
        ) {
            self.observe(secs.saturating_mul(1000).saturating_add(micros / 1000));
        }
        let refused = |what: &str, e: &redis::RedisError| {
            if matches!(e.kind(), redis::ErrorKind::Server(_)) {
                StoreError::Misconfigured(format!(
                    "the broker's Redis user may not run {what} ({}); Leash needs it to check eviction and persistence settings",
                    e.kind_description()
                ))
            } else {
                unavailable(e)
            }
        };
        // Every master is checked (one node, or each master of a cluster);
        // the facts kept are the weakest found, naming the node.
        let answers = |cmd: redis::Cmd, what: &'static str| {
            let mut conn = conn.clone();
            async move {
                let all = conn
                    .on_every_master(cmd)
                    .await
                    .map_err(|e| refused(what, &e))?;
                all.into_iter()
                    .map(|(node, v)| match v {
                        redis::Value::ServerError(e) => Err(StoreError::Misconfigured(format!(
                            "the broker's Redis user may not run {what} on {node} ({}); Leash needs it to check eviction and persistence settings",
                            e.details().unwrap_or_default()
                        ))),
                        v => Ok((node, v)),
                    })
                    .collect::<Result<Vec<_>, _>>()
            }
        };
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let mut facts: Vec<(String, ServerFacts)> = Vec::new();
        for (node, v) in answers(info, "INFO server").await? {
            let text: String = redis::from_redis_value(v).map_err(|_| {
                StoreError::Misconfigured(format!("INFO server of {node} is not text"))
            })?;
            let version = parse_version(&text).ok_or_else(|| {
                StoreError::Misconfigured(format!("INFO server of {node} has no redis_version"))
            })?;
            facts.push((
                node,
                ServerFacts {
                    version,
                    maxmemory_policy: String::new(),
                    appendonly: false,
                    appendfsync: String::new(),
                },
            ));
        }
        for name in ["maxmemory-policy", "appendonly", "appendfsync"] {
            let mut get = redis::cmd("CONFIG");
            get.arg("GET").arg(name);
            for (node, v) in answers(get, "CONFIG GET").await? {
                let pair: Vec<String> = redis::from_redis_value(v).unwrap_or_default();
                let value = pair.get(1).cloned().ok_or_else(|| {
                    StoreError::Misconfigured(format!(
                        "CONFIG GET {name} answered nothing on {node}"
                    ))
                })?;
                if let Some((_, f)) = facts.iter_mut().find(|(n, _)| *n == node) {
                    match name {
                        "maxmemory-policy" => f.maxmemory_policy = value,
                        "appendonly" => f.appendonly = value == "yes",
                        _ => f.appendfsync = value,
                    }
                }
            }
        }
        weakest(facts, self.durability)
    }

    /// `cmd`'s answer from the one node, or from a cluster's first master (in
    /// address order): what `leash doctor` reports.
    async fn first_master<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut conn = self.conn.clone();
        let mut all = conn.on_every_master(cmd).await?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        match all.into_iter().next() {
            Some((_, redis::Value::ServerError(e))) => Err(e.into()),
            Some((_, v)) => Ok(redis::from_redis_value(v)?),
            None => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no master answered",
            ))),
        }
    }

    /// One `CONFIG GET name`: `Ok(Err(why))` when Redis refuses it (ACL,
    /// renamed command), so the caller can fall back to `INFO`.
    async fn config_value(&self, name: &str) -> Result<Result<String, String>, StoreError> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        let answer: Result<Vec<String>, _> = self.first_master(cmd).await;
        match answer {
            Ok(pair) => Ok(pair
                .get(1)
                .cloned()
                .ok_or_else(|| format!("CONFIG GET {name} answered nothing"))),
            Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => Ok(Err(format!(
                "CONFIG GET {name} refused ({})",
                e.kind_description()
            ))),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// One `INFO section`: `Ok(Err(why))` when Redis refuses it.
    async fn info_section(&self, section: &str) -> Result<Result<String, String>, StoreError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        let answer: Result<String, _> = self.first_master(cmd).await;
        match answer {
            Ok(info) => Ok(Ok(info)),
            Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => Ok(Err(format!(
                "INFO {section} refused ({})",
                e.kind_description()
            ))),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// [`LeaseStore::diagnose`]: `TIME` bracketed by this replica's clock,
    /// then the settings by `CONFIG GET`, falling back to `INFO`.
    async fn diagnosis(&self) -> Result<super::StoreDiagnosis, StoreError> {
        let mut conn = self.conn.clone();
        // Connect first, so the round trip timed below is one command's.
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let sent_ms = self.local_clock.now_ms();
        let time: Vec<String> = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let received_ms = self.local_clock.now_ms();
        let clock = match (
            time.first().map(|s| s.parse::<u64>()),
            time.get(1).map(|s| s.parse::<u64>()),
        ) {
            (Some(Ok(secs)), Some(Ok(micros))) => Some(super::ClockReading {
                store_ms: secs.saturating_mul(1000).saturating_add(micros / 1000),
                sent_ms,
                received_ms,
            }),
            _ => return Err(corrupt("TIME answered no time")),
        };
        let store = match self.info_section("server").await? {
            Ok(info) => match parse_version(&info) {
                Some((major, minor, patch)) => format!("redis {major}.{minor}.{patch}"),
                None => "redis (version unknown)".to_owned(),
            },
            Err(_) => "redis (INFO refused: version unknown)".to_owned(),
        };
        let appendonly = self.config_value("appendonly").await?;
        let appendfsync = self.config_value("appendfsync").await?;
        let save = self.config_value("save").await?;
        let config = appendonly.and_then(|a| Ok((a, appendfsync?, save?)));
        let persistence = match config {
            Ok(c) => persistence_of(Ok(c), Err(String::new())),
            Err(why) => persistence_of(Err(why), self.info_section("persistence").await?),
        };
        let eviction = match self.config_value("maxmemory-policy").await? {
            Ok(v) => eviction_of(Ok(v), Err(String::new())),
            Err(why) => eviction_of(Err(why), self.info_section("memory").await?),
        };
        Ok(super::StoreDiagnosis {
            store,
            persistence,
            eviction,
            clock,
        })
    }

    /// The facts of the last passing check, checking now if there is none.
    async fn checked(&self) -> Result<ServerFacts, StoreError> {
        let known = self.facts.read().ok().and_then(|f| f.clone());
        match known {
            Some(f) => Ok(f),
            None => self.verify().await,
        }
    }

    /// ARGV[1] of every write script: the caller's time, or '' for Redis's clock.
    fn now_arg(&self, now_ms: u64) -> String {
        match self.clock {
            StoreClock::Store => String::new(),
            StoreClock::Caller => now_ms.to_string(),
        }
    }

    /// ARGV[2] of every audited script: where its shard's events go, the
    /// caller's trace id, the retention, who asked and a completion's summary.
    fn audit_arg(&self, shard: u8, by: &str, summary: &str) -> String {
        self.audit_context(shard, by, summary, self.audit.streams)
    }

    /// [`Self::audit_arg`], recording only if `record` (and the trail is on).
    fn audit_context(&self, shard: u8, by: &str, summary: &str, record: bool) -> String {
        serde_json::json!({
            "b": format!("{}:", self.tag(shard)),
            "tr": crate::audit::current_trace_id(),
            "m": self.audit.max_len,
            "age": self.audit.max_age_ms.max(1),
            "by": by,
            "sum": summary,
            "off": !(record && self.audit.streams),
        })
        .to_string()
    }

    /// `shard`'s stream of `tenant` (or of [`crate::audit::NO_TENANT`]).
    fn audit_key(&self, shard: u8, tenant: &str) -> String {
        let tenant = if tenant.is_empty() {
            crate::audit::NO_TENANT
        } else {
            tenant
        };
        format!("{}:audit:{tenant}", self.tag(shard))
    }

    fn tag(&self, shard: u8) -> String {
        format!("{{{}:s{shard:x}}}", self.prefix)
    }

    /// task, creds, cexp, cgr, deadlines, revlog, revoked.
    fn task_keys(&self, id: &TaskId) -> [String; 7] {
        let tag = self.tag(id.shard());
        [
            format!("{tag}:task:{id}"),
            format!("{tag}:creds:{id}"),
            format!("{tag}:cexp:{id}"),
            format!("{tag}:cgr:{id}"),
            format!("{tag}:deadlines"),
            format!("{tag}:revlog"),
            format!("{tag}:revoked"),
        ]
    }

    /// The base of the quota keys the ending scripts update (see the module
    /// docs); '' in a cluster, where the quota keys live in slots of their own
    /// and [`Self::release_quotas`] updates them after the script.
    fn quota_base(&self) -> String {
        if self.cluster {
            String::new()
        } else {
            format!("{}:q:", self.prefix)
        }
    }

    /// The kill switches `shard`'s scripts read: a hash `"<kind> <value>"` →
    /// kill switch JSON. On one node every shard shares `P:kill`; in a
    /// cluster each shard has its own copy in its slot, so the begin and
    /// delegate scripts stay single-slot.
    fn kill_key(&self, shard: u8) -> String {
        if self.cluster {
            format!("{}:kill", self.tag(shard))
        } else {
            format!("{}:kill", self.prefix)
        }
    }

    /// The identity prefixes among the kill switches (a set, for the begin check).
    fn kill_prefix_key(&self, shard: u8) -> String {
        if self.cluster {
            format!("{}:killpfx", self.tag(shard))
        } else {
            format!("{}:killpfx", self.prefix)
        }
    }

    /// The shards whose kill-switch copy a change writes, in order: on one
    /// node just the one shared copy; in a cluster every shard's, shard 0's
    /// last, so a switch listed (read from shard 0) is in force everywhere and
    /// a lift that fails part way leaves the switch listed and still refusing.
    fn kill_copies(&self) -> Vec<u8> {
        if self.cluster {
            (0..SHARDS).rev().collect()
        } else {
            vec![0]
        }
    }

    /// The audit context of a kill-switch change on `shard`'s copy: only the
    /// last copy (shard 0) records the event, so the trail tells it once.
    fn kill_audit_arg(&self, shard: u8) -> String {
        self.audit_context(0, "", "", shard == 0)
    }

    /// The owner, template, class and tenant a kill switch may refuse.
    fn kill_args(&self, inv: &mut redis::ScriptInvocation<'_>, task: &TaskRecord) {
        inv.arg(task.owner.as_str())
            .arg(task.template.as_str())
            .arg(task.class.as_str())
            .arg(task.tenant.as_str());
    }

    /// The kill switch a `killed` reply names.
    fn killed_reply(&self, reply: &[Option<String>]) -> Result<Option<KillSwitch>, StoreError> {
        if reply.first().and_then(Option::as_deref) != Some("killed") {
            return Ok(None);
        }
        let field = |i: usize| reply.get(i).and_then(Option::as_deref).unwrap_or_default();
        if let Ok(t) = parse_score(field(3)) {
            self.observe(t);
        }
        // An unreadable record still refuses: the kind and value say which switch.
        let mut switch: KillSwitch = serde_json::from_str(field(4)).unwrap_or_default();
        switch.kind = field(1).to_owned();
        switch.value = field(2).to_owned();
        Ok(Some(switch))
    }

    fn revlog_key(&self, shard: u8) -> String {
        format!("{}:revlog", self.tag(shard))
    }

    /// The shards that one multi-key step may cover together: all of them on
    /// one node, one at a time in a cluster (each shard is its own slot).
    fn shard_groups(&self) -> Vec<Vec<u8>> {
        if self.cluster {
            (0..SHARDS).map(|s| vec![s]).collect()
        } else {
            vec![(0..SHARDS).collect()]
        }
    }

    /// Runs the commands `cmds` gives for each shard, in shard order: one
    /// pipeline on one node, one pipeline per shard (concurrently) in a cluster.
    async fn per_shard<T: redis::FromRedisValue>(
        &self,
        cmds: impl Fn(u8) -> Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        let runs = self.shard_groups().into_iter().map(|group| {
            let mut pipe = redis::pipe();
            for shard in group {
                for c in cmds(shard) {
                    pipe.add_command(c);
                }
            }
            let mut conn = self.conn.clone();
            async move { pipe.query_async::<Vec<T>>(&mut conn).await }
        });
        let mut out = Vec::new();
        for r in futures_util::future::join_all(runs).await {
            out.extend(r.map_err(|e| unavailable(&e))?);
        }
        Ok(out)
    }

    /// The gap check and the read of every shard's log after `after`
    /// (`lua/read_log.lua`): one script for all shards on one node, one per
    /// shard in a cluster. A gap in any shard is a gap.
    async fn read_log(
        &self,
        after: &RevocationCursor,
        limit: usize,
    ) -> Result<RevocationRead, StoreError> {
        let reads = self
            .shard_groups()
            .into_iter()
            .map(|group| self.read_log_of(after, group, limit));
        let mut cursor = after.clone();
        let mut records = Vec::new();
        for read in futures_util::future::join_all(reads).await {
            let Some(part) = read? else {
                return Ok(RevocationRead::Gap);
            };
            for r in part {
                cursor.advance(r.position.0, r.position.1);
                records.push(r);
            }
        }
        Ok(RevocationRead::Records(records, cursor))
    }

    /// [`Self::read_log`] of some shards in one script; `None` is a gap.
    async fn read_log_of(
        &self,
        after: &RevocationCursor,
        shards: Vec<u8>,
        limit: usize,
    ) -> Result<Option<Vec<RevocationRecord>>, StoreError> {
        let mut inv = self.scripts.read_log.prepare_invoke();
        for &shard in &shards {
            inv.key(self.revlog_key(shard));
        }
        for &shard in &shards {
            let id = after.0.get(usize::from(shard)).copied().unwrap_or_default();
            inv.arg(id.to_string());
        }
        inv.arg(limit.max(1));
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut parts = reply.into_iter();
        let status: String = parts
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .ok_or_else(|| corrupt("revocation read"))?;
        if status == "gap" {
            return Ok(None);
        }
        let mut records = Vec::new();
        for (&shard, part) in shards.iter().zip(parts) {
            let range: redis::streams::StreamRangeReply =
                redis::from_redis_value(part).map_err(|_| corrupt("revocation entries"))?;
            for entry in range.ids {
                let pos = LogId::parse(&entry.id).ok_or_else(|| corrupt("stream id"))?;
                let field = |name: &str| -> Result<String, StoreError> {
                    entry
                        .map
                        .get(name)
                        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                        .ok_or_else(|| corrupt("revocation entry"))
                };
                records.push(RevocationRecord {
                    credential_id: CredentialId::parse(&field("c")?)
                        .ok_or_else(|| corrupt("revocation entry id"))?,
                    expires_at_ms: parse_score(&field("e")?)?,
                    revoked_at_ms: parse_score(&field("a")?)?,
                    // Entries logged before the field existed: due when revoked.
                    due_ms: match field("d") {
                        Ok(d) => parse_score(&d)?,
                        Err(_) => parse_score(&field("a")?)?,
                    },
                    reason: EndReason::parse(&field("r")?).ok_or_else(|| corrupt("reason"))?,
                    audience: field("u").unwrap_or_default(),
                    tenant: field("t").unwrap_or_default(),
                    position: (shard, pos),
                });
            }
        }
        Ok(Some(records))
    }

    /// A quota subject's keys in a cluster: the live-task set and the token
    /// bucket, in a slot of their own (hash tag: prefix, kind and subject), so
    /// the quotas of different identities and classes spread over the slots.
    fn cluster_quota_keys(&self, subject: &str) -> (String, String) {
        let live = format!("{{{}:q:{subject}}}", self.prefix);
        let rate = format!("{live}:rate");
        (live, rate)
    }

    /// Counts `task` against one quota subject (cluster only, `op`
    /// `reserve`), or undoes that for a begin then refused (`refund`); `Some`
    /// answers a refusal.
    async fn quota_step(
        &self,
        op: &str,
        task: &TaskRecord,
        subject: &str,
        limit: Option<u64>,
        bucket: Option<super::Bucket>,
        kinds: (QuotaKind, QuotaKind),
    ) -> Result<Option<BeginOutcome>, StoreError> {
        if limit.is_none() && bucket.is_none() {
            return Ok(None);
        }
        let (live, rate) = self.cluster_quota_keys(subject);
        let mut inv = self.scripts.quota.prepare_invoke();
        inv.key(&live)
            .key(&rate)
            .arg(self.now_arg(task.created_at_ms))
            .arg(op)
            .arg(task.id.as_str())
            .arg(task.max_deadline_ms.saturating_sub(task.created_at_ms))
            .arg(limit.map(|v| v.to_string()).unwrap_or_default());
        match bucket {
            Some(b) => inv.arg(b.burst).arg(format!("{:.3}", b.refill_ms.max(1.0))),
            None => inv.arg("").arg(""),
        };
        inv.arg(kinds.0.as_str())
            .arg(kinds.1.as_str())
            .arg(super::CONCURRENCY_RETRY_MS);
        let reply: Vec<Option<String>> = self.run_write(&live, &mut inv).await?;
        let field = |i: usize| reply.get(i).and_then(Option::as_deref);
        match field(0) {
            Some("ok") => {
                if let Some(t) = field(1).and_then(|t| parse_score(t).ok()) {
                    self.observe(t);
                }
                Ok(None)
            }
            Some("exhausted") => {
                if let Some(t) = field(3).and_then(|t| parse_score(t).ok()) {
                    self.observe(t);
                }
                Ok(Some(BeginOutcome::Exhausted {
                    quota: field(1)
                        .and_then(QuotaKind::parse)
                        .ok_or_else(|| corrupt("quota reply"))?,
                    retry_after_ms: field(2).map_or(Ok(0), parse_score)?,
                }))
            }
            _ => Err(corrupt("quota reply")),
        }
    }

    /// Stops counting ended tasks against their owners' and classes' live-task
    /// quotas (cluster only; on one node the ending scripts do it). A failure
    /// is logged, not returned: the task has ended, and its entry lapses at
    /// its max lifetime anyway, so a lost release only denies, never admits.
    async fn release_quotas(&self, tasks: Vec<&TaskRecord>) {
        if !self.cluster {
            return;
        }
        for task in tasks {
            let (id_key, class_key) = super::memory::quota_keys(task);
            for subject in [id_key, class_key] {
                let (live, _) = self.cluster_quota_keys(&subject);
                let mut conn = self.writes.clone();
                let done: Result<i64, _> = redis::cmd("ZREM")
                    .arg(&live)
                    .arg(task.id.as_str())
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = done {
                    tracing::warn!(task = %task.id, error = %e.kind_description(),
                        "quota release failed; the entry lapses at the task's max lifetime");
                }
            }
        }
    }

    /// Begin on a cluster: the quotas first, each in its own slot, then the
    /// begin script in the task's slot. A refused begin gives back what it
    /// counted (and the tokens it spent); a begin whose outcome is unknown
    /// keeps it (it may have begun), and the entry lapses at the task's max
    /// lifetime.
    async fn begin_in_cluster(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
        quota: BeginQuota,
    ) -> Result<BeginOutcome, StoreError> {
        let limited = quota.identity_max_live.is_some()
            || quota.class_max_live.is_some()
            || quota.identity_rate.is_some()
            || quota.class_rate.is_some();
        if !limited {
            return self.begin_script(task, credentials, quota).await;
        }
        // A replay is answered whatever the quotas, as on one node.
        if let Some(stored) = self.task(&task.id).await? {
            return Ok(BeginOutcome::Existing(Box::new(stored)));
        }
        let (id_key, class_key) = super::memory::quota_keys(task);
        let subjects = [
            (
                id_key,
                quota.identity_max_live,
                quota.identity_rate,
                (QuotaKind::IdentityTasks, QuotaKind::IdentityRate),
            ),
            (
                class_key,
                quota.class_max_live,
                quota.class_rate,
                (QuotaKind::ClassTasks, QuotaKind::ClassRate),
            ),
        ];
        let refund = |counted: usize| {
            let subjects = &subjects;
            async move {
                for (subject, limit, bucket, kinds) in subjects.iter().take(counted) {
                    let undone = self
                        .quota_step("refund", task, subject, *limit, *bucket, *kinds)
                        .await;
                    if let Err(e) = undone {
                        tracing::warn!(task = %task.id, error = %e,
                            "quota refund failed; the entry lapses at the task's max lifetime");
                    }
                }
            }
        };
        for (i, (subject, limit, bucket, kinds)) in subjects.iter().enumerate() {
            match self
                .quota_step("reserve", task, subject, *limit, *bucket, *kinds)
                .await
            {
                Ok(None) => {}
                Ok(Some(refused)) => {
                    refund(i).await;
                    return Ok(refused);
                }
                Err(e) => {
                    refund(i).await;
                    return Err(e);
                }
            }
        }
        let outcome = self
            .begin_script(task, credentials, BeginQuota::default())
            .await;
        match &outcome {
            Ok(BeginOutcome::Created(_) | BeginOutcome::Existing(_)) => {}
            // Refused, or nothing changed: the task did not begin.
            Ok(_) | Err(StoreError::Unavailable(_)) => refund(subjects.len()).await,
            Err(_) => {}
        }
        outcome
    }

    /// The begin script (on one node it also checks and counts the quotas).
    async fn begin_script(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
        quota: BeginQuota,
    ) -> Result<BeginOutcome, StoreError> {
        let keys = self.task_keys(&task.id);
        let mut inv = self.scripts.begin.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        if self.cluster {
            // Quotas were counted in their own slots; these keys are never
            // touched (every limit is ''), only declared in the task's slot.
            let tag = self.tag(task.id.shard());
            for part in ["q-id", "q-class", "q-rate-id", "q-rate-class"] {
                inv.key(format!("{tag}:{part}"));
            }
        } else {
            let base = self.quota_base();
            let (id_key, class_key) = super::memory::quota_keys(task);
            inv.key(format!("{base}{id_key}"))
                .key(format!("{base}{class_key}"))
                .key(format!("{base}rate:{id_key}"))
                .key(format!("{base}rate:{class_key}"));
        }
        inv.key(self.kill_key(task.id.shard()))
            .key(self.kill_prefix_key(task.id.shard()));
        inv.arg(self.now_arg(task.created_at_ms))
            .arg(self.audit_arg(task.id.shard(), "", ""))
            .arg(to_json(task)?)
            .arg(task.lease_deadline_ms.saturating_sub(task.created_at_ms))
            .arg(task.max_deadline_ms.saturating_sub(task.created_at_ms))
            .arg(self.retention_ms)
            .arg(task.id.as_str())
            .arg(MAX_LIVE_CREDENTIALS_PER_GRANT)
            .arg(REVOCATION_LOG_MAX);
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        inv.arg(opt(quota.identity_max_live))
            .arg(opt(quota.class_max_live));
        for bucket in [quota.identity_rate, quota.class_rate] {
            match bucket {
                Some(b) => inv.arg(b.burst).arg(format!("{:.3}", b.refill_ms.max(1.0))),
                None => inv.arg("").arg(""),
            };
        }
        inv.arg(
            task.approval
                .as_ref()
                .map(|a| a.validity_ms.to_string())
                .unwrap_or_default(),
        );
        self.kill_args(&mut inv, task);
        push_credentials(&mut inv, credentials)?;
        let reply: Vec<Option<String>> = self.run_write(&keys[0], &mut inv).await?;
        audit_refusal(&reply)?;
        if let Some(k) = self.killed_reply(&reply)? {
            return Ok(BeginOutcome::Killed(k));
        }
        if reply.first().and_then(Option::as_deref) == Some("exhausted") {
            let field = |i: usize| reply.get(i).and_then(Option::as_deref);
            if let Some(t) = field(3).and_then(|t| parse_score(t).ok()) {
                self.observe(t);
            }
            return Ok(BeginOutcome::Exhausted {
                quota: field(1)
                    .and_then(QuotaKind::parse)
                    .ok_or_else(|| corrupt("begin quota reply"))?,
                retry_after_ms: field(2).map_or(Ok(0), parse_score)?,
            });
        }
        self.decided(&reply);
        let stored = Box::new(task_from_fields(task_part(&reply)?)?);
        match reply.first().and_then(Option::as_deref) {
            Some("created") => Ok(BeginOutcome::Created(stored)),
            Some("existing") => Ok(BeginOutcome::Existing(stored)),
            _ => Err(corrupt("begin reply")),
        }
    }

    /// Runs a blocking command on the dedicated feed connection, bounded by
    /// `wait` plus the store timeout; the connection is remade after any error.
    async fn blocking_query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        wait: Duration,
    ) -> Result<T, StoreError> {
        let mut slot = self.feed.lock().await;
        let conn = match slot.take() {
            Some(c) => c,
            None => self
                .target
                .blocking_connection(self.timeout)
                .await
                .map_err(|e| unavailable(&e))?,
        };
        let mut conn = conn;
        match tokio::time::timeout(wait + self.timeout, cmd.query_async(&mut conn)).await {
            Ok(Ok(v)) => {
                *slot = Some(conn);
                Ok(v)
            }
            Ok(Err(e)) => Err(unavailable(&e)),
            Err(_) => Err(StoreError::Unavailable("redis: timed out".into())),
        }
    }

    async fn run(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))
    }

    /// Runs a state-changing script, then confirms its durability: the reply is
    /// returned only once the change is as durable as configured. `slot_key`
    /// is a key of the script's slot (its shard tag will do): in a cluster the
    /// confirmation must reach the node the script ran on.
    async fn run_write<T: redis::FromRedisValue>(
        &self,
        slot_key: &str,
        invocation: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let facts = self.checked().await?;
        let mut conn = self.writes.clone();
        let reply = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        self.confirm(&mut conn, slot_key, &facts).await?;
        Ok(reply)
    }

    async fn confirm(
        &self,
        conn: &mut Link,
        slot_key: &str,
        facts: &ServerFacts,
    ) -> Result<(), StoreError> {
        let wait_ms = crate::clock::duration_ms(self.timeout / 2).max(1);
        let unknown = |what: String| {
            StoreError::OutcomeUnknown(format!(
                "the change was applied but {what} within {wait_ms} ms"
            ))
        };
        match self.durability {
            // appendfsync always (checked): Redis fsyncs before it replies.
            Durability::None => Ok(()),
            Durability::Fsync if !facts.has_waitaof() => Ok(()),
            Durability::Fsync => {
                let mut cmd = redis::cmd("WAITAOF");
                cmd.arg(1).arg(0).arg(wait_ms);
                let acks: Vec<i64> = conn
                    .query_at(slot_key, cmd)
                    .await
                    .map_err(|e| write_failed(&e))?;
                if acks.first().copied().unwrap_or(0) >= 1 {
                    Ok(())
                } else {
                    Err(unknown("was not confirmed on disk (WAITAOF)".into()))
                }
            }
            Durability::Replicas(n) => {
                let mut cmd = redis::cmd("WAIT");
                cmd.arg(n).arg(wait_ms);
                let acked: i64 = conn
                    .query_at(slot_key, cmd)
                    .await
                    .map_err(|e| write_failed(&e))?;
                if acked >= i64::from(n) {
                    Ok(())
                } else {
                    Err(unknown(format!(
                        "only {acked} of {n} replicas acknowledged it"
                    )))
                }
            }
        }
    }
}

/// The facts of the master with the most problems for `durability` (the
/// first one if none has any), so one bad node of a cluster fails the check;
/// its problems name it.
fn weakest(
    facts: Vec<(String, ServerFacts)>,
    durability: Durability,
) -> Result<ServerFacts, StoreError> {
    let several = facts.len() > 1;
    let mut worst: Option<(usize, String, ServerFacts)> = None;
    for (node, f) in facts {
        let n = f.problems(durability).len();
        if worst.as_ref().is_none_or(|(w, _, _)| n > *w) {
            worst = Some((n, node, f));
        }
    }
    let (problems, node, f) =
        worst.ok_or_else(|| StoreError::Unavailable("redis: no master answered".into()))?;
    if problems > 0 && several {
        let mut lines = f.problems(durability);
        for l in &mut lines {
            *l = format!("{node}: {l}");
        }
        return Err(StoreError::Misconfigured(lines.join("; ")));
    }
    Ok(f)
}

/// `s` with the glob characters of a Redis MATCH pattern escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Reads a sorted-set score or numeric field written from an integer.
fn parse_score(s: &str) -> Result<u64, StoreError> {
    if let Ok(v) = s.parse::<u64>() {
        return Ok(v);
    }
    // Redis may render a large score as a float ("1.7e12").
    match s.parse::<f64>() {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked finite and non-negative; ms timestamps fit"
        )]
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(f as u64),
        _ => Err(corrupt("numeric field")),
    }
}

fn push_credentials(
    inv: &mut redis::ScriptInvocation<'_>,
    credentials: &[CredentialRecord],
) -> Result<(), StoreError> {
    for c in credentials {
        inv.arg(c.id.as_str())
            .arg(to_json(c)?)
            .arg(c.expires_at_ms)
            .arg(c.grant.as_str());
    }
    Ok(())
}

/// Reads one entry of a reap reply: an expired task, or a skipped id.
fn reaped_entry(value: &redis::Value, out: &mut Reaped) -> Result<(), StoreError> {
    let entry: Vec<Option<String>> =
        redis::from_redis_value_ref(value).map_err(|_| corrupt("reap entry"))?;
    match entry.first().and_then(Option::as_deref) {
        Some("skipped") => {
            let field = |i: usize| entry.get(i).cloned().flatten().unwrap_or_default();
            out.skipped.push((field(1), field(2)));
            Ok(())
        }
        _ => match ended_entry(value)? {
            Some(ended) => {
                out.expired.push(ended);
                Ok(())
            }
            None => Err(corrupt("reap entry")),
        },
    }
}

impl LeaseStore for RedisStore {
    #[tracing::instrument(skip_all, name = "store.begin")]
    async fn begin_with_quota(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
        quota: BeginQuota,
    ) -> Result<BeginOutcome, StoreError> {
        if self.cluster {
            return self.begin_in_cluster(task, credentials, quota).await;
        }
        self.begin_script(task, credentials, quota).await
    }

    #[tracing::instrument(skip_all, name = "store.task")]
    async fn task(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let [k_task, ..] = self.task_keys(task_id);
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&k_task)
            .arg(&TASK_FIELDS)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if fields.first().is_none_or(Option::is_none) {
            return Ok(None);
        }
        task_from_fields(&fields).map(Some)
    }

    #[tracing::instrument(skip_all, name = "store.renew")]
    async fn renew(
        &self,
        task_id: &TaskId,
        renewal: Renewal<'_>,
    ) -> Result<RenewOutcome, StoreError> {
        let keys = self.task_keys(task_id);
        let mut inv = self.scripts.renew.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(self.now_arg(renewal.now_ms))
            .arg(self.audit_arg(task_id.shard(), "", ""))
            .arg(renewal.extend_by_ms)
            .arg(
                renewal
                    .min_interval_ms
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            )
            .arg(MAX_LIVE_CREDENTIALS_PER_GRANT)
            .arg(REVOCATION_LOG_MAX)
            .arg(task_id.as_str())
            .arg(if renewal.redeems_approval { "1" } else { "" });
        push_credentials(&mut inv, renewal.credentials)?;
        let reply: Vec<Option<String>> = self.run_write(&keys[0], &mut inv).await?;
        audit_refusal(&reply)?;
        self.decided(&reply);
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(RenewOutcome::NotFound),
            Some("toosoon") => Ok(RenewOutcome::TooSoon {
                retry_after_ms: reply
                    .get(1)
                    .and_then(Option::as_deref)
                    .map_or(Ok(0), parse_score)?,
            }),
            Some("inactive") => Ok(RenewOutcome::NotActive(task_from_fields(task_part(
                &reply,
            )?)?)),
            Some("lapsed") => Ok(RenewOutcome::ApprovalLapsed(task_from_fields(task_part(
                &reply,
            )?)?)),
            Some("renewed") => Ok(RenewOutcome::Renewed {
                task: task_from_fields(task_part(&reply)?)?,
                rotated: trailing_ids(&reply)?,
            }),
            _ => Err(corrupt("renew reply")),
        }
    }

    #[tracing::instrument(skip_all, name = "store.complete")]
    async fn complete_with_summary(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
        summary: &str,
    ) -> Result<CompleteOutcome, StoreError> {
        let keys = self.task_keys(task_id);
        let mut inv = self.scripts.complete.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(self.now_arg(now_ms))
            .arg(self.audit_arg(task_id.shard(), "", summary))
            .arg(outcome)
            .arg(task_id.as_str())
            .arg(REVOCATION_LOG_MAX)
            .arg(self.retention_ms.max(1))
            .arg(self.quota_base())
            .arg(format!("{}:", self.tag(task_id.shard())));
        let values: Vec<redis::Value> = self.run_write(&keys[0], &mut inv).await?;
        let head = strings_of(values.get(..=DECIDED_AT).unwrap_or(&values));
        audit_refusal(&head)?;
        self.decided(&head);
        match head.first().and_then(Option::as_deref) {
            Some("missing") => Ok(CompleteOutcome::NotFound),
            Some("ended") => Ok(CompleteOutcome::AlreadyEnded(task_from_fields(task_part(
                &head,
            )?)?)),
            Some("done") => {
                let ids: Vec<Option<String>> = values
                    .get(DECIDED_AT + 1)
                    .map(redis::from_redis_value_ref)
                    .transpose()
                    .map_err(|_| corrupt("complete reply ids"))?
                    .unwrap_or_default();
                let mut descendants = Vec::new();
                for v in values.iter().skip(DECIDED_AT + 2) {
                    descendants.extend(ended_entry(v)?);
                }
                let task = task_from_fields(task_part(&head)?)?;
                let mut ended = vec![&task];
                ended.extend(descendants.iter().map(|d| &d.task));
                self.release_quotas(ended).await;
                Ok(CompleteOutcome::Ended {
                    task,
                    revoked: credential_ids(&ids)?,
                    descendants,
                })
            }
            _ => Err(corrupt("complete reply")),
        }
    }

    #[tracing::instrument(skip_all, name = "store.credential")]
    async fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
        now_ms: u64,
    ) -> Result<Option<CredentialView>, StoreError> {
        let [k_task, k_creds, ..] = self.task_keys(task_id);
        let mut inv = self.scripts.read_credential.prepare_invoke();
        inv.key(&k_task)
            .key(&k_creds)
            .arg(self.now_arg(now_ms))
            .arg(credential_id.as_str());
        let reply = self.run(&mut inv).await?;
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(None),
            Some("found") => {
                let task = task_from_fields(task_part(&reply)?)?;
                let now_ms = decided_at(&reply)?;
                self.observe(now_ms);
                let json = reply
                    .get(DECIDED_AT + 1)
                    .and_then(Option::as_deref)
                    .ok_or_else(|| corrupt("credential reply"))?;
                let credential = serde_json::from_str(json)
                    .map_err(|e| corrupt(&format!("credential record: {e}")))?;
                Ok(Some(CredentialView {
                    task,
                    credential,
                    now_ms,
                }))
            }
            _ => Err(corrupt("credential reply")),
        }
    }

    async fn reap(&self, shard: u8, now_ms: u64, limit: usize) -> Result<Reaped, StoreError> {
        let tag = self.tag(shard);
        let mut inv = self.scripts.reap.prepare_invoke();
        inv.key(format!("{tag}:deadlines"))
            .key(format!("{tag}:revlog"))
            .key(format!("{tag}:revoked"))
            .arg(self.now_arg(now_ms))
            .arg(self.audit_arg(shard, "", ""))
            .arg(limit.max(1))
            .arg(REVOCATION_LOG_MAX)
            .arg(self.retention_ms.max(1))
            .arg(format!("{tag}:"))
            .arg(self.quota_base());
        let reply: Vec<redis::Value> = self.run_write(&tag, &mut inv).await?;
        let mut out = Reaped {
            more: reply
                .get(1)
                .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
                == Some(1),
            ..Reaped::default()
        };
        for value in reply.iter().skip(2) {
            // One unreadable entry must not hide the others: its lease has
            // already been expired in Redis; only this report of it is lost.
            if let Err(e) = reaped_entry(value, &mut out) {
                tracing::warn!(shard, error = %e, "reaper: skipped an unreadable expired task");
                out.skipped.push((String::new(), e.to_string()));
            }
        }
        self.release_quotas(out.expired.iter().map(|e| &e.task).collect())
            .await;
        Ok(out)
    }

    async fn revocation_cursor(&self) -> Result<RevocationCursor, StoreError> {
        let mut cursor = RevocationCursor::default();
        for group in self.shard_groups() {
            let mut inv = self.scripts.log_end.prepare_invoke();
            for &shard in &group {
                inv.key(self.revlog_key(shard));
            }
            let reply = self.run(&mut inv).await?;
            for (i, &shard) in group.iter().enumerate() {
                let last = reply
                    .get(i)
                    .and_then(Option::as_deref)
                    .and_then(LogId::parse)
                    .ok_or_else(|| corrupt("revocation log id"))?;
                cursor.advance(shard, last);
            }
        }
        Ok(cursor)
    }

    async fn revoked_page(
        &self,
        shard: u8,
        from: PagePosition,
        limit: usize,
    ) -> Result<RevokedPage, StoreError> {
        let mut conn = self.conn.clone();
        let flat: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}:revoked", self.tag(shard)))
            .arg(from.min_expires_at_ms)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(from.skip)
            .arg(limit.max(1))
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut records = Vec::with_capacity(flat.len() / 2);
        let mut expiries = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [member, exp] = pair else {
                return Err(corrupt("revoked set"));
            };
            let mut parts = member.splitn(3, ' ');
            let id = parts.next().unwrap_or_default();
            let audience = parts.next().unwrap_or_default();
            let tenant = parts.next().unwrap_or_default();
            let exp = parse_score(exp)?;
            expiries.push(exp);
            records.push(RevocationRecord {
                credential_id: CredentialId::parse(id).ok_or_else(|| corrupt("revoked id"))?,
                expires_at_ms: exp,
                revoked_at_ms: 0,
                due_ms: 0,
                reason: EndReason::Completion,
                audience: audience.to_owned(),
                tenant: tenant.to_owned(),
                position: (shard, LogId::default()),
            });
        }
        Ok(RevokedPage {
            records,
            next: from.after(&expiries, limit.max(1)),
        })
    }

    async fn read_revocations(
        &self,
        after: &RevocationCursor,
        wait: Duration,
        limit: usize,
    ) -> Result<RevocationRead, StoreError> {
        // In a cluster, subscribe to the shards' bells before reading, so an
        // entry logged after the read wakes the wait below.
        let mut bell = self.bells.as_ref().map(|b| b.subscribe());
        let read = self.read_log(after, limit).await?;
        let idle = matches!(&read, RevocationRead::Records(records, _) if records.is_empty());
        if !idle || wait.is_zero() {
            return Ok(read);
        }
        if let Some(bell) = bell.as_mut() {
            // A ring is only a hint (a watcher rings when it connects, and
            // any shard's entry rings every reader): read again at each one
            // until something is there or the wait ends.
            let end = tokio::time::Instant::now() + wait;
            let mut read = read;
            loop {
                match tokio::time::timeout_at(end, bell.changed()).await {
                    Ok(Ok(())) => {}
                    Err(_) | Ok(Err(_)) => return Ok(read),
                }
                read = self.read_log(after, limit).await?;
                let idle = matches!(&read, RevocationRead::Records(r, _) if r.is_empty());
                if !idle || tokio::time::Instant::now() >= end {
                    return Ok(read);
                }
            }
        }
        // Nothing yet: block until an entry lands after the cursor (or the wait
        // ends), then read again through the script, so that what is returned
        // has passed the gap check in the same step as the read.
        let keys: Vec<String> = (0..SHARDS).map(|s| self.revlog_key(s)).collect();
        let ids: Vec<String> = after.0.iter().map(ToString::to_string).collect();
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(crate::clock::duration_ms(wait).max(1))
            .arg("STREAMS")
            .arg(&keys)
            .arg(&ids);
        let woke: Option<redis::Value> = self.blocking_query(&cmd, wait).await?;
        if woke.is_none() {
            return Ok(read);
        }
        self.read_log(after, limit).await
    }

    fn now_ms(&self, local_now_ms: u64) -> u64 {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let adjusted = i128::from(local_now_ms) + i128::from(offset);
        u64::try_from(adjusted.max(0)).unwrap_or(local_now_ms)
    }

    #[tracing::instrument(skip_all, name = "store.delegate")]
    async fn delegate(
        &self,
        child: &TaskRecord,
        handle_sha256: &str,
    ) -> Result<DelegateOutcome, StoreError> {
        let Some(parent) = child.parent.as_ref() else {
            return Err(corrupt("delegated task without parent"));
        };
        let root = child.root.as_ref().unwrap_or(parent);
        let tag = self.tag(child.id.shard());
        let mut inv = self.scripts.delegate.prepare_invoke();
        inv.key(format!("{tag}:task:{parent}"))
            .key(format!("{tag}:task:{}", child.id))
            .key(format!("{tag}:kids:{parent}"))
            .key(format!("{tag}:task:{root}"))
            .key(format!("{tag}:deadlines"))
            .key(self.kill_key(child.id.shard()))
            .key(self.kill_prefix_key(child.id.shard()));
        inv.arg(self.now_arg(child.created_at_ms))
            .arg(self.audit_arg(child.id.shard(), "", ""))
            .arg(to_json(child)?)
            .arg(child.lease_deadline_ms.saturating_sub(child.created_at_ms))
            .arg(child.max_deadline_ms.saturating_sub(child.created_at_ms))
            .arg(self.retention_ms)
            .arg(child.id.as_str())
            .arg(handle_sha256);
        self.kill_args(&mut inv, child);
        inv.arg(parent.as_str());
        let reply: Vec<Option<String>> = self.run_write(&tag, &mut inv).await?;
        audit_refusal(&reply)?;
        if let Some(k) = self.killed_reply(&reply)? {
            return Ok(DelegateOutcome::Killed(k));
        }
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(DelegateOutcome::ParentNotFound),
            Some("toomany") => Ok(DelegateOutcome::TooMany {
                bound: if reply.get(1).and_then(Option::as_deref) == Some("children") {
                    "children"
                } else {
                    "descendants"
                },
            }),
            Some("inactive") => {
                self.decided(&reply);
                Ok(DelegateOutcome::ParentNotActive(Box::new(
                    task_from_fields(task_part(&reply)?)?,
                )))
            }
            Some("created") => {
                self.decided(&reply);
                Ok(DelegateOutcome::Created(Box::new(task_from_fields(
                    task_part(&reply)?,
                )?)))
            }
            _ => Err(corrupt("delegate reply")),
        }
    }

    #[tracing::instrument(skip_all, name = "store.redeem")]
    async fn redeem(
        &self,
        record: &TaskRecord,
        handle_sha256: &str,
        now_ms: u64,
        credentials: &[CredentialRecord],
    ) -> Result<RedeemOutcome, StoreError> {
        let keys = self.task_keys(&record.id);
        let mut inv = self.scripts.redeem.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(self.now_arg(now_ms))
            .arg(self.audit_arg(record.id.shard(), "", ""))
            .arg(handle_sha256)
            .arg(to_json(record)?)
            .arg(MAX_LIVE_CREDENTIALS_PER_GRANT)
            .arg(REVOCATION_LOG_MAX)
            .arg(record.id.as_str());
        push_credentials(&mut inv, credentials)?;
        let reply: Vec<Option<String>> = self.run_write(&keys[0], &mut inv).await?;
        audit_refusal(&reply)?;
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(RedeemOutcome::NotFound),
            Some("badhandle") => Ok(RedeemOutcome::BadHandle),
            Some("inactive") => {
                self.decided(&reply);
                Ok(RedeemOutcome::NotActive(Box::new(task_from_fields(
                    task_part(&reply)?,
                )?)))
            }
            Some("redeemed") => {
                self.decided(&reply);
                Ok(RedeemOutcome::Redeemed(Box::new(task_from_fields(
                    task_part(&reply)?,
                )?)))
            }
            _ => Err(corrupt("redeem reply")),
        }
    }

    #[tracing::instrument(skip_all, name = "store.decide_approval")]
    async fn decide_approval(
        &self,
        task_id: &TaskId,
        decision: &ApprovalDecision,
        now_ms: u64,
    ) -> Result<ApprovalOutcome, StoreError> {
        let [k_task, ..] = self.task_keys(task_id);
        let mut inv = self.scripts.approve.prepare_invoke();
        inv.key(&k_task)
            .arg(self.now_arg(now_ms))
            .arg(self.audit_arg(task_id.shard(), "", ""))
            .arg(if decision.approve {
                ApprovalState::Approved.as_str()
            } else {
                ApprovalState::Denied.as_str()
            })
            .arg(decision.by.as_str())
            .arg(decision.reason.as_str())
            .arg(decision.validity_ms)
            .arg(task_id.as_str());
        let reply: Vec<Option<String>> = self.run_write(&k_task, &mut inv).await?;
        audit_refusal(&reply)?;
        self.decided(&reply);
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(ApprovalOutcome::NotFound),
            Some("notpending") => Ok(ApprovalOutcome::NotPending(Box::new(task_from_fields(
                task_part(&reply)?,
            )?))),
            Some("decided") => Ok(ApprovalOutcome::Decided(Box::new(task_from_fields(
                task_part(&reply)?,
            )?))),
            _ => Err(corrupt("approval reply")),
        }
    }

    #[tracing::instrument(skip_all, name = "store.set_kill_switch")]
    async fn set_kill_switch(&self, switch: &KillSwitch) -> Result<(), StoreError> {
        let json = to_json(switch)?;
        let mut reply = Vec::new();
        for shard in self.kill_copies() {
            let mut inv = self.scripts.kill.prepare_invoke();
            inv.key(self.kill_key(shard))
                .key(self.kill_prefix_key(shard))
                .arg(self.now_arg(switch.set_at_ms))
                .arg(self.kill_audit_arg(shard))
                .arg("set")
                .arg(switch.kind.as_str())
                .arg(switch.value.as_str())
                .arg(&json)
                .arg(switch.set_by.as_str())
                .arg(switch.reason.as_str());
            reply = self.run_write(&self.tag(shard), &mut inv).await?;
            audit_refusal(&reply)?;
            if reply.first().and_then(Option::as_deref) == Some("full") {
                return Err(super::kill_switches_full());
            }
        }
        match reply.first().and_then(Option::as_deref) {
            Some("set") => Ok(()),
            _ => Err(corrupt("kill switch reply")),
        }
    }

    #[tracing::instrument(skip_all, name = "store.lift_kill_switch")]
    async fn lift_kill_switch(
        &self,
        kind: &str,
        value: &str,
        by: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut reply: Vec<Option<String>> = Vec::new();
        for shard in self.kill_copies() {
            let mut inv = self.scripts.kill.prepare_invoke();
            inv.key(self.kill_key(shard))
                .key(self.kill_prefix_key(shard))
                .arg(self.now_arg(now_ms))
                .arg(self.kill_audit_arg(shard))
                .arg("lift")
                .arg(kind)
                .arg(value)
                .arg("")
                .arg(by)
                .arg(reason);
            reply = self.run_write(&self.tag(shard), &mut inv).await?;
            audit_refusal(&reply)?;
        }
        Ok(reply.first().and_then(Option::as_deref) == Some("lifted"))
    }

    async fn kill_switches(&self) -> Result<Vec<KillSwitch>, StoreError> {
        let mut conn = self.conn.clone();
        // Shard 0's copy is written last (see `kill_copies`): what it lists
        // is in force on every shard.
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.kill_key(0))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut out = Vec::with_capacity(all.len());
        for (field, json) in all {
            let mut switch: KillSwitch = serde_json::from_str(&json)
                .map_err(|e| corrupt(&format!("kill switch {field:?}: {e}")))?;
            if let Some((kind, value)) = field.split_once(' ') {
                switch.kind = kind.to_owned();
                switch.value = value.to_owned();
            }
            out.push(switch);
        }
        out.sort_by(|a, b| (&a.kind, &a.value).cmp(&(&b.kind, &b.value)));
        Ok(out)
    }

    async fn live_tasks(
        &self,
        shard: u8,
        cursor: u64,
        count: usize,
    ) -> Result<LiveTaskPage, StoreError> {
        let mut conn = self.conn.clone();
        let (next, items): (u64, Vec<String>) = redis::cmd("ZSCAN")
            .arg(format!("{}:deadlines", self.tag(shard)))
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        // ZSCAN answers member, score, member, score, ...
        let ids = items
            .iter()
            .step_by(2)
            .filter_map(|m| TaskId::parse(m))
            .collect();
        Ok(LiveTaskPage {
            ids,
            next: (next != 0).then_some(next),
        })
    }

    #[tracing::instrument(skip_all, name = "store.revoke_tasks")]
    async fn revoke_tasks(
        &self,
        shard: u8,
        ids: &[TaskId],
        target: &KillTarget,
        outcome: &str,
        by: &str,
        now_ms: u64,
    ) -> Result<Vec<EndedTask>, StoreError> {
        let tag = self.tag(shard);
        let mut out = Vec::new();
        for page in ids.chunks(KILL_PAGE) {
            let mut inv = self.scripts.revoke.prepare_invoke();
            inv.key(format!("{tag}:deadlines"))
                .key(format!("{tag}:revlog"))
                .key(format!("{tag}:revoked"))
                .arg(self.now_arg(now_ms))
                .arg(self.audit_arg(shard, by, ""))
                .arg(REVOCATION_LOG_MAX)
                .arg(self.retention_ms.max(1))
                .arg(format!("{tag}:"))
                .arg(self.quota_base())
                .arg(outcome)
                .arg(target.kind())
                .arg(target.value());
            for id in page {
                inv.arg(id.as_str());
            }
            let reply: Vec<redis::Value> = self.run_write(&tag, &mut inv).await?;
            for v in reply.iter().skip(1) {
                out.extend(ended_entry(v)?);
            }
        }
        self.release_quotas(out.iter().map(|e| &e.task).collect())
            .await;
        Ok(out)
    }

    async fn list_tasks(&self, token: Option<&str>, count: usize) -> Result<TaskPage, StoreError> {
        // The token is the SCAN cursor; in a cluster `<master>:<cursor>`, the
        // masters in address order (a failover between pages may repeat or
        // skip tasks of the slots that moved).
        let foreign = || corrupt("page token: not one this broker issued");
        let (node, cursor): (usize, u64) = match token {
            None => (0, 0),
            Some(t) if self.cluster => {
                let (n, c) = t.split_once(':').ok_or_else(foreign)?;
                (
                    n.parse().map_err(|_| foreign())?,
                    c.parse().map_err(|_| foreign())?,
                )
            }
            Some(t) => (0, t.parse().map_err(|_| foreign())?),
        };
        let pattern = format!("{{{}:s?}}:task:*", glob_escape(&self.prefix));
        let mut conn = self.conn.clone();
        let masters = if self.cluster {
            conn.masters().await.map_err(|e| unavailable(&e))?
        } else {
            vec![String::new()]
        };
        let address = masters.get(node).ok_or_else(foreign)?;
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(count.max(1));
        let (next, keys): (u64, Vec<String>) = conn
            .query_node(address, scan)
            .await
            .map_err(|e| unavailable(&e))?;
        let rows: Vec<Vec<Option<String>>> = if keys.is_empty() {
            Vec::new()
        } else if self.cluster {
            // Each task is in its own shard's slot: one read per task.
            let reads = keys.iter().map(|k| {
                let mut conn = self.conn.clone();
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(k).arg(&TASK_FIELDS);
                async move { cmd.query_async::<Vec<Option<String>>>(&mut conn).await }
            });
            futures_util::future::join_all(reads)
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .map_err(|e| unavailable(&e))?
        } else {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("HMGET").arg(k).arg(&TASK_FIELDS);
            }
            pipe.query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?
        };
        let next = match (next, self.cluster) {
            (0, true) if node + 1 < masters.len() => Some(format!("{}:0", node + 1)),
            (0, _) => None,
            (c, true) => Some(format!("{node}:{c}")),
            (c, false) => Some(c.to_string()),
        };
        let mut tasks = Vec::with_capacity(rows.len());
        for (key, row) in keys.iter().zip(rows) {
            if row.first().is_none_or(Option::is_none) {
                continue; // expired between the scan and the read
            }
            match task_from_fields(&row) {
                Ok(t) => tasks.push(t),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "list tasks: skipped an unreadable task")
                }
            }
        }
        Ok(TaskPage { tasks, next })
    }

    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let task = TaskId::parse(&event.task);
        let shard = task.as_ref().map_or(0, TaskId::shard);
        let mut inv = self.scripts.audit_append.prepare_invoke();
        // Not read by the script: names its slot, so a cluster routes it there.
        inv.key(format!("{}:deadlines", self.tag(shard)))
            .arg(self.now_arg(event.at_ms))
            .arg(self.audit_arg(shard, "", ""))
            .arg(task.as_ref().map_or("", TaskId::as_str));
        for (k, v) in event.to_fields() {
            inv.arg(k).arg(v);
        }
        let reply: Vec<Option<String>> = self.run_write(&self.tag(shard), &mut inv).await?;
        audit_refusal(&reply)
    }

    async fn audit_trace(
        &self,
        task_id: &TaskId,
        from: u64,
        limit: usize,
    ) -> Result<AuditPage, StoreError> {
        let tag = self.tag(task_id.shard());
        let limit = limit.max(1);
        let mut inv = self.scripts.audit_trace.prepare_invoke();
        inv.key(format!("{tag}:tev:{task_id}"))
            .arg(format!("{tag}:"))
            .arg(from)
            .arg(limit);
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let total: u64 = reply
            .first()
            .map(redis::from_redis_value_ref)
            .transpose()
            .map_err(|_| corrupt("audit index length"))?
            .unwrap_or(0);
        let mut events = Vec::new();
        for v in reply.iter().skip(1) {
            let (id, fields): (String, Vec<(String, String)>) =
                redis::from_redis_value_ref(v).map_err(|_| corrupt("audit entry"))?;
            events.push(AuditEvent::from_fields(
                format!("{:x}-{id}", task_id.shard()),
                fields,
            ));
        }
        let end = from.saturating_add(limit as u64);
        Ok(AuditPage {
            events,
            next: (end < total).then_some(end),
        })
    }

    async fn audit_cursor(&self, tenant: &str) -> Result<AuditCursor, StoreError> {
        let lasts: Vec<Vec<StreamEntry>> = self
            .per_shard(|shard| {
                let mut c = redis::cmd("XREVRANGE");
                c.arg(self.audit_key(shard, tenant))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
                vec![c]
            })
            .await?;
        let mut cursor = AuditCursor::default();
        for (slot, last) in cursor.0.iter_mut().zip(lasts) {
            if let Some((id, _)) = last.into_iter().next() {
                *slot = id;
            }
        }
        Ok(cursor)
    }

    async fn audit_read(
        &self,
        tenant: &str,
        after: &AuditCursor,
        limit: usize,
    ) -> Result<(Vec<AuditEvent>, AuditCursor), StoreError> {
        let pages: Vec<Vec<StreamEntry>> = self
            .per_shard(|shard| {
                let from = after
                    .0
                    .get(usize::from(shard))
                    .map_or("0-0", String::as_str);
                let mut c = redis::cmd("XRANGE");
                c.arg(self.audit_key(shard, tenant))
                    .arg(format!("({from}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit.max(1));
                vec![c]
            })
            .await?;
        let mut cursor = after.clone();
        let mut shards = Vec::new();
        for ((shard, slot), page) in (0..SHARDS).zip(cursor.0.iter_mut()).zip(pages) {
            let mut events = Vec::with_capacity(page.len());
            for (id, fields) in page {
                events.push(AuditEvent::from_fields(format!("{shard:x}-{id}"), fields));
                *slot = id;
            }
            shards.push(events);
        }
        Ok((crate::audit::merge(shards), cursor))
    }

    async fn audit_len(&self, tenant: &str) -> Result<u64, StoreError> {
        let lens: Vec<u64> = self
            .per_shard(|shard| {
                let mut c = redis::cmd("XLEN");
                c.arg(self.audit_key(shard, tenant));
                vec![c]
            })
            .await?;
        Ok(lens.iter().sum())
    }

    async fn task_credentials(
        &self,
        task_id: &TaskId,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let [_, creds, ..] = self.task_keys(task_id);
        let mut conn = self.conn.clone();
        let records: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(creds)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        records
            .values()
            .map(|json| serde_json::from_str(json).map_err(|_| corrupt("credential record")))
            .collect()
    }

    async fn live_counts(&self, now_ms: u64) -> Result<LiveCounts, StoreError> {
        let now = self.now_ms(now_ms);
        let replies: Vec<redis::Value> = self
            .per_shard(|shard| {
                let tag = self.tag(shard);
                let mut live = redis::cmd("HGETALL");
                live.arg(format!("{tag}:live"));
                let mut overdue = redis::cmd("ZCOUNT");
                overdue.arg(format!("{tag}:deadlines")).arg("-inf").arg(now);
                vec![live, overdue]
            })
            .await?;
        let mut counts = LiveCounts::default();
        for pair in replies.chunks(2) {
            let [fields, overdue] = pair else {
                return Err(corrupt("live counts: a shard's reply is incomplete"));
            };
            let fields: std::collections::HashMap<String, i64> =
                redis::FromRedisValue::from_redis_value(fields.clone())
                    .map_err(|_| corrupt("live counts: not a hash of integers"))?;
            for (field, value) in fields {
                let value = u64::try_from(value).unwrap_or(0);
                match field.split_once('|') {
                    Some(("t", template)) => {
                        counts
                            .templates
                            .entry(template.to_owned())
                            .or_default()
                            .tasks += value;
                    }
                    Some(("c", template)) => {
                        counts
                            .templates
                            .entry(template.to_owned())
                            .or_default()
                            .credentials += value;
                    }
                    _ => {}
                }
            }
            let overdue: u64 = redis::FromRedisValue::from_redis_value(overdue.clone())
                .map_err(|_| corrupt("live counts: overdue not an integer"))?;
            counts.overdue += overdue;
        }
        Ok(counts)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        // Redis may have been restarted with other settings: check again.
        self.verify().await.map(|_| ())
    }

    async fn diagnose(&self) -> Result<super::StoreDiagnosis, StoreError> {
        self.diagnosis().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: (u32, u32, u32), policy: &str, aof: bool, fsync: &str) -> ServerFacts {
        ServerFacts {
            version,
            maxmemory_policy: policy.into(),
            appendonly: aof,
            appendfsync: fsync.into(),
        }
    }

    #[test]
    fn durability_settings_parse() {
        assert_eq!(Durability::parse("none"), Some(Durability::None));
        assert_eq!(Durability::parse("fsync"), Some(Durability::Fsync));
        assert_eq!(
            Durability::parse("replicas = 2"),
            Some(Durability::Replicas(2))
        );
        assert_eq!(
            Durability::parse("replicas=1"),
            Some(Durability::Replicas(1))
        );
        for bad in [
            "",
            "replicas = 0",
            "replicas",
            "replica = 1",
            "fsync always",
            "replicas = x",
        ] {
            assert_eq!(Durability::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Durability::Replicas(3).to_string(), "replicas = 3");
    }

    #[test]
    fn server_checks_name_each_problem() {
        let good = facts((7, 0, 15), "noeviction", true, "always");
        assert!(good.problems(Durability::Fsync).is_empty());
        let old = facts((6, 2, 14), "noeviction", true, "always");
        assert!(old.problems(Durability::None)[0].contains("older than 7.0"));
        let lru = facts((7, 0, 15), "allkeys-lru", true, "always");
        assert!(lru.problems(Durability::None)[0].contains("maxmemory-policy"));
        let everysec = facts((7, 0, 15), "noeviction", true, "everysec");
        assert!(everysec.problems(Durability::Fsync)[0].contains("appendfsync always"));
        assert!(everysec.problems(Durability::Replicas(1)).is_empty());
        let waitaof = facts((7, 2, 4), "noeviction", true, "everysec");
        assert!(waitaof.has_waitaof() && waitaof.problems(Durability::Fsync).is_empty());
        let no_aof = facts((7, 2, 4), "noeviction", false, "everysec");
        assert!(no_aof.problems(Durability::Fsync)[0].contains("appendonly yes"));
        let all = facts((6, 0, 0), "volatile-lru", false, "no");
        assert_eq!(
            all.problems(Durability::Fsync).len(),
            3,
            "every problem at once"
        );
    }

    #[test]
    fn settings_fall_back_to_info_when_config_is_refused() {
        use super::super::{Eviction, Persistence};
        let refused = || Err("CONFIG GET maxmemory-policy refused (NOPERM)".to_owned());
        assert_eq!(
            eviction_of(Ok("allkeys-lru".into()), refused()),
            Eviction::Policy {
                value: "allkeys-lru".into(),
                source: "CONFIG GET"
            }
        );
        let memory = "# Memory\r\nused_memory:1000\r\nmaxmemory_policy:volatile-lru\r\n";
        assert_eq!(
            eviction_of(refused(), Ok(memory.into())),
            Eviction::Policy {
                value: "volatile-lru".into(),
                source: "INFO memory"
            }
        );
        let Eviction::Unknown(why) = eviction_of(refused(), Err("INFO memory refused".into()))
        else {
            panic!("neither readable")
        };
        assert!(
            why.contains("NOPERM") && why.contains("INFO memory refused"),
            "{why}"
        );

        let persistence = "# Persistence\r\nloading:0\r\naof_enabled:1\r\n";
        assert_eq!(
            persistence_of(
                refused().map(|_| Default::default()),
                Ok(persistence.into())
            ),
            Persistence::Redis {
                appendonly: true,
                appendfsync: "unknown".into(),
                save: None,
                source: "INFO persistence"
            }
        );
        assert_eq!(
            persistence_of(
                Ok(("no".into(), "everysec".into(), String::new())),
                Err(String::new())
            ),
            Persistence::Redis {
                appendonly: false,
                appendfsync: "everysec".into(),
                save: Some(String::new()),
                source: "CONFIG GET"
            }
        );
        assert!(matches!(
            persistence_of(
                refused().map(|_| Default::default()),
                Ok("# Persistence\r\n".into())
            ),
            Persistence::Unknown(_)
        ));
    }

    #[test]
    fn versions_are_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(parse_version(info), Some((7, 0, 15)));
        assert_eq!(parse_version("redis_version:8\r\n"), Some((8, 0, 0)));
        assert_eq!(parse_version("nothing"), None);
    }
}
