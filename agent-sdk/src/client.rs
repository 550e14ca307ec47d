//! The connection to a broker: builder, mTLS connector, raw calls with retries.

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use leash_proto::v1::{self as pb, broker_client::BrokerClient};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    Delegation, Error, RetryPolicy, SvidFiles, SvidSource, WorkloadApiSource,
    task::{Task, TaskRequest},
    trace::{self, TraceParent},
};

/// Default time allowed to open a connection (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for one call, from sending to the whole answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`Client`]; see [`Client::builder`].
#[derive(Debug, Default)]
pub struct ClientBuilder {
    broker: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    bundle: Option<PathBuf>,
    source: Option<Arc<dyn SvidSource>>,
    connect_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    // Some(endpoint) when the Workload API is the source; Some(None): from the env.
    workload_api: Option<Option<String>>,
    traceparent: Option<String>,
}

impl ClientBuilder {
    /// The broker's agent address, `https://host:port`. Required. The broker's
    /// certificate must carry `host` as a DNS or IP SAN.
    pub fn broker(mut self, url: impl Into<String>) -> Self {
        self.broker = Some(url.into());
        self
    }

    /// The agent's X.509-SVID chain and private key, as PEM files. Both are
    /// re-read at every new connection, so files rewritten by a rotating agent
    /// sidecar are picked up.
    pub fn svid_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// The trust bundle (PEM) the broker's certificate must chain to.
    pub fn bundle_file(mut self, bundle: impl Into<PathBuf>) -> Self {
        self.bundle = Some(bundle.into());
        self
    }

    /// Takes the SVID and bundle from `source` instead of files (for example a
    /// SPIFFE Workload API source). Overrides [`svid_files`](Self::svid_files)
    /// and [`bundle_file`](Self::bundle_file).
    pub fn svid_source(mut self, source: Arc<dyn SvidSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// Time allowed to open a connection. Default 5 s.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }

    /// Time allowed for one call. Default 10 s. A call that times out fails with
    /// [`Error::Transport`] and is not retried (its outcome is unknown).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }

    /// The W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`) sent with
    /// every call, so the broker's spans join the agent's trace; a task's
    /// renewals and completion carry it too. Without it the `TRACEPARENT`
    /// environment variable is used when it holds a valid one (an invalid one
    /// is ignored). [`TaskRequest::traceparent`] overrides it for one task.
    /// Checked at [`connect`](Self::connect).
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// How `UNAVAILABLE` answers are retried. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Checks the configuration, loads the SVID and bundle once, and opens a
    /// connection to the broker (retrying per the retry policy). Later
    /// disconnections are repaired by the client on the next call.
    ///
    /// # Errors
    /// [`Error::Config`] for a missing or malformed address or unusable SVID,
    /// key or bundle, or a malformed [`traceparent`](Self::traceparent);
    /// [`Error::Unavailable`] when no connection could be opened.
    pub async fn connect(self) -> Result<Client, Error> {
        let trace = match &self.traceparent {
            Some(t) => Some(TraceParent::parse(t)?),
            None => TraceParent::from_env(),
        };
        let address = self
            .broker
            .ok_or_else(|| Error::Config("no broker address (ClientBuilder::broker)".into()))?;
        let connect_timeout = self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let source = match (self.source, self.workload_api) {
            (Some(s), _) => Some(s),
            (None, Some(endpoint)) => Some(Arc::new(
                WorkloadApiSource::connect(endpoint.as_deref(), connect_timeout).await?,
            ) as Arc<dyn SvidSource>),
            (None, None) => None,
        };
        let source: Arc<dyn SvidSource> = match (source, self.cert, self.key, self.bundle) {
            (Some(s), ..) => s,
            (None, Some(cert), Some(key), Some(bundle)) => {
                Arc::new(SvidFiles { cert, key, bundle })
            }
            (None, None, ..) => {
                return Err(Error::Config(
                    "no SVID (ClientBuilder::svid_files, workload_api or svid_source)".into(),
                ));
            }
            (None, Some(_), Some(_), None) | (None, Some(_), None, _) => {
                return Err(Error::Config(
                    "no trust bundle (ClientBuilder::bundle_file)".into(),
                ));
            }
        };
        // Fail now, with the file's name, rather than at the first handshake.
        source.tls_config()?;
        let target = Target::parse(&address)?;
        let request_timeout = self.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let retry = self.retry.unwrap_or_default();
        let endpoint = Endpoint::from(target.uri.clone())
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .tcp_nodelay(true);
        let channel = retry
            .run("connect", || {
                let endpoint = endpoint.clone();
                let connector = connector(Arc::clone(&source), target.clone());
                let address = address.clone();
                async move {
                    endpoint
                        .connect_with_connector(connector)
                        .await
                        .map_err(|e| {
                            Error::Unavailable(format!(
                                "cannot connect to {address}: {}",
                                chain(&e)
                            ))
                        })
                }
            })
            .await?;
        let generation = source.generation();
        Ok(Client {
            inner: Arc::new(Inner {
                connection: RwLock::new((generation, BrokerClient::new(channel))),
                source,
                endpoint,
                target,
                retry,
                request_timeout,
                trace,
            }),
        })
    }

    /// Takes the SVID and trust bundles from the SPIFFE Workload API at
    /// `SPIFFE_ENDPOINT_SOCKET` (see [`WorkloadApiSource`]), following rotation:
    /// after the Workload API pushes a new SVID, the next calls go over a new
    /// connection made with it, while calls in flight finish on the old one.
    /// Overrides [`svid_files`](Self::svid_files) and [`bundle_file`](Self::bundle_file).
    pub fn workload_api(mut self) -> Self {
        self.workload_api = Some(None);
        self
    }

    /// Like [`workload_api`](Self::workload_api), at an explicit endpoint
    /// (`unix:///run/spire/agent.sock`).
    pub fn workload_api_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.workload_api = Some(Some(endpoint.into()));
        self
    }
}

