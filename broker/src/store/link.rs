//! Where the Redis store's data lives, and one connection type for the three
//! deployments Leash runs on: a single node, a master managed by Redis
//! Sentinel, and a Redis Cluster.
//!
//! [`Link`] is a [`ConnectionLike`], so every command and script of the store
//! runs unchanged on all three:
//! - **standalone**: a [`ConnectionManager`] (reconnects after errors);
//! - **sentinel**: a [`ConnectionManager`] to the master the Sentinels name,
//!   dropped and re-resolved after any connection error, any `READONLY` reply
//!   (the node was demoted) and any `+switch-master` the Sentinels publish,
//!   because a [`ConnectionManager`] alone would keep reconnecting to the old
//!   address (redis-rs issue #1438);
//! - **cluster**: the async cluster client, which routes each command and
//!   script by its first key's slot and follows `MOVED` and failovers itself.

use std::{
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::redis::{
    Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, TlsCertificates, TlsMode, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

/// Which Redis deployment holds the store.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// One Redis node: a `redis://` or `rediss://` URL (it may carry the user
    /// and password).
    Standalone {
        /// The node's URL.
        url: String,
    },
    /// A master (and its replicas) managed by Redis Sentinel: the broker asks
    /// the Sentinels for the master and follows every failover by itself.
    Sentinel {
        /// The name the Sentinels monitor the master under.
        master: String,
        /// The Sentinels, as `host:port`.
        sentinels: Vec<String>,
    },
    /// A Redis Cluster: any of its nodes, as `host:port`; the rest are learned
    /// from them.
    Cluster {
        /// Seed nodes.
        nodes: Vec<String>,
    },
}

impl Topology {
    /// `standalone`, `sentinel` or `cluster`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Standalone { .. } => "standalone",
            Self::Sentinel { .. } => "sentinel",
            Self::Cluster { .. } => "cluster",
        }
    }

    /// True for Redis Cluster, where every command and script must stay on one
    /// hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }
}

/// How to reach and log in to the data nodes (and the Sentinels). Secrets
/// here are never logged ([`fmt::Debug`](std::fmt::Debug) redacts them).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// ACL user on the data nodes (overrides a user in a standalone URL).
    pub username: Option<String>,
    /// Password on the data nodes (overrides one in a standalone URL).
    pub password: Option<String>,
    /// TLS to the data nodes whose addresses are discovered (Sentinel masters,
    /// Cluster nodes); a standalone URL says it with `rediss://`.
    pub tls: bool,
    /// PEM CA certificates to trust for TLS instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// ACL user on the Sentinels.
    pub sentinel_username: Option<String>,
    /// Password on the Sentinels.
    pub sentinel_password: Option<String>,
    /// TLS to the Sentinels.
    pub sentinel_tls: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("ca", &self.ca_pem.is_some())
            .field("sentinel_username", &self.sentinel_username)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .field("sentinel_tls", &self.sentinel_tls)
            .finish()
    }
}

impl Access {
    fn certificates(&self) -> Option<TlsCertificates> {
        self.ca_pem.as_ref().map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        })
    }
}

/// How long a connect and each reply may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

/// An opened [`Topology`]: makes the [`Link`]s the store talks through.
#[derive(Clone)]
pub(super) enum Target {
    Standalone(Client),
    Sentinel(Arc<SentinelState>),
    Cluster(ClusterClientPair),
}

/// What a cluster client is built from (seed nodes, access, connect timeout):
/// each link and each shard's bell builds its own.
#[derive(Clone)]
pub(super) struct ClusterClientPair {
    nodes: Vec<String>,
    access: Access,
    connect: Duration,
}

/// A connect or lookup that did not finish within its bound.
fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

fn host_port(address: &str) -> RedisResult<ConnectionAddr> {
    let (host, port) = address.rsplit_once(':').ok_or_else(|| {
        RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "not host:port",
            address.to_owned(),
        ))
    })?;
    let port: u16 = port.parse().map_err(|_| {
        RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "not a port",
            address.to_owned(),
        ))
    })?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(ConnectionAddr::Tcp(host, port))
}

