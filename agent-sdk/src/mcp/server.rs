//! The MCP server side: an OAuth protected resource (RFC 9728) that accepts
//! Leash credentials, and TLS serving that hands the layer the caller's
//! client certificate.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{HeaderValue, Method, Request, Response, StatusCode, header, request::Parts},
    response::IntoResponse,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rmcp::ErrorData;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use tower::{Layer, Service, ServiceExt as _};

use super::McpError;
use crate::verifier::{Claims, VerifiedToken, Verifier, VerifyError};

/// The RFC 9728 well-known path of protected resource metadata.
pub const WELL_KNOWN_PATH: &str = "/.well-known/oauth-protected-resource";

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`serve_tls`] lets open connections finish after shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client is told to wait (`Retry-After`) when revocation state is
/// unknown (the verifier's revocation stream is down or resyncing).
pub const RETRY_AFTER_SECS: u32 = 5;

/// What this MCP server is, as an OAuth protected resource (RFC 9728): served
/// at the well-known metadata path and named in every `WWW-Authenticate`
/// challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedResource {
    /// The MCP endpoint's URL, e.g. `https://mcp.acme.test/mcp`: the audience of
    /// the Leash grant that gives access to it, and so the verifier's
    /// [`VerifierConfig::audience`](crate::verifier::VerifierConfig::audience).
    pub resource: String,
    /// The issuers whose tokens it accepts (the broker's issuer).
    pub authorization_servers: Vec<String>,
    /// The scopes its tools require.
    pub scopes_supported: Vec<String>,
    /// A human-readable name, if any.
    pub resource_name: Option<String>,
}

impl ProtectedResource {
    /// A resource at `resource` accepting tokens of `issuer`.
    pub fn new(resource: impl Into<String>, issuer: impl Into<String>) -> Self {
        Self {
            resource: resource.into(),
            authorization_servers: vec![issuer.into()],
            scopes_supported: Vec::new(),
            resource_name: None,
        }
    }

    /// Adds scopes to `scopes_supported`.
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes_supported
            .extend(scopes.into_iter().map(Into::into));
        self
    }

    /// Sets `resource_name`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.resource_name = Some(name.into());
        self
    }

    /// `(origin, path)` of the resource URL: `https://host:port` and `/mcp`
    /// (empty for a URL without path).
    fn split(&self) -> Result<(&str, &str), McpError> {
        let bad = |why: &str| McpError::Config(format!("resource {:?}: {why}", self.resource));
        let rest = self
            .resource
            .strip_prefix("https://")
            .ok_or_else(|| bad("must be an https:// URL"))?;
        if rest.contains(['?', '#']) {
            return Err(bad("must have no query or fragment"));
        }
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.is_empty() {
            return Err(bad("has no host"));
        }
        let origin_len = "https://".len() + authority.len();
        Ok((&self.resource[..origin_len], path.trim_end_matches('/')))
    }

    /// The path of the metadata document for this resource: the well-known
    /// path with the resource's path appended (RFC 9728 §3.1), e.g.
    /// `/.well-known/oauth-protected-resource/mcp`.
    ///
    /// # Errors
    /// [`McpError::Config`] when the resource is not an `https://` URL
    /// without query or fragment.
    pub fn metadata_path(&self) -> Result<String, McpError> {
        let (_, path) = self.split()?;
        Ok(format!("{WELL_KNOWN_PATH}{path}"))
    }

    /// The URL of the metadata document, as named in `resource_metadata`.
    ///
    /// # Errors
    /// As [`metadata_path`](Self::metadata_path).
    pub fn metadata_url(&self) -> Result<String, McpError> {
        let (origin, path) = self.split()?;
        Ok(format!("{origin}{WELL_KNOWN_PATH}{path}"))
    }

    /// The RFC 9728 metadata document.
    pub fn document(&self) -> Value {
        let mut doc = json!({
            "resource": self.resource,
            "authorization_servers": self.authorization_servers,
            "bearer_methods_supported": ["header"],
            "scopes_supported": self.scopes_supported,
            "tls_client_certificate_bound_access_tokens": true,
        });
        if let (Some(name), Some(map)) = (&self.resource_name, doc.as_object_mut()) {
            map.insert("resource_name".into(), json!(name));
        }
        doc
    }
}

