//! Redis [`LeaseStore`]: every state change is one Lua script on one hash slot.
//!
//! Keys (`P` is the configured prefix, `s` the task's shard, `ID` the task id):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{P:s}:task:ID` | hash | `rec` (task JSON at begin), `state`, `deadline`, `max`, `ended`, `outcome` |
//! | `{P:s}:creds:ID` | hash | credential id → credential record JSON (hash of the value, never the value) |
//! | `{P:s}:cexp:ID` | zset | credential id by expiry, to prune expired records on renewal |
//! | `{P:s}:deadlines` | zset | task id by lease deadline: the reaper's work list |
//! | `{P:s}:claims` | zset | task id by claim expiry: expiry work a reaper has claimed |
//!
//! A task's keys expire (PEXPIREAT) at its max lifetime plus the retention, so
//! ended tasks do not accumulate. Scripts go through EVALSHA with a fallback to
//! EVAL, so a restarted Redis that lost its script cache keeps working.
//! Redis must persist (AOF) for leases to survive a Redis restart.

use std::time::Duration;

use redis::{Client, Script, aio::ConnectionManager, aio::ConnectionManagerConfig};

use super::{
    BeginOutcome, CompleteOutcome, CredentialId, CredentialRecord, CredentialView, EndReason,
    ExpireOutcome, LeaseStore, LogId, REVOCATION_GRACE_MS, REVOCATION_LOG_MAX, RenewOutcome,
    RevocationCursor, RevocationRead, RevocationRecord, SHARDS, StoreError, TaskId, TaskRecord,
    TaskState,
};

/// Options for [`RedisStore::connect`].
#[derive(Debug, Clone)]
pub struct RedisStoreOptions {
    /// Key prefix; brokers sharing a prefix share state.
    pub prefix: String,
    /// Bound on connecting and on each command; past it the call fails UNAVAILABLE.
    pub timeout: Duration,
    /// How long ended tasks stay readable past their max lifetime.
    pub retention: Duration,
}

/// A [`LeaseStore`] on a single Redis node (or a Sentinel-managed master).
///
/// The connection is made lazily and remade after errors: an unreachable Redis
/// makes calls fail with [`StoreError::Unavailable`] until it is back, without
/// restarting the broker.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    client: Client,
    timeout: Duration,
    /// A connection of its own for blocking stream reads, which would stall
    /// every other call on the shared multiplexed connection.
    feed: std::sync::Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    prefix: String,
    retention_ms: u64,
    scripts: std::sync::Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    // The connection holds the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    begin: Script,
    renew: Script,
    complete: Script,
    read_credential: Script,
    claim: Script,
    expire: Script,
    snapshot: Script,
    gap: Script,
}

const TASK_FIELDS: &str = "'rec', 'state', 'deadline', 'ended', 'outcome'";

