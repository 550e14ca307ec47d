//! `leash bench`: load against a running broker, with the ceilings of this very
//! machine measured in the same run, printed as a table of figures, ceilings
//! and ratios, and written as JSON.
//!
//! A load generator, not a test: nothing asserts speed. Every loop is bounded
//! by `--duration` and by `--max-tasks`. See docs/performance.md for how to
//! read the table.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use leash_proto::v1::{self as pb, broker_client::BrokerClient, verifier_client::VerifierClient};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::{ConnectArgs, task::CommandError};

/// What `leash bench` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// BeginTask only; the tasks are left to expire (outside the timed path).
    Begin,
    /// BeginTask → RenewLease → CompleteTask, each timed.
    Cycle,
    /// Verifier.Introspect of a live opaque token, then of a live JWT.
    Introspect,
    /// The SDK's offline JWT verification on one core, against raw `ring`.
    Verify,
    /// A new mTLS connection per task: connect, BeginTask, close.
    Connect,
}

/// Options of `leash bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Modes to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cycle")]
    pub mode: Vec<Mode>,
    /// Concurrent agents; comma-separated for a sweep (e.g. 1,16,64,256).
    #[arg(long, short, value_delimiter = ',', default_value = "16")]
    pub concurrency: Vec<usize>,
    /// How long each run lasts.
    #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop a run after this many calls, whichever comes first.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_tasks: u64,
    /// TLS connections shared by the agents (HTTP/2 multiplexes the rest).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Template to declare (`leash dev` writes `bench`, whose renewal limit is
    /// off, and `bench-jwt`, the same with one JWT grant).
    #[arg(long, short, default_value = "bench")]
    pub template: String,
    /// Parameter, `name=value`; repeat for each.
    #[arg(long = "param", short = 'p', value_parser = parse_param, default_value = "repo=acme/widgets")]
    pub params: Vec<(String, String)>,
    /// Measure the ceilings too: the gRPC health check on the same port and
    /// connections, ring sign/verify on one core, a raw rustls handshake loop,
    /// and (with `--redis-url`) the store's real begin script.
    #[arg(long)]
    pub ceilings: bool,
    /// More broker replicas (`https://host:port`, comma-separated) sharing
    /// one store with `--broker`: the agents are spread over all of them
    /// evenly (agent `i` talks to broker `i mod n`), `--connections` each.
    #[arg(long, value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// The brokers' process ids (comma-separated), to report their CPU time
    /// per call, summed (from /proc).
    #[arg(long, value_delimiter = ',')]
    pub broker_pid: Vec<u32>,
    /// The broker's Redis: Redis CPU per call, the store-script ceiling and
    /// `--live`. Written under its own key prefix, removed afterwards.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Redis servers whose CPU time is summed into the Redis CPU per call
    /// (comma-separated URLs; every node of a Cluster) [default: --redis-url].
    #[arg(long, value_delimiter = ',')]
    pub redis_cpu: Vec<String>,
    /// Begin this many leases with long TTLs through the store's own begin
    /// script and report Redis memory per live lease (needs `--redis-url`).
    #[arg(long)]
    pub live: Option<u64>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl BenchArgs {
    /// The options of a plain `leash bench` (cycle mode at concurrency 16 for
    /// 10 s, no ceilings) against the broker `connect` names.
    pub fn new(connect: ConnectArgs) -> Self {
        Self {
            mode: vec![Mode::Cycle],
            concurrency: vec![16],
            duration: Duration::from_secs(10),
            max_tasks: 10_000_000,
            connections: 4,
            template: "bench".into(),
            params: vec![("repo".into(), "acme/widgets".into())],
            ceilings: false,
            replicas: Vec::new(),
            broker_pid: Vec::new(),
            redis_url: None,
            redis_cpu: Vec::new(),
            live: None,
            json: None,
            connect,
        }
    }
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

/// One row of the report: a figure, and what it is measured against.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured (an RPC, a ceiling).
    pub name: String,
    /// Concurrency of the run (1 for single-core loops).
    pub concurrency: usize,
    /// Completed operations per second.
    pub rate: f64,
    /// Latency percentiles and maximum in ms (0 where not timed per call).
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest call.
    pub max_ms: f64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Broker CPU time per operation in µs (with `--broker-pid`; summed over
    /// the replicas).
    pub broker_cpu_us: Option<f64>,
    /// Redis CPU time per operation in µs (with `--redis-url` or
    /// `--redis-cpu`; summed over the nodes).
    pub redis_cpu_us: Option<f64>,
    /// The ceiling this figure is compared with, and its rate.
    pub ceiling: Option<(String, f64)>,
    /// rate / ceiling.
    pub ratio: Option<f64>,
    /// The target ratio (issue 10), and whether it is met.
    pub target: Option<f64>,
    /// rate/ceiling ≥ target (and the latency target where there is one).
    pub met: Option<bool>,
    /// The brokers' resident set (VmRSS, MiB, summed over the replicas) once
    /// the run had warmed up (at a tenth of its duration) and at its end, with
    /// `--broker-pid`.
    pub broker_rss_mib: Option<(f64, f64)>,
    /// A remark (the ceiling formula, resumption, memory breakdown).
    pub note: String,
}

impl Row {
    fn new(name: &str, concurrency: usize, rate: f64) -> Self {
        Self {
            name: name.to_owned(),
            concurrency,
            rate,
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            errors: BTreeMap::new(),
            broker_cpu_us: None,
            redis_cpu_us: None,
            ceiling: None,
            ratio: None,
            target: None,
            met: None,
            broker_rss_mib: None,
            note: String::new(),
        }
    }

    fn against(&mut self, ceiling: &str, rate: f64, target: Option<f64>) {
        if rate > 0.0 {
            let ratio = self.rate / rate;
            self.ceiling = Some((ceiling.to_owned(), rate));
            self.ratio = Some(ratio);
            self.target = target;
            self.met = target.map(|t| ratio >= t);
        }
    }
}

/// The whole report.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Every figure, in the order measured.
    pub rows: Vec<Row>,
    /// The machine: logical cores seen by this process.
    pub cores: usize,
    /// Broker replicas the load was spread over (`--broker` and `--replicas`).
    pub brokers: usize,
    /// Seconds per run.
    pub duration_s: f64,
}

