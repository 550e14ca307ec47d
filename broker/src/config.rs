//! Configuration of `leash serve`: one TOML file plus environment overrides.
//!
//! Validated before anything starts: unknown keys are rejected and every
//! problem is reported at once. See `examples/leash.toml` for an annotated file.
//!
//! Environment overrides: `LEASH_<SECTION>__<KEY>=value` sets `<section>.<key>`
//! (e.g. `LEASH_STORE__URL=redis://10.0.0.5:6379`). The value is read as a TOML
//! value if it parses as one (`250`, `true`, `["a", "b"]`), else as a string.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    credentials::Algorithm,
    lease::BindingRule,
    policy::{ActorClasses, ClassSpec, VerifierCallers},
};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "LEASH_";

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// The broker's configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Where to listen.
    pub listen: Listen,
    /// Serving certificate and trust bundles.
    pub tls: Tls,
    /// Task-scope templates.
    pub templates: Templates,
    /// Cedar policies decided at BeginTask (off without a `dir`).
    #[serde(default)]
    pub policy: PolicyConfig,
    /// JWT issuer and signing keys.
    pub signing: Signing,
    /// Where leases live.
    #[serde(default)]
    pub store: Store,
    /// Lease expiry.
    #[serde(default)]
    pub reaper: Reaper,
    /// Resource-server access.
    #[serde(default)]
    pub verifier: Verifier,
    /// Actor classes and tenants (none: every identity is denied).
    #[serde(default)]
    pub actors: Actors,
    /// Who may call the Admin service (none: nobody but template approvers).
    #[serde(default)]
    pub admin: Admin,
    /// File reloading.
    #[serde(default)]
    pub reload: Reload,
    /// The JWT-SVID listener (off unless this section is present).
    #[serde(default)]
    pub jwt_svid: Option<JwtSvid>,
    /// The OAuth 2.0 listener (off unless this section is present).
    #[serde(default)]
    pub oauth: Option<OAuth>,
    /// Bounds on connections, handshakes, streams and request sizes.
    #[serde(default)]
    pub limits: Limits,
    /// How much of the durable audit trail the store keeps.
    #[serde(default)]
    pub audit: Audit,
    /// The revocation canary (off by default).
    #[serde(default)]
    pub canary: Canary,
    /// OpenTelemetry trace export (off unless `otlp_endpoint` is set).
    #[serde(default)]
    pub telemetry: Telemetry,
}

/// `[canary]`: the revocation canary. When on, the broker begins a task on
/// `template` every `interval` as the canary's own SVID, checks its JWT
/// credential through Introspect and an SDK Verifier, completes it, and
/// measures how long until both refuse it, against `slo` (see
/// [`crate::canary`]). The canary's identity needs an actor class, the
/// template's `identities` and a `[verifier] callers` entry for the
/// template's audience.
#[derive(Debug, Clone, Deserialize)]
pub struct Canary {
    /// Run the canary loop. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Time between probes (from the end of one to the start of the next).
    /// Default 30 s; between 100 ms and 1 h.
    #[serde(default = "default_canary_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How soon after completion both must refuse the credential for a probe
    /// to pass. Default 2 s; between 1 ms and 60 s.
    #[serde(default = "default_canary_slo", with = "humantime_serde")]
    pub slo: Duration,
    /// The reserved canary template; it must be loaded when the canary is on.
    /// Default `leash-canary`.
    #[serde(default = "default_canary_template")]
    pub template: String,
    /// The canary's X509-SVID (PEM); required when on.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM); required when on.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// PEM bundle the broker's serving certificate chains to. Default: the
    /// one `tls.bundles` file, when there is exactly one.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The address the canary dials, `https://host:port` (its host must be
    /// in the serving certificate). Default `https://localhost:<port of
    /// listen.agent>`.
    #[serde(default)]
    pub connect: Option<String>,
}

impl Default for Canary {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: default_canary_interval(),
            slo: default_canary_slo(),
            template: default_canary_template(),
            cert: None,
            key: None,
            ca: None,
            connect: None,
        }
    }
}

fn default_canary_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_canary_slo() -> Duration {
    Duration::from_secs(2)
}
fn default_canary_template() -> String {
    "leash-canary".to_owned()
}

impl Canary {
    fn problems(&self, tls: &Tls) -> Vec<String> {
        let mut p = Vec::new();
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(3600) {
            p.push("canary.interval: must be between 100ms and 1h".into());
        }
        if self.slo < Duration::from_millis(1) || self.slo > Duration::from_secs(60) {
            p.push("canary.slo: must be between 1ms and 60s".into());
        }
        if self.template.trim().is_empty() {
            p.push("canary.template: must not be empty".into());
        }
        if let Some(c) = &self.connect
            && !c.starts_with("https://")
        {
            p.push(format!(
                "canary.connect: {c:?} must look like https://host:port"
            ));
        }
        if !self.enabled {
            return p;
        }
        for (key, path) in [("canary.cert", &self.cert), ("canary.key", &self.key)] {
            match path {
                Some(path) if !path.is_file() => {
                    p.push(format!("{key}: {} is not a readable file", path.display()));
                }
                Some(_) => {}
                None => p.push(format!(
                    "{key}: required with canary.enabled = true (the canary's own SVID)"
                )),
            }
        }
        match &self.ca {
            Some(ca) if !ca.is_file() => {
                p.push(format!("canary.ca: {} is not a readable file", ca.display()));
            }
            Some(_) => {}
            None if tls.bundles.len() == 1 => {}
            None => p.push(
                "canary.ca: required with canary.enabled = true unless tls.bundles has exactly one file".into(),
            ),
        }
        p
    }

    /// The probe target of the canary loop (when `enabled`; validated at
    /// load). `agent` is the broker's own agent listener address.
    pub fn target(&self, tls: &Tls, agent: SocketAddr) -> Option<crate::canary::ProbeTarget> {
        let ca = match &self.ca {
            Some(ca) => ca.clone(),
            None if tls.bundles.len() == 1 => tls.bundles.values().next()?.clone(),
            None => return None,
        };
        Some(crate::canary::ProbeTarget {
            broker: self
                .connect
                .clone()
                .unwrap_or_else(|| format!("https://localhost:{}", agent.port())),
            ca,
            cert: self.cert.clone()?,
            key: self.key.clone()?,
            template: self.template.clone(),
            wait: crate::canary::REVOCATION_WAIT.max(self.slo),
        })
    }
}

/// `[telemetry]`: OpenTelemetry traces exported over OTLP/gRPC. Off unless
/// `otlp_endpoint` is set. Exporting never blocks a request: finished spans
/// wait in a bounded queue and leave in batches; when the queue is full a span
/// is dropped and counted ([`crate::telemetry::dropped_spans`]).
#[derive(Debug, Clone, Deserialize)]
pub struct Telemetry {
    /// The OTLP/gRPC collector, `http://host:port` (plaintext gRPC; run a
    /// collector beside the broker). No other scheme is accepted.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute. Default `leash-broker`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Fraction of new traces recorded, 0 to 1 (parent-based: a call whose
    /// caller sent a sampled `traceparent` is recorded). Default 1.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Most finished spans waiting for export (1 to 1048576). Default 2048.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// Longest a finished span waits before its batch is sent. Default 5s.
    #[serde(default = "default_batch_interval", with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Time allowed for one export call (100ms to 60s). Default 10s.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
            sample_ratio: default_sample_ratio(),
            queue_size: default_queue_size(),
            batch_interval: default_batch_interval(),
            export_timeout: default_export_timeout(),
        }
    }
}