/// The caller's TLS client certificate (the leaf, DER), put into every
/// request's extensions by [`serve_tls`] (or by your own TLS server) for
/// [`LeashAuthLayer`] to check the token's `cnf.x5t#S256` binding against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub Arc<[u8]>);

/// Makes the service it wraps (an axum `Router` nesting rmcp's
/// `StreamableHttpService`) an OAuth protected resource accepting Leash
/// credentials:
///
/// - `GET` of [`WELL_KNOWN_PATH`], and of the path-inserted form
///   ([`ProtectedResource::metadata_path`]), answers the RFC 9728 document
///   without authentication;
/// - every other request needs `Authorization: Bearer <Leash JWT>`, checked by
///   the [`Verifier`] (signature, `iss`, `aud` = the resource, expiry,
///   revocation, and the certificate binding against [`PeerCertificate`]);
///   the claims then travel in the request's extensions as [`VerifiedToken`],
///   which a tool reads from rmcp's `http::request::Parts`
///   ([`require_scope`], [`verified_claims`]);
/// - refusals: **401** with `WWW-Authenticate: Bearer resource_metadata=...`
///   (no token), or with `error="invalid_token"` (bad, expired, revoked,
///   wrong audience, other certificate); **403** `error="insufficient_scope"`
///   for a scope required by [`require_scope`](Self::require_scope); **503**
///   with `Retry-After` while revocation state is unknown. Bodies are JSON
///   `{"error", "error_description"}`.
///
/// The token is never logged. Leash tokens are bound to the agent's
/// certificate, so the server must run over TLS asking for client
/// certificates ([`serve_tls`]); without one, every bound token is refused.
#[derive(Debug, Clone)]
pub struct LeashAuthLayer {
    inner: Arc<LayerInner>,
}

#[derive(Debug)]
struct LayerInner {
    verifier: Verifier,
    document: Vec<u8>,
    metadata_path: String,
    /// `Bearer resource_metadata="..."`
    challenge: String,
    scope: Option<String>,
}

impl LeashAuthLayer {
    /// Verifies with `verifier`, whose audience must be `resource.resource`.
    ///
    /// # Errors
    /// [`McpError::Config`] when the resource URL is not `https://` without
    /// query or fragment.
    pub fn new(verifier: Verifier, resource: &ProtectedResource) -> Result<Self, McpError> {
        let url = resource.metadata_url()?;
        if url.contains(['"', '\\']) {
            return Err(McpError::Config(format!(
                "resource {:?}: quotes are not allowed",
                resource.resource
            )));
        }
        Ok(Self {
            inner: Arc::new(LayerInner {
                verifier,
                document: resource.document().to_string().into_bytes(),
                metadata_path: resource.metadata_path()?,
                challenge: format!("Bearer resource_metadata=\"{url}\""),
                scope: None,
            }),
        })
    }

    /// Also requires `scope` of every request (a 403 with
    /// `error="insufficient_scope"` otherwise); per-tool scopes are checked
    /// in the tool with [`require_scope`].
    #[must_use]
    pub fn require_scope(self, scope: impl Into<String>) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(LayerInner {
                verifier: inner.verifier.clone(),
                document: inner.document.clone(),
                metadata_path: inner.metadata_path.clone(),
                challenge: inner.challenge.clone(),
                scope: Some(scope.into()),
            }),
        }
    }
}

impl<S> Layer<S> for LeashAuthLayer {
    type Service = LeashAuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LeashAuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`LeashAuthLayer`].
#[derive(Debug, Clone)]
pub struct LeashAuthService<S> {
    inner: S,
    layer: LeashAuthLayer,
}

