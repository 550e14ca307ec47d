//! Builds a broker from its [`Config`] and serves it on listeners it is given.
//!
//! The caller binds the listeners (tests bind port 0 and run many brokers side
//! by side) and passes a shutdown future. On shutdown the listeners stop
//! accepting, in-flight calls get [`DRAIN_TIMEOUT`] to finish, and the reaper,
//! reloader and revocation canary (when `[canary] enabled`) stop. If any part
//! stops on its own, all stop.

mod incoming;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use leash_proto::v1::{
    admin_server::AdminServer, broker_server::BrokerServer, verifier_server::VerifierServer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tonic::service::interceptor::InterceptedService;

use crate::{
    api::{AdminApi, BearerAuth, BrokerApi, SvidAuth, VerifierApi},
    canary::CanaryLoop,
    clock::{Clock, SystemClock},
    config::{Config, Limits, StoreKind, TlsSource},
    credentials::{KeySet, Minter, SigningKey},
    doctor::{CanaryView, Diagnostics},
    identity::{
        self, ServingCert, TrustBundleSource,
        jwt_svid::{JwtBundleSource, JwtSvidVerifier},
        workload::WorkloadIdentity,
    },
    lease::{LeaseService, Reaper, ReaperSettings},
    metrics::{MeteredStore, Metrics, RpcMetricsLayer},
    policy::cedar::PolicyCatalog,
    reload::Reloader,
    revocation::RevocationFeed,
    store::{LeaseStore, MemoryStore, RedisStore, RedisStoreOptions},
    templates::TemplateCatalog,
};

/// How long in-flight calls may take to finish after shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often store health is checked for the health service.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the broker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A component could not be built from the configuration.
    #[error("{0}")]
    Setup(String),
    /// A listener failed.
    #[error("serving failed: {0}")]
    Serve(String),
}

/// The gRPC server settings every listener shares, with a span for every call
/// (see [`crate::telemetry::RpcTrace`]).
fn grpc_server(
    limits: &Limits,
) -> tonic::transport::Server<
    tower::layer::util::Stack<crate::telemetry::RpcTraceLayer, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .layer(crate::telemetry::RpcTraceLayer)
}

fn setup(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::Setup(format!("{what}: {e}"))
}

/// Everything a broker is made of, built and checked before serving.
struct Parts {
    bundles: Arc<TrustBundleSource>,
    cert: Arc<ServingCert>,
    templates: Arc<TemplateCatalog>,
    // Cedar policies, when `[policy] dir` is set.
    policies: Option<Arc<PolicyCatalog>>,
    minter: Minter,
    // Followed until shutdown when the identity comes from the Workload API.
    workload: Option<WorkloadIdentity>,
    // The JWT-SVID listener's address and verifier, when configured.
    jwt_svid: Option<(std::net::SocketAddr, JwtSvidVerifier)>,
    // Its JWT bundles, for the reloader.
    jwt_bundles: Option<Arc<JwtBundleSource>>,
}

async fn build_parts(config: &Config) -> Result<Parts, ServerError> {
    let (bundles, cert, workload) = match config.tls.source {
        TlsSource::Files => {
            let bundles = Arc::new(
                TrustBundleSource::from_files(&config.tls.bundles)
                    .map_err(|e| setup("tls.bundles", e))?,
            );
            let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
                return Err(setup("tls", "cert and key are required"));
            };
            let cert = Arc::new(
                ServingCert::from_files(cert.clone(), key.clone())
                    .map_err(|e| setup("tls.cert/tls.key", e))?,
            );
            (bundles, cert, None)
        }
        TlsSource::WorkloadApi => {
            let endpoint = config.workload_api_endpoint().ok_or_else(|| {
                setup(
                    "tls.workload_api_socket",
                    "no Workload API endpoint configured",
                )
            })?;
            let workload = WorkloadIdentity::connect(&endpoint, config.tls.workload_api_timeout)
                .await
                .map_err(|e| setup("tls.source", e))?;
            (
                Arc::clone(&workload.bundles),
                Arc::clone(&workload.cert),
                Some(workload),
            )
        }
    };
    let offline = build_offline_parts(config)?;
    let (templates, policies, minter, jwt_svid, jwt_bundles) = (
        offline.templates,
        offline.policies,
        offline.minter,
        offline.jwt_svid,
        offline.jwt_bundles,
    );
    Ok(Parts {
        bundles,
        cert,
        templates,
        policies,
        minter,
        workload,
        jwt_svid,
        jwt_bundles,
    })
}