fn default_service_name() -> String {
    "leash-broker".into()
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_queue_size() -> usize {
    2048
}

fn default_batch_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Telemetry {
    /// Largest `queue_size` accepted.
    pub const MAX_QUEUE_SIZE: usize = 1 << 20;

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(endpoint) = &self.otlp_endpoint
            && let Err(e) = check_otlp_endpoint(endpoint)
        {
            p.push(format!("telemetry.otlp_endpoint: {e}"));
        }
        if self.service_name.trim().is_empty() || self.service_name.len() > 256 {
            p.push("telemetry.service_name: must be 1 to 256 characters".into());
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            p.push(format!(
                "telemetry.sample_ratio: {} is not between 0 and 1",
                self.sample_ratio
            ));
        }
        if self.queue_size == 0 || self.queue_size > Self::MAX_QUEUE_SIZE {
            p.push(format!(
                "telemetry.queue_size: must be between 1 and {}",
                Self::MAX_QUEUE_SIZE
            ));
        }
        if self.batch_interval < Duration::from_millis(10)
            || self.batch_interval > Duration::from_secs(600)
        {
            p.push("telemetry.batch_interval: must be between 10ms and 10m".into());
        }
        if self.export_timeout < Duration::from_millis(100)
            || self.export_timeout > Duration::from_secs(60)
        {
            p.push("telemetry.export_timeout: must be between 100ms and 60s".into());
        }
        p
    }
}

/// An OTLP/gRPC endpoint must be `http://host:port` and nothing more.
fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        let scheme = endpoint.split_once("://").map_or("", |(s, _)| s);
        return Err(format!(
            "{endpoint:?}: only http:// is supported (plaintext OTLP/gRPC to a nearby collector){}",
            if scheme.is_empty() {
                String::new()
            } else {
                format!(", not {scheme}://")
            }
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let parsed = authority.parse::<axum::http::uri::Authority>().ok();
    match parsed {
        Some(a)
            if a.as_str() == authority
                && !a.host().is_empty()
                && a.port_u16().is_some()
                && !authority.contains('@') =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{endpoint:?} is not like \"http://127.0.0.1:4317\" (a host and a port, no path)"
        )),
    }
}

/// `[audit]`: retention of the durable audit trail (one Redis stream per
/// tenant and shard; the memory store keeps the same bounds).
#[derive(Debug, Clone, Deserialize)]
pub struct Audit {
    /// Events each stream keeps at most (about: Redis trims whole nodes);
    /// a tenant's trail is 16 streams. Default 100000.
    #[serde(default = "default_audit_max_len")]
    pub max_len: u64,
    /// Events older than this leave the trail. Default 30 days.
    #[serde(default = "default_audit_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Write the durable trail (default true). `false` keeps only the log
    /// lines: for measuring the trail's cost, never in production (the
    /// broker warns at start).
    #[serde(default = "default_true")]
    pub streams: bool,
}

fn default_true() -> bool {
    true
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            max_len: default_audit_max_len(),
            max_age: default_audit_max_age(),
            streams: true,
        }
    }
}

impl Audit {
    /// The retention the stores apply.
    pub fn retention(&self) -> crate::audit::AuditRetention {
        crate::audit::AuditRetention {
            max_len: self.max_len.max(1),
            max_age_ms: crate::clock::duration_ms(self.max_age).max(1),
            streams: self.streams,
        }
    }
}

fn default_audit_max_len() -> u64 {
    crate::audit::AuditRetention::default().max_len
}

fn default_audit_max_age() -> Duration {
    Duration::from_millis(crate::audit::AuditRetention::default().max_age_ms)
}

/// `[limits]`: how much one client (or a flood of them) can make a listener hold.
/// Each listener (agent port, JWT-SVID port) has its own budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Most open connections (handshaking or established); more are closed at
    /// accept. Default 10000.
    pub max_connections: usize,
    /// Most TLS handshakes in progress (never more than `max_connections`); when
    /// full, the oldest is dropped for the newest, so a flood of half-open
    /// connections cannot lock agents out. Default 1024.
    pub max_pending_handshakes: usize,
    /// How long a client may take to complete its TLS handshake. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Most concurrent HTTP/2 streams (calls) per connection. Default 100.
    pub max_concurrent_streams: u32,
    /// Largest request message in bytes (protobuf, before decoding); a bigger one is
    /// refused unread. Default 65536 (the largest valid request is about 12 KiB).
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_pending_handshakes: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            max_message_bytes: 64 * 1024,
        }
    }
}

/// `tls.task_binding`: how a task begun over mTLS stays bound to the X509-SVID
/// that began it. Either way a JWT-SVID can never renew or complete such a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskBindingMode {
    /// Renew and complete need an X509-SVID of the same SPIFFE ID, with any key, so
    /// SVIDs rotated during the task (Workload API, files rewritten by a sidecar,
    /// certificates renewed with a new key) keep working.
    #[default]
    SpiffeId,
    /// Renew and complete also need the same public key as the X509-SVID that began
    /// the task: for SVIDs that never change key during a task.
    Key,
}

/// `[jwt_svid]`: a listener that accepts a JWT-SVID as `authorization: Bearer`
/// instead of a client certificate, for agents behind a TLS-terminating proxy.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtSvid {
    /// Address of the listener (TLS with the broker's certificate, no client certificate).
    pub listen: SocketAddr,
    /// The audience a JWT-SVID must name (`aud`) to be accepted here.
    pub audience: String,
    /// JWT bundle (JWK Set, SPIFFE bundle format) per trust domain.
    pub bundles: BTreeMap<String, PathBuf>,
    /// Clock skew allowed on `exp`. Default 30 s, at most 5 min.
    #[serde(default = "default_jwt_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Longest a JWT-SVID may still be valid when presented (`exp` − now, beyond
    /// the leeway); a longer-lived token is refused. Default 5 min.
    #[serde(default = "default_jwt_max_lifetime", with = "humantime_serde")]
    pub max_lifetime: Duration,
}

fn default_jwt_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_jwt_max_lifetime() -> Duration {
    Duration::from_secs(300)
}

/// `[oauth]`: the OAuth 2.0 front door (docs/mcp.md) on a listener of its own:
/// RFC 8414 metadata, the JWK Set, RFC 8693 token exchange, RFC 7662
/// introspection and RFC 7009 revocation, over TLS with HTTP/1.1 and HTTP/2
/// (ALPN). Client certificates are requested, not required at the handshake:
/// the metadata and the JWK Set are public; the token, introspection and
/// revocation endpoints admit only a caller whose X509-SVID verifies
/// (`tls_client_auth`, RFC 8705).
#[derive(Debug, Clone, Deserialize)]
pub struct OAuth {
    /// Address of the listener.
    pub listen: SocketAddr,
    /// The base URL clients reach the listener at (`https://host[:port]`,
    /// no query or fragment): every endpoint the metadata names, and the
    /// ops port's discovery `jwks_uri`, are built from it. Default:
    /// `signing.issuer`, which RFC 8414 clients expect the listener to be
    /// reached at.
    #[serde(default)]
    pub public_url: Option<String>,
}

impl OAuth {
    /// [`OAuth::public_url`] or else `issuer`, without a trailing `/`.
    pub fn base_url(&self, issuer: &str) -> String {
        self.public_url
            .as_deref()
            .unwrap_or(issuer)
            .trim_end_matches('/')
            .to_owned()
    }
}

/// Why `url` is not an `https` base URL fit for OAuth metadata (RFC 8414 §2:
/// `https`, no query, no fragment), if it is not.
pub fn https_url_problem(url: &str) -> Option<&'static str> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Some("must be an https:// URL (RFC 8414 section 2)");
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Some("must name a host after https://");
    }
    if url.contains('?') || url.contains('#') {
        return Some("must have no query and no fragment (RFC 8414 section 2)");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || host.contains('@') {
        return Some("must be a plain https://host[:port][/path] URL");
    }
    None
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Listen {
    /// mTLS port for agents and resource servers.
    pub agent: SocketAddr,
    /// Plaintext ops port: health (gRPC and HTTP `/healthz`, `/readyz`).
    pub ops: SocketAddr,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Tls {
    /// Where the serving certificate and the trust bundles come from.
    #[serde(default)]
    pub source: TlsSource,
    /// The broker's certificate chain (PEM). Required with `source = "files"`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The broker's private key (PEM, PKCS#8). Required with `source = "files"`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Trust bundle (PEM CA certificates) per SPIFFE trust domain. Required with
    /// `source = "files"`.
    #[serde(default)]
    pub bundles: BTreeMap<String, PathBuf>,
    /// The SPIFFE Workload API endpoint (`unix:///run/spire/agent.sock`) with
    /// `source = "workload_api"`; default: the `SPIFFE_ENDPOINT_SOCKET` variable.
    #[serde(default)]
    pub workload_api_socket: Option<String>,
    /// How long to wait at start for the Workload API's first SVID. Default 30 s.
    #[serde(default = "default_workload_api_timeout", with = "humantime_serde")]
    pub workload_api_timeout: Duration,
    /// What a renewal or completion of a task begun over mTLS must present:
    /// `spiffe_id` (default) or `key`. See [`TaskBindingMode`].
    #[serde(default)]
    pub task_binding: TaskBindingMode,
}

/// `tls.source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsSource {
    /// `cert`, `key` and `bundles` from PEM files, reloaded when they change.
    #[default]
    Files,
    /// The serving X509-SVID and every trust bundle from the SPIFFE Workload API,
    /// following its rotations.
    WorkloadApi,
}

fn default_workload_api_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[templates]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Templates {
    /// Directory of `*.yaml` templates.
    pub dir: PathBuf,
}

/// `[policy]`: Cedar policies decided at every BeginTask, after the template rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files, validated against the shipped schema and
    /// reloaded like templates. Unset (the default): no policies, the template
    /// rules alone decide. Set: default deny as soon as it holds a policy.
    pub dir: Option<PathBuf>,
    /// IANA time zone of `context.time` (hour, weekday). Default `UTC`.
    pub time_zone: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: None,
            time_zone: "UTC".into(),
        }
    }
}