impl Scripts {
    fn new() -> Self {
        // Every script that returns a task returns its five fields in TASK_FIELDS
        // order after a status word, so one parser reads them all.
        let begin = format!(
            r"
local f = redis.call('HMGET', KEYS[1], {TASK_FIELDS})
if f[1] then return {{'existing', f[1], f[2], f[3], f[4], f[5]}} end
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'state', 'active', 'deadline', ARGV[2], 'max', ARGV[3])
for i = 6, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i])
end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[5])
for k = 1, 3 do redis.call('PEXPIREAT', KEYS[k], ARGV[4]) end
return {{'created'}}
"
        );
        let renew = format!(
            r"
local f = redis.call('HMGET', KEYS[1], {TASK_FIELDS})
if not f[1] then return {{'missing'}} end
local now = tonumber(ARGV[1])
if f[2] ~= 'active' or tonumber(f[3]) <= now then
  return {{'inactive', f[1], f[2], f[3], f[4], f[5]}}
end
local max = redis.call('HGET', KEYS[1], 'max')
local nd = ARGV[2]
if tonumber(nd) < tonumber(f[3]) then nd = f[3] end
if tonumber(nd) > tonumber(max) then nd = max end
redis.call('HSET', KEYS[1], 'deadline', nd)
redis.call('ZADD', KEYS[4], nd, ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1])
for _, c in ipairs(old) do redis.call('HDEL', KEYS[2], c) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1])
for i = 4, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i])
end
-- Pruning may have emptied (deleted) the credential keys: give them the task's expiry again.
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then for k = 2, 3 do redis.call('PEXPIRE', KEYS[k], ttl) end end
return {{'renewed', f[1], 'active', nd, f[4], f[5]}}
"
        );
        // Logs each revoked, unexpired credential (cexp scores are expiries) in
        // the shard's revocation stream and revoked set, in the same atomic step.
        // Revoked-set members are `<credential id> <audience>`, kept until
        // REVOCATION_GRACE_MS past their expiry; stream entries carry c (id),
        // e (expiry), a (revoked at), r (reason) and u (audience).
        let log = |creds: &str,
                   cexp: &str,
                   revlog: &str,
                   revoked: &str,
                   now: &str,
                   maxlen: &str,
                   collect: &str| {
            format!(
                r"
local live = redis.call('ZRANGEBYSCORE', {cexp}, '(' .. {now}, '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  {collect}
  local aud = ''
  local cj = redis.call('HGET', {creds}, live[i])
  if cj then aud = cjson.decode(cj).audience or '' end
  redis.call('XADD', {revlog}, 'MAXLEN', '~', {maxlen}, '*', 'c', live[i], 'e', live[i + 1], 'a', {now}, 'r', reason, 'u', aud)
  redis.call('ZADD', {revoked}, live[i + 1], live[i] .. ' ' .. aud)
end
redis.call('ZREMRANGEBYSCORE', {revoked}, '-inf', '(' .. (tonumber({now}) - {REVOCATION_GRACE_MS}))
"
            )
        };
        let complete = format!(
            r"
local f = redis.call('HMGET', KEYS[1], {TASK_FIELDS})
if not f[1] then return {{'missing'}} end
if f[2] ~= 'active' then return {{'ended', f[1], f[2], f[3], f[4], f[5]}} end
local state = 'completed'
local outcome = ARGV[2]
local reason = 'completion'
if tonumber(f[3]) <= tonumber(ARGV[1]) then state = 'expired'; outcome = ''; reason = 'expiry' end
redis.call('HSET', KEYS[1], 'state', state, 'ended', ARGV[1], 'outcome', outcome)
redis.call('ZREM', KEYS[3], ARGV[3])
local out = {{'done', f[1], state, f[3], ARGV[1], outcome}}
{{LOG_REVOCATIONS}}
return out
"
        )
        .replace(
            "{LOG_REVOCATIONS}",
            &log(
                "KEYS[6]",
                "KEYS[2]",
                "KEYS[4]",
                "KEYS[5]",
                "ARGV[1]",
                "ARGV[4]",
                "table.insert(out, live[i])",
            ),
        );
        let read_credential = format!(
            r"
local f = redis.call('HMGET', KEYS[1], {TASK_FIELDS})
if not f[1] then return {{'missing'}} end
local c = redis.call('HGET', KEYS[2], ARGV[1])
if not c then return {{'missing'}} end
return {{'found', f[1], f[2], f[3], f[4], f[5], c}}
"
        );
        let claim = r"
local now = ARGV[1]
local out = {}
local seen = {}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(stale) do table.insert(out, id); seen[id] = true end
local room = tonumber(ARGV[3]) - #out
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, room)
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[1], id)
    -- A task renewed after an earlier claim (clock skew between replicas) can be
    -- both a stale claim and due again: list it once.
    if not seen[id] then table.insert(out, id); seen[id] = true end
  end
end
for _, id in ipairs(out) do redis.call('ZADD', KEYS[2], ARGV[2], id) end
return out
"
        .to_owned();
        let expire = format!(
            r"
local f = redis.call('HMGET', KEYS[1], {TASK_FIELDS})
if not f[1] or f[2] ~= 'active' then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return {{'ended'}}
end
if tonumber(f[3]) > tonumber(ARGV[1]) then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('ZADD', KEYS[3], f[3], ARGV[2])
  return {{'notdue'}}
end
redis.call('HSET', KEYS[1], 'state', 'expired', 'ended', ARGV[1], 'outcome', '')
redis.call('ZREM', KEYS[3], ARGV[2])
local reason = 'expiry'
local logged = {{}}
{{LOG_REVOCATIONS_EXPIRE}}
local out = {{'expired', f[1], 'expired', f[3], ARGV[1], ''}}
for _, c in ipairs(redis.call('HKEYS', KEYS[2])) do table.insert(out, c) end
return out
"
        )
        .replace(
            "{LOG_REVOCATIONS_EXPIRE}",
            &log(
                "KEYS[2]",
                "KEYS[5]",
                "KEYS[6]",
                "KEYS[7]",
                "ARGV[1]",
                "ARGV[3]",
                "table.insert(logged, live[i])",
            ),
        );
        // One shard: the last log id and every revoked credential unexpired at ARGV[1].
        let snapshot = r"
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do if info[i] == 'last-generated-id' then last = info[i + 1] end end
end
local out = {last}
for _, v in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (tonumber(ARGV[1]) - {grace}), '+inf', 'WITHSCORES')) do
  table.insert(out, v)