fn node_url(address: &str, access: &Access) -> RedisResult<String> {
    let ConnectionAddr::Tcp(host, port) = host_port(address)? else {
        return Err(RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "not host:port",
        )));
    };
    let scheme = if access.tls { "rediss" } else { "redis" };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(format!("{scheme}://{host}:{port}"))
}

impl Target {
    /// Checks the topology's addresses and prepares its clients; connects to nothing.
    pub fn open(topology: &Topology, access: &Access, connect: Duration) -> RedisResult<Self> {
        match topology {
            Topology::Standalone { url } => {
                let mut info = url.as_str().into_connection_info()?;
                let mut redis = info.redis_settings().clone();
                if let Some(u) = &access.username {
                    redis = redis.set_username(u);
                }
                if let Some(p) = &access.password {
                    redis = redis.set_password(p);
                }
                info = info.set_redis_settings(redis);
                let client = match access.certificates() {
                    Some(certs) => Client::build_with_tls(info, certs)?,
                    None => Client::open(info)?,
                };
                Ok(Self::Standalone(client))
            }
            Topology::Sentinel { master, sentinels } => {
                let addrs = sentinels
                    .iter()
                    .map(|s| {
                        host_port(s).map(|a| match (a, access.sentinel_tls) {
                            (ConnectionAddr::Tcp(h, p), true) => ConnectionAddr::TcpTls {
                                host: h,
                                port: p,
                                insecure: false,
                                tls_params: None,
                            },
                            (a, _) => a,
                        })
                    })
                    .collect::<RedisResult<Vec<_>>>()?;
                let mut builder =
                    SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)?;
                if let Some(u) = &access.username {
                    builder = builder.set_client_to_redis_username(u);
                }
                if let Some(p) = &access.password {
                    builder = builder.set_client_to_redis_password(p);
                }
                if access.tls {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                }
                if let Some(u) = &access.sentinel_username {
                    builder = builder.set_client_to_sentinel_username(u);
                }
                if let Some(p) = &access.sentinel_password {
                    builder = builder.set_client_to_sentinel_password(p);
                }
                if access.sentinel_tls {
                    builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure);
                }
                if let Some(certs) = access.certificates() {
                    builder = builder
                        .set_client_to_redis_certificates(certs.clone())
                        .set_client_to_sentinel_certificates(certs);
                }
                let client = builder.build()?;
                Ok(Self::Sentinel(Arc::new(SentinelState {
                    client: tokio::sync::Mutex::new(client),
                    master: master.clone(),
                    sentinels: sentinels.clone(),
                    access: access.clone(),
                    current: RwLock::new(None),
                    generation: AtomicU64::new(0),
                    watching: std::sync::Once::new(),
                    connect,
                    failed_at: std::sync::Mutex::new(None),
                })))
            }
            Topology::Cluster { nodes } => {
                for n in nodes {
                    node_url(n, access)?;
                }
                Ok(Self::Cluster(ClusterClientPair {
                    nodes: nodes.clone(),
                    access: access.clone(),
                    connect,
                }))
            }
        }
    }

    /// A link whose replies may take up to `response`.
    pub fn link(&self, t: Timeouts) -> RedisResult<Link> {
        match self {
            Self::Standalone(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Ok(Link::Direct(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?))
            }
            Self::Sentinel(state) => Ok(Link::Sentinel(SentinelLink {
                state: state.clone(),
                timeouts: t,
                cached: Arc::default(),
            })),
            Self::Cluster(pair) => Ok(Link::Cluster(ClusterLink {
                client: Arc::new(pair.client(Some(t.response))?),
                conn: Arc::new(tokio::sync::OnceCell::new()),
                connect: t.connect,
            })),
        }
    }

    /// A connection of its own for blocking reads on a single node (standalone
    /// and Sentinel): no response timeout (the caller bounds the wait).
    pub async fn blocking_connection(
        &self,
        connect: Duration,
    ) -> RedisResult<MultiplexedConnection> {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(None);
        let client = match self {
            Self::Standalone(client) => client.clone(),
            Self::Sentinel(state) => state.master_client().await?,
            Self::Cluster(_) => {
                return Err(RedisError::from((
                    ::redis::ErrorKind::InvalidClientConfig,
                    "a cluster has no single node for blocking reads",
                )));
            }
        };
        tokio::time::timeout(
            connect,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| timed_out())?
    }

    /// A cluster connection of its own (for one shard's blocking reads).
    pub async fn cluster_connection(
        &self,
        response: Option<Duration>,
    ) -> RedisResult<ClusterConnection> {
        match self {
            Self::Cluster(pair) => {
                let client = pair.client(response)?;
                tokio::time::timeout(pair.connect, client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())?
            }
            _ => Err(RedisError::from((
                ::redis::ErrorKind::InvalidClientConfig,
                "not a cluster",
            ))),
        }
    }
}