/// RFC 6750 `error_description` allows %x20-21 / %x23-5B / %x5D-7E only.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A refusal: status, JSON body, and the `WWW-Authenticate` challenge.
fn refusal(
    status: StatusCode,
    challenge: Option<String>,
    error: &str,
    description: &str,
) -> Response<Body> {
    let body = json!({"error": error, "error_description": description}).to_string();
    let mut response = json_response(status, body.into_bytes());
    if let Some(challenge) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

impl LayerInner {
    fn is_metadata(&self, path: &str) -> bool {
        path == WELL_KNOWN_PATH || path == self.metadata_path
    }

    /// The bearer token, `Ok(None)` for none, or a refusal.
    fn token<'r, B>(&self, req: &'r Request<B>) -> Result<Option<&'r str>, Box<Response<Body>>> {
        let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        let invalid = |why: &str| {
            Box::new(refusal(
                StatusCode::BAD_REQUEST,
                Some(format!(
                    "Bearer error=\"invalid_request\", error_description=\"{why}\", {}",
                    self.challenge.trim_start_matches("Bearer ")
                )),
                "invalid_request",
                why,
            ))
        };
        if values.next().is_some() {
            return Err(invalid("more than one Authorization header"));
        }
        let value = value
            .to_str()
            .map_err(|_| invalid("Authorization header is not ASCII"))?;
        match value.split_once(' ') {
            // The auth scheme is case-insensitive (RFC 9110 §11.1).
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                let token = token.trim();
                if token.is_empty() {
                    Err(invalid("empty bearer token"))
                } else {
                    Ok(Some(token))
                }
            }
            // Another scheme: answered like no credential, with the challenge.
            _ => Ok(None),
        }
    }

    fn challenge_with(&self, params: &str) -> String {
        format!(
            "Bearer {params}, {}",
            self.challenge.trim_start_matches("Bearer ")
        )
    }

    /// The claims, or the refusal to send.
    fn authorize<B>(&self, req: &Request<B>) -> Result<Claims, Box<Response<Body>>> {
        let Some(token) = self.token(req)? else {
            return Err(Box::new(refusal(
                StatusCode::UNAUTHORIZED,
                Some(self.challenge.clone()),
                "invalid_request",
                "a Leash credential is required: Authorization: Bearer <token>",
            )));
        };
        let cert = req.extensions().get::<PeerCertificate>();
        let verdict =
            self.verifier
                .verify(token, self.scope.as_deref(), cert.map(|c| c.0.as_ref()));
        verdict.map_err(|e| {
            tracing::info!(path = %req.uri().path(), reason = %e, "MCP request refused");
            Box::new(self.refusal_for(&e))
        })
    }

    fn refusal_for(&self, e: &VerifyError) -> Response<Body> {
        match e {
            VerifyError::MissingScope(scope) => {
                let scope = header_safe(scope);
                let description = format!("scope {scope} is required");
                refusal(
                    StatusCode::FORBIDDEN,
                    Some(self.challenge_with(&format!(
                        "error=\"insufficient_scope\", scope=\"{scope}\", \
                         error_description=\"{description}\""
                    ))),
                    "insufficient_scope",
                    &description,
                )
            }
            VerifyError::RevocationsUnknown => {
                let mut response = refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    "temporarily_unavailable",
                    &e.to_string(),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                response
            }
            _ => {
                let description = header_safe(&e.to_string());
                refusal(
                    StatusCode::UNAUTHORIZED,
                    Some(self.challenge_with(&format!(
                        "error=\"invalid_token\", error_description=\"{description}\""
                    ))),
                    "invalid_token",
                    &description,
                )
            }
        }
    }
}

impl<S, B> Service<Request<B>> for LeashAuthService<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let layer = &self.layer.inner;
        if layer.is_metadata(req.uri().path())
            && (req.method() == Method::GET || req.method() == Method::HEAD)
        {
            let response = json_response(StatusCode::OK, layer.document.clone());
            return Box::pin(async move { Ok(response) });
        }
        match layer.authorize(&req) {
            Ok(claims) => {
                req.extensions_mut().insert(VerifiedToken(Arc::new(claims)));
                // The clone that was polled ready must serve this request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { Ok(inner.call(req).await?.into_response()) })
            }
            Err(response) => Box::pin(async move { Ok(*response) }),
        }
    }
}

/// The verified claims of the request a tool is serving: from rmcp's
/// `Extension(parts): Extension<http::request::Parts>`.
pub fn verified_claims(parts: &Parts) -> Option<&Claims> {
    parts
        .extensions
        .get::<VerifiedToken>()
        .map(|t| t.0.as_ref())
}