/// Where to connect: the URI tonic sees, the TCP address and the TLS server name.
#[derive(Debug, Clone)]
struct Target {
    uri: Uri,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Target {
    fn parse(address: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("broker address {address:?}: {why}"));
        let rest = address
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://"))?;
        // tonic speaks plain HTTP/2 to the connector, which adds TLS itself.
        let uri: Uri = format!("http://{rest}")
            .parse()
            .map_err(|_| bad("not a URL"))?;
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| bad("host is not a DNS name or IP"))?;
        Ok(Self {
            uri,
            host,
            port,
            server_name,
        })
    }
}

/// A tonic connector doing TCP then TLS with the source's current config.
fn connector(
    source: Arc<dyn SvidSource>,
    target: Target,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(move |_: Uri| {
        let source = Arc::clone(&source);
        let target = target.clone();
        async move {
            let config = source.tls_config().map_err(std::io::Error::other)?;
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config)
                .connect(target.server_name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        }
    })
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[derive(Debug)]
struct Inner {
    // The source generation the connection was opened with, and the connection.
    connection: RwLock<(u64, BrokerClient<Channel>)>,
    source: Arc<dyn SvidSource>,
    endpoint: Endpoint,
    target: Target,
    retry: RetryPolicy,
    request_timeout: Duration,
    // The trace context every call of this client carries by default.
    trace: Option<TraceParent>,
}

impl Inner {
    /// The connection for the next call: the current one, or a new one (opened
    /// lazily, with the new SVID) when the source's SVID or bundle changed.
    fn broker(&self) -> BrokerClient<Channel> {
        let generation = self.source.generation();
        {
            let current = self
                .connection
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if current.0 == generation {
                return current.1.clone();
            }
        }
        let mut current = self
            .connection
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.0 != generation {
            let channel = self.endpoint.connect_with_connector_lazy(connector(
                Arc::clone(&self.source),
                self.target.clone(),
            ));
            *current = (generation, BrokerClient::new(channel));
            tracing::debug!(generation, "SVID rotated; new calls use a new connection");
        }
        current.1.clone()
    }
}

/// A connection to a Leash broker, authenticated by the agent's SVID. Cheap to
/// clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Starts configuring a client:
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), leash_sdk::Error> {
    /// let client = leash_sdk::Client::builder()
    ///     .broker("https://localhost:8443")
    ///     .svid_files(".leash-dev/agent.pem", ".leash-dev/agent-key.pem")
    ///     .bundle_file(".leash-dev/bundle.pem")
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Declares a task and returns its guard, which renews the lease in the
    /// background until the task is completed or the guard dropped.
    ///
    /// `UNAVAILABLE` is retried per the retry policy with the same idempotency
    /// key (one is generated when the request has none), so a retry never
    /// creates a second task.
    ///
    /// # Errors
    /// [`Error::NotFound`] (unknown template), [`Error::Denied`] (this SVID may not
    /// declare it), [`Error::Invalid`] (a parameter, the intent or the TTL is
    /// wrong; the message names the field), [`Error::Precondition`] (idempotency
    /// key reused for another request), [`Error::Unavailable`] after the retries,
    /// [`Error::Transport`].
    pub async fn begin_task(&self, request: TaskRequest) -> Result<Task, Error> {
        let trace = request.trace_parent().or(self.inner.trace);
        let request = request.into_proto();
        let response = self
            .inner
            .retry
            .run("BeginTask", || {
                let mut broker = self.inner.broker();
                let request = trace::request(request.clone(), trace.as_ref());
                async move { Ok(broker.begin_task(request).await?.into_inner()) }
            })
            .await?;
        Task::from_response(self.clone(), std::time::Instant::now(), response, trace)
    }

    /// Redeems a delegation made for this client's identity (the subagent named
    /// in [`Task::delegate`]) and returns the child task's guard, exactly as
    /// [`begin_task`](Self::begin_task) does: it renews in the background and
    /// completes the child when finished or dropped. The child's credentials
    /// carry the delegation chain; the child dies with its parent.
    ///
    /// The handle works once. `UNAVAILABLE` is retried per the retry policy;
    /// should a lost answer have redeemed it already, the retry is refused
    /// (and the child expires unrenewed at its lease deadline).
    ///
    /// ```no_run
    /// # async fn f(client: leash_sdk::Client) -> Result<(), leash_sdk::Error> {
    /// let token = std::env::var("LEASH_DELEGATION").unwrap_or_default();
    /// let delegation = leash_sdk::Delegation::from_token(&token)?;
    /// let task = client.redeem_delegation(&delegation).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Denied`] (this SVID is not the named subagent, a wrong or used
    /// handle), [`Error::NotFound`] (unknown child task),
    /// [`Error::Precondition`] (the child or its parent ended),
    /// [`Error::Unavailable`] after the retries, [`Error::Transport`].
    pub async fn redeem_delegation(&self, delegation: &Delegation) -> Result<Task, Error> {
        let request = delegation.redeem_request();
        let response = self
            .inner
            .retry
            .run("RedeemDelegation", || {
                let mut broker = self.inner.broker();
                let request = trace::request(request.clone(), self.inner.trace.as_ref());
                async move { Ok(broker.redeem_delegation(request).await?.into_inner()) }
            })
            .await?;
        Task::from_response(
            self.clone(),
            std::time::Instant::now(),
            response,
            self.inner.trace,
        )
    }

    /// DelegateTask, retried on `UNAVAILABLE`.
    pub(crate) async fn delegate(
        &self,
        request: pb::DelegateTaskRequest,
        trace: Option<&TraceParent>,
    ) -> Result<pb::DelegateTaskResponse, Error> {
        self.inner
            .retry
            .run("DelegateTask", || {
                let mut broker = self.inner.broker();
                let request = trace::request(request.clone(), trace);
                async move { Ok(broker.delegate_task(request).await?.into_inner()) }
            })
            .await
    }

    /// Opens one WatchTask stream, without retries (the caller reopens it).
    pub(crate) async fn watch_task(
        &self,
        task_id: &str,
        trace: Option<&TraceParent>,
    ) -> Result<tonic::Streaming<pb::TaskEvent>, Error> {
        let mut broker = self.inner.broker();
        let request = trace::request(
            pb::WatchTaskRequest {
                task_id: task_id.to_owned(),
            },
            trace,
        );
        Ok(broker.watch_task(request).await?.into_inner())
    }

    /// One RenewLease call, without retries (the renewer has its own loop).
    pub(crate) async fn renew_once(
        &self,
        task_id: &str,
        trace: Option<&TraceParent>,
    ) -> Result<pb::RenewLeaseResponse, Error> {
        let mut broker = self.inner.broker();
        let request = trace::request(
            pb::RenewLeaseRequest {
                task_id: task_id.to_owned(),
            },
            trace,
        );
        Ok(broker.renew_lease(request).await?.into_inner())
    }

    /// CompleteTask, retried on `UNAVAILABLE` (it is idempotent).
    pub(crate) async fn complete(
        &self,
        request: pb::CompleteTaskRequest,
        trace: Option<&TraceParent>,
    ) -> Result<pb::CompleteTaskResponse, Error> {
        self.inner
            .retry
            .run("CompleteTask", || {
                let mut broker = self.inner.broker();
                let request = trace::request(request.clone(), trace);
                async move { Ok(broker.complete_task(request).await?.into_inner()) }
            })
            .await
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry
    }

    /// The trace context this client's calls carry by default (from
    /// [`ClientBuilder::traceparent`] or `TRACEPARENT`), if any.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.inner.trace
    }

    /// The per-call timeout in force.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// The generated gRPC client on this connection, for calls the SDK does not
    /// wrap. Calls made through it get no retries and no lease management.
    pub fn broker_client(&self) -> BrokerClient<Channel> {
        self.inner.broker()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(Target::parse("https://localhost:8443").is_ok());
        assert!(Target::parse("https://127.0.0.1:8443").is_ok());
        assert!(Target::parse("https://[::1]:8443").is_ok());
        for bad in [
            "http://localhost:8443",
            "https://localhost",
            "localhost:1",
            "https://",
        ] {
            assert!(
                matches!(Target::parse(bad), Err(Error::Config(_))),
                "{bad} accepted"
            );
        }
    }

    #[tokio::test]
    async fn missing_configuration_is_reported() {
        let e = Client::builder().connect().await.unwrap_err();
        assert!(
            matches!(e, Error::Config(ref m) if m.contains("broker")),
            "{e}"
        );
        let e = Client::builder()
            .broker("https://localhost:1")
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Config(ref m) if m.contains("SVID")),
            "{e}"
        );
        let e = Client::builder()
            .broker("https://localhost:1")
            .svid_files("/nonexistent/a.pem", "/nonexistent/k.pem")
            .bundle_file("/nonexistent/b.pem")
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Config(ref m) if m.contains("/nonexistent/b.pem")),
            "{e}"
        );
    }
}