impl ClusterClientPair {
    fn client(&self, response: Option<Duration>) -> RedisResult<ClusterClient> {
        let urls = self
            .nodes
            .iter()
            .map(|n| node_url(n, &self.access))
            .collect::<RedisResult<Vec<_>>>()?;
        let mut b = ClusterClient::builder(urls)
            .connection_timeout(self.connect)
            // A failed node is retried briefly, then the call fails (UNAVAILABLE).
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(250);
        if let Some(r) = response {
            b = b.response_timeout(r);
        } else {
            b = b.response_timeout(Duration::from_secs(3600));
        }
        if let Some(u) = &self.access.username {
            b = b.username(u);
        }
        if let Some(p) = &self.access.password {
            b = b.password(p);
        }
        if self.access.tls {
            b = b.tls(TlsMode::Secure);
        }
        if let Some(certs) = self.access.certificates() {
            b = b.certs(certs);
        }
        b.build()
    }
}

/// The master the Sentinels named, shared by every [`SentinelLink`] of a store.
pub(super) struct SentinelState {
    client: tokio::sync::Mutex<SentinelClient>,
    master: String,
    sentinels: Vec<String>,
    access: Access,
    /// The current master's connection and the generation it belongs to.
    current: RwLock<Option<(u64, Client)>>,
    generation: AtomicU64,
    watching: std::sync::Once,
    connect: Duration,
    /// When the last resolution failed.
    failed_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// After a failed resolution, calls fail at once for this long.
const RESOLVE_BACKOFF: Duration = Duration::from_millis(250);

impl SentinelState {
    /// The current master's client, asking the Sentinels if there is none.
    /// Bounded by the connect timeout, waiting included: calls that queue
    /// behind one resolution never wait for several, and for a short while
    /// after a failed resolution calls fail at once (UNAVAILABLE) instead of
    /// each asking the Sentinels again.
    async fn master(self: &Arc<Self>) -> RedisResult<(u64, Client)> {
        self.watch();
        if let Some(c) = self.current.read().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        match tokio::time::timeout(self.connect, self.resolve()).await {
            Ok(r) => r,
            Err(_) => {
                self.failed();
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the Sentinels did not name a master in time",
                )))
            }
        }
    }

    fn failed(&self) {
        if let Ok(mut at) = self.failed_at.lock() {
            *at = Some(std::time::Instant::now());
        }
    }

    async fn resolve(self: &Arc<Self>) -> RedisResult<(u64, Client)> {
        let mut sentinel = self.client.lock().await;
        if let Some(c) = self.current.read().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let recently_failed = self
            .failed_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < RESOLVE_BACKOFF);
        if recently_failed {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the Sentinels named no reachable master just now",
            )));
        }
        let client = match sentinel.async_get_client().await {
            Ok(c) => c,
            Err(e) => {
                self.failed();
                return Err(e);
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(
            master = %self.master,
            address = %client.get_connection_info().addr(),
            "sentinel: resolved the master"
        );
        if let Ok(mut slot) = self.current.write() {
            *slot = Some((generation, client.clone()));
        }
        Ok((generation, client))
    }

    async fn master_client(self: &Arc<Self>) -> RedisResult<Client> {
        self.master().await.map(|(_, c)| c)
    }

    /// Forgets the master of `generation` (if it is still the current one), so
    /// the next call asks the Sentinels again.
    fn forget(&self, generation: u64, why: &str) {
        if let Ok(mut slot) = self.current.write()
            && slot.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            tracing::warn!(master = %self.master, why, "sentinel: re-resolving the master");
            *slot = None;
        }
    }

    /// Subscribes to `+switch-master` on every Sentinel (once per store): a
    /// failover drops the old master at once, not at its next error.
    fn watch(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.watching.call_once(|| {
            for s in self.sentinels.clone() {
                tokio::spawn(switch_watcher(Arc::downgrade(self), s));
            }
        });
    }
}