/// `[signing]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Signing {
    /// `iss` of every JWT.
    pub issuer: String,
    /// Signing keys; the first signs, all are published in the JWK Set.
    pub keys: Vec<KeyConfig>,
}

/// One `[[signing.keys]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyConfig {
    /// Key id (`kid`).
    pub kid: String,
    /// `EdDSA` (default) or `ES256`.
    #[serde(default = "default_alg")]
    pub alg: Algorithm,
    /// PKCS#8 PEM file.
    pub path: PathBuf,
}

fn default_alg() -> Algorithm {
    Algorithm::EdDSA
}

/// Which store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Redis (production).
    #[default]
    Redis,
    /// In-process memory (one replica, state lost on exit).
    Memory,
}

/// Which Redis deployment (`[store] topology`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisTopology {
    /// One node at `store.url` (the default).
    #[default]
    Standalone,
    /// A master managed by Redis Sentinel (`[store.sentinel]`).
    Sentinel,
    /// A Redis Cluster (`[store.cluster]`).
    Cluster,
}

/// `[store.sentinel]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelSection {
    /// The name the Sentinels monitor the master under.
    #[serde(default)]
    pub master: String,
    /// The Sentinels, as `host:port`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// ACL user on the Sentinels.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the Sentinels' password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS to the Sentinels (the CA is `store.ca_file`, else the system roots).
    #[serde(default)]
    pub tls: bool,
}

/// `[store.cluster]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Seed nodes, as `host:port` (the rest are discovered).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// `[store]`.
#[derive(Clone, Deserialize)]
pub struct Store {
    /// `redis` or `memory`.
    #[serde(default)]
    pub kind: StoreKind,
    /// `standalone` (default), `sentinel` or `cluster`.
    #[serde(default)]
    pub topology: RedisTopology,
    /// Redis URL (`redis://` or `rediss://`) of a standalone node; may carry a
    /// password, never logged.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// The Sentinels and the master name (`topology = "sentinel"`).
    #[serde(default)]
    pub sentinel: SentinelSection,
    /// The seed nodes (`topology = "cluster"`).
    #[serde(default)]
    pub cluster: ClusterSection,
    /// ACL user on the data nodes (overrides a user in `url`).
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the data nodes' password (its first line; overrides a
    /// password in `url`). Mount it from a secret; it is never logged.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS to the discovered data nodes (Sentinel masters, Cluster nodes); a
    /// standalone node says it with `rediss://`.
    #[serde(default)]
    pub tls: bool,
    /// PEM CA certificates to trust for TLS to Redis instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Key prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Bound on each store call.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long an ended task's record stays readable after it ends (its
    /// credential records are deleted when it ends).
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// When a state change is acknowledged: `"fsync"` (default; on the Redis
    /// node's disk), `"replicas = N"` (N replicas acknowledged), or `"none"`
    /// (explicit opt-out, logged loudly at start). See `durability()`.
    #[serde(default = "default_durability")]
    pub durability: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("kind", &self.kind)
            .field("topology", &self.topology)
            .field("url", &redact_url(&self.url))
            .field("sentinel", &self.sentinel)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// What is wrong with the Redis settings of this topology.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let host_port = |a: &str| {
            a.rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
        };
        match self.topology {
            RedisTopology::Standalone => {
                if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
                    p.push("store.url: must start with redis:// or rediss://".into());
                }
                if self.ca_file.is_some() && self.url.starts_with("redis://") {
                    p.push(
                        "store.ca_file: applies to TLS only; store.url starts with redis:// (use rediss://)"
                            .into(),
                    );
                }
            }
            RedisTopology::Sentinel => {
                if self.sentinel.master.trim().is_empty() {
                    p.push(
                        "store.sentinel.master: the master name the Sentinels monitor is required"
                            .into(),
                    );
                }
                if self.sentinel.addresses.is_empty() {
                    p.push(
                        "store.sentinel.addresses: at least one Sentinel (host:port) is required"
                            .into(),
                    );
                }
                for a in &self.sentinel.addresses {
                    if !host_port(a) {
                        p.push(format!("store.sentinel.addresses: {a:?} is not host:port"));
                    }
                }
            }
            RedisTopology::Cluster => {
                if self.cluster.nodes.is_empty() {
                    p.push(
                        "store.cluster.nodes: at least one seed node (host:port) is required"
                            .into(),
                    );
                }
                for a in &self.cluster.nodes {
                    if !host_port(a) {
                        p.push(format!("store.cluster.nodes: {a:?} is not host:port"));
                    }
                }
            }
        }
        for (field, file) in [
            ("store.password_file", &self.password_file),
            ("store.sentinel.password_file", &self.sentinel.password_file),
            ("store.ca_file", &self.ca_file),
        ] {
            if let Some(f) = file
                && let Err(e) = std::fs::metadata(f)
            {
                p.push(format!("{field}: cannot read {}: {e}", f.display()));
            }
        }
        p
    }

    /// The configured topology.
    pub fn topology(&self) -> crate::store::Topology {
        match self.topology {
            RedisTopology::Standalone => crate::store::Topology::Standalone {
                url: self.url.clone(),
            },
            RedisTopology::Sentinel => crate::store::Topology::Sentinel {
                master: self.sentinel.master.clone(),
                sentinels: self.sentinel.addresses.clone(),
            },
            RedisTopology::Cluster => crate::store::Topology::Cluster {
                nodes: self.cluster.nodes.clone(),
            },
        }
    }

    /// How to log in to Redis: the user, the passwords read from their files
    /// now (first line), TLS and the CA.
    ///
    /// # Errors
    /// A message naming the file that cannot be read.
    pub fn access(&self) -> Result<crate::store::Access, String> {
        let secret = |field: &str, f: &Option<PathBuf>| -> Result<Option<String>, String> {
            match f {
                None => Ok(None),
                Some(f) => std::fs::read_to_string(f)
                    .map(|s| Some(s.lines().next().unwrap_or_default().to_owned()))
                    .map_err(|e| format!("{field}: cannot read {}: {e}", f.display())),
            }
        };
        let ca_pem = match &self.ca_file {
            None => None,
            Some(f) => Some(
                std::fs::read(f)
                    .map_err(|e| format!("store.ca_file: cannot read {}: {e}", f.display()))?,
            ),
        };
        Ok(crate::store::Access {
            username: self.username.clone(),
            password: secret("store.password_file", &self.password_file)?,
            tls: self.tls,
            ca_pem,
            sentinel_username: self.sentinel.username.clone(),
            sentinel_password: secret(
                "store.sentinel.password_file",
                &self.sentinel.password_file,
            )?,
            sentinel_tls: self.sentinel.tls,
        })
    }
}

/// The URL with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl Default for Store {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            topology: RedisTopology::default(),
            url: default_redis_url(),
            sentinel: SentinelSection::default(),
            cluster: ClusterSection::default(),
            username: None,
            password_file: None,
            tls: false,
            ca_file: None,
            prefix: default_prefix(),
            timeout: default_store_timeout(),
            retention: default_retention(),
            durability: default_durability(),
        }
    }
}

