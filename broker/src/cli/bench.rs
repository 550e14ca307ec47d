//! `leash bench`: N concurrent agents doing begin → renew → complete over mTLS
//! against a running broker; prints tasks/s and p50/p99 per RPC.
//!
//! A load generator, not a test: nothing asserts speed. Every loop is bounded
//! by `--duration` and by `--max-tasks`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use leash_proto::v1::{self as pb, broker_client::BrokerClient};
use tokio::task::JoinSet;

use super::{ConnectArgs, task::CommandError};

/// Options of `leash bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Concurrent agents.
    #[arg(long, short, default_value_t = 16)]
    pub concurrency: usize,
    /// How long to run.
    #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many tasks in all, whichever comes first.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_tasks: u64,
    /// TLS connections shared by the agents (HTTP/2 multiplexes the rest).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Template to declare (`leash dev` writes `bench`, whose renewal limit is
    /// off; a template with the default limit refuses the immediate renewals).
    #[arg(long, short, default_value = "bench")]
    pub template: String,
    /// Parameter, `name=value`; repeat for each.
    #[arg(long = "param", short = 'p', value_parser = parse_param, default_value = "repo=acme/widgets")]
    pub params: Vec<(String, String)>,
    /// Connection.
    #[command(flatten)]
    pub connect: ConnectArgs,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

#[derive(Debug, Default)]
struct Samples {
    begin: Vec<Duration>,
    renew: Vec<Duration>,
    complete: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
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

/// Runs the load and prints the report.
///
/// # Errors
/// [`CommandError`] if the connections cannot be made.
pub async fn run(args: BenchArgs) -> Result<String, CommandError> {
    let conns = args.connections.clamp(1, args.concurrency.max(1));
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(args.connect.connect("agent").await?);
    }
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(args.max_tasks));
    let start = Instant::now();
    let end = start + args.duration;
    let mut workers = JoinSet::new();
    for i in 0..args.concurrency.max(1) {
        let mut client = BrokerClient::new(channels[i % conns].clone());
        let template = args.template.clone();
        let params: std::collections::HashMap<String, String> =
            args.params.iter().cloned().collect();
        let budget = budget.clone();
        workers.spawn(async move {
            let mut s = Samples::default();
            let mut n = 0u64;
            while Instant::now() < end
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |b| b.checked_sub(1),
                    )
                    .is_ok()
            {
                n += 1;
                let run = async {
                    let t = Instant::now();
                    let r = client
                        .begin_task(pb::BeginTaskRequest {
                            template: template.clone(),
                            parameters: params.clone(),
                            intent: format!("bench agent {i} task {n}"),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    s.begin.push(t.elapsed());
                    let t = Instant::now();
                    client
                        .renew_lease(pb::RenewLeaseRequest {
                            task_id: r.task_id.clone(),
                        })
                        .await?;
                    s.renew.push(t.elapsed());
                    let t = Instant::now();
                    client
                        .complete_task(pb::CompleteTaskRequest {
                            task_id: r.task_id,
                            outcome: pb::Outcome::Succeeded.into(),
                            summary: String::new(),
                        })
                        .await?;
                    s.complete.push(t.elapsed());
                    Ok::<_, tonic::Status>(())
                };
                if let Err(e) = run.await {
                    s.errors += 1;
                    s.first_error
                        .get_or_insert_with(|| format!("{}: {}", e.code(), e.message()));
                }
            }
            s
        });
    }
    let mut all = Samples::default();
    while let Some(Ok(s)) = workers.join_next().await {
        all.begin.extend(s.begin);
        all.renew.extend(s.renew);
        all.complete.extend(s.complete);
        all.errors += s.errors;
        if all.first_error.is_none() {
            all.first_error = s.first_error;
        }
    }
    let elapsed = start.elapsed();
    let tasks = all.complete.len();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = tasks as f64 / elapsed.as_secs_f64();
    let mut out = format!(
        "leash bench: {} agents over {conns} connections for {:.1}s\n\
         tasks/s: {rate:.1} ({tasks} tasks begin→renew→complete, {} errors)\n\
         {:<14}{:>9}{:>10}{:>10}{:>10}\n",
        args.concurrency,
        elapsed.as_secs_f64(),
        all.errors,
        "rpc",
        "count",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    for (name, v) in [
        ("BeginTask", &mut all.begin),
        ("RenewLease", &mut all.renew),
        ("CompleteTask", &mut all.complete),
    ] {
        v.sort();
        out.push_str(&format!(
            "{name:<14}{:>9}{:>10.2}{:>10.2}{:>10.2}\n",
            v.len(),
            ms(percentile(v, 0.50)),
            ms(percentile(v, 0.99)),
            ms(v.last().copied().unwrap_or_default()),
        ));
    }
    if let Some(e) = all.first_error {
        out.push_str(&format!("first error: {e}\n"));
    }
    Ok(out)
}
