//! Redis [`LeaseStore`]: every state change is one Lua script on one hash slot.
//!
//! Keys (`P` is the configured prefix, `s` the task's shard, `ID` the task id):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{P:s}:task:ID` | hash | `rec` (task JSON at begin), `state`, `deadline`, `max`, `ended`, `outcome`, `renewed` |
//! | `{P:s}:creds:ID` | hash | credential id → credential record JSON (hash of the value, never the value) |
//! | `{P:s}:cexp:ID` | zset | credential id by expiry |
//! | `{P:s}:cgr:ID` | hash | grant → its live credential ids, oldest first (the per-grant cap) |
//! | `{P:s}:deadlines` | zset | task id by lease deadline: the reaper's work list |
//! | `{P:s}:revlog` | stream | one entry per revocation, for watchers |
//! | `{P:s}:revoked` | zset | `<credential id> <audience> <tenant>` by expiry, for snapshots |
//! | `P:q:id:<owner>`, `P:q:class:<class>` | zset | live task ids by max lifetime (concurrency quotas) |
//! | `P:q:rate:id:<owner>`, `P:q:rate:class:<class>` | hash | token bucket `t` (tokens), `ts` (ms) |
//!
//! The quota keys (`P:q:…`) are per identity and per class, so they carry no
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

use redis::{Client, Script, aio::ConnectionManager, aio::ConnectionManagerConfig};

use super::{
    BeginOutcome, BeginQuota, CompleteOutcome, CredentialId, CredentialRecord, CredentialView,
    EndReason, ExpiredTask, LeaseStore, LogId, MAX_LIVE_CREDENTIALS_PER_GRANT, PRUNE_PAGE,
    PagePosition, QuotaKind, REVOCATION_GRACE_MS, REVOCATION_LOG_MAX, Reaped, RenewOutcome,
    Renewal, RevocationCursor, RevocationRead, RevocationRecord, RevokedPage, SHARDS, StoreClock,
    StoreError, TaskId, TaskRecord, TaskState,
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
    conn: ConnectionManager,
    /// State changes and their WAIT/WAITAOF go on a connection of their own, so
    /// a slow acknowledgement never holds up reads (introspection).
    writes: ConnectionManager,
    client: Client,
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
}

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// A write script: the shared prelude (with its constants) and the body.
fn write_script(body: &str) -> Script {
    let prelude = PRELUDE
        .replace("__GRACE__", &REVOCATION_GRACE_MS.to_string())
        .replace("__PAGE__", &PRUNE_PAGE.to_string());
    let body = body.replace("__CONC__", &super::CONCURRENCY_RETRY_MS.to_string());
    Script::new(&format!("{prelude}\n{body}"))
}