fn default_durability() -> String {
    "fsync".into()
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/0".into()
}
fn default_prefix() -> String {
    "leash".into()
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_retention() -> Duration {
    Duration::from_secs(3600)
}

/// `[reaper]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Reaper {
    /// Sweep interval: how late after its deadline a lease may be revoked.
    #[serde(default = "default_reaper_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Most leases expired per shard in one atomic store step (1 to 1000).
    #[serde(default = "default_batch")]
    pub batch: usize,
}

impl Default for Reaper {
    fn default() -> Self {
        Self {
            interval: default_reaper_interval(),
            batch: default_batch(),
        }
    }
}

fn default_reaper_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_batch() -> usize {
    256
}

/// `[verifier]`: which resource servers may call Introspect and
/// WatchRevocations, and of which audiences' credentials they learn.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Verifier {
    /// The verifier callers, in order: the first entry whose `identity` matches
    /// the caller gives its audiences; a caller no entry matches is refused.
    /// Empty (the default): nobody. See [`VerifierCallers`].
    #[serde(default)]
    pub callers: Vec<VerifierCallerConfig>,
}

/// One `verifier.callers` entry, as written (validated at load).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    expecting = "an entry like { identity = \"spiffe://<trust domain>/resource/*\", audiences = [\"https://api.example\"] }"
)]
pub struct VerifierCallerConfig {
    /// An exact SPIFFE ID or `spiffe://<trust domain>/<prefix>/*`.
    #[serde(default)]
    pub identity: String,
    /// The audiences served, matched exactly; `["*"]` alone means every audience.
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// `[admin]`: who may call the Admin service (inventory, kill switches).
/// Approve and Deny are open to a template's approvers instead.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Admin {
    /// Exact SPIFFE IDs or `spiffe://<trust domain>/<prefix>/*` patterns.
    /// Empty (the default): nobody.
    #[serde(default)]
    pub callers: Vec<String>,
    /// Tenant admins: per tenant, the identities (patterns as in `callers`)
    /// that may read that tenant's audit trail and inventory, and nothing else
    /// of the Admin service.
    #[serde(default)]
    pub tenants: std::collections::BTreeMap<String, Vec<String>>,
}

/// `[actors]`: which identities are which actor class, of which tenant, with
/// which limits. Fail closed: without classes every identity is denied.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Actors {
    /// The classes, in order (`[[actors.classes]]`): the first identity
    /// pattern matching a caller decides its class. See [`ActorClasses`].
    #[serde(default)]
    pub classes: Vec<ActorClassConfig>,
}

/// One `[[actors.classes]]` entry, as written (validated at load).
#[derive(Debug, Clone, Deserialize)]
pub struct ActorClassConfig {
    /// The class name (`agent`, `ci`, `partner-acme`).
    #[serde(default)]
    pub name: String,
    /// The tenant its identities belong to.
    #[serde(default)]
    pub tenant: String,
    /// Who to contact about the class.
    #[serde(default)]
    pub owner: String,
    /// Exact SPIFFE IDs or `spiffe://<trust domain>/<prefix>/*` patterns.
    #[serde(default)]
    pub identities: Vec<String>,
    /// TTL ceiling for the class's leases.
    #[serde(default, with = "humantime_serde::option")]
    pub max_ttl: Option<Duration>,
    /// Live tasks of the whole class at once.
    #[serde(default)]
    pub max_concurrent_tasks: Option<u64>,
    /// Live tasks of one identity of the class at once.
    #[serde(default)]
    pub max_concurrent_tasks_per_identity: Option<u64>,
    /// Begins of the whole class: `"<burst>/<duration>"`.
    #[serde(default)]
    pub begin_rate: Option<String>,
    /// Begins of one identity: `"<burst>/<duration>"`.
    #[serde(default)]
    pub begin_rate_per_identity: Option<String>,
}

/// Keys that once existed, with what replaced them, so an old file is refused
/// with directions rather than a bare "unknown key".
const REPLACED_KEYS: &[(&str, &str)] = &[(
    "verifier.introspect_callers",
    "no longer supported: replaced by `verifier.callers`, which also says which audiences each caller serves, e.g. callers = [{ identity = \"spiffe://acme.test/resource/*\", audiences = [\"https://api.acme.test\"] }] (`audiences = [\"*\"]` for every audience; see examples/leash.toml)",
)];

fn unknown_key(path: &str) -> String {
    match REPLACED_KEYS.iter().find(|(key, _)| *key == path) {
        Some((key, why)) => format!("{key}: {why}"),
        None => format!("unknown key `{path}`"),
    }
}

/// `[reload]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Reload {
    /// How often certificate, bundle and template files are checked for changes.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for Reload {
    fn default() -> Self {
        Self {
            interval: default_reload_interval(),
        }
    }
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(2)
}

impl Limits {
    /// The largest valid request (a BeginTask with every parameter at its limits)
    /// is about 12 KiB; a smaller cap would refuse valid calls.
    const MIN_MESSAGE_BYTES: usize = 16 * 1024;

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_connections == 0 {
            p.push("limits.max_connections: must be positive".into());
        }
        if self.max_pending_handshakes == 0 {
            p.push("limits.max_pending_handshakes: must be positive".into());
        }
        if self.handshake_timeout < Duration::from_millis(100)
            || self.handshake_timeout > Duration::from_secs(60)
        {
            p.push("limits.handshake_timeout: must be between 100ms and 60s".into());
        }
        if self.max_concurrent_streams == 0 || self.max_concurrent_streams > 10_000 {
            p.push("limits.max_concurrent_streams: must be between 1 and 10000".into());
        }
        if self.max_message_bytes < Self::MIN_MESSAGE_BYTES
            || self.max_message_bytes > 16 * 1024 * 1024
        {
            p.push(format!(
                "limits.max_message_bytes: must be between {} and 16777216",
                Self::MIN_MESSAGE_BYTES
            ));
        }
        p
    }
}

/// Serde adapter for `"250ms"`-style durations.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"250ms\" or \"5s\": {e}"
            ))
        })
    }

    /// The same, for an optional key.
    pub(super) mod option {
        use std::time::Duration;

        use serde::Deserializer;

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

fn env_value(raw: &str) -> toml::Value {
    // Parse as a TOML value where possible (numbers, booleans, arrays), else a string.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// Applies `LEASH_SECTION__KEY` overrides from `vars` onto `table`.
fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
    problems: &mut Vec<String>,
) {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !path.contains("__") {
            // LEASH_CONFIG, LEASH_LOG and friends are not config keys.
            continue;
        }
        let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        if let Err(e) = set_path(table, &keys, env_value(&raw)) {
            problems.push(format!("{name}: {e}"));
        }
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    match keys {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [section, rest @ ..] => match table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => set_path(t, rest, value),
            _ => Err(format!("{section} is not a section")),
        },
    }
}

impl Config {
    /// The SPIFFE Workload API endpoint: `tls.workload_api_socket`, else the
    /// `SPIFFE_ENDPOINT_SOCKET` variable; an absolute path is taken as `unix://` + path.
    pub fn workload_api_endpoint(&self) -> Option<String> {
        let raw = self
            .tls
            .workload_api_socket
            .clone()
            .or_else(|| std::env::var(spiffe::constants::SPIFFE_SOCKET_ENV).ok())
            .filter(|s| !s.trim().is_empty())?;
        Some(if raw.starts_with('/') {
            format!("unix://{raw}")
        } else {
            raw
        })
    }