/// The verified claims, if they grant `scope`; for a tool that needs it:
///
/// ```no_run
/// # use rmcp::{ErrorData, handler::server::tool::Extension};
/// async fn add_item(
///     Extension(parts): Extension<axum::http::request::Parts>,
/// ) -> Result<String, ErrorData> {
///     let claims = leash_sdk::mcp::require_scope(&parts, "tools:write")?;
///     Ok(format!("added for task {}", claims.task_id()))
/// }
/// ```
///
/// # Errors
/// An MCP `invalid_request` error (-32600) saying which scope is missing, with
/// `data` `{"error": "insufficient_scope", "scope": ...}`; or an
/// `internal_error` when the request did not pass [`LeashAuthLayer`] (a
/// server wiring mistake).
pub fn require_scope<'p>(parts: &'p Parts, scope: &str) -> Result<&'p Claims, ErrorData> {
    let claims = verified_claims(parts).ok_or_else(|| {
        tracing::error!("an MCP tool ran without LeashAuthLayer in front of it");
        ErrorData::internal_error("the request carries no verified credential", None)
    })?;
    if claims.has_scope(scope) {
        Ok(claims)
    } else {
        Err(ErrorData::invalid_request(
            format!(
                "insufficient_scope: this tool requires scope {scope:?}, which the credential does not grant"
            ),
            Some(json!({
                "error": "insufficient_scope",
                "scope": scope,
                "granted": claims.scopes(),
            })),
        ))
    }
}

/// A rustls server configuration for an MCP server: `chain`/`key` as its
/// certificate, client certificates **requested but optional** and, when
/// presented, verified against `client_roots` (the SPIFFE bundle of the
/// agents), ALPN `h2` and `http/1.1`, the ring provider.
///
/// # Errors
/// [`McpError::Config`] for an unusable root or key.
pub fn server_tls_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, McpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in client_roots {
        roots
            .add(cert)
            .map_err(|e| McpError::Config(format!("unusable client trust anchor: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| McpError::Config(format!("client trust bundle: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| McpError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| McpError::Config(format!("server key unusable with its certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then lets
/// open connections finish for at most [`DRAIN_TIMEOUT`]. Each connection's
/// client certificate (leaf, if any) is put into its requests' extensions as
/// [`PeerCertificate`]; HTTP/1.1 and HTTP/2 by ALPN. Handshakes run
/// concurrently, each for at most [`HANDSHAKE_TIMEOUT`]. Failed accepts,
/// handshakes and connections are logged and never end the server (a failed
/// accept, e.g. out of file descriptors, pauses accepting for 100 ms).
pub async fn serve_tls<F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: F,
) where
    F: Future<Output = ()> + Send,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        connections.spawn(serve_connection(
            acceptor.clone(),
            tcp,
            peer,
            router.clone(),
            stop_rx.clone(),
        ));
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.shutdown().await;
    }
}

async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(|c| PeerCertificate(Arc::from(c.as_ref())));
    let service = router.map_request(move |mut req: Request<hyper::body::Incoming>| {
        if let Some(cert) = &cert {
            req.extensions_mut().insert(cert.clone());
        }
        req
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = stop.wait_for(|stop| *stop).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A [`Verifier`] fed by the broker at `broker` (`https://host:port`, the
/// agent port), connected as the resource server's SVID from `svid` (whose
/// identity the broker's `[verifier] callers` must allow for `config`'s
/// audience). It returns once the JWK Set is fetched and the first revocation
/// snapshot is whole (see [`Verifier::connect`]).
///
/// # Errors
/// [`McpError::Config`] for a bad address or unusable SVID;
/// [`McpError::Broker`] when the broker cannot be reached or refuses.
pub async fn connect_verifier(
    broker: &str,
    svid: Arc<dyn crate::SvidSource>,
    config: crate::verifier::VerifierConfig,
) -> Result<Verifier, McpError> {
    use tonic::transport::{Endpoint, Uri};
    let bad = |why: &str| McpError::Config(format!("broker address {broker:?}: {why}"));
    let rest = broker
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
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|_| bad("host is not a DNS name or IP"))?;
    svid.tls_config()
        .map_err(|e| McpError::Config(e.to_string()))?;
    let connector = tower::service_fn(move |_: Uri| {
        let svid = Arc::clone(&svid);
        let host = host.clone();
        let server_name = server_name.clone();
        async move {
            let config = svid.tls_config().map_err(std::io::Error::other)?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| McpError::Broker(format!("cannot connect to {broker}: {e}")))?;
    Verifier::connect(channel, config)
        .await
        .map_err(|e| McpError::Broker(e.to_string()))
}