end
return out
"
        .replace("{grace}", &REVOCATION_GRACE_MS.to_string());
        // 1 if any stream has trimmed entries after the reader's position in it.
        let gap = r"
for k = 1, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    local del = '0-0'
    for i = 1, #info, 2 do if info[i] == 'max-deleted-entry-id' then del = info[i + 1] end end
    local a_ms, a_seq = string.match(ARGV[k], '^(%d+)-(%d+)$')
    local d_ms, d_seq = string.match(del, '^(%d+)-(%d+)$')
    a_ms, a_seq, d_ms, d_seq = tonumber(a_ms), tonumber(a_seq), tonumber(d_ms), tonumber(d_seq)
    if a_ms < d_ms or (a_ms == d_ms and a_seq < d_seq) then return 1 end
  end
end
return 0
";
        Self {
            snapshot: Script::new(&snapshot),
            gap: Script::new(gap),
            begin: Script::new(&begin),
            renew: Script::new(&renew),
            complete: Script::new(&complete),
            read_credential: Script::new(&read_credential),
            claim: Script::new(&claim),
            expire: Script::new(&expire),
        }
    }
}

fn unavailable(e: &redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {}", e.kind_description()))
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

/// Rebuilds a task record from the five stored fields (rec, state, deadline, ended, outcome).
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
    Ok(task)
}

/// The five task fields that follow the status word of a script reply.
fn task_part(reply: &[Option<String>]) -> Result<&[Option<String>], StoreError> {
    reply.get(1..6).ok_or_else(|| corrupt("short script reply"))
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

impl RedisStore {
    /// Prepares a store for `url` (`redis://` or `rediss://`). Does not connect:
    /// the first call does, and every call after a failure retries.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the URL is malformed.
    pub fn connect(url: &str, options: RedisStoreOptions) -> Result<Self, StoreError> {
        let client = Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("redis url: {}", e.kind_description())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| unavailable(&e))?;
        Ok(Self {
            conn,
            client,
            timeout: options.timeout,
            feed: std::sync::Arc::new(tokio::sync::Mutex::new(None)),
            prefix: options.prefix,
            retention_ms: crate::clock::duration_ms(options.retention),
            scripts: std::sync::Arc::new(Scripts::new()),
        })
    }

    fn tag(&self, shard: u8) -> String {
        format!("{{{}:s{shard:x}}}", self.prefix)
    }

    fn task_keys(&self, id: &TaskId) -> [String; 7] {
        let tag = self.tag(id.shard());
        [
            format!("{tag}:task:{id}"),
            format!("{tag}:creds:{id}"),
            format!("{tag}:cexp:{id}"),
            format!("{tag}:deadlines"),
            format!("{tag}:claims"),
            format!("{tag}:revlog"),
            format!("{tag}:revoked"),
        ]
    }

    fn revlog_key(&self, shard: u8) -> String {
        format!("{}:revlog", self.tag(shard))
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
        inv.arg(c.id.as_str()).arg(to_json(c)?).arg(c.expires_at_ms);
    }
    Ok(())
}

impl LeaseStore for RedisStore {
    async fn begin(
        &self,
        task: &TaskRecord,
        credentials: &[CredentialRecord],
    ) -> Result<BeginOutcome, StoreError> {
        let [k_task, k_creds, k_cexp, k_deadlines, ..] = self.task_keys(&task.id);
        let mut inv = self.scripts.begin.prepare_invoke();
        inv.key(&k_task)
            .key(&k_creds)
            .key(&k_cexp)
            .key(&k_deadlines);
        inv.arg(to_json(task)?)
            .arg(task.lease_deadline_ms)
            .arg(task.max_deadline_ms)
            .arg(task.max_deadline_ms.saturating_add(self.retention_ms))
            .arg(task.id.as_str());
        push_credentials(&mut inv, credentials)?;
        let reply = self.run(&mut inv).await?;
        match reply.first().and_then(Option::as_deref) {
            Some("created") => Ok(BeginOutcome::Created),
            Some("existing") => Ok(BeginOutcome::Existing(Box::new(task_from_fields(
                task_part(&reply)?,
            )?))),
            _ => Err(corrupt("begin reply")),
        }
    }