/// Samples of one run: per RPC, latencies; failures by code.
#[derive(Debug, Default)]
struct Samples {
    calls: HashMap<&'static str, Vec<Duration>>,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl Samples {
    fn ok(&mut self, rpc: &'static str, d: Duration) {
        self.calls.entry(rpc).or_default().push(d);
    }

    fn failed(&mut self, e: &tonic::Status) {
        *self.errors.entry(format!("{:?}", e.code())).or_default() += 1;
        self.first_error
            .get_or_insert_with(|| format!("{}: {}", e.code(), e.message()));
    }

    fn merge(&mut self, other: Self) {
        for (k, v) in other.calls {
            self.calls.entry(k).or_default().extend(v);
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index of a bounded sample"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[expect(clippy::cast_precision_loss, reason = "rates for display")]
fn per_second(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// When a run stops: at its end time or when its call budget is spent.
#[derive(Debug, Clone)]
struct Stop {
    end: Instant,
    budget: Arc<AtomicU64>,
}

impl Stop {
    fn new(duration: Duration, budget: u64) -> Self {
        Self {
            end: Instant::now() + duration,
            budget: Arc::new(AtomicU64::new(budget)),
        }
    }

    fn running(&self) -> bool {
        Instant::now() < self.end
    }

    fn go(&self) -> bool {
        Instant::now() < self.end
            && self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_ok()
    }
}

/// CPU time of local processes (the broker replicas), read from /proc (user +
/// system), summed.
#[derive(Debug, Clone)]
struct Cpu(Arc<[u32]>);

impl Cpu {
    /// µs of CPU so far, summed; `None` without pids or if a process cannot
    /// be read. Assumes the Linux USER_HZ of 100 ticks per second (x86-64 and
    /// arm64 kernels).
    fn now_us(&self) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.iter().try_fold(0, |sum, &pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(sum + (utime + stime) * 10_000)
        })
    }

    /// The processes' resident set in KiB (VmRSS), summed; `None` without
    /// pids or if a process cannot be read.
    fn rss_kib(&self) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.iter().try_fold(0, |sum, &pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(sum + kib)
        })
    }

