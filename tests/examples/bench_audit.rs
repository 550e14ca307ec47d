//! What the audit trail (and OTLP trace export) costs BeginTask, in one run:
//! `leash bench`'s load (begin → renew → complete, kept-open mTLS
//! connections) at concurrency 64 against a broker on a fresh real
//! `redis-server`, three times:
//!
//! 1. audit streams on (the default),
//! 2. audit streams off (`[audit] streams = false`: log lines only),
//! 3. audit streams on and every span exported over OTLP/gRPC to a loopback
//!    receiver built from the official `opentelemetry-proto` definitions.
//!
//! Prints each run's `leash bench` report and a summary with the ratios.
//! `cargo run --release -p leash-e2e --example bench_audit [SECONDS]`
//! (default 10 s per run). A benchmark, not a test: nothing is asserted.
#![allow(clippy::unwrap_used, reason = "a benchmark: a panic is a failed run")]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use leash_broker::cli::{ConnectArgs, bench::BenchArgs};
use leash_e2e::{BrokerOptions, RedisServer, TestBroker};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

const BENCH: &str = r#"
name: bench
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 30s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
grants:
  - name: github
    kind: jwt
    audience: https://api.github.test
    scopes: [{scope: "repo:acme/widgets:read", class: read}]
    ttl: 60s
"#;

/// Counts the spans it is sent.
#[derive(Debug, Default, Clone)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_sink() -> (SocketAddr, Sink) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Sink::default();
    let served = sink.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(served))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, sink)
}

/// One run: a fresh Redis and broker with `extra_toml`, then the load.
async fn run(name: &str, extra_toml: &str, duration: Duration) -> (String, f64) {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates = vec![BENCH.to_owned()];
    options.extra_toml = extra_toml.to_owned();
    let broker = TestBroker::start(options).await;
    let agent = broker.pki.svid("agent/bench");
    let mut args = BenchArgs::new(ConnectArgs {
        broker: broker.url(),
        ca: Some(broker.pki.bundle()),
        cert: Some(agent.cert.clone()),
        key: Some(agent.key.clone()),
        dev_dir: broker.config_dir.path().to_owned(),
    });
    args.concurrency = vec![64];
    args.duration = duration;
    args.params = Vec::new();
    let report = leash_broker::cli::bench::run(args).await.unwrap();
    broker.stop().await;
    let rate = report
        .lines()
        .find_map(|l| l.strip_prefix("tasks/s: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!("== {name}\n{report}");
    (name.to_owned(), rate)
}

#[tokio::main]
async fn main() {
    // Spans are recorded as in the broker binary; they leave only when a
    // broker's [telemetry] starts the export (run 3).
    use tracing_subscriber::layer::SubscriberExt as _;
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(leash_broker::telemetry::layer()),
    );
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let duration = Duration::from_secs(seconds);
    let mut results = Vec::new();
    results.push(run("audit streams on", "", duration).await);
    results.push(run("audit streams off", "[audit]\nstreams = false\n", duration).await);
    let (sink_addr, sink) = start_sink().await;
    let otlp =
        format!("[telemetry]\notlp_endpoint = \"http://{sink_addr}\"\nbatch_interval = \"1s\"\n");
    results.push(run("audit streams on + OTLP export", &otlp, duration).await);
    println!("OTLP receiver got {} spans", sink.0.load(Ordering::Relaxed));
    println!("\nBeginTask→RenewLease→CompleteTask tasks/s at concurrency 64 ({seconds} s each):");
    let base = results[0].1.max(f64::MIN_POSITIVE);
    for (name, rate) in &results {
        println!(
            "  {name:<34} {rate:>9.1}/s  {:.2}x of audit on",
            rate / base
        );
    }
    println!(
        "  spans dropped (queue full): {}",
        leash_broker::telemetry::dropped_spans()
    );
}