/// The parts built from files alone (no Workload API, no store).
struct OfflineParts {
    templates: Arc<TemplateCatalog>,
    policies: Option<Arc<PolicyCatalog>>,
    minter: Minter,
    jwt_svid: Option<(std::net::SocketAddr, JwtSvidVerifier)>,
    jwt_bundles: Option<Arc<JwtBundleSource>>,
}

fn build_offline_parts(config: &Config) -> Result<OfflineParts, ServerError> {
    let templates = Arc::new(
        TemplateCatalog::with_check(
            config.templates.dir.clone(),
            Some(crate::policy::actors::template_check(
                config.actor_classes(),
            )),
        )
        .map_err(|e| setup("templates", format!("{} problem(s):\n{e}", e.0.len())))?,
    );
    let policies = match &config.policy.dir {
        Some(dir) => Some(Arc::new(
            PolicyCatalog::new(dir.clone(), &config.policy.time_zone)
                .map_err(|e| setup("policy", format!("{} problem(s):\n{e}", e.0.len())))?,
        )),
        None => None,
    };
    let keys = config
        .signing
        .keys
        .iter()
        .map(|k| SigningKey::from_pem_file(&k.kid, k.alg, &k.path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup("signing.keys", e))?;
    let keys = KeySet::new(keys).map_err(|e| setup("signing.keys", e))?;
    let minter = Minter::new(Arc::new(keys), config.signing.issuer.clone());
    let (jwt_svid, jwt_bundles) = match &config.jwt_svid {
        Some(j) => {
            let bundles = Arc::new(
                JwtBundleSource::from_files(&j.bundles)
                    .map_err(|e| setup("jwt_svid.bundles", e))?,
            );
            let verifier = JwtSvidVerifier::new(Arc::clone(&bundles), j.audience.clone(), j.leeway)
                .with_max_lifetime(j.max_lifetime);
            (Some((j.listen, verifier)), Some(bundles))
        }
        None => (None, None),
    };
    Ok(OfflineParts {
        templates,
        policies,
        minter,
        jwt_svid,
        jwt_bundles,
    })
}

/// The Redis store `config` describes (its topology, access and options);
/// connects to nothing yet.
fn redis_store(config: &Config, clock: Arc<dyn Clock>) -> Result<RedisStore, ServerError> {
    let access = config.store.access().map_err(|e| setup("store", e))?;
    RedisStore::open(
        &config.store.topology(),
        &access,
        RedisStoreOptions {
            prefix: config.store.prefix.clone(),
            timeout: config.store.timeout,
            retention: config.store.retention,
            durability: config.durability(),
            clock: crate::store::StoreClock::Store,
            local_clock: clock,
            audit: config.audit.retention(),
        },
    )
    .map_err(|e| setup("store", e))
}

/// What [`check_config`] found: one line per part checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigCheck(pub Vec<String>);

impl std::fmt::Display for ConfigCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in &self.0 {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// `leash serve --check-config`: builds everything `serve` builds from files
/// (the serving certificate, key and trust bundles with `tls.source =
/// "files"`, the templates checked against the actor classes, the Cedar
/// policies, the signing keys, the JWT-SVID bundles, the store's password and
/// CA files and its topology) and reports what it found, without listening,
/// connecting to the store or to the Workload API.
///
/// # Errors
/// [`ServerError::Setup`] naming the first part that does not load, as `serve`
/// would at start.
pub async fn check_config(config: &Config) -> Result<ConfigCheck, ServerError> {
    let mut out = Vec::new();
    match config.tls.source {
        TlsSource::Files => {
            TrustBundleSource::from_files(&config.tls.bundles)
                .map_err(|e| setup("tls.bundles", e))?;
            let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
                return Err(setup("tls", "cert and key are required"));
            };
            ServingCert::from_files(cert.clone(), key.clone())
                .map_err(|e| setup("tls.cert/tls.key", e))?;
            out.push(format!(
                "tls: files, certificate and key load, {} trust bundle(s)",
                config.tls.bundles.len()
            ));
        }
        TlsSource::WorkloadApi => {
            let endpoint = config.workload_api_endpoint().ok_or_else(|| {
                setup(
                    "tls.workload_api_socket",
                    "no Workload API endpoint configured (or SPIFFE_ENDPOINT_SOCKET)",
                )
            })?;
            out.push(format!(
                "tls: workload_api at {endpoint} (not contacted by the check)"
            ));
        }
    }
    let parts = build_offline_parts(config)?;
    out.push(format!(
        "templates: {} template(s) in {}",
        parts.templates.current().len(),
        config.templates.dir.display()
    ));
    if let Some(dir) = &config.policy.dir {
        out.push(format!(
            "policy: the Cedar policies in {} compile",
            dir.display()
        ));
    }
    out.push(format!(
        "signing: {} key(s) load, issuer {}",
        config.signing.keys.len(),
        config.signing.issuer
    ));
    if parts.jwt_svid.is_some() {
        out.push("jwt_svid: bundles load".into());
    }
    if let Some(o) = &config.oauth {
        out.push(format!(
            "oauth: listener {} at {}",
            o.listen,
            o.base_url(&config.signing.issuer)
        ));
    }
    match config.store.kind {
        StoreKind::Memory => out.push("store: memory (nothing survives a restart)".into()),
        StoreKind::Redis => {
            let topology = config.store.topology();
            let shape = match &topology {
                crate::store::Topology::Standalone { .. } => "standalone".to_owned(),
                crate::store::Topology::Sentinel { master, sentinels } => {
                    format!(
                        "sentinel (master {master}, {} Sentinel(s))",
                        sentinels.len()
                    )
                }
                crate::store::Topology::Cluster { nodes } => {
                    format!("cluster ({} seed node(s))", nodes.len())
                }
            };
            redis_store(config, Arc::new(crate::clock::SystemClock))?;
            out.push(format!(
                "store: redis {shape}, not contacted by the check; durability {}",
                config.durability()
            ));
        }
    }
    Ok(ConfigCheck(out))
}

/// Builds the broker described by `config` and serves it on `agent` (mTLS) and
/// `ops` (plaintext health) until `shutdown` completes.
///
/// # Errors
/// [`ServerError::Setup`] if a certificate, key, bundle or template cannot be
/// loaded (nothing is served then); [`ServerError::Serve`] if a listener fails.
pub async fn serve(
    config: Config,
    agent: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_with_clock(config, Arc::new(SystemClock), agent, ops, shutdown).await
}

/// [`serve`] with this replica's clock given: what it mints credentials and
/// judges by where the store does not decide. With Redis every lease deadline
/// is decided on Redis's clock, so replicas whose clocks differ still agree
/// (tests run replicas with skewed clocks to show it).
///
/// # Errors
/// As [`serve`].
pub async fn serve_with_clock(
    config: Config,
    clock: Arc<dyn Clock>,
    agent: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    // Traces first, so the start itself is traced; flushed when serving ends.
    let telemetry =
        crate::telemetry::start(&config.telemetry).map_err(|e| setup("telemetry", e))?;
    let result = serve_parts(config, clock, agent, ops, shutdown).await;
    if let Some(t) = telemetry {
        t.shutdown(TELEMETRY_FLUSH_TIMEOUT).await;
    }
    result
}

/// How long queued spans may take to leave at shutdown.
const TELEMETRY_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

async fn serve_parts(
    config: Config,
    clock: Arc<dyn Clock>,
    agent: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let parts = build_parts(&config).await?;
    match config.store.kind {
        StoreKind::Memory => {
            let store = Arc::new(MemoryStore::with_audit(
                crate::clock::duration_ms(config.store.retention),
                config.audit.retention(),
            ));
            run(config, parts, store, clock, agent, ops, shutdown).await
        }
        StoreKind::Redis => {
            let store = redis_store(&config, clock.clone())?;
            check_redis(&store).await?;
            run(config, parts, Arc::new(store), clock, agent, ops, shutdown).await
        }
    }
}

/// Checks the Redis server before serving: a reachable server that cannot give
/// Leash's guarantees stops the start; an unreachable one is logged, and state
/// changes fail closed until a check passes.
async fn check_redis(store: &RedisStore) -> Result<(), ServerError> {
    let durability = store.durability();
    if durability == crate::store::Durability::None {
        tracing::warn!(
            "store.durability = \"none\": changes are acknowledged before they are durable; a Redis crash can bring completed tasks back and lose revocations. Do not run production like this."
        );
    }
    match store.verify().await {
        Ok(facts) => {
            let (major, minor, patch) = facts.version;
            tracing::info!(redis = %format!("{major}.{minor}.{patch}"), %durability, "redis checked");
            Ok(())
        }
        Err(e @ crate::store::StoreError::Misconfigured(_)) => Err(setup("store", e)),
        Err(e) => {
            tracing::warn!(error = %e, "redis not reachable at start; state changes wait for a passing check");
            Ok(())
        }
    }
}

async fn run<S: LeaseStore>(
    config: Config,
    parts: Parts,
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    agent: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    // Every store call is timed; the metrics are served at /metrics.
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(MeteredStore::new(store, metrics.clone()));
    run_metered(config, parts, store, metrics, clock, agent, ops, shutdown).await
}

#[allow(clippy::too_many_arguments)]
async fn run_metered<S: LeaseStore>(
    config: Config,
    parts: Parts,
    store: Arc<S>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    agent: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if !config.audit.streams {
        tracing::warn!(
            "audit.streams = false: no change is recorded in the durable audit trail (log lines only). For measuring its cost; do not run production like this."
        );
    }
    // Refusals reach the durable trail through a bounded queue and one writer.
    let (refusals, refused) = crate::audit::Refusals::new(clock.clone());
    let refusals = refusals.with_metrics(metrics.clone());
    tokio::spawn(crate::audit::write_refusals(store.clone(), refused));
    let tls =
        identity::server_tls_config(parts.bundles.clone(), parts.cert.clone(), refusals.clone())
            .map_err(|e| setup("tls", e))?;
    let service = Arc::new(
        LeaseService::new(
            store.clone(),
            parts.templates.clone(),
            parts.minter,
            clock.clone(),
            config.verifier_callers(),
        )
        .with_binding_rule(config.task_binding_rule())
        .with_actors(config.actor_classes())
        .with_admins(config.admin_callers())
        .with_tenant_admins(config.tenant_admins())
        .with_policies(parts.policies.clone())
        .with_refusals(refusals)
        .with_metrics(metrics.clone()),
    );
    if config.actors.classes.is_empty() {
        tracing::warn!(
            "no [[actors.classes]] configured: every identity is denied (fail closed); see examples/leash.toml"
        );
    }
    let feed = RevocationFeed::with_metrics(store.clone(), clock.clone(), Some(metrics.clone()));
    let canary = canary_loop(&config, &parts.templates, clock.clone())?;
    if let Some(c) = &canary {
        metrics.register(|r| c.metrics().register(r));
    }
    let diagnostics = Arc::new(
        Diagnostics::new(
            store.clone(),
            parts.bundles.clone(),
            config
                .signing
                .keys
                .first()
                .map(|k| (k.kid.clone(), k.path.clone())),
            (config.store.kind == StoreKind::Redis).then(|| config.durability()),
            clock.clone(),
        )
        .with_canary(canary.as_ref().map(|c| CanaryView {
            state: c.state(),
            interval: config.canary.interval,
            slo: config.canary.slo,
        })),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<BrokerApi<S>>>().await;
    health.set_serving::<VerifierServer<VerifierApi<S>>>().await;
    health.set_serving::<AdminServer<AdminApi<S>>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(leash_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| setup("reflection", e))?;

    let mut tasks: JoinSet<(&'static str, Result<(), ServerError>)> = JoinSet::new();

    // Agent port: mTLS, Broker + Verifier + health + reflection. Every Broker and
    // Verifier call re-checks the client's chain against the current bundles.
    let limits = &config.limits;
    let max_message = limits.max_message_bytes;
    let incoming = incoming::tls_incoming(
        agent,
        TlsAcceptor::from(tls),
        stop_rx.clone(),
        limits.into(),
    );
    let health_service = health_service.max_decoding_message_size(max_message);
    let svid_auth = SvidAuth::new(parts.bundles.clone());
    let agent_router = grpc_server(limits)
        .layer(RpcMetricsLayer::new(metrics.clone()))
        .add_service(health_service.clone())
        .add_service(reflection.max_decoding_message_size(max_message))
        .add_service(InterceptedService::new(
            BrokerServer::new(BrokerApi::new(service.clone()))
                .max_decoding_message_size(max_message),
            svid_auth.clone(),
        ))
        .add_service(InterceptedService::new(
            VerifierServer::new(VerifierApi::new(service.clone(), feed.clone()))
                .max_decoding_message_size(max_message),
            svid_auth.clone(),
        ))
        // Admin only on the mTLS port: operators prove themselves with an X509-SVID.
        .add_service(InterceptedService::new(
            AdminServer::new(AdminApi::new(service.clone()).with_diagnostics(diagnostics))
                .max_decoding_message_size(max_message),
            svid_auth,
        ));
    let stop = wait_for(stop_rx.clone());
    tasks.spawn(async move {
        let r = agent_router
            .serve_with_incoming_shutdown(incoming, stop)
            .await
            .map_err(|e| ServerError::Serve(format!("agent port: {e}")));
        ("agent server", r)
    });

    // JWT-SVID port (optional): TLS without client certificates; every call must
    // carry `authorization: Bearer <JWT-SVID>`.
    if let Some((address, verifier)) = parts.jwt_svid {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| setup("jwt_svid.listen", format!("{address}: {e}")))?;
        let tls = identity::server_tls_config_without_client_auth(parts.cert.clone())
            .map_err(|e| setup("jwt_svid", e))?;
        let incoming = incoming::tls_incoming(
            listener,
            TlsAcceptor::from(tls),
            stop_rx.clone(),
            limits.into(),
        );
        let auth = BearerAuth::new(verifier);
        let router = grpc_server(limits)
            .layer(RpcMetricsLayer::new(metrics.clone()))
            .add_service(health_service.clone())
            .add_service(InterceptedService::new(
                BrokerServer::new(BrokerApi::new(service.clone()))
                    .max_decoding_message_size(max_message),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                VerifierServer::new(VerifierApi::new(service.clone(), feed.clone()))
                    .max_decoding_message_size(max_message),
                auth,
            ));
        let stop = wait_for(stop_rx.clone());
        tasks.spawn(async move {
            let r = router
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(|e| ServerError::Serve(format!("jwt_svid port: {e}")));
            ("jwt-svid server", r)
        });
        tracing::info!(%address, "JWT-SVID listener serving");
    }

    // OAuth port (optional): TLS, client certificates requested but optional
    // (the metadata and JWK Set are public), HTTP/1.1 and HTTP/2.
    let oauth_base = config
        .oauth
        .as_ref()
        .map(|o| o.base_url(&config.signing.issuer));
    if let (Some(oauth), Some(base)) = (&config.oauth, &oauth_base) {
        let address = oauth.listen;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| setup("oauth.listen", format!("{address}: {e}")))?;
        let tls = identity::oauth_tls_config(
            parts.bundles.clone(),
            parts.cert.clone(),
            service.refusals().clone(),
        )
        .map_err(|e| setup("oauth", e))?;
        let incoming = incoming::tls_incoming(
            listener,
            TlsAcceptor::from(tls),
            stop_rx.clone(),
            limits.into(),
        );
        let router = Arc::new(crate::api::OAuthApi::new(
            service.clone(),
            parts.bundles.clone(),
            base.clone(),
        ))
        .router();
        let stop = wait_for(stop_rx.clone());
        tasks.spawn(async move {
            let r = axum::serve(
                incoming::TlsListener::new(incoming),
                router.into_make_service_with_connect_info::<crate::api::PeerConnection>(),
            )
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| ServerError::Serve(format!("oauth port: {e}")));
            ("oauth server", r)
        });
        tracing::info!(%address, public_url = %base, "OAuth listener serving");
    }

    // Ops port: plaintext; Kubernetes probes cannot present client certificates.
    let ops_router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .with_state(store.clone())
        .merge(
            Router::new()
                .route("/metrics", get(metrics_page::<S>))
                .with_state(Arc::new(Scrape {
                    store: store.clone(),
                    metrics: metrics.clone(),
                    templates: parts.templates.clone(),
                    clock: clock.clone(),
                    refusals: service.refusals().clone(),
                    tenants: config.actor_classes().tenants(),
                    lock: tokio::sync::Mutex::new(()),
                })),
        )
        .merge(
            Router::new()
                .route("/.well-known/jwks.json", get(jwks::<S>))
                .route("/.well-known/openid-configuration", get(discovery::<S>))
                .with_state(service.clone())
                .layer(axum::Extension(PublicUrl(oauth_base.clone()))),
        )
        .merge(tonic::service::Routes::new(health_service).into_axum_router());
    let stop = wait_for(stop_rx.clone());
    tasks.spawn(async move {
        let r = axum::serve(ops, ops_router)
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| ServerError::Serve(format!("ops port: {e}")));
        ("ops server", r)
    });

    let reaper = Reaper::new(
        store.clone(),
        clock.clone(),
        ReaperSettings {
            interval: config.reaper.interval,
            batch: config.reaper.batch,
            ..ReaperSettings::default()
        },
    )
    .with_metrics(metrics.clone());
    let rx = stop_rx.clone();
    tasks.spawn(async move {
        reaper.run(rx).await;
        ("reaper", Ok(()))
    });
    let rx = stop_rx.clone();
    tasks.spawn(async move {
        feed.run(rx).await;
        ("revocation feed", Ok(()))
    });
    if let Some(canary) = canary {
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            canary.run(rx).await;
            ("canary", Ok(()))
        });
    }
    if let Some(workload) = parts.workload {
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            workload.follow(rx).await;
            ("workload api", Ok(()))
        });
    }
    let reloader = Reloader {
        bundles: parts.bundles,
        cert: parts.cert,
        jwt_bundles: parts.jwt_bundles,
        templates: parts.templates,
        policies: parts.policies,
        interval: config.reload.interval,
    };
    let rx = stop_rx.clone();
    tasks.spawn(async move {
        reloader.run(rx).await;
        ("reloader", Ok(()))
    });
    let rx = stop_rx.clone();
    tasks.spawn(async move {
        store_health::<S>(store, health, rx).await;
        ("store health", Ok(()))
    });

    tracing::info!(
        agent = %config.listen.agent,
        ops = %config.listen.ops,
        store = ?config.store,
        "leash broker serving"
    );

    // Supervise: the first part to stop (for any reason) stops all.
    let mut result = Ok(());
    if let Some(joined) = tasks.join_next().await {
        let _ = stop_tx.send(true);
        if let Ok((name, Err(e))) = joined {
            tracing::error!(part = name, error = %e, "stopped with an error; shutting down");
            result = Err(e);
        } else if !*stop_rx.borrow() {
            tracing::error!("a broker part stopped unexpectedly; shutting down");
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok((name, Err(e))) = joined {
                tracing::warn!(part = name, error = %e, "error while stopping");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain timed out; aborting the remaining calls");
        tasks.abort_all();
    }
    tracing::info!("leash broker stopped");
    result
}

/// The canary loop when `[canary] enabled`, after checking its template is
/// loaded (a broker whose canary could never pass does not start).
fn canary_loop(
    config: &Config,
    templates: &TemplateCatalog,
    clock: Arc<dyn Clock>,
) -> Result<Option<CanaryLoop>, ServerError> {
    let c = &config.canary;
    if !c.enabled {
        return Ok(None);
    }
    if templates.current().get(&c.template).is_none() {
        return Err(setup(
            "canary.template",
            format!(
                "no template named {:?} is loaded from {}; the canary needs one (see README: Revocation canary)",
                c.template,
                templates.dir().display()
            ),
        ));
    }
    let target = c
        .target(&config.tls, config.listen.agent)
        .ok_or_else(|| setup("canary", "cert, key and ca are required when enabled"))?;
    tracing::info!(
        template = %c.template,
        broker = %target.broker,
        interval = %humantime::format_duration(c.interval),
        slo = %humantime::format_duration(c.slo),
        "revocation canary on"
    );
    Ok(Some(CanaryLoop::new(target, c.interval, c.slo, clock)))
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// What a `/metrics` scrape reads besides the counters.
struct Scrape<S> {
    store: Arc<S>,
    metrics: Arc<Metrics>,
    templates: Arc<TemplateCatalog>,
    clock: Arc<dyn Clock>,
    refusals: crate::audit::Refusals,
    tenants: Vec<String>,
    // One scrape at a time reads the store.
    lock: tokio::sync::Mutex<()>,
}

/// How long a scrape waits for the store before answering with the gauges it has.
const SCRAPE_STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The Prometheus text exposition: the counters, and the live gauges read from
/// the store now (bounded work: a few reads per shard). If the store does not
/// answer, `leash_store_up` is 0 and the gauges keep their last values.
async fn metrics_page<S: LeaseStore>(
    State(scrape): State<Arc<Scrape<S>>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let _one = scrape.lock.lock().await;
    let m = &scrape.metrics;
    let read = async {
        let now = scrape.clock.now_ms();
        let counts = scrape.store.live_counts(now).await?;
        let mut lens = Vec::with_capacity(scrape.tenants.len() + 1);
        for tenant in scrape.tenants.iter().map(String::as_str).chain([""]) {
            lens.push((tenant, scrape.store.audit_len(tenant).await?));
        }
        Ok::<_, crate::store::StoreError>((counts, lens))
    };
    match tokio::time::timeout(SCRAPE_STORE_TIMEOUT, read).await {
        Ok(Ok((counts, lens))) => {
            let names: Vec<String> = scrape
                .templates
                .current()
                .names()
                .map(str::to_owned)
                .collect();
            m.set_live(&counts, &names);
            for (tenant, len) in lens {
                m.set_audit_length(tenant, len);
            }
            m.set_store_up(true);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: store not read");
            m.set_store_up(false);
        }
        Err(_) => {
            tracing::warn!("metrics: store read timed out");
            m.set_store_up(false);
        }
    }
    m.set_dropped("log_lines", crate::logging::dropped_lines());
    m.set_dropped("refusals", scrape.refusals.dropped());
    m.set_dropped("spans", crate::telemetry::dropped_spans());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// The JWK Set over plain HTTP, for off-the-shelf JWT libraries (RFC 7517).
async fn jwks<S: LeaseStore>(
    State(service): State<Arc<LeaseService<S>>>,
) -> ([(axum::http::HeaderName, &'static str); 2], String) {
    (
        [
            (axum::http::header::CONTENT_TYPE, "application/jwk-set+json"),
            (axum::http::header::CACHE_CONTROL, "max-age=60"),
        ],
        service.jwks().to_string(),
    )
}

/// `oauth.public_url` (or the issuer), when the OAuth listener is on.
#[derive(Debug, Clone)]
struct PublicUrl(Option<String>);

/// An OpenID-style discovery document naming the issuer and the JWK Set, so
/// libraries that start from discovery find the keys.
async fn discovery<S: LeaseStore>(
    State(service): State<Arc<LeaseService<S>>>,
    axum::Extension(PublicUrl(public)): axum::Extension<PublicUrl>,
    headers: axum::http::HeaderMap,
) -> axum::Json<serde_json::Value> {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let jwks = service.jwks();
    let algs: Vec<&str> = jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.get("alg").and_then(|a| a.as_str()))
                .collect()
        })
        .unwrap_or_default();
    axum::Json(serde_json::json!({
        "issuer": service.minter().issuer(),
        // The configured public URL when there is one (the OAuth listener
        // serves the same JWK Set); else this port as the request reached it.
        "jwks_uri": match &public {
            Some(base) => format!("{base}{}", crate::api::oauth::JWKS_PATH),
            None => format!("http://{host}/.well-known/jwks.json"),
        },
        "id_token_signing_alg_values_supported": algs,
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": true,
        "response_types_supported": [],
        "subject_types_supported": ["public"],
    }))
}

async fn readyz<S: LeaseStore>(State(store): State<Arc<S>>) -> (StatusCode, String) {
    match store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

/// Reports the Broker and Verifier as NOT_SERVING while the store is unreachable.
async fn store_health<S: LeaseStore>(
    store: Arc<S>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut up = true;
    loop {
        tokio::select! {
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let now_up = store.ping().await.is_ok();
        if now_up != up {
            up = now_up;
            if up {
                health.set_serving::<BrokerServer<BrokerApi<S>>>().await;
                health.set_serving::<VerifierServer<VerifierApi<S>>>().await;
            } else {
                health.set_not_serving::<BrokerServer<BrokerApi<S>>>().await;
                health
                    .set_not_serving::<VerifierServer<VerifierApi<S>>>()
                    .await;
            }
        }
    }
}