    /// Samples the resident set once a second while `stop` runs; answers it
    /// at a tenth of the run (after warm-up) and at the end, in MiB.
    async fn rss_over(self, stop: Stop, duration: Duration) -> Option<(f64, f64)> {
        if self.0.is_empty() {
            return None;
        }
        let start = Instant::now();
        let mut warm = None;
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while stop.running() {
            tick.tick().await;
            let rss = self.rss_kib();
            if warm.is_none() && start.elapsed() >= duration / 10 {
                warm = rss;
            }
            last = rss.or(last);
        }
        last = self.rss_kib().or(last);
        #[expect(clippy::cast_precision_loss, reason = "MiB for display")]
        let mib = |kib: u64| kib as f64 / 1024.0;
        Some((mib(warm.or(last)?), mib(last?)))
    }
}

/// Runs `concurrency` workers until `stop`, and gathers their samples.
async fn drive<W, F>(concurrency: usize, stop: &Stop, worker: W) -> (Samples, Duration)
where
    W: Fn(usize, Stop) -> F,
    F: Future<Output = Samples> + Send + 'static,
{
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for i in 0..concurrency.max(1) {
        workers.spawn(worker(i, stop.clone()));
    }
    let mut all = Samples::default();
    while let Some(r) = workers.join_next().await {
        if let Ok(s) = r {
            all.merge(s);
        }
    }
    (all, start.elapsed())
}

/// The per-RPC rows of one run, with CPU per call.
fn rows_of(
    mut samples: Samples,
    elapsed: Duration,
    concurrency: usize,
    cpu: (Option<u64>, Option<u64>),
    redis_cpu: (Option<u64>, Option<u64>),
) -> Vec<Row> {
    let mut names: Vec<&'static str> = samples.calls.keys().copied().collect();
    names.sort_unstable();
    let total: usize = samples.calls.values().map(Vec::len).sum();
    #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
    let per_call = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if total > 0 => Some(b.saturating_sub(a) as f64 / total as f64),
        _ => None,
    };
    let broker_cpu = per_call(cpu.0, cpu.1);
    let redis = per_call(redis_cpu.0, redis_cpu.1);
    let mut out = Vec::new();
    for name in names {
        let v = samples.calls.entry(name).or_default();
        v.sort_unstable();
        let mut row = Row::new(name, concurrency, per_second(v.len(), elapsed));
        row.p50_ms = ms(percentile(v, 0.50));
        row.p99_ms = ms(percentile(v, 0.99));
        row.p999_ms = ms(percentile(v, 0.999));
        row.max_ms = ms(v.last().copied().unwrap_or_default());
        row.broker_cpu_us = broker_cpu;
        row.redis_cpu_us = redis;
        out.push(row);
    }
    if let Some(first) = out.first_mut() {
        first.errors = std::mem::take(&mut samples.errors);
        if let Some(e) = samples.first_error {
            first.note = format!("first error: {e}");
        }
    }
    out
}

struct Ctx {
    args: BenchArgs,
    channels: Vec<Channel>,
    cpu: Cpu,
    /// The Redis servers whose CPU is counted.
    redis: Vec<redis::Client>,
}

/// µs of CPU one Redis server has used so far (`INFO cpu`).
async fn redis_cpu_us(client: &redis::Client) -> Option<u64> {
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .ok()?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    let s = field("used_cpu_user")? + field("used_cpu_sys")?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "seconds of CPU, positive"
    )]
    Some((s * 1e6) as u64)
}

impl Ctx {
    fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    /// µs of CPU the Redis servers have used so far, summed; `None` without
    /// servers or if one cannot be asked.
    async fn redis_cpu_us(&self) -> Option<u64> {
        if self.redis.is_empty() {
            return None;
        }
        let mut sum = 0;
        for client in &self.redis {
            sum += redis_cpu_us(client).await?;
        }
        Some(sum)
    }