/// Listens for `+switch-master` on one Sentinel while the store lives.
async fn switch_watcher(state: Weak<SentinelState>, sentinel: String) {
    use tokio_stream::StreamExt as _;
    loop {
        let Some(s) = state.upgrade() else { return };
        let url = {
            let mut a = s.access.clone();
            a.tls = s.access.sentinel_tls;
            node_url(&sentinel, &a)
        };
        let client = url.and_then(|u| {
            let mut info = u.as_str().into_connection_info()?;
            let mut r = info.redis_settings().clone();
            if let Some(u) = &s.access.sentinel_username {
                r = r.set_username(u);
            }
            if let Some(p) = &s.access.sentinel_password {
                r = r.set_password(p);
            }
            info = info.set_redis_settings(r);
            match s.access.certificates() {
                Some(c) if s.access.sentinel_tls => Client::build_with_tls(info, c),
                _ => Client::open(info),
            }
        });
        let connect = s.connect;
        drop(s);
        let subscribed = async {
            let client = client.ok()?;
            let mut pubsub = tokio::time::timeout(connect, client.get_async_pubsub())
                .await
                .ok()?
                .ok()?;
            pubsub.subscribe("+switch-master").await.ok()?;
            Some(pubsub)
        }
        .await;
        if let Some(mut pubsub) = subscribed {
            let mut messages = pubsub.on_message();
            loop {
                // Wake every second to notice a dropped store.
                match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
                    Ok(Some(msg)) => {
                        let Some(s) = state.upgrade() else { return };
                        let payload: String = msg.get_payload().unwrap_or_default();
                        if payload.split(' ').next() == Some(s.master.as_str()) {
                            let g = s.generation.load(Ordering::SeqCst);
                            s.forget(g, "+switch-master");
                        }
                    }
                    Ok(None) => break, // the Sentinel went away: resubscribe
                    Err(_) => {
                        if state.strong_count() == 0 {
                            return;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A link to the current Sentinel master: its own [`ConnectionManager`],
/// remade when the master changes.
#[derive(Clone)]
pub(super) struct SentinelLink {
    state: Arc<SentinelState>,
    timeouts: Timeouts,
    cached: Arc<std::sync::Mutex<Option<(u64, ConnectionManager)>>>,
}

impl SentinelLink {
    async fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
        let (generation, client) = self.state.master().await?;
        if let Ok(cached) = self.cached.lock()
            && let Some((g, m)) = cached.as_ref()
            && *g == generation
        {
            return Ok((generation, m.clone()));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.response))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let m = ConnectionManager::new_lazy_with_config(client, config)?;
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((generation, m.clone()));
        }
        Ok((generation, m))
    }

    fn judge(&self, generation: u64, e: &RedisError) {
        if let Some(why) = failover_sign(e) {
            self.state.forget(generation, why);
        }
    }
}

/// Why an error means the master may have moved, or `None`.
fn failover_sign(e: &RedisError) -> Option<&'static str> {
    if matches!(
        e.kind(),
        ::redis::ErrorKind::Server(::redis::ServerErrorKind::ReadOnly)
    ) {
        Some("the node is read-only (demoted)")
    } else if e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error() {
        Some("connection error")
    } else if e.is_timeout() {
        Some("timed out")
    } else {
        None
    }
}

/// A connection for one store topology; cheap to clone.
#[derive(Clone)]
pub(super) enum Link {
    Direct(ConnectionManager),
    Sentinel(SentinelLink),
    Cluster(ClusterLink),
}

/// The cluster connection, made at the first call (and retried after a failed one).
#[derive(Clone)]
pub(super) struct ClusterLink {
    client: Arc<ClusterClient>,
    conn: Arc<tokio::sync::OnceCell<ClusterConnection>>,
    connect: Duration,
}

impl ClusterLink {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| async {
                tokio::time::timeout(self.connect, self.client.get_async_connection())
                    .await
                    .map_err(|_| timed_out())?
            })
            .await
            .cloned()
    }
}