impl Scripts {
    fn new() -> Self {
        Self {
            log_end: Script::new(include_str!("lua/log_end.lua")),
            read_log: Script::new(include_str!("lua/read_log.lua")),
            begin: write_script(include_str!("lua/begin.lua")),
            renew: write_script(include_str!("lua/renew.lua")),
            complete: write_script(include_str!("lua/complete.lua")),
            read_credential: write_script(include_str!("lua/read_credential.lua")),
            reap: write_script(include_str!("lua/reap.lua")),
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
        if self.is_timeout() {
            "timed out".to_owned()
        } else if self.is_connection_refusal() || self.is_io_error() || self.is_connection_dropped()
        {
            "connection failed".to_owned()
        } else {
            format!("{:?}", self.kind())
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// The task hash fields every script returns, in this order.
const TASK_FIELDS: [&str; 6] = ["rec", "state", "deadline", "ended", "outcome", "max"];

/// Rebuilds a task record from the six stored fields (TASK_FIELDS order).
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
    Ok(task)
}

/// The six task fields that follow the status word of a script reply.
fn task_part(reply: &[Option<String>]) -> Result<&[Option<String>], StoreError> {
    reply.get(1..7).ok_or_else(|| corrupt("short script reply"))
}

/// The time a script decided at (after the task fields).
fn decided_at(reply: &[Option<String>]) -> Result<u64, StoreError> {
    reply
        .get(7)
        .and_then(Option::as_deref)
        .ok_or_else(|| corrupt("script reply without time"))
        .and_then(parse_score)
}

/// What a reply carries after its time: credential ids.
fn trailing_ids(reply: &[Option<String>]) -> Result<Vec<CredentialId>, StoreError> {
    credential_ids(reply.get(8..).unwrap_or_default())
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
    /// Prepares a store for `url` (`redis://` or `rediss://`). Does not connect:
    /// the first call does, and every call after a failure retries.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the URL is malformed.
    pub fn connect(url: &str, options: RedisStoreOptions) -> Result<Self, StoreError> {
        let client = Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("redis url: {}", e.kind_description())))?;
        let manager = |response: Duration| {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.timeout))
                .set_response_timeout(Some(response))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| unavailable(&e))
        };
        let conn = manager(options.timeout)?;
        // A WAIT may use up to half the timeout on top of the script itself.
        let writes = manager(options.timeout + options.timeout / 2)?;
        Ok(Self {
            conn,
            writes,
            client,
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
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| refused("INFO server", &e))?;
        let version = parse_version(&info)
            .ok_or_else(|| StoreError::Misconfigured("INFO server has no redis_version".into()))?;
        let get = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let pair: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| refused("CONFIG GET", &e))?;
                pair.get(1).cloned().ok_or_else(|| {
                    StoreError::Misconfigured(format!("CONFIG GET {name} answered nothing"))
                })
            }
        };
        Ok(ServerFacts {
            version,
            maxmemory_policy: get("maxmemory-policy").await?,
            appendonly: get("appendonly").await? == "yes",
            appendfsync: get("appendfsync").await?,
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

    /// The base of the quota keys (see the module docs).
    fn quota_base(&self) -> String {
        format!("{}:q:", self.prefix)
    }

    fn revlog_key(&self, shard: u8) -> String {
        format!("{}:revlog", self.tag(shard))
    }

    /// The gap check and the read of every shard's log after `after`, in one
    /// script (`lua/read_log.lua`).
    async fn read_log(
        &self,
        after: &RevocationCursor,
        limit: usize,
    ) -> Result<RevocationRead, StoreError> {
        let mut inv = self.scripts.read_log.prepare_invoke();
        for shard in 0..SHARDS {
            inv.key(self.revlog_key(shard));
        }
        for id in &after.0 {
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
            return Ok(RevocationRead::Gap);
        }
        let mut cursor = after.clone();
        let mut records = Vec::new();
        for (shard, part) in (0..SHARDS).zip(parts) {
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
                    reason: EndReason::parse(&field("r")?).ok_or_else(|| corrupt("reason"))?,
                    audience: field("u").unwrap_or_default(),
                    tenant: field("t").unwrap_or_default(),
                    position: (shard, pos),
                });
                cursor.advance(shard, pos);
            }
        }
        Ok(RevocationRead::Records(records, cursor))
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
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(None);
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| unavailable(&e))?
            }
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
    /// returned only once the change is as durable as configured.
    async fn run_write<T: redis::FromRedisValue>(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let facts = self.checked().await?;
        let mut conn = self.writes.clone();
        let reply = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| write_failed(&e))?;
        self.confirm(&mut conn, &facts).await?;
        Ok(reply)
    }

    async fn confirm(
        &self,
        conn: &mut ConnectionManager,
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
                let acks: Vec<i64> = redis::cmd("WAITAOF")
                    .arg(1)
                    .arg(0)
                    .arg(wait_ms)
                    .query_async(conn)
                    .await
                    .map_err(|e| write_failed(&e))?;
                if acks.first().copied().unwrap_or(0) >= 1 {
                    Ok(())
                } else {
                    Err(unknown("was not confirmed on disk (WAITAOF)".into()))
                }
            }
            Durability::Replicas(n) => {
                let acked: i64 = redis::cmd("WAIT")
                    .arg(n)
                    .arg(wait_ms)
                    .query_async(conn)
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
        Some("expired") => {
            let task = task_from_fields(task_part(&entry)?)?;
            let revoked = trailing_ids(&entry)?;
            out.expired.push(ExpiredTask { task, revoked });
            Ok(())
        }
        _ => Err(corrupt("reap entry")),
    }
}

