//! Fault test with real processes (issue 6, acceptance 2).
//!
//! Two `leash serve` processes (this crate's binary, brokers A and B) share one
//! real `redis-server` with AOF (`appendfsync always`, `durability = "fsync"`).
//! Four agents run begin → use → renew → complete loops over mTLS, two through
//! each broker, with 1–2 s leases; an agent whose broker answers UNAVAILABLE (or
//! is gone) moves to the other one. Meanwhile the faults, in order:
//!
//! 1. `kill -9` broker A (its agents move to B);
//! 2. `kill -9` Redis, and restart it on the same port and data;
//! 3. SIGSTOP Redis for 10 s, then SIGCONT.
//!
//! Throughout, probers check every issued credential, live and ended, through
//! `Verifier.Introspect` (on both brokers) and through three SDK `Verifier`s
//! (watching A, watching B, and one connected after the faults). After the
//! load, the checker proves from what the agents were told and what Redis holds:
//!
//! - no credential is accepted after its end beyond the bounds below;
//! - every acknowledged change survived (begin, renewal, completion);
//! - no lease is left unreaped, and none was reaped later than the bound;
//! - every failure an agent saw was UNAVAILABLE, or one of the legitimate
//!   exceptions documented at [`classify`].
//!
//! It prints calls, failures by code and violations, and asserts zero violations.
//!
//! # The bounds (what "beyond the documented bound" means here)
//!
//! A credential ends at `min(its expiry, its task's end)`. Its task ends when
//! CompleteTask is acknowledged (the ack's arrival at the agent, or the
//! `ended` time Redis recorded if earlier), or when its lease lapses.
//!
//! - **Introspect** decides on Redis's clock, which on this one host is the
//!   test's clock: a probe *sent* more than [`CLOCK_MARGIN_MS`] after the end
//!   must be answered inactive (CompleteTask: "when it returns, every credential
//!   of the task is inactive"; a lapsed lease is inactive from its deadline).
//! - **SDK `Verifier`** (default config, [`sdk_config`]): a credential that
//!   ended by *expiry* may be accepted until `exp + leeway` (the documented
//!   clock-skew allowance); one that ended by *revocation* (completion before
//!   its expiry) must be refused from `T + PROPAGATION_MS`, unless the
//!   verifier's revocation stream was impaired around `T` (its broker dead, or
//!   Redis down or stopped). Then the bound is the earlier of "the stream is back
//!   and the watcher reconnected" (`end + RECONNECT_MS + PROPAGATION_MS`) and
//!   "the verifier fails closed" (`start + fail_closed_after + SILENCE_SLACK_MS`).
//! - **Reaper**: a lapsed lease is expired within `reaper.interval +
//!   REAPER_MARGIN_MS` of its deadline, or of the end of a Redis outage that
//!   covered it.
#![allow(
    clippy::unwrap_used,
    reason = "a failed unwrap in a test is a failed test"
)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use leash_broker::{
    cli::client::connect_with,
    credentials::{Algorithm, SigningKey},
    identity::client_tls_config,
    store::{SHARDS, TaskId},
};
use leash_e2e::{RedisCluster, RedisServer, SentinelGroup, TestPki, eventually, free_port, pb};
use leash_sdk::verifier::{Verifier, VerifierConfig};
use pb::{broker_client::BrokerClient, verifier_client::VerifierClient};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Code, transport::Channel};

const LEASH: &str = env!("CARGO_BIN_EXE_leash");

// ---------------------------------------------------------------- knobs

