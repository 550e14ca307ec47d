//! A real Prometheus server scrapes the broker's `/metrics`; its HTTP API then
//! shows the counters and the revocation-lag histogram moving as the calls made.
//!
//! Needs the `prometheus` binary (Debian package `prometheus`; `scripts/test`
//! installs it). It runs on a free loopback port with a generated config and a
//! private storage directory, and is killed when the test ends.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use leash_e2e::{BrokerOptions, RedisServer, TestBroker, free_port, http_get};
use leash_proto::v1 as pb;

const SCRAPED: &str = r#"
name: scraped
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 20s, max_ttl: 1m, max_lifetime: 10m, min_renew_interval: 0s}
grants:
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

/// A lease nobody renews: the reaper ends it about a second in.
const BRIEF: &str = r#"
name: brief
version: "1"
owner: platform@acme.test
identities: ["spiffe://acme.test/agent/*"]
lease: {ttl: 1s, max_ttl: 1s, max_lifetime: 1m}
grants:
  - name: db
    kind: opaque
    audience: postgres://db.acme.test/app
    scopes: [{scope: "sales:read", class: read}]
    ttl: 60s
"#;

/// A `prometheus` process owned by the test.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second.
    fn start(target: SocketAddr) -> Self {
        let binary = which("prometheus").expect(
            "the `prometheus` binary is needed (Debian package `prometheus`; scripts/test installs it)",
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: leash\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The sum of an instant query's values, or None if it has no result yet.
    async fn value(&self, query: &str) -> Option<f64> {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(query)),
        )
        .await;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let results = json["data"]["result"].as_array()?;
        if results.is_empty() {
            return None;
        }
        Some(
            results
                .iter()
                .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// Waits (bounded) until `query` evaluates to a value `ok` accepts; panics
    /// with the last value otherwise.
    async fn wait_for(&self, query: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = None;
        for _ in 0..300 {
            last = self.value(query).await;
            if let Some(v) = last
                && ok(v)
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("Prometheus query {query} never matched; last value {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn begin(template: &str) -> pb::BeginTaskRequest {
    pb::BeginTaskRequest {
        template: template.into(),
        intent: format!("prometheus test: {template}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_counters_and_the_revocation_lag() {
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.templates = vec![SCRAPED.to_owned(), BRIEF.to_owned()];
    let broker = TestBroker::start(options).await;
    let prometheus = Prometheus::start(broker.ops_addr);
    // Prometheus is scraping the broker before anything happens.
    prometheus.wait_for("up{job=\"leash\"}", |v| v == 1.0).await;
    prometheus
        .wait_for("leash_live_tasks{template=\"scraped\"}", |v| v == 0.0)
        .await;

    let mut agent = broker.broker("agent/metered").await;
    let mut begun = Vec::new();
    for _ in 0..3 {
        begun.push(
            agent
                .begin_task(begin("scraped"))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    agent
        .renew_lease(pb::RenewLeaseRequest {
            task_id: begun[0].task_id.clone(),
        })
        .await
        .unwrap();
    for task in &begun[..2] {
        agent
            .complete_task(pb::CompleteTaskRequest {
                task_id: task.task_id.clone(),
                outcome: pb::Outcome::Succeeded.into(),
                summary: String::new(),
            })
            .await
            .unwrap();
    }
    let brief = agent.begin_task(begin("brief")).await.unwrap().into_inner();
    // A refusal: an unknown template.
    let refused = agent
        .begin_task(begin("no-such-template"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    // The brief lease lapses (nobody renews it) and the reaper ends it.
    let _ = brief;

    let p = &prometheus;
    p.wait_for("leash_tasks_begun_total{template=\"scraped\"}", |v| {
        v == 3.0
    })
    .await;
    p.wait_for("leash_tasks_begun_total{template=\"brief\"}", |v| v == 1.0)
        .await;
    p.wait_for("leash_leases_renewed_total{template=\"scraped\"}", |v| {
        v == 1.0
    })
    .await;
    p.wait_for(
        "leash_tasks_completed_total{template=\"scraped\",outcome=\"succeeded\"}",
        |v| v == 2.0,
    )
    .await;
    p.wait_for("leash_tasks_ended_total{reason=\"expiry\"}", |v| v == 1.0)
        .await;
    p.wait_for(
        "leash_denials_total{method=\"leash.v1.Broker/BeginTask\",reason=\"template_not_found\"}",
        |v| v == 1.0,
    )
    .await;
    p.wait_for(
        "leash_rpc_duration_seconds_count{method=\"leash.v1.Broker/BeginTask\",code=\"OK\"}",
        |v| v == 4.0,
    )
    .await;
    // The completions revoked three credentials (the renewed task held its
    // first and its renewal's): each one's lag was measured. The expired
    // lease's credential expired at its deadline by its own `exp`; the lag
    // of the expiry is from the deadline to the reaper ending the task.
    p.wait_for(
        "leash_revocation_lag_seconds_count{reason=\"completion\"}",
        |v| v == 3.0,
    )
    .await;
    p.wait_for(
        "leash_revocation_lag_seconds_count{reason=\"expiry\"}",
        |v| v == 1.0,
    )
    .await;
    p.wait_for(
        "leash_revocation_lag_seconds_bucket{reason=\"expiry\",le=\"+Inf\"}",
        |v| v == 1.0,
    )
    .await;
    // The expiry's lag is the reaper's delay plus the feed's: above zero, well
    // under the 30 s the test allowed.
    let lag = p
        .wait_for("leash_revocation_lag_seconds_sum{reason=\"expiry\"}", |v| {
            v > 0.0
        })
        .await;
    assert!(lag < 30.0, "expiry lag {lag} s");
    // The gauges come from the store: one scraped task is still live.
    p.wait_for("leash_live_tasks{template=\"scraped\"}", |v| v == 1.0)
        .await;
    p.wait_for("leash_live_credentials{template=\"scraped\"}", |v| v == 1.0)
        .await;
    p.wait_for("leash_live_tasks{template=\"brief\"}", |v| v == 0.0)
        .await;
    p.wait_for("leash_reaper_backlog", |v| v == 0.0).await;
    p.wait_for("leash_store_up", |v| v == 1.0).await;
    // 4 begins, 1 renewal, 2 completions, 1 expiry: at least 3 + 4 events per
    // begin, and more.
    p.wait_for("leash_audit_stream_length{tenant=\"default\"}", |v| {
        v >= 20.0
    })
    .await;
    p.wait_for(
        "sum(leash_store_duration_seconds_count{op=\"begin\"})",
        |v| v == 4.0,
    )
    .await;

    // Label values are bounded: no task id nor identity in the exposition.
    let (_, text) = http_get(broker.ops_addr, "/metrics").await;
    for t in &begun {
        assert!(!text.contains(t.task_id.as_str()), "a task id in a label");
    }
    assert!(!text.contains("spiffe://"), "an identity in a label");
    broker.stop().await;
}