impl LeaseStore for RedisStore {
    async fn begin_with_quota(
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
        let base = self.quota_base();
        let (id_key, class_key) = super::memory::quota_keys(task);
        inv.key(format!("{base}{id_key}"))
            .key(format!("{base}{class_key}"))
            .key(format!("{base}rate:{id_key}"))
            .key(format!("{base}rate:{class_key}"));
        inv.arg(self.now_arg(task.created_at_ms))
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
        push_credentials(&mut inv, credentials)?;
        let reply: Vec<Option<String>> = self.run_write(&mut inv).await?;
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
            .arg(renewal.extend_by_ms)
            .arg(
                renewal
                    .min_interval_ms
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            )
            .arg(MAX_LIVE_CREDENTIALS_PER_GRANT)
            .arg(REVOCATION_LOG_MAX)
            .arg(task_id.as_str());
        push_credentials(&mut inv, renewal.credentials)?;
        let reply: Vec<Option<String>> = self.run_write(&mut inv).await?;
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
            Some("renewed") => Ok(RenewOutcome::Renewed {
                task: task_from_fields(task_part(&reply)?)?,
                rotated: trailing_ids(&reply)?,
            }),
            _ => Err(corrupt("renew reply")),
        }
    }

    async fn complete(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
    ) -> Result<CompleteOutcome, StoreError> {
        let keys = self.task_keys(task_id);
        let mut inv = self.scripts.complete.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(self.now_arg(now_ms))
            .arg(outcome)
            .arg(task_id.as_str())
            .arg(REVOCATION_LOG_MAX)
            .arg(self.retention_ms.max(1))
            .arg(self.quota_base());
        let reply: Vec<Option<String>> = self.run_write(&mut inv).await?;
        self.decided(&reply);
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(CompleteOutcome::NotFound),
            Some("ended") => Ok(CompleteOutcome::AlreadyEnded(task_from_fields(task_part(
                &reply,
            )?)?)),
            Some("done") => Ok(CompleteOutcome::Ended {
                task: task_from_fields(task_part(&reply)?)?,
                revoked: trailing_ids(&reply)?,
            }),
            _ => Err(corrupt("complete reply")),
        }
    }

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
                    .get(8)
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
            .arg(limit.max(1))
            .arg(REVOCATION_LOG_MAX)
            .arg(self.retention_ms.max(1))
            .arg(format!("{tag}:"))
            .arg(self.quota_base());
        let reply: Vec<redis::Value> = self.run_write(&mut inv).await?;
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
        Ok(out)
    }

    async fn revocation_cursor(&self) -> Result<RevocationCursor, StoreError> {
        let mut inv = self.scripts.log_end.prepare_invoke();
        for shard in 0..SHARDS {
            inv.key(self.revlog_key(shard));
        }
        let reply = self.run(&mut inv).await?;
        let mut cursor = RevocationCursor::default();
        for shard in 0..SHARDS {
            let last = reply
                .get(usize::from(shard))
                .and_then(Option::as_deref)
                .and_then(LogId::parse)
                .ok_or_else(|| corrupt("revocation log id"))?;
            cursor.advance(shard, last);
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
        let read = self.read_log(after, limit).await?;
        let idle = matches!(&read, RevocationRead::Records(records, _) if records.is_empty());
        if !idle || wait.is_zero() {
            return Ok(read);
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

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        // Redis may have been restarted with other settings: check again.
        self.verify().await.map(|_| ())
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
    fn versions_are_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(parse_version(info), Some((7, 0, 15)));
        assert_eq!(parse_version("redis_version:8\r\n"), Some((8, 0, 0)));
        assert_eq!(parse_version("nothing"), None);
    }
}
