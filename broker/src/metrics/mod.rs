//! Metrics in the Prometheus text format, served at `/metrics` on the ops port.
//!
//! Counters and histograms are kept per broker replica (Prometheus sums them
//! over replicas); the live gauges are read from the store at each scrape, so
//! they are exact across replicas and the same from every one of them (take
//! `max` over replicas, not `sum`). Every label value comes from a closed set:
//! a template name from the catalog, an RPC method from the proto, a gRPC code,
//! a store operation, a revocation reason, a tenant from the configuration.
//! No credential, task id, identity or other caller-chosen text is ever a
//! label value. [`RpcMetricsLayer`] times every RPC; [`MeteredStore`] times
//! every store call. See `docs/metrics.md` for the list.

mod rpc;
mod store;

use std::{sync::Mutex, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

pub use rpc::{RpcMetricsLayer, RpcMetricsService};
pub use store::MeteredStore;

use crate::store::{EndReason, LiveCounts};

/// The response header in which a refused call names its reason (one word of
/// a closed set: see [`refusal_reason`]); the RPC layer counts refusals by it.
pub const REASON_HEADER: &str = "leash-reason";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabel {
    template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompletionLabels {
    template: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    method: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

/// Latency buckets from 0.1 ms to ~3.3 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Revocation-lag buckets from 1 ms to ~65 s.
fn lag() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// One broker replica's metrics and the registry they are encoded from.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    begun: Family<TemplateLabel, Counter>,
    renewed: Family<TemplateLabel, Counter>,
    completed: Family<CompletionLabels, Counter>,
    ended: Family<ReasonLabel, Counter>,
    rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    denials: Family<DenialLabels, Counter>,
    store_duration: Family<OpLabel, Histogram, fn() -> Histogram>,
    store_errors: Family<OpLabel, Counter>,
    revocation_lag: Family<ReasonLabel, Histogram, fn() -> Histogram>,
    live_tasks: Family<TemplateLabel, Gauge>,
    live_credentials: Family<TemplateLabel, Gauge>,
    reaper_backlog: Gauge,
    audit_length: Family<TenantLabel, Gauge>,
    store_up: Gauge,
    dropped: Family<ReasonLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every Leash metric, registered, at zero.
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            begun: Family::default(),
            renewed: Family::default(),
            completed: Family::default(),
            ended: Family::default(),
            rpc_duration: Family::new_with_constructor(latency),
            denials: Family::default(),
            store_duration: Family::new_with_constructor(latency),
            store_errors: Family::default(),
            revocation_lag: Family::new_with_constructor(lag),
            live_tasks: Family::default(),
            live_credentials: Family::default(),
            reaper_backlog: Gauge::default(),
            audit_length: Family::default(),
            store_up: Gauge::default(),
            dropped: Family::default(),
        };
        m.register(|r| {
            r.register(
                "leash_tasks_begun",
                "Tasks begun (replays not counted), by template",
                m.begun.clone(),
            );
            r.register(
                "leash_leases_renewed",
                "Leases renewed, by template",
                m.renewed.clone(),
            );
            r.register(
                "leash_tasks_completed",
                "Tasks completed by their owner, by template and declared outcome",
                m.completed.clone(),
            );
            r.register(
                "leash_tasks_ended",
                "Tasks ended, by reason (completion, expiry, cascade, kill_switch)",
                m.ended.clone(),
            );
            r.register(
                "leash_rpc_duration_seconds",
                "gRPC call latency until the response headers, by method and gRPC code",
                m.rpc_duration.clone(),
            );
            r.register(
                "leash_denials",
                "Calls refused, by method and reason",
                m.denials.clone(),
            );
            r.register(
                "leash_store_duration_seconds",
                "Store call latency, by operation",
                m.store_duration.clone(),
            );
            r.register(
                "leash_store_errors",
                "Store calls that failed, by operation",
                m.store_errors.clone(),
            );
            r.register(
                "leash_revocation_lag_seconds",
                "Time from a completion, kill switch or cascade to the credential's revocation being read from the revocation log; for an expiry, from the lease deadline to the task's end being recorded (its credentials expired at the deadline by their own exp); by reason",
                m.revocation_lag.clone(),
            );
            r.register(
                "leash_live_tasks",
                "Live tasks now, by template (from the store: the same on every replica)",
                m.live_tasks.clone(),
            );
            r.register(
                "leash_live_credentials",
                "Credentials held by live tasks now, by template (from the store)",
                m.live_credentials.clone(),
            );
            r.register(
                "leash_reaper_backlog",
                "Live tasks past their lease deadline not yet ended by a reaper (from the store)",
                m.reaper_backlog.clone(),
            );
            r.register(
                "leash_audit_stream_length",
                "Events held in the audit trail, by tenant (\"_\": events of no tenant)",
                m.audit_length.clone(),
            );
            r.register(
                "leash_store_up",
                "1 if the last scrape read the store, else 0 (the live gauges then keep their last values)",
                m.store_up.clone(),
            );
            r.register(
                "leash_dropped",
                "Items dropped rather than waited for, since start, by what (log_lines, refusals, spans)",
                m.dropped.clone(),
            );
        });
        m
    }

    /// Lets `f` add metrics of its own (the canary's, say) to the registry.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    }

    /// A task of `template` was begun.
    pub fn task_begun(&self, template: &str) {
        self.begun.get_or_create(&template_label(template)).inc();
    }

    /// A lease of `template` was renewed.
    pub fn lease_renewed(&self, template: &str) {
        self.renewed.get_or_create(&template_label(template)).inc();
    }

    /// A task of `template` was completed by its owner with `outcome` (the
    /// proto's `Outcome` name, lowercase).
    pub fn task_completed(&self, template: &str, outcome: &str) {
        self.completed
            .get_or_create(&CompletionLabels {
                template: template.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A task ended for `reason`.
    pub fn task_ended(&self, reason: EndReason) {
        self.ended
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    /// A gRPC call to `method` answered `code` after `elapsed`; `refused` is
    /// the refusal reason when the code is a refusal.
    pub fn rpc_done(&self, method: &str, code: &str, refused: Option<&str>, elapsed: Duration) {
        self.rpc_duration
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
        if let Some(reason) = refused {
            self.denials
                .get_or_create(&DenialLabels {
                    method: method.to_owned(),
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }

    /// A connection's TLS handshake was refused (bad or foreign SVID): a
    /// denial of method `tls_handshake`, reason `unauthenticated`.
    pub fn rpc_refused_at_handshake(&self) {
        self.denials
            .get_or_create(&DenialLabels {
                method: "tls_handshake".to_owned(),
                reason: "unauthenticated".to_owned(),
            })
            .inc();
    }

    /// A store call `op` took `elapsed` and failed if `failed`.
    pub fn store_call(&self, op: &'static str, elapsed: Duration, failed: bool) {
        let label = OpLabel { op: op.to_owned() };
        self.store_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if failed {
            self.store_errors.get_or_create(&label).inc();
        }
    }

    /// A revocation for `reason`, due at `due_ms`, was read from the log at
    /// `now_ms` (both the store's time).
    pub fn revocation_seen(&self, reason: EndReason, due_ms: u64, now_ms: u64) {
        if due_ms == 0 {
            return;
        }
        let lag = Duration::from_millis(now_ms.saturating_sub(due_ms));
        self.revocation_lag
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .observe(lag.as_secs_f64());
    }

    /// Sets the live gauges from the store's counts; `templates` are the
    /// catalog's names (each gets a value, 0 if nothing of it is live).
    pub fn set_live(&self, counts: &LiveCounts, templates: &[String]) {
        self.live_tasks.clear();
        self.live_credentials.clear();
        for name in templates {
            let c = counts.templates.get(name).copied().unwrap_or_default();
            set(&self.live_tasks, name, c.tasks);
            set(&self.live_credentials, name, c.credentials);
        }
        // Tasks of a template since removed from the catalog: still live.
        for (name, c) in &counts.templates {
            if !templates.contains(name) && (c.tasks > 0 || c.credentials > 0) {
                set(&self.live_tasks, name, c.tasks);
                set(&self.live_credentials, name, c.credentials);
            }
        }
        self.reaper_backlog.set(gauge_value(counts.overdue));
    }

    /// Sets the audit stream length of `tenant` ("" for no tenant).
    pub fn set_audit_length(&self, tenant: &str, len: u64) {
        let tenant = if tenant.is_empty() {
            crate::audit::NO_TENANT
        } else {
            tenant
        };
        self.audit_length
            .get_or_create(&TenantLabel {
                tenant: tenant.to_owned(),
            })
            .set(gauge_value(len));
    }

    /// Whether the last scrape could read the store.
    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// How many `what`s were dropped since start.
    pub fn set_dropped(&self, what: &str, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: what.to_owned(),
            })
            .set(gauge_value(n));
    }

    /// The registry in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

fn template_label(template: &str) -> TemplateLabel {
    TemplateLabel {
        template: template.to_owned(),
    }
}

fn set(family: &Family<TemplateLabel, Gauge>, template: &str, v: u64) {
    family
        .get_or_create(&template_label(template))
        .set(gauge_value(v));
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The refusal reason of a status: one word of a closed set, or `None` for a
/// code that is not a refusal (OK, and the server's own failures).
pub fn refusal_reason(code: tonic::Code) -> Option<&'static str> {
    use tonic::Code;
    Some(match code {
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::PermissionDenied => "permission_denied",
        Code::Unauthenticated => "unauthenticated",
        Code::FailedPrecondition => "failed_precondition",
        Code::ResourceExhausted => "resource_exhausted",
        Code::AlreadyExists => "already_exists",
        Code::OutOfRange => "out_of_range",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LiveCount;

    #[test]
    fn counters_and_gauges_encode_with_their_labels() {
        let m = Metrics::new();
        m.task_begun("demo");
        m.task_begun("demo");
        m.task_completed("demo", "success");
        m.rpc_done(
            "leash.v1.Broker/BeginTask",
            "PERMISSION_DENIED",
            Some("policy"),
            Duration::from_millis(3),
        );
        let mut counts = LiveCounts::default();
        counts.templates.insert(
            "demo".into(),
            LiveCount {
                tasks: 2,
                credentials: 5,
            },
        );
        counts.overdue = 1;
        m.set_live(&counts, &["demo".into(), "idle".into()]);
        let text = m.encode();
        assert!(
            text.contains("leash_tasks_begun_total{template=\"demo\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("leash_tasks_completed_total{template=\"demo\",outcome=\"success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "leash_denials_total{method=\"leash.v1.Broker/BeginTask\",reason=\"policy\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("leash_live_tasks{template=\"demo\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("leash_live_tasks{template=\"idle\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("leash_live_credentials{template=\"demo\"} 5"),
            "{text}"
        );
        assert!(text.contains("leash_reaper_backlog 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn revocation_lag_is_measured_from_the_due_time() {
        let m = Metrics::new();
        m.revocation_seen(EndReason::Expiry, 1_000, 1_250);
        // A snapshot's record has no due time: not a measurement.
        m.revocation_seen(EndReason::Completion, 0, 1_250);
        let text = m.encode();
        assert!(
            text.contains("leash_revocation_lag_seconds_sum{reason=\"expiry\"} 0.25"),
            "{text}"
        );
        assert!(
            text.contains("leash_revocation_lag_seconds_count{reason=\"expiry\"} 1"),
            "{text}"
        );
        assert!(!text.contains("reason=\"completion\""), "{text}");
    }

    #[test]
    fn only_refusals_have_a_reason() {
        assert_eq!(
            refusal_reason(tonic::Code::PermissionDenied),
            Some("permission_denied")
        );
        assert_eq!(refusal_reason(tonic::Code::Ok), None);
        assert_eq!(refusal_reason(tonic::Code::Unavailable), None);
        assert_eq!(refusal_reason(tonic::Code::Internal), None);
    }
}