/// Redis key prefix of both replicas.
const PREFIX: &str = "leash-faults";
/// `reaper.interval` of both replicas.
const REAPER_INTERVAL_MS: u64 = 100;
/// The resource server identity that introspects and watches revocations.
const VERIFIER_CALLER: &str = "resource/api";
/// The broker's `[verifier]` section: the ONE place to adapt when the verifier
/// configuration changes (it must let [`VERIFIER_CALLER`] introspect and watch
/// credentials of [`AUDIENCE`] and of the opaque grant's audience).
const VERIFIER_TOML: &str = r#"
[verifier]
callers = [
  { identity = "spiffe://acme.test/resource/*", audiences = ["https://api.fault.test", "postgres://db.fault.test/app"] },
]
[[actors.classes]]
name = "any"
tenant = "default"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/*"]
"#;
const ISSUER: &str = "https://leash.acme.test";
const AUDIENCE: &str = "https://api.fault.test";
const SCOPE: &str = "repo:acme/widgets:read";
const TEMPLATE: &str = r#"
name: fault
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
parameters:
  repo: { type: string, pattern: "[a-z0-9-]+/[a-z0-9-]+" }
lease:
  ttl: 2s
  max_ttl: 2s
  max_lifetime: 1m
  min_renew_interval: 0s
grants:
  - { name: api, kind: jwt, audience: "https://api.fault.test", scopes: [{scope: "repo:{repo}:read", class: read}], ttl: 60s }
  - { name: db, kind: opaque, audience: "postgres://db.fault.test/app", scopes: [{scope: "db:app:select", class: read}], ttl: 60s }
"#;

const AGENTS: usize = 4;
/// Steady load between faults.
const CALM: Duration = Duration::from_secs(3);
/// How long Redis stays dead after `kill -9`.
const REDIS_DEAD: Duration = Duration::from_secs(1);
/// How long Redis stays stopped (SIGSTOP).
const REDIS_STOPPED: Duration = Duration::from_secs(10);
/// How long a broker is cut off from Redis (paused with SIGSTOP).
const BROKER_CUT: Duration = Duration::from_secs(10);
/// How long all of Redis stays stopped in the Sentinel and Cluster scenarios.
const ALL_REDIS_STOPPED: Duration = Duration::from_secs(30);
/// Client-side bound on one agent call; the broker bounds store calls far below it.
const CALL_TIMEOUT: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------- bounds

/// Redis TIME and the test's clock are the same host clock; this covers ms rounding.
const CLOCK_MARGIN_MS: u64 = 20;
/// A revocation reaches a watching SDK verifier this soon when nothing is broken
/// (the feed's blocking read returns at once; generous for 2 busy cores).
const PROPAGATION_MS: u64 = 2_000;
/// After an impairment ends, a watcher reconnects within its largest backoff (5 s) and a margin.
const RECONNECT_MS: u64 = 6_000;
/// A watcher may still hear a heartbeat shortly after Redis stops answering
/// (the feed notices after its 1 s blocking read plus the store timeout).
const SILENCE_SLACK_MS: u64 = 2_000;
/// Reaper lateness allowed beyond `reaper.interval` (a busy machine, a reconnect).
const REAPER_MARGIN_MS: u64 = 3_000;
/// A lease that fell due during a store outage is reaped this soon after the
/// store is back (issue 11: "no lease unreaped within 2 s of recovery").
const RECOVERY_REAP_MS: u64 = 2_000;

/// The SDK verifier as a resource server would run it: the defaults
/// (5 s leeway, fail closed after 15 s of stream silence).
fn sdk_config() -> VerifierConfig {
    VerifierConfig::new(AUDIENCE, ISSUER)
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn ts_ms(ts: Option<&prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| {
        u64::try_from(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).unwrap_or(0)
    })
}

/// A small deterministic PRNG (xorshift), seeded per run and printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

// ---------------------------------------------------------------- processes

/// One `leash serve` process with its own config file and log.
struct BrokerProc {
    name: &'static str,
    config: PathBuf,
    log: PathBuf,
    agent: SocketAddr,
    ops: SocketAddr,
    child: Option<Child>,
}

impl BrokerProc {
    fn new(name: &'static str, dir: &Path, store: &str, pki: &TestPki) -> Self {
        let mut me = Self {
            name,
            config: dir.join(format!("leash-{name}.toml")),
            log: dir.join(format!("leash-{name}.log")),
            agent: SocketAddr::from(([127, 0, 0, 1], 0)),
            ops: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: None,
        };
        me.write_config(dir, store, pki);
        me
    }

    /// `store` is the whole `[store]` section (and its sub-tables).
    fn write_config(&mut self, dir: &Path, store: &str, pki: &TestPki) {
        self.agent = SocketAddr::from(([127, 0, 0, 1], free_port()));
        self.ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let p = pki.dir.path().display();
        let d = dir.display();
        let toml = format!(
            r#"
[listen]
agent = "{agent}"
ops = "{ops}"
[tls]
cert = "{p}/broker.pem"
key = "{p}/broker-key.pem"
bundles = {{ "acme.test" = "{p}/bundle.pem" }}
[templates]
dir = "{d}/templates"
[signing]
issuer = "{ISSUER}"
keys = [{{ kid = "faults-1", alg = "EdDSA", path = "{d}/signing.pem" }}]
{store}
[reaper]
interval = "{REAPER_INTERVAL_MS}ms"
[reload]
interval = "2s"
{VERIFIER_TOML}
"#,
            agent = self.agent,
            ops = self.ops,
        );
        std::fs::write(&self.config, toml).unwrap();
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent.port())
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(LEASH);
        cmd.args(["serve", "--config"]).arg(&self.config);
        // Only this test's config decides: no LEASH_* override from the environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("LEASH_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .env("LEASH_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {LEASH}: {e}"));
        self.child = Some(child);
    }

    /// Starts the process and waits until `/readyz` answers 200 (store reachable).
    async fn start(&mut self, dir: &Path, store: &str, pki: &TestPki, fresh_ports: bool) {
        for attempt in 0..3 {
            if fresh_ports && attempt > 0 {
                self.write_config(dir, store, pki);
            }
            self.spawn();
            let deadline = now_ms() + 30_000;
            while now_ms() < deadline {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    self.child = None;
                    let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                    if fresh_ports && log.contains("cannot listen") {
                        break; // a port was taken meanwhile: new ports, try again
                    }
                    panic!("broker {} exited early ({status}):\n{log}", self.name);
                }
                if ready(self.ops).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.child.is_some() {
                self.kill9();
                panic!(
                    "broker {} not ready within 30 s:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
        }
        panic!("broker {} could not listen after 3 tries", self.name);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// The last `lines` WARN and ERROR lines of the log.
    fn warnings(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let hits: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        hits[hits.len().saturating_sub(lines)..].join("\n")
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// True once `GET /readyz` on the ops port answers 200.
async fn ready(ops: SocketAddr) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(ops).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

/// Keeps a process stopped (SIGSTOP) until dropped (SIGCONT), so a failing
/// test never leaves a stopped Redis behind.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal(pid, "-STOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("redis connect timed out")
    .unwrap()
}

// ---------------------------------------------------------------- the ledger

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Begin,
    Renew,
    Complete,
}

/// One agent call and its result.
#[derive(Debug, Clone)]
struct Call {
    agent: usize,
    broker: usize,
    op: Op,
    /// Task id (renew, complete) or idempotency key (begin).
    subject: String,
    sent_ms: u64,
    recv_ms: u64,
    code: Code,
    message: String,
    /// Renew: the lease deadline the agent had been told before this call.
    known_deadline_ms: u64,
    /// Begin: when the first attempt with this idempotency key was sent, and the TTL asked.
    first_sent_ms: u64,
    ttl_ms: u64,
}

/// One credential handed to an agent.
#[derive(Debug, Clone)]
struct Cred {
    id: String,
    task: String,
    agent: usize,
    jwt: bool,
    value: String,
    /// Its expiry (for a JWT: the `exp` claim).
    exp_ms: u64,
    live_introspected: bool,
    live_sdk_checked: bool,
    introspected_after_end: u32,
    last_introspect_ms: u64,
}

/// What an agent was told about one task.
#[derive(Debug, Clone)]
struct TaskLog {
    /// The latest lease deadline any answer gave.
    known_deadline_ms: u64,
    /// When CompleteTask's OK arrived, and the state it reported.
    ack_ms: Option<u64>,
    ack_state: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Introspect(usize),
    Sdk(usize),
}

/// A probe that accepted a credential.
#[derive(Debug, Clone)]
struct Accepted {
    cred: usize,
    via: Via,
    sent_ms: u64,
}

#[derive(Default)]
struct Ledger {
    calls: Vec<Call>,
    tasks: BTreeMap<String, TaskLog>,
    creds: Vec<Cred>,
    accepted: Vec<Accepted>,
    /// Probe outcomes by kind, for the summary.
    probes: BTreeMap<String, u64>,
    /// Found while recording (a credential outliving its own answer's lease).
    violations: Vec<(String, String)>,
}

impl Ledger {
    fn count(&mut self, what: impl Into<String>) {
        *self.probes.entry(what.into()).or_default() += 1;
    }

    /// Records the credentials of an OK begin or renew answer.
    fn issued(
        &mut self,
        agent: usize,
        task: &str,
        lease_expires_ms: u64,
        credentials: &[pb::Credential],
    ) {
        let log = self.tasks.entry(task.to_owned()).or_insert(TaskLog {
            known_deadline_ms: 0,
            ack_ms: None,
            ack_state: 0,
        });
        log.known_deadline_ms = log.known_deadline_ms.max(lease_expires_ms);
        for c in credentials {
            let jwt = c.kind == pb::CredentialKind::Jwt as i32;
            let mut exp_ms = ts_ms(c.expires_at.as_ref());
            if jwt {
                let claim = jwt_exp(&c.value).map(|s| s * 1000);
                if claim != Some(exp_ms) {
                    self.violations.push((
                        "JWT exp claim differs from expires_at".into(),
                        format!("{} claim {claim:?} expires_at {exp_ms}", c.id),
                    ));
                    exp_ms = exp_ms.max(claim.unwrap_or(0));
                }
            }
            if exp_ms > lease_expires_ms {
                self.violations.push((
                    "credential outlives the lease it was issued with".into(),
                    format!("{} exp {exp_ms} > lease {lease_expires_ms}", c.id),
                ));
            }
            self.creds.push(Cred {
                id: c.id.clone(),
                task: task.to_owned(),
                agent,
                jwt,
                value: c.value.clone(),
                exp_ms,
                live_introspected: false,
                live_sdk_checked: false,
                introspected_after_end: 0,
                last_introspect_ms: 0,
            });
        }
    }

    /// When the agent knows the credential ended: its expiry or its task's ack.
    fn known_end(&self, c: &Cred) -> u64 {
        let ack = self.tasks.get(&c.task).and_then(|t| t.ack_ms);
        ack.map_or(c.exp_ms, |a| a.min(c.exp_ms))
    }
}

fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

/// One fault and when it happened (test clock, ms): from the fault until its
/// cause was undone (a killed broker restarted, Redis back, a master promoted).
#[derive(Debug, Clone)]
struct Fault {
    name: String,
    kind: FaultKind,
    start: u64,
    end: u64,
    /// When every agent had completed a task again after `end`.
    recovered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// Broker `i` was `kill -9`ed (until it was started again).
    BrokerKilled(usize),
    /// Broker `i` was paused (SIGSTOP): cut off from Redis and its agents.
    BrokerPaused(usize),
    /// Some or all of the store could not serve (a node killed or stopped, a
    /// master failing over).
    Store,
}

/// Every fault of a run.
#[derive(Debug, Default, Clone)]
struct Faults(Vec<Fault>);

impl Faults {
    /// The windows in which the store could not serve (every broker
    /// affected): from the fault until the agents complete tasks again, since
    /// the brokers learn of a failover (a Cluster's new slot map, a Sentinel's
    /// new master) only after the test has seen it.
    fn store_windows(&self) -> Vec<(u64, u64)> {
        self.0
            .iter()
            .filter(|f| f.kind == FaultKind::Store)
            .map(|f| (f.start, f.recovered.max(f.end)))
            .collect()
    }

    /// The windows in which broker `b` itself was down or frozen.
    fn broker_windows(&self, b: usize) -> Vec<(u64, u64)> {
        self.0
            .iter()
            .filter(|f| matches!(f.kind, FaultKind::BrokerKilled(i) | FaultKind::BrokerPaused(i) if i == b))
            .map(|f| (f.start, f.end))
            .collect()
    }
}

// ---------------------------------------------------------------- agents

struct Agent {
    idx: usize,
    brokers: Vec<BrokerClient<Channel>>,
    current: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    rng: Rng,
}

type CallResult<T> = Result<T, (Code, String)>;

async fn timed<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> (CallResult<T>, u64, u64) {
    let sent = now_ms();
    let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err((status.code(), status.message().to_owned())),
        Err(_) => Err((
            Code::DeadlineExceeded,
            "no answer within the client timeout".into(),
        )),
    };
    (r, sent, now_ms())
}

/// Failures after which an agent tries the other broker: the broker or its
/// store is unreachable, or the connection broke under the call.
fn moves_on(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

impl Agent {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn record(&self, call: Call) {
        self.ledger.lock().unwrap().calls.push(call);
    }

    async fn backoff(&mut self, attempt: u32) {
        let cap = (100u64 << attempt.min(3)).min(800);
        let d = self.rng.ms(cap / 2, cap);
        tokio::time::sleep(d).await;
    }

    fn call(&self, op: Op, subject: &str, sent_ms: u64, recv_ms: u64, code: Code) -> Call {
        Call {
            agent: self.idx,
            broker: self.current,
            op,
            subject: subject.to_owned(),
            sent_ms,
            recv_ms,
            code,
            message: String::new(),
            known_deadline_ms: 0,
            first_sent_ms: 0,
            ttl_ms: 0,
        }
    }

    async fn begin(&mut self, key: &str, ttl_ms: u64) -> Option<String> {
        let mut first_sent = 0;
        for attempt in 0..12 {
            if attempt > 0 && self.stopping() {
                return None;
            }
            let req = pb::BeginTaskRequest {
                template: "fault".into(),
                parameters: [("repo".to_owned(), "acme/widgets".to_owned())].into(),
                intent: "review under faults".into(),
                requested_ttl: Some(prost_types::Duration {
                    seconds: i64::try_from(ttl_ms / 1000).unwrap(),
                    nanos: 0,
                }),
                idempotency_key: key.to_owned(),
            };
            let mut client = self.brokers[self.current].clone();
            let (r, sent, recv) = timed(client.begin_task(req)).await;
            if first_sent == 0 {
                first_sent = sent;
            }
            let code = r.as_ref().err().map_or(Code::Ok, |e| e.0);
            let mut call = self.call(Op::Begin, key, sent, recv, code);
            call.first_sent_ms = first_sent;
            call.ttl_ms = ttl_ms;
            match r {
                Ok(resp) => {
                    let mut l = self.ledger.lock().unwrap();
                    l.calls.push(call);
                    let lease = ts_ms(resp.lease_expires_at.as_ref());
                    l.issued(self.idx, &resp.task_id, lease, &resp.credentials);
                    return Some(resp.task_id);
                }
                Err((code, message)) => {
                    call.message = message;
                    self.record(call);
                    if !moves_on(code) {
                        return None;
                    }
                    self.current = (self.current + 1) % self.brokers.len();
                    self.backoff(attempt).await;
                }
            }
        }
        None
    }

    /// One renewal, retried while the broker or store is unreachable. False
    /// once the lease is lost (refused, or past its deadline without renewal).
    async fn renew(&mut self, task: &str) -> bool {
        for attempt in 0..30 {
            let known = self.ledger.lock().unwrap().tasks[task].known_deadline_ms;
            if now_ms() > known + 3_000 {
                return false; // long past the deadline: lost, as the SDK would say
            }
            let mut client = self.brokers[self.current].clone();
            let req = pb::RenewLeaseRequest {
                task_id: task.to_owned(),
            };
            let (r, sent, recv) = timed(client.renew_lease(req)).await;
            let code = r.as_ref().err().map_or(Code::Ok, |e| e.0);
            let mut call = self.call(Op::Renew, task, sent, recv, code);
            call.known_deadline_ms = known;
            match r {
                Ok(resp) => {
                    let mut l = self.ledger.lock().unwrap();
                    l.calls.push(call);
                    let lease = ts_ms(resp.lease_expires_at.as_ref());
                    l.issued(self.idx, task, lease, &resp.credentials);
                    return true;
                }
                Err((code, message)) => {
                    call.message = message;
                    self.record(call);
                    if !moves_on(code) {
                        return false;
                    }
                    self.current = (self.current + 1) % self.brokers.len();
                    self.backoff(attempt).await;
                }
            }
        }
        false
    }

    async fn complete(&mut self, task: &str) {
        let started = now_ms();
        for attempt in 0..40 {
            if now_ms() > started + 30_000 {
                return;
            }
            let mut client = self.brokers[self.current].clone();
            let req = pb::CompleteTaskRequest {
                task_id: task.to_owned(),
                outcome: pb::Outcome::Succeeded as i32,
                summary: "done".into(),
            };
            let (r, sent, recv) = timed(client.complete_task(req)).await;
            let code = r.as_ref().err().map_or(Code::Ok, |e| e.0);
            let mut call = self.call(Op::Complete, task, sent, recv, code);
            match r {
                Ok(resp) => {
                    let mut l = self.ledger.lock().unwrap();
                    l.calls.push(call);
                    let t = l.tasks.get_mut(task).unwrap();
                    t.ack_ms = Some(recv);
                    t.ack_state = resp.state;
                    return;
                }
                Err((code, message)) => {
                    call.message = message;
                    self.record(call);
                    if !moves_on(code) {
                        return;
                    }
                    self.current = (self.current + 1) % self.brokers.len();
                    self.backoff(attempt).await;
                }
            }
        }
    }

    async fn run(mut self) {
        for n in 0..1_000 {
            if self.stopping() {
                break;
            }
            let ttl_ms = if self.rng.below(3) == 0 { 1_000 } else { 2_000 };
            let renewals = self.rng.below(4);
            let abandon = self.rng.below(8) == 0;
            let key = format!("a{}-t{n}", self.idx);
            let Some(task) = self.begin(&key, ttl_ms).await else {
                continue;
            };
            // "Use" the credentials, then renew at about 40% of the lease.
            tokio::time::sleep(self.rng.ms(100, 300)).await;
            for _ in 0..renewals {
                if self.stopping() {
                    break;
                }
                tokio::time::sleep(self.rng.ms(ttl_ms * 3 / 10, ttl_ms / 2)).await;
                if !self.renew(&task).await {
                    break;
                }
            }
            if abandon {
                continue; // the lease lapses; the reaper must end it
            }
            self.complete(&task).await;
        }
    }
}

// ---------------------------------------------------------------- probers

/// SDK verifiers being probed: name and verifier.
type Watchers = Arc<Mutex<Vec<(&'static str, Verifier)>>>;

/// Checks every JWT with every SDK verifier, every 250 ms, from issue until
/// past `exp + leeway`: once while live (the positive control), then on every
/// pass after its known end.
async fn sdk_prober(
    ledger: Arc<Mutex<Ledger>>,
    watchers: Watchers,
    certs: Arc<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) {
    let leeway_ms = u64::try_from(sdk_config().leeway.as_millis()).unwrap();
    let mut from = 0;
    while !stop.load(Ordering::Relaxed) {
        sdk_pass(&ledger, &watchers, &certs, leeway_ms, &mut from);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sdk_pass(
    ledger: &Mutex<Ledger>,
    watchers: &Watchers,
    certs: &[Vec<u8>],
    leeway_ms: u64,
    from: &mut usize,
) {
    let watchers = watchers.lock().unwrap().clone();
    let now = now_ms();
    let work: Vec<(usize, String, usize, bool)> = {
        let mut l = ledger.lock().unwrap();
        // Credentials before `from` are all past every horizon.
        while *from < l.creds.len() && l.creds[*from].exp_ms + leeway_ms + 1_000 < now {
            *from += 1;
        }
        let mut work = Vec::new();
        for i in *from..l.creds.len() {
            let end = l.known_end(&l.creds[i]);
            let c = &mut l.creds[i];
            if !c.jwt || now > c.exp_ms + leeway_ms + 1_000 {
                continue;
            }
            let live = now + 50 < end;
            if live && c.live_sdk_checked {
                continue;
            }
            if live {
                c.live_sdk_checked = true;
            }
            work.push((i, c.value.clone(), c.agent, live));
        }
        work
    };
    let mut results = Vec::new();
    for (i, value, agent, live) in work {
        for (w, (_, v)) in watchers.iter().enumerate() {
            let sent = now_ms();
            let r = v.verify(&value, Some(SCOPE), Some(&certs[agent]));
            results.push((
                i,
                w,
                live,
                sent,
                r.map(|_| ()).map_err(|e| format!("{e:?}")),
            ));
        }
    }
    let mut l = ledger.lock().unwrap();
    for (i, w, live, sent, r) in results {
        let phase = if live { "live" } else { "ended" };
        match r {
            Ok(()) => {
                l.count(format!("sdk {phase}: accepted"));
                if !live {
                    l.accepted.push(Accepted {
                        cred: i,
                        via: Via::Sdk(w),
                        sent_ms: sent,
                    });
                }
            }
            Err(e) => {
                let kind = e.split('(').next().unwrap_or_default().to_owned();
                l.count(format!("sdk {phase}: refused {kind}"));
            }
        }
    }
}

/// Introspects each credential once while live and twice after its known end
/// (at once, and 1.5 s later), alternating brokers, at most 24 calls a pass.
async fn introspect_prober(
    ledger: Arc<Mutex<Ledger>>,
    verifiers: Vec<VerifierClient<Channel>>,
    stop: Arc<AtomicBool>,
) {
    let n = verifiers.len();
    let turn = AtomicUsize::new(0);
    while !stop.load(Ordering::Relaxed) {
        let now = now_ms();
        let work: Vec<(usize, String, bool)> = {
            let l = ledger.lock().unwrap();
            let mut first = Vec::new();
            let mut live = Vec::new();
            let mut second = Vec::new();
            for (i, c) in l.creds.iter().enumerate() {
                let end = l.known_end(c);
                if now + 50 < end {
                    if !c.live_introspected {
                        live.push((i, c.value.clone(), true));
                    }
                } else if now >= end && c.introspected_after_end == 0 {
                    first.push((i, c.value.clone(), false));
                } else if c.introspected_after_end == 1 && now >= c.last_introspect_ms + 1_500 {
                    second.push((i, c.value.clone(), false));
                }
            }
            first
                .into_iter()
                .chain(live)
                .chain(second)
                .take(24)
                .collect()
        };
        let mut set = tokio::task::JoinSet::new();
        for (i, value, live) in work {
            let b = turn.fetch_add(1, Ordering::Relaxed) % n;
            let mut v = verifiers[b].clone();
            let mut other = verifiers[(b + 1) % n].clone();
            set.spawn(async move {
                let req = pb::IntrospectRequest { token: value };
                let (r, sent, _) = timed(v.introspect(req.clone())).await;
                if r.is_ok() {
                    return (i, b, live, sent, r.map(|a| a.active));
                }
                // That broker is gone or its store unreachable: ask the other replica.
                let (r, sent, _) = timed(other.introspect(req)).await;
                (i, (b + 1) % n, live, sent, r.map(|a| a.active))
            });
        }
        while let Some(done) = set.join_next().await {
            let (i, b, live, sent, r) = done.unwrap();
            let mut l = ledger.lock().unwrap();
            let phase = if live { "live" } else { "ended" };
            match r {
                Ok(active) => {
                    let c = &mut l.creds[i];
                    if live {
                        c.live_introspected = true;
                    } else {
                        c.introspected_after_end += 1;
                        c.last_introspect_ms = sent;
                    }
                    if active && !live {
                        l.accepted.push(Accepted {
                            cred: i,
                            via: Via::Introspect(b),
                            sent_ms: sent,
                        });
                    }
                    l.count(format!(
                        "introspect {phase}: {}",
                        if active { "active" } else { "inactive" }
                    ));
                }
                // Fail closed: no answer is never "active". Probed again next pass.
                Err((code, _)) => l.count(format!("introspect {phase}: {code:?}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------- the checker

/// What Redis holds about one task at the end.
#[derive(Debug, Clone, Default)]
struct Stored {
    exists: bool,
    state: String,
    deadline_ms: u64,
    ended_ms: Option<u64>,
}

fn task_key(task: &str) -> String {
    let shard = TaskId::parse(task).unwrap().shard();
    format!("{{{PREFIX}:s{shard:x}}}:task:{task}")
}

async fn read_task(conn: &mut impl redis::aio::ConnectionLike, task: &str) -> Stored {
    let f: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(task_key(task))
        .arg(&["rec", "state", "deadline", "ended"])
        .query_async(conn)
        .await
        .unwrap();
    Stored {
        exists: f[0].is_some(),
        state: f[1].clone().unwrap_or_default(),
        deadline_ms: f[2].as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
        ended_ms: f[3].as_deref().and_then(|s| s.parse().ok()),
    }
}

/// Active tasks and deadline entries left in Redis.
async fn leftovers(conn: &mut impl redis::aio::ConnectionLike) -> (Vec<String>, u64) {
    let mut deadlines = 0u64;
    for shard in 0..SHARDS {
        let n: u64 = redis::cmd("ZCARD")
            .arg(format!("{{{PREFIX}:s{shard:x}}}:deadlines"))
            .query_async(conn)
            .await
            .unwrap();
        deadlines += n;
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{PREFIX}:s*}}:task:*"))
        .query_async(conn)
        .await
        .unwrap();
    let mut active = Vec::new();
    for k in keys {
        let state: Option<String> = redis::cmd("HGET")
            .arg(&k)
            .arg("state")
            .query_async(conn)
            .await
            .unwrap();
        if state.as_deref() == Some("active") {
            active.push(k);
        }
    }
    (active, deadlines)
}

/// The latest instant a watching verifier may still accept a credential whose
/// revocation was acknowledged at `t`, given the windows in which its stream was
/// impaired (see the module docs).
fn revocation_bound(t: u64, windows: &[(u64, u64)], fail_closed_ms: u64) -> u64 {
    let mut b = t + PROPAGATION_MS;
    loop {
        let mut changed = false;
        for &(s, e) in windows {
            if s <= b && e + RECONNECT_MS >= t {
                let nb =
                    (e + RECONNECT_MS + PROPAGATION_MS).min(s + fail_closed_ms + SILENCE_SLACK_MS);
                if nb > b {
                    b = nb;
                    changed = true;
                }
            }
        }
        if !changed {
            return b;
        }
    }
}

/// Whether an agent's failed call is legitimate (Some(why)) or a violation (None).
///
/// - UNAVAILABLE: the broker or its store is unreachable (always allowed).
/// - FAILED_PRECONDITION on RenewLease, answered at or after the lease deadline
///   the agent had been told: the lease lapsed during an outage. (Before that
///   deadline it would mean the store lost an acknowledged renewal.)
/// - FAILED_PRECONDITION on a BeginTask retry (same idempotency key) saying the
///   task ended, answered at least the TTL after the first attempt: the first
///   attempt's outcome was unknown, it did create the task, and that lease
///   lapsed before the retry got through. Or saying its lease ends too soon to
///   issue a credential, answered at most a second before that: the retry hit
///   the lease's last fraction of a second, where no whole-second JWT fits.
/// - A transport failure (UNKNOWN, INTERNAL, CANCELLED from the client library)
///   of a call to a broker that was in flight when it was `kill -9`ed: no broker
///   answered it; the connection died under it.
/// - DEADLINE_EXCEEDED (the client's own timeout) of a call to a broker that
///   was paused (SIGSTOP) while the call waited: a frozen process answers
///   nothing, not even UNAVAILABLE.
fn classify(c: &Call, faults: &Faults) -> Option<&'static str> {
    let m = CLOCK_MARGIN_MS;
    match c.code {
        Code::Ok => Some("ok"),
        Code::Unavailable => Some("UNAVAILABLE"),
        Code::FailedPrecondition if c.op == Op::Renew && c.recv_ms + m >= c.known_deadline_ms => {
            Some("FAILED_PRECONDITION: lease lapsed during an outage")
        }
        Code::FailedPrecondition
            if c.op == Op::Begin
                && (c.message.contains("expired") || c.message.contains("ended"))
                && c.recv_ms + m >= c.first_sent_ms + c.ttl_ms =>
        {
            Some("FAILED_PRECONDITION: retried begin found its lapsed task")
        }
        Code::FailedPrecondition
            if c.op == Op::Begin
                && c.message.contains("too soon to issue")
                && c.recv_ms + m + 1_000 >= c.first_sent_ms + c.ttl_ms =>
        {
            Some("FAILED_PRECONDITION: retried begin in its task's last second")
        }
        Code::Unknown | Code::Internal | Code::Cancelled
            if faults.0.iter().any(|f| {
                f.kind == FaultKind::BrokerKilled(c.broker)
                    && c.sent_ms <= f.start + 200
                    && c.recv_ms + m >= f.start
            }) =>
        {
            Some("connection lost: its broker killed mid-call")
        }
        Code::DeadlineExceeded
            if faults.0.iter().any(|f| {
                f.kind == FaultKind::BrokerPaused(c.broker)
                    && c.sent_ms <= f.end
                    && c.recv_ms + m >= f.start
            }) =>
        {
            Some("no answer: its broker paused (SIGSTOP) under the call")
        }
        _ => None,
    }
}

// ---------------------------------------------------------------- judging

/// One broken invariant: its kind, and a line naming what and when.
type Violation = (String, String);

/// Everything the checker judges, gathered after the run.
struct Evidence<'a> {
    ledger: &'a Ledger,
    faults: &'a Faults,
    /// What Redis holds for every task an agent was told about.
    stored: &'a BTreeMap<String, Stored>,
    /// Active tasks and deadline entries left after the drain wait.
    left: &'a (Vec<String>, u64),
    /// The SDK verifiers, in `Via::Sdk` order, with the broker each watches
    /// (`None`: connected after every fault, from a snapshot).
    watchers: &'a [(&'static str, Option<usize>)],
}

const BROKER: [&str; 3] = ["A", "B", "C"];

/// The windows in which verifier `w`'s revocation stream was impaired: the
/// store's outages, and its own broker's death or pause.
fn impaired(w: usize, e: &Evidence<'_>) -> Vec<(u64, u64)> {
    match e.watchers.get(w).and_then(|(_, b)| *b) {
        Some(b) => {
            let mut ws = e.faults.store_windows();
            ws.extend(e.faults.broker_windows(b));
            ws
        }
        None => Vec::new(),
    }
}

/// Every acknowledged change survived; every lapsed lease was reaped in time.
fn judge_store(e: &Evidence<'_>, out: &mut Vec<Violation>) {
    for (task, t) in &e.ledger.tasks {
        let s = &e.stored[task];
        if !s.exists {
            out.push((
                "acknowledged begin lost".into(),
                format!("{task}: no record in Redis"),
            ));
            continue;
        }
        if s.deadline_ms < t.known_deadline_ms {
            out.push((
                "acknowledged renewal lost".into(),
                format!(
                    "{task}: Redis deadline {} < acknowledged {}",
                    s.deadline_ms, t.known_deadline_ms
                ),
            ));
        }
        if let Some(ack) = t.ack_ms {
            let said_completed = t.ack_state == pb::LeaseState::Completed as i32;
            let kept = match s.state.as_str() {
                "completed" => s.ended_ms.is_some_and(|e| e <= ack + CLOCK_MARGIN_MS),
                "expired" => !said_completed,
                _ => false,
            };
            if !kept {
                out.push((
                    "acknowledged completion lost".into(),
                    format!(
                        "{task}: acknowledged state {} at {ack}, Redis {s:?}",
                        t.ack_state
                    ),
                ));
            }
        }
        // Within the interval (plus margin) of its deadline, or within
        // RECOVERY_REAP_MS of the end of a store outage that the deadline fell
        // into or just before.
        if s.state == "expired" && t.ack_ms.is_none() {
            let d = s.deadline_ms;
            let slack = REAPER_INTERVAL_MS + REAPER_MARGIN_MS;
            let bound = e
                .faults
                .store_windows()
                .iter()
                .filter(|(start, end)| d <= *end && d + slack >= *start)
                .map(|(_, end)| *end + RECOVERY_REAP_MS)
                .fold(d + slack, u64::max);
            let ended = s.ended_ms.unwrap_or(u64::MAX);
            if ended > bound {
                out.push((
                    "lease reaped late".into(),
                    format!(
                        "{task}: deadline {d}, reaped {} ms past its bound {bound}",
                        ended - bound
                    ),
                ));
            }
        }
    }
    let (active, deadlines) = e.left;
    if !active.is_empty() || *deadlines > 0 {
        out.push((
            "lease left unreaped".into(),
            format!(
                "{} task(s) still active {:?}, {deadlines} deadline entries",
                active.len(),
                &active[..active.len().min(5)]
            ),
        ));
    }
}

/// No credential accepted after its end beyond the bound; one violation per
/// (credential, prober), with how many probes accepted it.
fn judge_acceptance(e: &Evidence<'_>, out: &mut Vec<Violation>) {
    let leeway_ms = u64::try_from(sdk_config().leeway.as_millis()).unwrap();
    let fail_closed_ms =
        u64::try_from(sdk_config().fail_closed_after.unwrap().as_millis()).unwrap();
    let l = e.ledger;
    let mut seen: BTreeMap<(usize, String), (Violation, u32)> = BTreeMap::new();
    for a in &l.accepted {
        let c = &l.creds[a.cred];
        let t = &l.tasks[&c.task];
        let s = &e.stored[&c.task];
        let found = match a.via {
            Via::Introspect(b) => {
                let store_end = match s.state.as_str() {
                    "completed" => s.ended_ms,
                    "expired" => Some(s.deadline_ms),
                    _ => None,
                };
                let end = [Some(c.exp_ms), t.ack_ms, store_end]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap();
                (a.sent_ms > end + CLOCK_MARGIN_MS).then(|| {
                    (
                        format!("Introspect via {}", BROKER[b]),
                        (
                            "Introspect accepted an ended credential".to_owned(),
                            format!(
                                "{} ({}) via broker {}: asked {} ms after its end (exp {}, ack {:?}, Redis {s:?})",
                                c.id,
                                if c.jwt { "jwt" } else { "opaque" },
                                BROKER[b],
                                a.sent_ms - end,
                                c.exp_ms,
                                t.ack_ms
                            ),
                        ),
                    )
                })
            }
            Via::Sdk(w) => {
                // Ended by revocation: completed before it expired.
                let store_completed = (s.state == "completed").then_some(s.ended_ms).flatten();
                let revoked_at = [t.ack_ms, store_completed]
                    .into_iter()
                    .flatten()
                    .min()
                    .filter(|r| *r < c.exp_ms);
                let expiry_bound = c.exp_ms + leeway_ms;
                let bound = revoked_at.map_or(expiry_bound, |r| {
                    revocation_bound(r, &impaired(w, e), fail_closed_ms).min(expiry_bound)
                });
                (a.sent_ms > bound).then(|| {
                    let why = match revoked_at {
                        Some(r) => format!("revoked (task completed) at {r}, exp {}", c.exp_ms),
                        None => format!("expired at {}", c.exp_ms),
                    };
                    (
                        format!("SDK {}", e.watchers[w].0),
                        (
                            format!("SDK Verifier ({}) accepted an ended credential", e.watchers[w].0),
                            format!(
                                "{} by the verifier {}: first {} ms past its bound, {} ms after exp; {why}",
                                c.id,
                                e.watchers[w].0,
                                a.sent_ms - bound,
                                i128::from(a.sent_ms) - i128::from(c.exp_ms)
                            ),
                        ),
                    )
                })
            }
        };
        if let Some((prober, v)) = found {
            seen.entry((a.cred, prober)).or_insert((v, 0)).1 += 1;
        }
    }
    for (_, ((kind, detail), n)) in seen {
        out.push((kind, format!("{detail} ({n} accepting probe(s))")));
    }
}

/// Every failure an agent saw was allowed by [`classify`]; returns the call table.
fn judge_calls(
    e: &Evidence<'_>,
    out: &mut Vec<Violation>,
) -> BTreeMap<(Op, &'static str), BTreeMap<&'static str, u64>> {
    let mut table: BTreeMap<(Op, &str), BTreeMap<&str, u64>> = BTreeMap::new();
    for c in &e.ledger.calls {
        let class = classify(c, e.faults);
        *table
            .entry((c.op, BROKER[c.broker]))
            .or_default()
            .entry(class.unwrap_or("NOT ALLOWED"))
            .or_default() += 1;
        if class.is_none() {
            out.push((
                "agent saw a failure other than UNAVAILABLE".into(),
                format!(
                    "agent {} {:?} {} via {}: {:?} {:?} (sent {} recv {}, known deadline {})",
                    c.agent,
                    c.op,
                    c.subject,
                    BROKER[c.broker],
                    c.code,
                    c.message,
                    c.sent_ms,
                    c.recv_ms,
                    c.known_deadline_ms
                ),
            ));
        }
    }
    table
}

fn report(
    title: &str,
    e: &Evidence<'_>,
    t0: u64,
    table: &BTreeMap<(Op, &'static str), BTreeMap<&'static str, u64>>,
    violations: &[Violation],
) -> String {
    let l = e.ledger;
    let f = e.faults;
    let rel = |t: u64| format!("{:.1}s", t.saturating_sub(t0) as f64 / 1000.0);
    let mut out = String::new();
    let _ = writeln!(out, "\n=== fault test: {title} ===");
    let _ = writeln!(
        out,
        "{:<58} {:>7} {:>7} {:>7} {:>6}  failures by code",
        "fault (start .. cause undone)", "start", "end", "recov", "calls"
    );
    for fault in &f.0 {
        // The calls sent from the fault until the agents were completing again.
        let mut codes: BTreeMap<String, u64> = BTreeMap::new();
        let mut calls = 0;
        for c in l
            .calls
            .iter()
            .filter(|c| c.sent_ms >= fault.start && c.sent_ms <= fault.recovered)
        {
            calls += 1;
            if c.code != Code::Ok {
                *codes.entry(format!("{:?}", c.code)).or_default() += 1;
            }
        }
        let _ = writeln!(
            out,
            "{:<58} {:>7} {:>7} {:>6.1}s {:>6}  {codes:?}",
            fault.name,
            rel(fault.start),
            rel(fault.end),
            fault.recovered.saturating_sub(fault.end) as f64 / 1000.0,
            calls,
        );
    }
    let _ = writeln!(
        out,
        "tasks begun {} (completion acknowledged {}), credentials issued {} ({} JWT)",
        l.tasks.len(),
        l.tasks.values().filter(|t| t.ack_ms.is_some()).count(),
        l.creds.len(),
        l.creds.iter().filter(|c| c.jwt).count()
    );
    let _ = writeln!(out, "agent calls: {}", l.calls.len());
    for ((op, broker), classes) in table {
        let total: u64 = classes.values().sum();
        let parts: Vec<String> = classes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(
            out,
            "  {op:?} via {broker}: {total:>4}  [{}]",
            parts.join(", ")
        );
    }
    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    for c in l.calls.iter().filter(|c| c.code != Code::Ok) {
        *by_code.entry(format!("{:?}", c.code)).or_default() += 1;
    }
    let _ = writeln!(out, "agent failures by code: {by_code:?}");
    for c in &l.calls {
        if let Some(why) =
            classify(c, f).filter(|_| !matches!(c.code, Code::Ok | Code::Unavailable))
        {
            let _ = writeln!(
                out,
                "  allowed: {why}: agent {} {:?} via {} {:?} {:?}",
                c.agent, c.op, BROKER[c.broker], c.code, c.message
            );
        }
    }
    let _ = writeln!(out, "probes:");
    for (k, n) in &l.probes {
        let _ = writeln!(out, "  {k}: {n}");
    }
    let mut kinds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, d) in violations {
        kinds.entry(k.as_str()).or_default().push(d.as_str());
    }
    let _ = writeln!(out, "violations: {}", violations.len());
    for (k, ds) in &kinds {
        let _ = writeln!(out, "  {k}: {}", ds.len());
        for d in ds.iter().take(5) {
            let _ = writeln!(out, "    - {d}");
        }
    }
    out
}

// ---------------------------------------------------------------- the test

/// Introspects every credential through both brokers and verifies every JWT
/// with every SDK verifier, once, after everything has ended.
async fn final_probes(
    ledger: &Mutex<Ledger>,
    introspectors: &[VerifierClient<Channel>],
    watchers: &Watchers,
    certs: &[Vec<u8>],
) {
    let creds: Vec<(usize, String)> = {
        let l = ledger.lock().unwrap();
        l.creds
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.value.clone()))
            .collect()
    };
    for chunk in creds.chunks(16) {
        let mut set = tokio::task::JoinSet::new();
        for (i, value) in chunk.iter().cloned() {
            for (b, v) in introspectors.iter().enumerate() {
                let mut v = v.clone();
                let token = value.clone();
                set.spawn(async move {
                    let (r, sent, _) = timed(v.introspect(pb::IntrospectRequest { token })).await;
                    (i, b, sent, r.map(|a| a.active))
                });
            }
        }
        while let Some(done) = set.join_next().await {
            let (i, b, sent, r) = done.unwrap();
            let mut l = ledger.lock().unwrap();
            match r {
                Ok(true) => {
                    l.count("introspect final: active");
                    l.accepted.push(Accepted {
                        cred: i,
                        via: Via::Introspect(b),
                        sent_ms: sent,
                    });
                }
                Ok(false) => l.count("introspect final: inactive"),
                Err((code, _)) => l.count(format!("introspect final: {code:?}")),
            }
        }
    }
    let mut from = 0;
    sdk_pass(ledger, watchers, certs, u64::MAX / 4, &mut from);
}

// ---------------------------------------------------------------- deployments

/// The Redis a scenario runs on, started by the test itself.
enum Deployment {
    /// One node, AOF `appendfsync always`, `durability = "fsync"`.
    Single(RedisServer),
    /// A master, two replicas, three Sentinels; `durability = "replicas = 1"`.
    Sentinel(SentinelGroup),
    /// Three masters with a replica each; `durability = "replicas = 1"`.
    Cluster(RedisCluster),
}

/// A connection that reads what the brokers stored, whatever the deployment.
enum Data {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Data {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        0
    }
}

impl Deployment {
    /// The brokers' whole `[store]` section.
    fn store_toml(&self) -> String {
        let common = format!("kind = \"redis\"\nprefix = \"{PREFIX}\"\n");
        match self {
            Self::Single(r) => format!(
                "[store]\n{common}url = \"{}\"\ntimeout = \"500ms\"\ndurability = \"fsync\"\n",
                r.url()
            ),
            Self::Sentinel(g) => format!(
                "[store]\n{common}topology = \"sentinel\"\ntimeout = \"1s\"\ndurability = \"replicas = 1\"\n[store.sentinel]\nmaster = \"{}\"\naddresses = {:?}\n",
                SentinelGroup::NAME,
                g.sentinel_addresses()
            ),
            Self::Cluster(c) => format!(
                "[store]\n{common}topology = \"cluster\"\ntimeout = \"1s\"\ndurability = \"replicas = 1\"\n[store.cluster]\nnodes = {:?}\n",
                c.seeds()
            ),
        }
    }

    async fn data(&self) -> Data {
        match self {
            Self::Single(r) => Data::Node(redis_conn(&r.url()).await),
            Self::Sentinel(g) => {
                let port = tokio::task::block_in_place(|| g.master_port());
                Data::Node(redis_conn(&format!("redis://127.0.0.1:{port}/0")).await)
            }
            Self::Cluster(c) => {
                let urls: Vec<String> = c.seeds().iter().map(|s| format!("redis://{s}")).collect();
                let client = redis::cluster::ClusterClient::new(urls).unwrap();
                Data::Cluster(
                    tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
                        .await
                        .expect("cluster connect timed out")
                        .unwrap(),
                )
            }
        }
    }

    /// Every Redis process (data nodes and Sentinels) running now.
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Single(r) => r.pid().into_iter().collect(),
            Self::Sentinel(g) => g.pids(),
            Self::Cluster(c) => c.pids(),
        }
    }
}

/// One fault of a scenario, run in order with steady load between them.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// `kill -9` broker `i` (started again at the end).
    KillBroker(usize),
    /// SIGSTOP broker `i` for the duration: cut off from Redis (and its agents).
    PauseBroker(usize, Duration),
    /// `kill -9` the single Redis node and restart it on its data.
    KillRedis,
    /// SIGSTOP every Redis process for the duration.
    StopRedis(Duration),
    /// `kill -9` a master (Sentinel's, or one of the Cluster's): a replica is
    /// promoted; the old master comes back as a replica.
    KillMaster,
}

/// Runs `steps` under load on `deployment` with `brokers` broker processes,
/// then judges and reports; panics on any violation.
async fn run_scenario(title: &str, mut deployment: Deployment, brokers_n: usize, steps: &[Step]) {
    // One scenario at a time: each loads both cores on its own.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = std::env::var("LEASH_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() | 1);
    println!("{title}: seed {seed} (LEASH_FAULTS_SEED={seed} replays the agents' choices)");
    let t0 = now_ms();

    // ---- setup: broker processes, verifiers, agents, probers
    let store = deployment.store_toml();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    std::fs::write(dir.path().join("templates/fault.yaml"), TEMPLATE).unwrap();
    // One signing key for every replica, as in production.
    let (_, signing) = SigningKey::generate("faults-1", Algorithm::EdDSA).unwrap();
    std::fs::write(dir.path().join("signing.pem"), signing).unwrap();
    let mut brokers: Vec<BrokerProc> = (0..brokers_n)
        .map(|i| BrokerProc::new(BROKER[i], dir.path(), &store, &pki))
        .collect();
    for b in &mut brokers {
        b.start(dir.path(), &store, &pki, true).await;
    }
    let urls: Vec<String> = brokers.iter().map(BrokerProc::url).collect();
    let channel = |url: String, cert: PathBuf, key: PathBuf| {
        let bundle = pki.bundle();
        async move {
            connect_with(&url, client_tls_config(&bundle, &cert, &key).unwrap())
                .await
                .unwrap()
        }
    };
    let resource = pki.svid(VERIFIER_CALLER);
    let v_chan = |i: usize| channel(urls[i].clone(), resource.cert.clone(), resource.key.clone());
    const WATCHING: [&str; 3] = ["watching A", "watching B", "watching C"];
    let mut watching = Vec::new();
    let mut watcher_of: Vec<(&'static str, Option<usize>)> = Vec::new();
    let mut introspectors = Vec::new();
    for (i, name) in WATCHING.iter().copied().enumerate().take(brokers_n) {
        watching.push((
            name,
            Verifier::connect(v_chan(i).await, sdk_config())
                .await
                .unwrap(),
        ));
        watcher_of.push((name, Some(i)));
        introspectors.push(VerifierClient::new(v_chan(i).await));
    }
    let watchers: Watchers = Arc::new(Mutex::new(watching));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop_agents = Arc::new(AtomicBool::new(false));
    let stop_probes = Arc::new(AtomicBool::new(false));
    let mut certs = Vec::new();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let svid = pki.svid(&format!("agent/f{i}"));
        certs.push(CertificateDer::from_pem_file(&svid.cert).unwrap().to_vec());
        let mut clients = Vec::new();
        for u in &urls {
            clients.push(BrokerClient::new(
                channel(u.clone(), svid.cert.clone(), svid.key.clone()).await,
            ));
        }
        let agent = Agent {
            idx: i,
            brokers: clients,
            current: i % brokers_n,
            ledger: ledger.clone(),
            stop: stop_agents.clone(),
            rng: Rng(seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i as u64)
                | 1),
        };
        agents.push(tokio::spawn(agent.run()));
    }
    let certs = Arc::new(certs);
    let probers = [
        tokio::spawn(sdk_prober(
            ledger.clone(),
            watchers.clone(),
            certs.clone(),
            stop_probes.clone(),
        )),
        tokio::spawn(introspect_prober(
            ledger.clone(),
            introspectors.clone(),
            stop_probes.clone(),
        )),
    ];

    // Every agent completes tasks (begun after `since`) — the recovery condition.
    let completions = |since: u64| {
        let l = ledger.lock().unwrap();
        (0..AGENTS)
            .map(|a| {
                l.calls
                    .iter()
                    .filter(|c| {
                        c.agent == a
                            && c.op == Op::Complete
                            && c.code == Code::Ok
                            && c.sent_ms >= since
                    })
                    .count()
            })
            .min()
            .unwrap_or(0)
    };
    let recovered = |what: String, since: u64, n: usize| {
        let completions = &completions;
        async move {
            let back = eventually(Duration::from_secs(45), || async {
                completions(since) >= n
            })
            .await;
            assert!(
                back.is_some(),
                "the agents did not complete tasks within 45 s {what}"
            );
            now_ms()
        }
    };
    recovered("at the start".into(), 0, 2).await;
    tokio::time::sleep(CALM).await;

    // ---- the faults
    let mut faults = Faults::default();
    let mut killed_brokers = Vec::new();
    for step in steps {
        let start = now_ms();
        let (name, kind) = match *step {
            Step::KillBroker(i) => {
                brokers[i].kill9();
                killed_brokers.push(i);
                (
                    format!("kill -9 broker {}", BROKER[i]),
                    FaultKind::BrokerKilled(i),
                )
            }
            Step::PauseBroker(i, d) => {
                let paused = Stopped::new(brokers[i].pid());
                tokio::time::sleep(d).await;
                drop(paused);
                (
                    format!(
                        "broker {} paused (SIGSTOP) {} s: cut off from Redis",
                        BROKER[i],
                        d.as_secs()
                    ),
                    FaultKind::BrokerPaused(i),
                )
            }
            Step::KillRedis => {
                let Deployment::Single(redis) = &mut deployment else {
                    panic!("KillRedis is for one node")
                };
                tokio::task::block_in_place(|| redis.kill());
                tokio::time::sleep(REDIS_DEAD).await;
                tokio::task::block_in_place(|| redis.restart());
                (
                    "kill -9 Redis, restart on its data".into(),
                    FaultKind::Store,
                )
            }
            Step::StopRedis(d) => {
                let stopped: Vec<Stopped> =
                    deployment.pids().into_iter().map(Stopped::new).collect();
                tokio::time::sleep(d).await;
                drop(stopped);
                (
                    format!("all of Redis stopped (SIGSTOP) {} s", d.as_secs()),
                    FaultKind::Store,
                )
            }
            Step::KillMaster => {
                let name = tokio::task::block_in_place(|| match &mut deployment {
                    Deployment::Sentinel(g) => {
                        let m = g.master();
                        let old = g.nodes[m].port();
                        g.nodes[m].kill();
                        let new = g.wait_promoted(old, Duration::from_secs(30));
                        g.nodes[m].restart_with(&["--replicaof", "127.0.0.1", &new.to_string()]);
                        format!("kill -9 the Sentinel master :{old} (promoted :{new})")
                    }
                    Deployment::Cluster(c) => {
                        let m = c.masters()[0];
                        let old = c.nodes[m].port();
                        c.nodes[m].kill();
                        c.wait_failed_over(old, Duration::from_secs(30));
                        c.nodes[m].restart();
                        format!("kill -9 Cluster master :{old} (its replica took over)")
                    }
                    Deployment::Single(_) => panic!("KillMaster is for Sentinel and Cluster"),
                });
                (name, FaultKind::Store)
            }
        };
        let end = now_ms();
        let back = recovered(format!("after: {name}"), end, 1).await;
        faults.0.push(Fault {
            name,
            kind,
            start,
            end,
            recovered: back,
        });
        tokio::time::sleep(CALM).await;
    }

    // ---- wind down: agents finish, killed brokers come back, a fresh verifier joins
    stop_agents.store(true, Ordering::Relaxed);
    for a in agents {
        tokio::time::timeout(Duration::from_secs(60), a)
            .await
            .expect("an agent did not stop within 60 s")
            .unwrap();
    }
    for &i in &killed_brokers {
        brokers[i].start(dir.path(), &store, &pki, false).await;
        let back = now_ms();
        for f in &mut faults.0 {
            if f.kind == FaultKind::BrokerKilled(i) {
                f.end = back;
            }
        }
    }
    let fresh = Verifier::connect(v_chan(0).await, sdk_config())
        .await
        .unwrap();
    watchers
        .lock()
        .unwrap()
        .push(("fresh after the faults", fresh));
    watcher_of.push(("fresh after the faults", None));

    // No lease left unreaped: wait (bounded) for every deadline entry to go.
    let mut conn = deployment.data().await;
    let mut left = leftovers(&mut conn).await;
    let give_up = now_ms() + 30_000;
    while !(left.0.is_empty() && left.1 == 0) && now_ms() < give_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = leftovers(&mut conn).await;
    }

    // The probers see every credential through its last window, then stop.
    let leeway_ms = u64::try_from(sdk_config().leeway.as_millis()).unwrap();
    let horizon = ledger
        .lock()
        .unwrap()
        .creds
        .iter()
        .map(|c| c.exp_ms)
        .max()
        .unwrap_or(0)
        + leeway_ms
        + 1_500;
    let waited = eventually(Duration::from_secs(30), || async { now_ms() > horizon }).await;
    assert!(waited.is_some(), "the probe horizon did not pass");
    stop_probes.store(true, Ordering::Relaxed);
    for p in probers {
        tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("a prober did not stop")
            .unwrap();
    }
    final_probes(&ledger, &introspectors, &watchers, &certs).await;

    // ---- judge and report
    let tasks: Vec<String> = ledger.lock().unwrap().tasks.keys().cloned().collect();
    let mut stored = BTreeMap::new();
    for task in tasks {
        let s = read_task(&mut conn, &task).await;
        stored.insert(task, s);
    }
    let l = ledger.lock().unwrap();
    let evidence = Evidence {
        ledger: &l,
        faults: &faults,
        stored: &stored,
        left: &left,
        watchers: &watcher_of,
    };
    let mut violations = l.violations.clone();
    judge_store(&evidence, &mut violations);
    judge_acceptance(&evidence, &mut violations);
    let table = judge_calls(&evidence, &mut violations);
    println!("{}", report(title, &evidence, t0, &table, &violations));
    if !violations.is_empty() {
        for b in &brokers {
            println!(
                "--- broker {} warnings (tail) ---\n{}",
                b.name,
                b.warnings(20)
            );
        }
    }
    println!("took {:.1} s", (now_ms() - t0) as f64 / 1000.0);

    // The checker can see acceptance at all: live credentials were accepted on
    // both paths, and ended ones were probed on both.
    let sum = |prefix: &str| -> u64 {
        l.probes
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    };
    assert!(
        sum("introspect live: active") > 0,
        "no live credential ever introspected active: the checker is blind"
    );
    assert!(
        sum("sdk live: accepted") > 0,
        "no live JWT ever accepted by an SDK verifier: the checker is blind"
    );
    assert!(
        sum("introspect ended") > 0 && sum("sdk ended") > 0,
        "ended credentials were never probed"
    );
    assert!(
        violations.is_empty(),
        "{} violation(s); see the report above",
        violations.len()
    );
}

// ---------------------------------------------------------------- the tests

/// Two brokers on one Redis node (AOF, fsync): a broker killed, Redis killed
/// and restarted, Redis paused for 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_credential_outlives_its_reason_through_broker_and_redis_crashes() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    run_scenario(
        "4 agents, brokers A and B (processes) on one Redis (AOF, fsync)",
        Deployment::Single(redis),
        2,
        &[
            Step::KillBroker(0),
            Step::KillRedis,
            Step::StopRedis(REDIS_STOPPED),
        ],
    )
    .await;
}

/// Three brokers on Redis Sentinel (a master, two replicas, three Sentinels;
/// `replicas = 1`): the master killed (a replica promoted), a broker killed, a
/// broker cut off for 10 s, all of Redis stopped for 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_credential_outlives_its_reason_on_redis_sentinel() {
    let group = tokio::task::block_in_place(|| SentinelGroup::start(2, 3));
    run_scenario(
        "4 agents, brokers A, B and C on Redis Sentinel (1 master, 2 replicas, 3 sentinels; replicas = 1)",
        Deployment::Sentinel(group),
        3,
        &[
            Step::KillMaster,
            Step::KillBroker(0),
            Step::PauseBroker(1, BROKER_CUT),
            Step::StopRedis(ALL_REDIS_STOPPED),
        ],
    )
    .await;
}

/// Three brokers on a Redis Cluster (three masters with a replica each;
/// `replicas = 1`): a master killed (its replica takes over), a broker killed,
/// a broker cut off for 10 s, all of Redis stopped for 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_credential_outlives_its_reason_on_redis_cluster() {
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 1));
    run_scenario(
        "4 agents, brokers A, B and C on a Redis Cluster (3 masters, 1 replica each; replicas = 1)",
        Deployment::Cluster(cluster),
        3,
        &[
            Step::KillMaster,
            Step::KillBroker(0),
            Step::PauseBroker(1, BROKER_CUT),
            Step::StopRedis(ALL_REDIS_STOPPED),
        ],
    )
    .await;
}
// ---------------------------------------------------------------- the checker's own rules

#[test]
fn the_revocation_bound_stretches_only_over_impairments() {
    // A verifier that would stay open on stale knowledge for a minute.
    let patient = 60_000;
    // Calm: the propagation bound.
    assert_eq!(
        revocation_bound(100_000, &[], patient),
        100_000 + PROPAGATION_MS
    );
    // A window long before or long after does not matter.
    let far = [(10_000, 20_000), (200_000, 210_000)];
    assert_eq!(
        revocation_bound(100_000, &far, patient),
        100_000 + PROPAGATION_MS
    );
    // Revoked just before Redis stopped for 10 s: the watcher reconnects after the end.
    let stop = [(101_000, 111_000)];
    let after = 111_000 + RECONNECT_MS + PROPAGATION_MS;
    assert_eq!(revocation_bound(100_000, &stop, patient), after);
    // Revoked just after the outage ended: the watcher may still be in its backoff.
    assert_eq!(revocation_bound(112_000, &stop, patient), after);
    // With the default 15 s, failing closed comes first.
    assert_eq!(
        revocation_bound(100_000, &stop, 15_000),
        101_000 + 15_000 + SILENCE_SLACK_MS
    );
    // The broker watched is dead for good: only failing closed bounds it.
    let dead = [(99_000, u64::MAX / 2)];
    assert_eq!(
        revocation_bound(100_000, &dead, 15_000),
        99_000 + 15_000 + SILENCE_SLACK_MS
    );
}

#[test]
fn only_unavailable_and_the_documented_exceptions_are_allowed() {
    let faults = Faults(vec![Fault {
        name: "kill -9 broker A".into(),
        kind: FaultKind::BrokerKilled(0),
        start: 50_000,
        end: 60_000,
        recovered: 61_000,
    }]);
    let call = |op, broker, code, sent_ms, recv_ms| Call {
        agent: 0,
        broker,
        op,
        subject: "x".into(),
        sent_ms,
        recv_ms,
        code,
        message: "task tk_x has expired: its lease was not renewed in time".into(),
        known_deadline_ms: 10_000,
        first_sent_ms: 8_000,
        ttl_ms: 2_000,
    };
    let allowed = |c: &Call| classify(c, &faults).is_some();
    assert!(allowed(&call(Op::Renew, 1, Code::Unavailable, 1, 2)));
    // A refused renewal after the known deadline; before it, a lost renewal.
    assert!(allowed(&call(
        Op::Renew,
        1,
        Code::FailedPrecondition,
        9_000,
        10_100
    )));
    assert!(!allowed(&call(
        Op::Renew,
        1,
        Code::FailedPrecondition,
        9_000,
        9_500
    )));
    // A retried begin finding its lapsed task, only once the TTL could have run out.
    assert!(allowed(&call(
        Op::Begin,
        1,
        Code::FailedPrecondition,
        10_000,
        10_050
    )));
    assert!(!allowed(&call(
        Op::Begin,
        1,
        Code::FailedPrecondition,
        9_000,
        9_100
    )));
    // ... or in its last second, with no room for a JWT.
    let mut late = call(Op::Begin, 1, Code::FailedPrecondition, 9_000, 9_100);
    late.message = "the lease ends in 300 ms, too soon to issue a credential".into();
    assert!(allowed(&late));
    late.recv_ms = 8_500;
    assert!(!allowed(&late));
    assert!(!allowed(&call(
        Op::Complete,
        1,
        Code::FailedPrecondition,
        20_000,
        20_010
    )));
    // A broken connection only on A, only in flight at A's kill.
    assert!(allowed(&call(Op::Renew, 0, Code::Unknown, 49_990, 50_001)));
    assert!(!allowed(&call(Op::Renew, 1, Code::Unknown, 49_990, 50_001)));
    assert!(!allowed(&call(Op::Renew, 0, Code::Unknown, 40_000, 40_010)));
    for code in [
        Code::NotFound,
        Code::ResourceExhausted,
        Code::PermissionDenied,
        Code::DeadlineExceeded,
    ] {
        assert!(!allowed(&call(Op::Renew, 1, code, 1, 2)), "{code:?}");
    }
}