    fn begin_request(&self, n: u64, i: usize) -> pb::BeginTaskRequest {
        pb::BeginTaskRequest {
            template: self.args.template.clone(),
            parameters: self.args.params.iter().cloned().collect(),
            intent: format!("bench agent {i} task {n}"),
            ..Default::default()
        }
    }

    /// Runs `worker` at `concurrency` with CPU accounting.
    async fn measure<W, F>(&self, concurrency: usize, worker: W) -> Vec<Row>
    where
        W: Fn(usize, Stop) -> F,
        F: Future<Output = Samples> + Send + 'static,
    {
        let stop = Stop::new(self.args.duration, self.args.max_tasks);
        let rss = tokio::spawn(self.cpu.clone().rss_over(stop.clone(), self.args.duration));
        let (c0, r0) = (self.cpu.now_us(), self.redis_cpu_us().await);
        let (samples, elapsed) = drive(concurrency, &stop, worker).await;
        let (c1, r1) = (self.cpu.now_us(), self.redis_cpu_us().await);
        let rss = rss.await.ok().flatten();
        let mut rows = rows_of(samples, elapsed, concurrency, (c0, c1), (r0, r1));
        for row in &mut rows {
            row.broker_rss_mib = rss;
        }
        rows
    }
}

/// Runs the load and returns the report as text (and writes JSON with `--json`).
///
/// # Errors
/// [`CommandError`] if the connections cannot be made or a mode cannot set up.
pub async fn run(args: BenchArgs) -> Result<String, CommandError> {
    let report = measure(args.clone()).await?;
    let text = render(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CommandError::Bench(format!("bench report: {e}")))?;
        std::fs::write(path, json)
            .map_err(|e| CommandError::Bench(format!("{}: {e}", path.display())))?;
    }
    Ok(text)
}