impl Link {
    /// Sends `cmd` to the master serving `key`'s slot in a cluster, or over
    /// this link elsewhere (`WAIT` must reach the node the write went to).
    pub async fn query_at<T: ::redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: Cmd,
    ) -> RedisResult<T> {
        match self {
            Self::Cluster(c) => {
                let mut conn = c.get().await?;
                let v = conn
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                            Route::with_key(key.as_bytes(), SlotAddr::Master),
                        )),
                    )
                    .await?;
                Ok(::redis::from_redis_value(v)?)
            }
            _ => cmd.query_async(self).await,
        }
    }

    /// Runs `cmd` on every master (a cluster's; the one node elsewhere), each
    /// answer with the node's address.
    pub async fn on_every_master(&mut self, cmd: Cmd) -> RedisResult<Vec<(String, Value)>> {
        match self {
            Self::Cluster(c) => {
                let mut conn = c.get().await?;
                let v = conn
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((
                            ::redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                            None,
                        )),
                    )
                    .await?;
                match v {
                    Value::Map(pairs) => Ok(pairs
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                ::redis::from_redis_value::<String>(k).unwrap_or_default(),
                                v,
                            )
                        })
                        .collect()),
                    other => Ok(vec![(String::new(), other)]),
                }
            }
            _ => {
                let v: Value = cmd.query_async(self).await?;
                Ok(vec![(String::new(), v)])
            }
        }
    }
}

impl Link {
    /// The masters' addresses (`host:port`) in a cluster, sorted; one empty
    /// name for the one node elsewhere.
    pub async fn masters(&mut self) -> RedisResult<Vec<String>> {
        let mut names: Vec<String> = self
            .on_every_master(::redis::cmd("PING"))
            .await?
            .into_iter()
            .map(|(addr, _)| addr)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Sends `cmd` to the node at `address` (a name from [`Self::masters`]).
    pub async fn query_node<T: ::redis::FromRedisValue>(
        &mut self,
        address: &str,
        cmd: Cmd,
    ) -> RedisResult<T> {
        match self {
            Self::Cluster(c) => {
                let ConnectionAddr::Tcp(host, port) = host_port(address)? else {
                    return Err(RedisError::from((
                        ::redis::ErrorKind::InvalidClientConfig,
                        "not host:port",
                    )));
                };
                let mut conn = c.get().await?;
                let v = conn
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                    )
                    .await?;
                Ok(::redis::from_redis_value(v)?)
            }
            _ => cmd.query_async(self).await,
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Direct(m) => m.req_packed_command(cmd),
            Self::Sentinel(s) => Box::pin(async move {
                let (generation, mut m) = s.manager().await?;
                let r = m.req_packed_command(cmd).await;
                if let Err(e) = &r {
                    s.judge(generation, e);
                }
                r
            }),
            Self::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Direct(m) => m.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(s) => Box::pin(async move {
                let (generation, mut m) = s.manager().await?;
                let r = m.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &r {
                    s.judge(generation, e);
                }
                r
            }),
            Self::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Direct(m) => m.get_db(),
            Self::Sentinel(_) | Self::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "a failed unwrap in a test is a failed test"
    )]
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        assert!(
            matches!(host_port("127.0.0.1:6379").unwrap(), ConnectionAddr::Tcp(h, 6379) if h == "127.0.0.1")
        );
        assert!(
            matches!(host_port("[::1]:7000").unwrap(), ConnectionAddr::Tcp(h, 7000) if h == "::1")
        );
        assert!(host_port("redis.example").is_err());
        assert!(host_port("redis.example:port").is_err());
        let tls = Access {
            tls: true,
            ..Access::default()
        };
        assert_eq!(node_url("::1:7000", &tls).unwrap(), "rediss://[::1]:7000");
        assert_eq!(
            node_url("10.0.0.5:7001", &Access::default()).unwrap(),
            "redis://10.0.0.5:7001"
        );
    }

    #[test]
    fn access_never_shows_its_passwords() {
        let a = Access {
            password: Some("hunter2".into()),
            sentinel_password: Some("s3cret".into()),
            ..Access::default()
        };
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