    async fn task(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let [k_task, ..] = self.task_keys(task_id);
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&k_task)
            .arg(&["rec", "state", "deadline", "ended", "outcome"])
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
        now_ms: u64,
        new_deadline_ms: u64,
        credentials: &[CredentialRecord],
    ) -> Result<RenewOutcome, StoreError> {
        let [k_task, k_creds, k_cexp, k_deadlines, ..] = self.task_keys(task_id);
        let mut inv = self.scripts.renew.prepare_invoke();
        inv.key(&k_task)
            .key(&k_creds)
            .key(&k_cexp)
            .key(&k_deadlines);
        inv.arg(now_ms).arg(new_deadline_ms).arg(task_id.as_str());
        push_credentials(&mut inv, credentials)?;
        let reply = self.run(&mut inv).await?;
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(RenewOutcome::NotFound),
            Some("inactive") => Ok(RenewOutcome::NotActive(task_from_fields(task_part(
                &reply,
            )?)?)),
            Some("renewed") => Ok(RenewOutcome::Renewed(task_from_fields(task_part(&reply)?)?)),
            _ => Err(corrupt("renew reply")),
        }
    }

    async fn complete(
        &self,
        task_id: &TaskId,
        now_ms: u64,
        outcome: &str,
    ) -> Result<CompleteOutcome, StoreError> {
        let [k_task, k_creds, k_cexp, k_deadlines, _, k_revlog, k_revoked] =
            self.task_keys(task_id);
        let mut inv = self.scripts.complete.prepare_invoke();
        inv.key(&k_task)
            .key(&k_cexp)
            .key(&k_deadlines)
            .key(&k_revlog)
            .key(&k_revoked)
            .key(&k_creds);
        inv.arg(now_ms)
            .arg(outcome)
            .arg(task_id.as_str())
            .arg(REVOCATION_LOG_MAX);
        let reply = self.run(&mut inv).await?;
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(CompleteOutcome::NotFound),
            Some("ended") => Ok(CompleteOutcome::AlreadyEnded(task_from_fields(task_part(
                &reply,
            )?)?)),
            Some("done") => {
                let task = task_from_fields(task_part(&reply)?)?;
                let revoked = credential_ids(reply.get(6..).unwrap_or_default())?;
                Ok(CompleteOutcome::Ended { task, revoked })
            }
            _ => Err(corrupt("complete reply")),
        }
    }

    async fn credential(
        &self,
        task_id: &TaskId,
        credential_id: &CredentialId,
    ) -> Result<Option<CredentialView>, StoreError> {
        let [k_task, k_creds, ..] = self.task_keys(task_id);
        let mut inv = self.scripts.read_credential.prepare_invoke();
        inv.key(&k_task).key(&k_creds).arg(credential_id.as_str());
        let reply = self.run(&mut inv).await?;
        match reply.first().and_then(Option::as_deref) {
            Some("missing") => Ok(None),
            Some("found") => {
                let task = task_from_fields(task_part(&reply)?)?;
                let json = reply
                    .get(6)
                    .and_then(Option::as_deref)
                    .ok_or_else(|| corrupt("credential reply"))?;
                let credential = serde_json::from_str(json)
                    .map_err(|e| corrupt(&format!("credential record: {e}")))?;
                Ok(Some(CredentialView { task, credential }))
            }
            _ => Err(corrupt("credential reply")),
        }
    }

    async fn claim_due(
        &self,
        shard: u8,
        now_ms: u64,
        claim_ttl_ms: u64,
        limit: usize,
    ) -> Result<Vec<TaskId>, StoreError> {
        let tag = self.tag(shard);
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.key(format!("{tag}:deadlines"))
            .key(format!("{tag}:claims"))
            .arg(now_ms)
            .arg(now_ms.saturating_add(claim_ttl_ms))
            .arg(limit);
        let reply = self.run(&mut inv).await?;
        reply
            .into_iter()
            .map(|id| {
                id.as_deref()
                    .and_then(TaskId::parse)
                    .ok_or_else(|| corrupt("claimed task id"))
            })
            .collect()
    }

    async fn expire(&self, task_id: &TaskId, now_ms: u64) -> Result<ExpireOutcome, StoreError> {
        let [
            k_task,
            k_creds,
            k_cexp,
            k_deadlines,
            k_claims,
            k_revlog,
            k_revoked,
        ] = self.task_keys(task_id);
        let mut inv = self.scripts.expire.prepare_invoke();
        inv.key(&k_task)
            .key(&k_creds)
            .key(&k_deadlines)
            .key(&k_claims);
        inv.key(&k_cexp).key(&k_revlog).key(&k_revoked);
        inv.arg(now_ms)
            .arg(task_id.as_str())
            .arg(REVOCATION_LOG_MAX);
        let reply = self.run(&mut inv).await?;
        match reply.first().and_then(Option::as_deref) {
            Some("ended") => Ok(ExpireOutcome::AlreadyEnded),
            Some("notdue") => Ok(ExpireOutcome::NotDue),
            Some("expired") => {
                let task = Box::new(task_from_fields(task_part(&reply)?)?);
                let revoked = credential_ids(reply.get(6..).unwrap_or_default())?;
                Ok(ExpireOutcome::Expired { task, revoked })
            }
            _ => Err(corrupt("expire reply")),
        }
    }

    async fn release(&self, task_id: &TaskId) -> Result<(), StoreError> {
        let [_, _, _, _, k_claims, ..] = self.task_keys(task_id);
        let mut conn = self.conn.clone();
        redis::cmd("ZREM")
            .arg(&k_claims)
            .arg(task_id.as_str())
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }

    async fn revocation_snapshot(
        &self,
        now_ms: u64,
    ) -> Result<(Vec<RevocationRecord>, RevocationCursor), StoreError> {
        let mut cursor = RevocationCursor::default();
        let mut records = Vec::new();
        for shard in 0..SHARDS {
            let tag = self.tag(shard);
            let mut inv = self.scripts.snapshot.prepare_invoke();
            inv.key(format!("{tag}:revlog"))
                .key(format!("{tag}:revoked"))
                .arg(now_ms);
            let reply = self.run(&mut inv).await?;
            let last = reply
                .first()
                .and_then(Option::as_deref)
                .and_then(LogId::parse)
                .ok_or_else(|| corrupt("revocation log id"))?;
            cursor.advance(shard, last);
            for pair in reply.get(1..).unwrap_or_default().chunks(2) {
                let (Some(Some(member)), Some(Some(exp))) = (pair.first(), pair.get(1)) else {
                    return Err(corrupt("revoked set"));
                };
                let (id, audience) = member.split_once(' ').unwrap_or((member, ""));
                records.push(RevocationRecord {
                    credential_id: CredentialId::parse(id).ok_or_else(|| corrupt("revoked id"))?,
                    expires_at_ms: parse_score(exp)?,
                    revoked_at_ms: 0,
                    reason: EndReason::Completion,
                    audience: audience.to_owned(),
                    position: (shard, LogId::default()),
                });
            }
        }
        Ok((records, cursor))
    }

    async fn read_revocations(
        &self,
        after: &RevocationCursor,
        wait: Duration,
        limit: usize,
    ) -> Result<RevocationRead, StoreError> {
        let keys: Vec<String> = (0..SHARDS).map(|s| self.revlog_key(s)).collect();
        let ids: Vec<String> = after.0.iter().map(ToString::to_string).collect();
        let mut inv = self.scripts.gap.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for id in &ids {
            inv.arg(id);
        }
        let mut conn = self.conn.clone();
        let gap: i64 = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if gap == 1 {
            return Ok(RevocationRead::Gap);
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(limit.max(1));
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        if wait_ms > 0 {
            cmd.arg("BLOCK").arg(wait_ms);
        }
        cmd.arg("STREAMS").arg(&keys).arg(&ids);
        let reply: Option<redis::streams::StreamReadReply> = if wait_ms > 0 {
            self.blocking_query(&cmd, wait).await?
        } else {
            cmd.query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?
        };
        let mut cursor = after.clone();
        let mut records = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let shard = keys
                .iter()
                .position(|k| *k == stream.key)
                .and_then(|i| u8::try_from(i).ok())
                .ok_or_else(|| corrupt("revocation stream key"))?;
            for entry in stream.ids {
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
                    position: (shard, pos),
                });
                cursor.advance(shard, pos);
            }
        }
        Ok(RevocationRead::Records(records, cursor))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&e))
    }
}