    /// Reads `path`, applies environment overrides from the process, and validates.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem: unreadable file, TOML syntax,
    /// unknown keys, wrong types, invalid values, missing files.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
        Self::from_toml(
            &text,
            std::env::vars(),
            path.parent().unwrap_or(Path::new(".")),
        )
    }

    /// Parses `text` with overrides from `vars`; relative paths are taken from `base`.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem found.
    pub fn from_toml(
        text: &str,
        vars: impl Iterator<Item = (String, String)>,
        base: &Path,
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(vec![format!("TOML: {e}")]))?;
        apply_env(&mut table, vars, &mut problems);
        let mut unknown = Vec::new();
        let parsed: Result<Self, _> = serde_ignored::deserialize(toml::Value::Table(table), |p| {
            unknown.push(unknown_key(&p.to_string()));
        });
        problems.extend(unknown);
        let mut config = match parsed {
            Ok(c) => c,
            Err(e) => {
                problems.push(e.to_string());
                return Err(ConfigError(problems));
            }
        };
        config.resolve_paths(base);
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(problems))
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.tls.cert.iter_mut().for_each(abs);
        self.tls.key.iter_mut().for_each(abs);
        self.tls.bundles.values_mut().for_each(abs);
        abs(&mut self.templates.dir);
        self.policy.dir.iter_mut().for_each(abs);
        if let Some(j) = &mut self.jwt_svid {
            j.bundles.values_mut().for_each(abs);
        }
        self.signing.keys.iter_mut().for_each(|k| abs(&mut k.path));
        self.canary.cert.iter_mut().for_each(abs);
        self.canary.key.iter_mut().for_each(abs);
        self.canary.ca.iter_mut().for_each(abs);
    }

    /// Every semantic problem (files missing, bad patterns, out-of-range values).
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        fn file(p: &mut Vec<String>, key: &str, path: &Path) {
            if !path.is_file() {
                p.push(format!("{key}: {} is not a readable file", path.display()));
            }
        }
        match self.tls.source {
            TlsSource::Files => {
                for (key, path) in [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
                    match path {
                        Some(path) => file(&mut p, key, path),
                        None => p.push(format!("{key}: required with tls.source = \"files\"")),
                    }
                }
                for (td, path) in &self.tls.bundles {
                    file(&mut p, &format!("tls.bundles.{td}"), path);
                }
                if self.tls.bundles.is_empty() {
                    p.push("tls.bundles: at least one trust domain is required".into());
                }
                if self.tls.workload_api_socket.is_some() {
                    p.push(
                        "tls.workload_api_socket: only used with tls.source = \"workload_api\""
                            .into(),
                    );
                }
            }
            TlsSource::WorkloadApi => {
                for (key, set) in [
                    ("tls.cert", self.tls.cert.is_some()),
                    ("tls.key", self.tls.key.is_some()),
                    ("tls.bundles", !self.tls.bundles.is_empty()),
                ] {
                    if set {
                        p.push(format!(
                            "{key}: not used with tls.source = \"workload_api\" (the Workload API provides it); remove it"
                        ));
                    }
                }
                if self.workload_api_endpoint().is_none() {
                    p.push(format!(
                        "tls.workload_api_socket: required with tls.source = \"workload_api\" unless {} is set",
                        spiffe::constants::SPIFFE_SOCKET_ENV
                    ));
                }
            }
        }
        for (i, k) in self.signing.keys.iter().enumerate() {
            file(&mut p, &format!("signing.keys[{i}].path"), &k.path);
        }
        if let Some(j) = &self.jwt_svid {
            if j.audience.trim().is_empty() {
                p.push("jwt_svid.audience: required".into());
            }
            if j.bundles.is_empty() {
                p.push("jwt_svid.bundles: at least one trust domain is required".into());
            }
            for (td, path) in &j.bundles {
                file(&mut p, &format!("jwt_svid.bundles.{td}"), path);
            }
            if j.leeway > Duration::from_secs(300) {
                p.push("jwt_svid.leeway: at most 5m".into());
            }
            if j.max_lifetime.is_zero() || j.max_lifetime > Duration::from_secs(86_400) {
                p.push("jwt_svid.max_lifetime: must be between 1s and 24h".into());
            }
            if j.listen == self.listen.agent || j.listen == self.listen.ops {
                p.push("jwt_svid.listen: must differ from listen.agent and listen.ops".into());
            }
        }
        if let Some(o) = &self.oauth {
            let (field, url) = match &o.public_url {
                Some(u) => ("oauth.public_url", u.as_str()),
                None => (
                    "signing.issuer (the default of oauth.public_url)",
                    self.signing.issuer.as_str(),
                ),
            };
            if let Some(why) = https_url_problem(url) {
                p.push(format!("{field}: {why}"));
            }
            let taken = [
                Some(self.listen.agent),
                Some(self.listen.ops),
                self.jwt_svid.as_ref().map(|j| j.listen),
            ];
            if taken.contains(&Some(o.listen)) {
                p.push(
                    "oauth.listen: must differ from listen.agent, listen.ops and jwt_svid.listen"
                        .into(),
                );
            }
        }
        if !self.templates.dir.is_dir() {
            p.push(format!(
                "templates.dir: {} is not a directory",
                self.templates.dir.display()
            ));
        }
        if let Some(dir) = &self.policy.dir
            && !dir.is_dir()
        {
            p.push(format!("policy.dir: {} is not a directory", dir.display()));
        }
        if let Err(e) = crate::policy::cedar::time_zone(&self.policy.time_zone) {
            p.push(format!("policy.time_zone: {e}"));
        }
        if self.signing.issuer.trim().is_empty() {
            p.push("signing.issuer: required".into());
        }
        if self.signing.keys.is_empty() {
            p.push("signing.keys: at least one key is required".into());
        }
        if let Err(problems) = self.parse_actor_classes() {
            p.extend(
                problems
                    .into_iter()
                    .map(|f| format!("{}: {}", f.field, f.reason)),
            );
        }
        if let Err(problems) = self.parse_admin_callers() {
            p.extend(problems);
        }
        if let Err(problems) = self.parse_tenant_admins() {
            p.extend(problems);
        }
        if let Err(problems) = self.parse_verifier_callers() {
            p.extend(
                problems
                    .into_iter()
                    .map(|f| format!("{}: {}", f.field, f.reason)),
            );
        }
        if self.listen.agent == self.listen.ops {
            p.push("listen.ops: must differ from listen.agent".into());
        }
        if self.store.kind == StoreKind::Redis {
            p.extend(self.store.problems());
        }
        if self.store.timeout.is_zero() {
            p.push("store.timeout: must be positive".into());
        }
        if self.reaper.interval < Duration::from_millis(10)
            || self.reaper.interval > Duration::from_secs(1)
        {
            p.push("reaper.interval: must be between 10ms and 1s (it bounds how late a lease is revoked)".into());
        }
        if self.reaper.batch == 0 || self.reaper.batch > 1000 {
            p.push(
                "reaper.batch: must be between 1 and 1000 (one atomic step must stay short)".into(),
            );
        }
        if crate::store::Durability::parse(&self.store.durability).is_none() {
            p.push(format!(
                "store.durability: {:?} is not \"fsync\", \"replicas = N\" (N >= 1) or \"none\"",
                self.store.durability
            ));
        }
        if self.reload.interval < Duration::from_millis(100) {
            p.push("reload.interval: at least 100ms".into());
        }
        p.extend(self.limits.problems());
        p.extend(self.canary.problems(&self.tls));
        p.extend(self.telemetry.problems());
        p
    }

    /// The configured durability (validated at load; `fsync` if unreadable).
    pub fn durability(&self) -> crate::store::Durability {
        crate::store::Durability::parse(&self.store.durability)
            .unwrap_or(crate::store::Durability::Fsync)
    }

    /// The admin callers (`admin.callers`), validated at load; should an
    /// invalid list get here, nobody is an admin.
    pub fn admin_callers(&self) -> Vec<crate::identity::IdentityPattern> {
        self.parse_admin_callers().unwrap_or_default()
    }

    /// The tenant admins (`admin.tenants`), validated at load; should an
    /// invalid entry get here, that tenant has no tenant admin.
    pub fn tenant_admins(&self) -> Vec<(String, crate::identity::IdentityPattern)> {
        self.parse_tenant_admins().unwrap_or_default()
    }

    fn parse_tenant_admins(
        &self,
    ) -> Result<Vec<(String, crate::identity::IdentityPattern)>, Vec<String>> {
        let mut problems = Vec::new();
        let mut out = Vec::new();
        for (tenant, callers) in &self.admin.tenants {
            if !self.actors.classes.iter().any(|c| &c.tenant == tenant) {
                problems.push(format!(
                    "admin.tenants.{tenant}: no actor class belongs to tenant {tenant:?}"
                ));
            }
            for (i, c) in callers.iter().enumerate() {
                match crate::identity::IdentityPattern::parse(c) {
                    Ok(p) => out.push((tenant.clone(), p)),
                    Err(e) => problems.push(format!(
                        "admin.tenants.{tenant}[{i}]: invalid identity pattern {c:?}: {e}"
                    )),
                }
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }

    fn parse_admin_callers(&self) -> Result<Vec<crate::identity::IdentityPattern>, Vec<String>> {
        let mut problems = Vec::new();
        let mut out = Vec::new();
        for (i, c) in self.admin.callers.iter().enumerate() {
            match crate::identity::IdentityPattern::parse(c) {
                Ok(p) => out.push(p),
                Err(e) => problems.push(format!(
                    "admin.callers[{i}]: invalid identity pattern {c:?}: {e}"
                )),
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }

    /// The verifier callers (`verifier.callers`), validated at load; should an
    /// invalid list get here, nobody is a verifier.
    pub fn verifier_callers(&self) -> VerifierCallers {
        self.parse_verifier_callers().unwrap_or_default()
    }

    fn parse_verifier_callers(&self) -> Result<VerifierCallers, Vec<crate::policy::FieldProblem>> {
        VerifierCallers::parse(
            "verifier.callers",
            self.verifier
                .callers
                .iter()
                .map(|c| (c.identity.as_str(), c.audiences.iter().map(String::as_str))),
        )
    }

    /// The actor classes (`actors.classes`), validated at load; should an
    /// invalid list get here, nobody is classified (every call denied).
    pub fn actor_classes(&self) -> ActorClasses {
        self.parse_actor_classes().unwrap_or_default()
    }

    fn parse_actor_classes(&self) -> Result<ActorClasses, Vec<crate::policy::FieldProblem>> {
        ActorClasses::parse(
            "actors.classes",
            self.actors.classes.iter().map(|c| ClassSpec {
                name: &c.name,
                tenant: &c.tenant,
                owner: &c.owner,
                identities: c.identities.iter().map(String::as_str).collect(),
                max_ttl: c.max_ttl,
                max_concurrent_tasks: c.max_concurrent_tasks,
                max_concurrent_tasks_per_identity: c.max_concurrent_tasks_per_identity,
                begin_rate: c.begin_rate.as_deref(),
                begin_rate_per_identity: c.begin_rate_per_identity.as_deref(),
            }),
        )
    }

    /// The binding rule for tasks begun over mTLS (`tls.task_binding`).
    pub fn task_binding_rule(&self) -> BindingRule {
        match self.tls.task_binding {
            TaskBindingMode::SpiffeId => BindingRule::SpiffeId,
            TaskBindingMode::Key => BindingRule::Key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_files() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tmp");
        for f in ["cert.pem", "key.pem", "bundle.pem", "signing.pem"] {
            std::fs::write(d.path().join(f), "x").expect("write");
        }
        std::fs::create_dir(d.path().join("templates")).expect("mkdir");
        d
    }

    const GOOD: &str = r#"
[listen]
agent = "127.0.0.1:8443"
ops = "127.0.0.1:8080"
[tls]
cert = "cert.pem"
key = "key.pem"
bundles = { "acme.test" = "bundle.pem" }
[templates]
dir = "templates"
[signing]
issuer = "https://leash.acme.test"
keys = [{ kid = "k1", path = "signing.pem" }]
[verifier]
callers = [
  { identity = "spiffe://acme.test/resource/github", audiences = ["https://api.github.test"] },
  { identity = "spiffe://acme.test/resource/*", audiences = ["https://api.acme.test", "postgres://db.acme.test"] },
  { identity = "spiffe://acme.test/ops/revocation-auditor", audiences = ["*"] },
]
"#;

    #[test]
    fn redis_topologies_are_checked_and_built() {
        let d = dir_with_files();
        let sentinel = format!(
            "{GOOD}\n[store]\ntopology = \"sentinel\"\ndurability = \"replicas = 1\"\n[store.sentinel]\nmaster = \"leash\"\naddresses = [\"127.0.0.1:26379\", \"[::1]:26380\"]\n"
        );
        let c = Config::from_toml(&sentinel, std::iter::empty(), d.path()).expect("config");
        assert!(matches!(
            c.store.topology(),
            crate::store::Topology::Sentinel { master, sentinels } if master == "leash" && sentinels.len() == 2
        ));
        let cluster = format!(
            "{GOOD}\n[store]\ntopology = \"cluster\"\n[store.cluster]\nnodes = [\"10.0.0.1:7000\"]\n"
        );
        let c = Config::from_toml(&cluster, std::iter::empty(), d.path()).expect("config");
        assert!(c.store.topology().is_cluster());
        // Missing or malformed addresses are named; so is an unreadable password file.
        let bad = format!(
            "{GOOD}\n[store]\ntopology = \"sentinel\"\npassword_file = \"/nonexistent/pw\"\n[store.sentinel]\naddresses = [\"nohost\"]\n"
        );
        let err = Config::from_toml(&bad, std::iter::empty(), d.path())
            .expect_err("a bad sentinel section")
            .to_string();
        for want in [
            "store.sentinel.master",
            "store.sentinel.addresses: \"nohost\" is not host:port",
            "store.password_file",
        ] {
            assert!(err.contains(want), "{want} missing from: {err}");
        }
        let empty = format!("{GOOD}\n[store]\ntopology = \"cluster\"\n");
        let err = Config::from_toml(&empty, std::iter::empty(), d.path())
            .expect_err("a cluster without nodes")
            .to_string();
        assert!(err.contains("store.cluster.nodes"), "{err}");
        // A CA without TLS is a mistake, not a silent plain-text connection.
        let plain =
            format!("{GOOD}\n[store]\nurl = \"redis://10.0.0.1:6379\"\nca_file = \"bundle.pem\"\n");
        let err = Config::from_toml(&plain, std::iter::empty(), d.path())
            .expect_err("a CA for a plain-text URL")
            .to_string();
        assert!(err.contains("store.ca_file: applies to TLS only"), "{err}");
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let d = dir_with_files();
        let c = Config::from_toml(GOOD, std::iter::empty(), d.path()).expect("config");
        assert_eq!(c.store.kind, StoreKind::Redis);
        assert_eq!(c.reaper.interval, Duration::from_millis(250));
        assert_eq!(c.signing.keys[0].alg, Algorithm::EdDSA);
        assert!(c.tls.cert.as_ref().expect("cert").is_absolute());
    }

    #[test]
    fn the_canary_is_off_by_default_and_checked_when_on() {
        let d = dir_with_files();
        let c = Config::from_toml(GOOD, std::iter::empty(), d.path()).expect("config");
        assert!(!c.canary.enabled);
        assert_eq!(c.canary.interval, Duration::from_secs(30));
        assert_eq!(c.canary.slo, Duration::from_secs(2));
        assert_eq!(c.canary.template, "leash-canary");
        let on = format!(
            "{GOOD}\n[canary]\nenabled = true\ncert = \"cert.pem\"\nkey = \"key.pem\"\ninterval = \"1s\"\nslo = \"250ms\"\n"
        );
        let c = Config::from_toml(&on, std::iter::empty(), d.path()).expect("config");
        let target = c.canary.target(&c.tls, c.listen.agent).expect("target");
        assert_eq!(target.broker, "https://localhost:8443");
        assert_eq!(target.ca, d.path().join("bundle.pem"), "the one tls bundle");
        assert_eq!(target.template, "leash-canary");
        assert!(target.cert.is_absolute() && target.key.is_absolute());
        assert_eq!(c.canary.slo, Duration::from_millis(250));
        let bad = format!(
            "{GOOD}\n[canary]\nenabled = true\ninterval = \"1ms\"\nslo = \"2m\"\nconnect = \"localhost:1\"\nkey = \"nope.pem\"\nsloo = 1\n"
        );
        let all = Config::from_toml(&bad, std::iter::empty(), d.path())
            .expect_err("bad")
            .to_string();
        for want in [
            "canary.interval: must be between 100ms and 1h",
            "canary.slo: must be between 1ms and 60s",
            "canary.connect:",
            "canary.cert: required with canary.enabled = true",
            "canary.key: ",
            "unknown key `canary.sloo`",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }

    #[test]
    fn the_policy_section_is_optional_and_checked() {
        let d = dir_with_files();
        let c = Config::from_toml(GOOD, std::iter::empty(), d.path()).expect("config");
        assert_eq!(c.policy.dir, None, "no policies unless configured");
        assert_eq!(c.policy.time_zone, "UTC");
        std::fs::create_dir(d.path().join("policies")).expect("mkdir");
        let with = GOOD.replace(
            "[signing]",
            "[policy]\ndir = \"policies\"\ntime_zone = \"Europe/Berlin\"\n[signing]",
        );
        let c = Config::from_toml(&with, std::iter::empty(), d.path()).expect("config");
        assert_eq!(c.policy.dir, Some(d.path().join("policies")));
        assert_eq!(c.policy.time_zone, "Europe/Berlin");
        let bad = GOOD.replace(
            "[signing]",
            "[policy]\ndir = \"nowhere\"\ntime_zone = \"Mars/Olympus\"\nzone = 1\n[signing]",
        );
        let all = Config::from_toml(&bad, std::iter::empty(), d.path())
            .expect_err("bad")
            .to_string();
        for want in [
            "policy.dir:",
            "policy.time_zone: unknown time zone \"Mars/Olympus\"",
            "unknown key `policy.zone`",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let d = dir_with_files();
        let text = GOOD
            .replace("[verifier]", "bogus = 1\n[verifier]\ntypo = 2")
            .replace("signing.pem", "missing.pem")
            .replace("https://leash.acme.test", " ");
        let err = Config::from_toml(&text, std::iter::empty(), d.path()).expect_err("bad");
        let all = err.to_string();
        for want in [
            "unknown key `signing.bogus`",
            "unknown key `verifier.typo`",
            "missing.pem",
            "signing.issuer",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }

    #[test]
    fn the_workload_api_source_replaces_the_tls_files() {
        let d = dir_with_files();
        let files =
            "cert = \"cert.pem\"\nkey = \"key.pem\"\nbundles = { \"acme.test\" = \"bundle.pem\" }";
        let wl = GOOD.replace(
            files,
            "source = \"workload_api\"\nworkload_api_socket = \"/run/spire/agent.sock\"",
        );
        let c = Config::from_toml(&wl, std::iter::empty(), d.path()).expect("config");
        assert_eq!(c.tls.source, TlsSource::WorkloadApi);
        assert_eq!(
            c.workload_api_endpoint().as_deref(),
            Some("unix:///run/spire/agent.sock")
        );
        // Mixing both, or files without a certificate, is refused with every reason.
        let mixed = GOOD.replace("[tls]", "[tls]\nsource = \"workload_api\"");
        let all = Config::from_toml(&mixed, std::iter::empty(), d.path())
            .expect_err("mixed")
            .to_string();
        for want in [
            "tls.cert: not used",
            "tls.key: not used",
            "tls.bundles: not used",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
        let bare = GOOD.replace(files, "workload_api_socket = \"/x.sock\"");
        let all = Config::from_toml(&bare, std::iter::empty(), d.path())
            .expect_err("no files")
            .to_string();
        for want in [
            "tls.cert: required",
            "tls.key: required",
            "tls.bundles: at least one",
            "tls.workload_api_socket: only used",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }

    #[test]
    fn environment_overrides_apply() {
        let d = dir_with_files();
        let vars = vec![
            ("LEASH_STORE__KIND".to_owned(), "memory".to_owned()),
            ("LEASH_REAPER__INTERVAL".to_owned(), "100ms".to_owned()),
            ("LEASH_REAPER__BATCH".to_owned(), "7".to_owned()),
            ("LEASH_LOG".to_owned(), "debug".to_owned()),
            ("LEASH_STORE__NOPE".to_owned(), "1".to_owned()),
        ];
        let err = Config::from_toml(GOOD, vars.clone().into_iter(), d.path()).expect_err("unknown");
        assert!(err.to_string().contains("store.nope"));
        let c = Config::from_toml(GOOD, vars.into_iter().take(4), d.path()).expect("config");
        assert_eq!(c.store.kind, StoreKind::Memory);
        assert_eq!(c.reaper.interval, Duration::from_millis(100));
        assert_eq!(c.reaper.batch, 7);
    }

    #[test]
    fn limits_have_sane_defaults_and_are_validated() {
        let d = dir_with_files();
        let c = Config::from_toml(GOOD, std::iter::empty(), d.path()).expect("config");
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.max_pending_handshakes, 1024);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_concurrent_streams, 100);
        assert_eq!(c.limits.max_message_bytes, 65_536);
        assert_eq!(c.task_binding_rule(), BindingRule::SpiffeId);
        let set = format!(
            "{GOOD}[limits]\nmax_connections = 50\nmax_pending_handshakes = 10\nhandshake_timeout = \"2s\"\nmax_concurrent_streams = 8\nmax_message_bytes = 20000\n"
        );
        let c = Config::from_toml(&set, std::iter::empty(), d.path()).expect("config");
        assert_eq!(c.limits.max_pending_handshakes, 10);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(2));
        let bad = format!(
            "{GOOD}[limits]\nmax_connections = 0\nmax_pending_handshakes = 0\nhandshake_timeout = \"0s\"\nmax_concurrent_streams = 0\nmax_message_bytes = 10\nmax_handshakes = 1\n"
        );
        let all = Config::from_toml(&bad, std::iter::empty(), d.path())
            .expect_err("bad limits")
            .to_string();
        for want in [
            "limits.max_connections",
            "limits.max_pending_handshakes",
            "limits.handshake_timeout",
            "limits.max_concurrent_streams",
            "limits.max_message_bytes",
            "unknown key `limits.max_handshakes`",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }

    #[test]
    fn actor_classes_load_in_order_and_bad_ones_are_refused_naming_the_field() {
        let d = dir_with_files();
        let load = |body: &str| {
            Config::from_toml(&format!("{GOOD}\n{body}"), std::iter::empty(), d.path())
        };
        // No classes: loads, and nobody is classified (fail closed).
        let none = load("").expect("config");
        assert!(none.actor_classes().classes().is_empty());
        assert!(none.actor_classes().classify(&id("agent/a")).is_err());
        let good = load(
            r#"
[[actors.classes]]
name = "ci"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/agent/ci"]
max_ttl = "5m"
[[actors.classes]]
name = "agent"
tenant = "acme"
owner = "platform@acme.test"
identities = ["spiffe://acme.test/agent/*"]
max_concurrent_tasks = 10
max_concurrent_tasks_per_identity = 2
begin_rate = "60/1m"
begin_rate_per_identity = "1/1m"
"#,
        )
        .expect("config");
        let classes = good.actor_classes();
        assert_eq!(classes.classify(&id("agent/ci")).expect("ci").class, "ci");
        let agent = classes.classify(&id("agent/x")).expect("agent");
        assert_eq!(
            (agent.class.as_str(), agent.tenant.as_str()),
            ("agent", "acme")
        );
        assert_eq!(agent.limits.max_concurrent_tasks_per_identity, Some(2));
        for (body, want) in [
            ("max_ttl = \"soon\"", "in `actors.classes.max_ttl`"),
            ("typo = 1", "unknown key `actors.classes.0.typo`"),
        ] {
            let all = load(&format!(
                "[[actors.classes]]\nname = \"a\"\ntenant = \"t\"\nowner = \"o\"\nidentities = [\"spiffe://acme.test/*\"]\n{body}\n"
            ))
            .expect_err(body)
            .to_string();
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
        // With the type error fixed, every semantic problem at once.
        let all = load(
            r#"
[[actors.classes]]
name = "Agent"
owner = ""
identities = ["spiffe://acme.test/*"]
begin_rate = "fast"
[[actors.classes]]
name = "ci"
tenant = "acme"
owner = "o"
identities = ["spiffe://acme.test/ci"]
max_concurrent_tasks = 0
"#,
        )
        .expect_err("bad classes")
        .to_string();
        for want in [
            "actors.classes[0].name: \"Agent\" is not a class name",
            "actors.classes[0].tenant: required",
            "actors.classes[0].owner: required",
            "actors.classes[0].begin_rate: \"fast\" must be",
            "actors.classes[1].identities[0]: spiffe://acme.test/ci never applies: actors.classes[0].identities[0]",
            "actors.classes[1].max_concurrent_tasks: must be positive",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }

    #[test]
    fn task_binding_is_spiffe_id_unless_set_to_key() {
        let d = dir_with_files();
        let with = |tls_extra: &str| {
            Config::from_toml(
                &GOOD.replace("[tls]", &format!("[tls]\n{tls_extra}")),
                std::iter::empty(),
                d.path(),
            )
        };
        assert_eq!(
            with("").expect("config").task_binding_rule(),
            BindingRule::SpiffeId
        );
        assert_eq!(
            with("task_binding = \"key\"")
                .expect("config")
                .task_binding_rule(),
            BindingRule::Key
        );
        assert!(
            with("task_binding = \"cert\"")
                .expect_err("unknown mode")
                .to_string()
                .contains("task_binding")
        );
    }

    fn with_verifier(body: &str) -> Result<Config, ConfigError> {
        let d = dir_with_files();
        let start = GOOD.find("[verifier]").expect("GOOD has [verifier]");
        Config::from_toml(
            &format!("{}[verifier]\n{body}\n", &GOOD[..start]),
            std::iter::empty(),
            d.path(),
        )
    }

    fn id(path: &str) -> crate::identity::SpiffeId {
        crate::identity::SpiffeId::parse(&format!("spiffe://acme.test/{path}")).expect("id")
    }

    #[test]
    fn verifier_callers_map_identities_to_audiences_first_match_wins() {
        use crate::revocation::Audiences;
        let d = dir_with_files();
        let c = Config::from_toml(GOOD, std::iter::empty(), d.path()).expect("config");
        let callers = c.verifier_callers();
        assert_eq!(callers.entries().len(), c.verifier.callers.len());
        let only = |a: &[&str]| Audiences::Only(a.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(
            callers.audiences_of(&id("resource/github")),
            Some(&only(&["https://api.github.test"]))
        );
        assert_eq!(
            callers.audiences_of(&id("resource/db")),
            Some(&only(&["https://api.acme.test", "postgres://db.acme.test"]))
        );
        assert_eq!(
            callers.audiences_of(&id("ops/revocation-auditor")),
            Some(&Audiences::All)
        );
        assert_eq!(callers.audiences_of(&id("agent/reviewer")), None);
        // No [verifier] section: nobody is a verifier.
        let none = with_verifier("").expect("config");
        assert!(none.verifier_callers().entries().is_empty());
    }

    #[test]
    fn bad_verifier_callers_are_refused_naming_the_field() {
        let all = with_verifier(
            r#"callers = [
  { identity = "spiffe://acme.test/resource/a", audiences = [] },
  { identity = "resource/*", audiences = ["https://a.test"] },
  { identity = "spiffe://acme.test/resource/*", audiences = ["*", "https://a.test"] },
  { identity = "spiffe://acme.test/resource/b", audiences = ["https://b.test"] },
  { identity = "spiffe://acme.test/ops/x", audiences = ["https://c.test", "https://c.test", "https://*.test", ""] },
  { identity = "spiffe://acme.test/ops/y" },
  { audiences = ["*"] },
  { identity = "spiffe://acme.test/ops/z", audiences = ["*"], audience = "x" },
]"#,
        )
        .expect_err("bad callers")
        .to_string();
        for want in [
            "verifier.callers[0].audiences: must list at least one audience",
            "verifier.callers[1].identity: invalid identity pattern \"resource/*\": not a SPIFFE ID",
            "verifier.callers[2].audiences: \"*\" means every audience and must be the only entry",
            "verifier.callers[3].identity: spiffe://acme.test/resource/b never applies: verifier.callers[2] (spiffe://acme.test/resource/*)",
            "verifier.callers[4].audiences[1]: \"https://c.test\" is listed twice",
            "verifier.callers[4].audiences[2]: \"https://*.test\": audiences match exactly",
            "verifier.callers[4].audiences[3]: \"\" is not an audience",
            "verifier.callers[5].audiences: must list at least one audience",
            "verifier.callers[6].identity: required",
            "unknown key `verifier.callers.7.audience`",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
        // A list of strings (the old shape) under the new key is refused too.
        let old_shape = with_verifier(r#"callers = ["spiffe://acme.test/resource/*"]"#)
            .expect_err("strings")
            .to_string();
        assert!(
            old_shape.contains("expected an entry like { identity = ")
                && old_shape.contains("verifier.callers"),
            "{old_shape}"
        );
    }

    #[test]
    fn the_replaced_introspect_callers_key_is_refused_with_directions() {
        let d = dir_with_files();
        let old = with_verifier(r#"introspect_callers = ["spiffe://acme.test/resource/*"]"#)
            .expect_err("old key")
            .to_string();
        let from_env = Config::from_toml(
            GOOD,
            [(
                "LEASH_VERIFIER__INTROSPECT_CALLERS".to_owned(),
                r#"["spiffe://acme.test/resource/*"]"#.to_owned(),
            )]
            .into_iter(),
            d.path(),
        )
        .expect_err("old key from the environment")
        .to_string();
        for all in [old, from_env] {
            assert!(
                all.contains("verifier.introspect_callers: no longer supported: replaced by `verifier.callers`"),
                "{all}"
            );
            assert!(all.contains("audiences = [\"*\"]"), "{all}");
            assert!(!all.contains("unknown key"), "{all}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(redact_url("redis://db:6379"), "redis://db:6379");
    }

    #[test]
    fn telemetry_is_off_by_default_and_checked() {
        let d = dir_with_files();
        let c = Config::from_toml(GOOD, std::iter::empty(), d.path()).expect("config");
        assert_eq!(
            c.telemetry.otlp_endpoint, None,
            "no export unless configured"
        );
        assert_eq!(c.telemetry.service_name, "leash-broker");
        assert_eq!(c.telemetry.sample_ratio, 1.0);
        assert_eq!(c.telemetry.queue_size, 2048);
        assert_eq!(c.telemetry.batch_interval, Duration::from_secs(5));
        let on = format!(
            "{GOOD}[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25\nbatch_interval = \"200ms\"\n"
        );
        let c = Config::from_toml(&on, std::iter::empty(), d.path()).expect("config");
        assert_eq!(
            c.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(c.telemetry.batch_interval, Duration::from_millis(200));
        for endpoint in ["http://collector.observability:4317", "http://[::1]:4317/"] {
            let t = format!("{GOOD}[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
            Config::from_toml(&t, std::iter::empty(), d.path()).expect(endpoint);
        }
        for (endpoint, want) in [
            ("https://127.0.0.1:4317", "only http:// is supported"),
            ("grpc://127.0.0.1:4317", "not grpc://"),
            ("127.0.0.1:4317", "only http:// is supported"),
            ("http://127.0.0.1", "a host and a port"),
            ("http://127.0.0.1:4317/v1/traces", "no path"),
            ("http://user@127.0.0.1:4317", "a host and a port"),
            ("http://", "a host and a port"),
        ] {
            let t = format!("{GOOD}[telemetry]\notlp_endpoint = \"{endpoint}\"\n");
            let all = Config::from_toml(&t, std::iter::empty(), d.path())
                .expect_err(endpoint)
                .to_string();
            assert!(
                all.contains("telemetry.otlp_endpoint:") && all.contains(want),
                "{endpoint}: {all}"
            );
        }
        let bad = format!(
            "{GOOD}[telemetry]\nsample_ratio = 1.5\nqueue_size = 0\nbatch_interval = \"1ms\"\nexport_timeout = \"2m\"\nservice_name = \"\"\nexporter = \"x\"\n"
        );
        let all = Config::from_toml(&bad, std::iter::empty(), d.path())
            .expect_err("bad")
            .to_string();
        for want in [
            "telemetry.sample_ratio",
            "telemetry.queue_size",
            "telemetry.batch_interval",
            "telemetry.export_timeout",
            "telemetry.service_name",
            "unknown key `telemetry.exporter`",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
    }
}