/// Runs every asked-for mode and ceiling and returns the figures.
///
/// # Errors
/// As [`run`].
pub async fn measure(args: BenchArgs) -> Result<Report, CommandError> {
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
    let brokers: Vec<String> = std::iter::once(args.connect.broker.clone())
        .chain(args.replicas.iter().cloned())
        .collect();
    let conns = args
        .connections
        .clamp(1, max_conc.div_ceil(brokers.len()).max(1));
    // Interleaved, so that channel i (and agent i) is on broker i mod n.
    let mut channels = Vec::with_capacity(conns * brokers.len());
    for _ in 0..conns {
        for broker in &brokers {
            let mut connect = args.connect.clone();
            connect.broker.clone_from(broker);
            channels.push(connect.connect("agent").await?);
        }
    }
    let cpu_urls = if args.redis_cpu.is_empty() {
        args.redis_url.iter().cloned().collect()
    } else {
        args.redis_cpu.clone()
    };
    let mut redis = Vec::with_capacity(cpu_urls.len());
    for url in &cpu_urls {
        redis.push(
            redis::Client::open(url.as_str())
                .map_err(|e| CommandError::Bench(format!("Redis {url}: {e}")))?,
        );
    }
    let ctx = Ctx {
        cpu: Cpu(args.broker_pid.clone().into()),
        args,
        channels,
        redis,
    };
    let mut report = Report {
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        brokers: 1 + ctx.args.replicas.len(),
        duration_s: ctx.args.duration.as_secs_f64(),
        ..Default::default()
    };
    let mut echo: HashMap<usize, f64> = HashMap::new();
    let mut ceilings = Ceilings::default();
    if ctx.args.ceilings {
        for &c in &ctx.args.concurrency {
            let rows = ctx
                .measure(c, |i, stop| health_worker(ctx.channel(i), stop))
                .await;
            for mut row in rows {
                row.name = "echo: grpc.health.v1.Health/Check".into();
                echo.insert(c, row.rate);
                report.rows.push(row);
            }
        }
        ceilings = ceilings::measure(&ctx, &mut report, &echo).await;
    }
    let mut modes = ctx.args.mode.clone();
    modes.sort_unstable();
    modes.dedup();
    for mode in modes {
        match mode {
            Mode::Begin | Mode::Cycle => {
                for &c in &ctx.args.concurrency {
                    let cycle = mode == Mode::Cycle;
                    let rows = ctx
                        .measure(c, |i, stop| {
                            agent_worker(
                                BrokerClient::new(ctx.channel(i)),
                                ctx.begin_request(0, i),
                                i,
                                cycle,
                                stop,
                            )
                        })
                        .await;
                    for mut row in rows {
                        let e = echo.get(&c).copied().unwrap_or(0.0);
                        match row.name.as_str() {
                            "BeginTask" => {
                                if mode == Mode::Begin && ceilings.derived_begin > 0.0 {
                                    row.against(
                                        "derived BeginTask ceiling",
                                        ceilings.derived_begin,
                                        Some(0.5),
                                    );
                                    row.name = "BeginTask (begin)".into();
                                    let mut vs_echo = row.clone();
                                    vs_echo.against("echo", e, Some(0.2));
                                    vs_echo.name = "BeginTask (begin, vs echo)".into();
                                    if c == 64 {
                                        vs_echo.note = format!(
                                            "target ≥ 15000/s and p99 ≤ 5 ms at c=64: {}",
                                            if row.rate >= 15_000.0 && row.p99_ms <= 5.0 {
                                                "met"
                                            } else {
                                                "missed"
                                            }
                                        );
                                    }
                                    report.rows.push(row);
                                    report.rows.push(vs_echo);
                                    continue;
                                }
                                row.against("echo", e, (mode == Mode::Begin).then_some(0.2));
                            }
                            "RenewLease" | "CompleteTask" => row.against("echo", e, Some(0.2)),
                            _ => {}
                        }
                        row.name = format!("{} ({mode:?})", row.name).replace("(Cycle)", "(cycle)");
                        row.name = row.name.replace("(Begin)", "(begin)");
                        report.rows.push(row);
                    }
                }
            }
            Mode::Introspect => {
                for &c in &ctx.args.concurrency {
                    for (kind, label, target) in [
                        (pb::CredentialKind::Opaque, "Introspect (opaque)", 0.6),
                        (pb::CredentialKind::Jwt, "Introspect (JWT)", 0.4),
                    ] {
                        let token = live_token(&ctx, kind).await?;
                        let verifier = ctx.args.connect.connect("resource").await?;
                        let token = Arc::new(token);
                        let rows = ctx
                            .measure(c, |_, stop| {
                                introspect_worker(
                                    VerifierClient::new(verifier.clone()),
                                    token.clone(),
                                    stop,
                                )
                            })
                            .await;
                        for mut row in rows {
                            row.name = label.into();
                            row.against("echo", echo.get(&c).copied().unwrap_or(0.0), Some(target));
                            report.rows.push(row);
                        }
                    }
                }
            }
            Mode::Verify => verify::measure(&ctx, &mut report).await?,
            Mode::Connect => {
                connect::measure(&ctx, &mut report, ceilings.handshakes.as_ref()).await?;
            }
        }
    }
    if let Some(n) = ctx.args.live {
        ceilings::live(&ctx, n, &mut report).await?;
    }
    Ok(report)
}

/// The ceilings measured in this run, for the ratios.
#[derive(Debug, Default)]
struct Ceilings {
    derived_begin: f64,
    /// Raw rustls full handshakes per second, by concurrency.
    handshakes: Option<HashMap<usize, f64>>,
}

async fn health_worker(channel: Channel, stop: Stop) -> Samples {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut s = Samples::default();
    while stop.go() {
        let t = Instant::now();
        match client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(_) => s.ok("Health/Check", t.elapsed()),
            Err(e) => s.failed(&e),
        }
    }
    s
}

async fn agent_worker(
    mut client: BrokerClient<Channel>,
    request: pb::BeginTaskRequest,
    i: usize,
    cycle: bool,
    stop: Stop,
) -> Samples {
    let mut s = Samples::default();
    let mut n = 0u64;
    while stop.go() {
        n += 1;
        let mut req = request.clone();
        req.intent = format!("bench agent {i} task {n}");
        let run = async {
            let t = Instant::now();
            let r = client.begin_task(req).await?.into_inner();
            s.ok("BeginTask", t.elapsed());
            if !cycle {
                return Ok(());
            }
            let t = Instant::now();
            client
                .renew_lease(pb::RenewLeaseRequest {
                    task_id: r.task_id.clone(),
                })
                .await?;
            s.ok("RenewLease", t.elapsed());
            let t = Instant::now();
            client
                .complete_task(pb::CompleteTaskRequest {
                    task_id: r.task_id,
                    outcome: pb::Outcome::Succeeded.into(),
                    summary: String::new(),
                })
                .await?;
            s.ok("CompleteTask", t.elapsed());
            Ok::<_, tonic::Status>(())
        };
        if let Err(e) = run.await {
            s.failed(&e);
        }
    }
    s
}

/// A fresh live credential of `kind` from the `bench` template (one JWT and
/// one opaque grant), begun as the agent.
async fn live_token(ctx: &Ctx, kind: pb::CredentialKind) -> Result<String, CommandError> {
    let mut client = BrokerClient::new(ctx.channel(0));
    let mut req = ctx.begin_request(0, 0);
    req.template = "bench".into();
    let r = client
        .begin_task(req)
        .await
        .map_err(|e| CommandError::Bench(format!("bench begin for introspection: {e}")))?
        .into_inner();
    r.credentials
        .into_iter()
        .find(|c| c.kind == i32::from(kind))
        .map(|c| c.value)
        .ok_or_else(|| CommandError::Bench("the bench template issued no such credential".into()))
}

async fn introspect_worker(
    mut client: VerifierClient<Channel>,
    token: Arc<String>,
    stop: Stop,
) -> Samples {
    let mut s = Samples::default();
    while stop.go() {
        let t = Instant::now();
        match client
            .introspect(pb::IntrospectRequest {
                token: token.as_str().to_owned(),
            })
            .await
        {
            Ok(r) if r.get_ref().active => s.ok("Introspect", t.elapsed()),
            Ok(_) => s.failed(&tonic::Status::failed_precondition("token inactive")),
            Err(e) => s.failed(&e),
        }
    }
    s
}

mod ceilings;
mod connect;
mod verify;

/// The report as a table: figure, its ceiling, the ratio and the target.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "leash bench: {} cores, {} broker{}, {:.0} s per run\n{:<40}{:>5}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}  {:<28}{:>11}{:>7}{:>8}  {}\n",
        report.cores,
        report.brokers,
        if report.brokers == 1 { "" } else { "s" },
        report.duration_s,
        "figure",
        "c",
        "rate/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "cpu µs",
        "redis µs",
        "ceiling",
        "ceiling/s",
        "ratio",
        "target",
        "note"
    );
    let opt =
        |v: Option<f64>, digits: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"));
    for r in &report.rows {
        let (ceiling, crate_) = r.ceiling.clone().map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |(n, v)| (n, format!("{v:.0}")),
        );
        let target = match (r.target, r.met) {
            (Some(t), Some(true)) => format!("≥{t} ok"),
            (Some(t), _) => format!("≥{t} MISS"),
            _ => "-".into(),
        };
        let errors: u64 = r.errors.values().sum();
        let mut note = r.note.clone();
        if report.duration_s >= 60.0
            && let Some((warm, end)) = r.broker_rss_mib
        {
            note = format!(
                "broker RSS {warm:.1} -> {end:.1} MiB ({:+.1}%) {note}",
                (end - warm) / warm.max(f64::MIN_POSITIVE) * 100.0
            );
        }
        if errors > 0 {
            note = format!("{errors} errors {:?} {note}", r.errors);
        }
        out.push_str(&format!(
            "{:<40}{:>5}{:>11.0}{:>9.2}{:>9.2}{:>9.2}{:>9.2}{:>9}{:>9}  {:<28}{:>11}{:>7}{:>8}  {}\n",
            r.name,
            r.concurrency,
            r.rate,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            opt(r.broker_cpu_us, 0),
            opt(r.redis_cpu_us, 0),
            ceiling,
            crate_,
            opt(r.ratio, 2),
            target,
            note
        ));
    }
    // The figure scripts read: tasks per second of the cycle at the highest concurrency.
    if let Some(r) = report
        .rows
        .iter()
        .rev()
        .find(|r| r.name == "CompleteTask (cycle)")
    {
        out.push_str(&format!("tasks/s: {:.1}\n", r.rate));
    }
    out
}
