//! The MCP client side: rmcp's streamable HTTP transport over mutual TLS with
//! the agent's SVID, presenting a Leash credential that is looked up afresh
//! for every request.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime},
};

use axum::http::{HeaderName, HeaderValue};
use futures_util::stream::BoxStream;
use rmcp::{
    model::ClientJsonRpcMessage,
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::{
            SseError, StreamableHttpClient, StreamableHttpClientTransportConfig,
            StreamableHttpError, StreamableHttpPostResponse, StreamableHttpResponseLimits,
        },
    },
};
use serde_json::Value;
use tokio::sync::watch;

use super::McpError;
use crate::{CredentialKind, Credentials, SvidSource, Task};

/// The RFC 8693 grant type of a token exchange.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The RFC 8693 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The largest token endpoint answer read.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// Time allowed to open a connection to an MCP server or token endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An access token to present; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    value: Arc<str>,
    expires_at: Option<SystemTime>,
}

impl AccessToken {
    /// A token, with its expiry when known.
    pub fn new(value: impl Into<Arc<str>>, expires_at: Option<SystemTime>) -> Self {
        Self {
            value: value.into(),
            expires_at,
        }
    }

    /// The value for `Authorization: Bearer`. Never log it.
    pub fn secret(&self) -> &str {
        &self.value
    }

    /// When it expires, if known.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"...")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The future a [`TokenSource`] returns.
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<AccessToken, McpError>> + Send + 'a>>;

/// Where the bearer token of each MCP request comes from. It is asked before
/// every request, so it must be cheap when nothing changed.
///
/// The SDK ships [`TaskCredential`] (the task's own credential for the MCP
/// server's audience, following renewals) and [`TokenExchange`] (a token for
/// the MCP server obtained from the broker's RFC 8693 token endpoint).
pub trait TokenSource: fmt::Debug + Send + Sync + 'static {
    /// The token to present now.
    ///
    /// # Errors
    /// When no usable token can be had; the request then fails without being
    /// sent.
    fn token(&self) -> TokenFuture<'_>;
}

/// The current credential of one grant of a [`Task`]: every call reads the
/// task's latest credentials, so renewals are picked up by the next request.
pub struct TaskCredential {
    credentials: watch::Receiver<Credentials>,
    grant: String,
}

impl fmt::Debug for TaskCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskCredential")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl TaskCredential {
    /// The credential of the one grant of `task` whose audience is `audience`
    /// (the MCP server's resource URL, e.g. `https://mcp.acme.test/mcp`).
    ///
    /// # Errors
    /// [`McpError::NoGrantForAudience`] when no JWT grant of the task has that
    /// audience, [`McpError::Config`] when more than one has.
    pub fn for_audience(task: &Task, audience: &str) -> Result<Self, McpError> {
        let credentials = task.watch();
        let matching: Vec<String> = credentials
            .borrow()
            .iter()
            .filter(|c| c.audience() == audience && c.kind() == CredentialKind::Jwt)
            .map(|c| c.grant().to_owned())
            .collect();
        match matching.as_slice() {
            [grant] => Ok(Self {
                credentials,
                grant: grant.clone(),
            }),
            [] => Err(McpError::NoGrantForAudience(audience.to_owned())),
            _ => Err(McpError::Config(format!(
                "more than one grant of the task has audience {audience:?}: {matching:?}; \
                 use TaskCredential::for_grant"
            ))),
        }
    }

    /// The credential of grant `grant` of `task`.
    ///
    /// # Errors
    /// [`McpError::Config`] when the task has no such grant.
    pub fn for_grant(task: &Task, grant: &str) -> Result<Self, McpError> {
        if task.credential(grant).is_none() {
            return Err(McpError::Config(format!("the task has no grant {grant:?}")));
        }
        Ok(Self {
            credentials: task.watch(),
            grant: grant.to_owned(),
        })
    }

    /// The grant whose credential this presents.
    pub fn grant(&self) -> &str {
        &self.grant
    }

    fn current(&self) -> Result<AccessToken, McpError> {
        let credentials = self.credentials.borrow();
        let credential = credentials
            .get(&self.grant)
            .ok_or_else(|| McpError::CredentialUnavailable(self.grant.clone()))?;
        if credential.expires_at() <= SystemTime::now() {
            return Err(McpError::CredentialUnavailable(self.grant.clone()));
        }
        Ok(AccessToken::new(
            credential.secret(),
            Some(credential.expires_at()),
        ))
    }
}

impl TokenSource for TaskCredential {
    fn token(&self) -> TokenFuture<'_> {
        let token = self.current();
        Box::pin(async move { token })
    }
}

/// A token for the MCP server from the broker's RFC 8693 token endpoint,
/// exchanged for a live credential of the task (`subject`), over mutual TLS
/// with the agent's SVID. The token is cached, and exchanged again at half its
/// lifetime or as soon as the subject credential changes (a renewal).
pub struct TokenExchange {
    http: reqwest::Client,
    endpoint: String,
    subject: Arc<dyn TokenSource>,
    resource: String,
    scope: Option<String>,
    cached: tokio::sync::Mutex<Option<Exchanged>>,
}

struct Exchanged {
    subject: AccessToken,
    token: AccessToken,
    refresh_at: Instant,
}

impl fmt::Debug for TokenExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenExchange")
            .field("endpoint", &self.endpoint)
            .field("subject", &self.subject)
            .field("resource", &self.resource)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A token endpoint's answer (RFC 8693 §2.2.1).
#[derive(serde::Deserialize)]
struct ExchangeAnswer {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
}

impl TokenExchange {
    /// Exchanges `subject`'s token at `endpoint` (`https://.../token`) for a
    /// token for `resource`, using `http` ([`http_client`] with the agent's
    /// SVID: the endpoint authenticates the agent by its certificate).
    pub fn new(
        http: reqwest::Client,
        endpoint: impl Into<String>,
        subject: Arc<dyn TokenSource>,
        resource: impl Into<String>,
    ) -> Self {
        Self {
            http,
            endpoint: endpoint.into(),
            subject,
            resource: resource.into(),
            scope: None,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// Asks for these scopes only (space-separated), instead of all the
    /// subject's scopes that apply to the resource.
    #[must_use]
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    async fn exchange(&self, subject: &AccessToken) -> Result<(AccessToken, Instant), McpError> {
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("subject_token", subject.secret()),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("resource", self.resource.as_str()),
        ];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope));
        }
        let started = Instant::now();
        let mut response = self
            .http
            .post(&self.endpoint)
            .header("accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| McpError::TokenEndpoint(format!("{}: {}", self.endpoint, chain(&e))))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| McpError::TokenEndpoint(format!("reading the answer: {}", chain(&e))))?
        {
            if body.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
                return Err(McpError::TokenEndpoint(format!(
                    "answer larger than {MAX_TOKEN_RESPONSE_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let text = |k: &str| answer.get(k).and_then(Value::as_str).unwrap_or_default();
            return Err(McpError::ExchangeRefused {
                status: status.as_u16(),
                error: text("error").to_owned(),
                description: text("error_description").to_owned(),
            });
        }
        let answer: ExchangeAnswer = serde_json::from_slice(&body)
            .map_err(|e| McpError::TokenEndpoint(format!("malformed answer: {e}")))?;
        if !answer.token_type.eq_ignore_ascii_case("bearer") {
            return Err(McpError::TokenEndpoint(format!(
                "token_type {:?}, not Bearer",
                answer.token_type
            )));
        }
        // Without expires_in: the subject's expiry bounds it.
        let lifetime = answer.expires_in.map(Duration::from_secs).or_else(|| {
            subject
                .expires_at()
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
        });
        let lifetime = lifetime.unwrap_or(Duration::ZERO);
        let token = AccessToken::new(answer.access_token, Some(SystemTime::now() + lifetime));
        Ok((token, started + lifetime / 2))
    }
}

impl TokenSource for TokenExchange {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let subject = self.subject.token().await?;
            // One exchange at a time: concurrent requests wait for its answer.
            let mut cached = self.cached.lock().await;
            if let Some(c) = cached.as_ref()
                && c.subject == subject
                && Instant::now() < c.refresh_at
            {
                return Ok(c.token.clone());
            }
            let (token, refresh_at) = self.exchange(&subject).await?;
            *cached = Some(Exchanged {
                subject,
                token: token.clone(),
                refresh_at,
            });
            Ok(token)
        })
    }
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

/// A `reqwest` client presenting the SVID of `svid` as its client certificate
/// and trusting its bundle for the server's (DNS or IP SAN of the URL's
/// host); TLS 1.3/1.2 with ring, ALPN `http/1.1`, no redirects (a bearer
/// token is never replayed elsewhere), [`CONNECT_TIMEOUT`].
///
/// # Errors
/// [`McpError::Config`] when the SVID or bundle cannot be used.
pub fn http_client(svid: &dyn SvidSource) -> Result<reqwest::Client, McpError> {
    let mut tls = (*svid
        .tls_config()
        .map_err(|e| McpError::Config(e.to_string()))?)
    .clone();
    // This reqwest speaks HTTP/1.1 only.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|e| McpError::Config(format!("HTTP client: {}", chain(&e))))
}

/// rmcp's streamable HTTP client over mutual TLS with the agent's SVID,
/// presenting the [`TokenSource`]'s token as `Authorization: Bearer` on every
/// request (whatever `auth_header` rmcp passes is ignored). When the SVID
/// source's generation changes (rotation), the next request uses a new
/// connection pool made with the new SVID.
///
/// A token that cannot be had fails the request as
/// [`StreamableHttpError::Io`] carrying the [`McpError`].
#[derive(Clone)]
pub struct LeashHttpClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    svid: Arc<dyn SvidSource>,
    http: RwLock<(u64, reqwest::Client)>,
    token: Arc<dyn TokenSource>,
}

impl fmt::Debug for LeashHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeashHttpClient")
            .field("svid", &self.inner.svid)
            .field("token", &self.inner.token)
            .finish_non_exhaustive()
    }
}

impl LeashHttpClient {
    /// A client presenting `svid` and `token`.
    ///
    /// # Errors
    /// [`McpError::Config`] when the SVID or bundle cannot be used.
    pub fn new(svid: Arc<dyn SvidSource>, token: Arc<dyn TokenSource>) -> Result<Self, McpError> {
        let generation = svid.generation();
        let http = http_client(svid.as_ref())?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                svid,
                http: RwLock::new((generation, http)),
                token,
            }),
        })
    }

    /// The transport for the MCP endpoint at `url`, to hand to rmcp
    /// (`ClientInfo::default().serve(transport)`).
    pub fn transport(self, url: impl Into<Arc<str>>) -> StreamableHttpClientTransport<Self> {
        StreamableHttpClientTransport::with_client(
            self,
            StreamableHttpClientTransportConfig::with_uri(url),
        )
    }

    /// The HTTP client for the current SVID.
    fn http(&self) -> Result<reqwest::Client, McpError> {
        let generation = self.inner.svid.generation();
        {
            let current = self
                .inner
                .http
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if current.0 == generation {
                return Ok(current.1.clone());
            }
        }
        let fresh = http_client(self.inner.svid.as_ref())?;
        *self
            .inner
            .http
            .write()
            .unwrap_or_else(PoisonError::into_inner) = (generation, fresh.clone());
        Ok(fresh)
    }

    /// The HTTP client and the token for one request.
    async fn prepare(
        &self,
    ) -> Result<(reqwest::Client, Option<String>), StreamableHttpError<reqwest::Error>> {
        let io = |e: McpError| StreamableHttpError::Io(std::io::Error::other(e));
        let http = self.http().map_err(io)?;
        let token = self.inner.token.token().await.map_err(io)?;
        Ok((http, Some(token.secret().to_owned())))
    }
}

/// The task's credential for the MCP server at `url` (its grant whose
/// audience is `url`), over mutual TLS with `svid`: the transport to hand to
/// rmcp. The same as [`TaskCredential::for_audience`] with
/// [`LeashHttpClient::transport`].
///
/// # Errors
/// As [`TaskCredential::for_audience`] and [`LeashHttpClient::new`].
pub fn task_transport(
    task: &Task,
    svid: Arc<dyn SvidSource>,
    url: &str,
) -> Result<StreamableHttpClientTransport<LeashHttpClient>, McpError> {
    let token = Arc::new(TaskCredential::for_audience(task, url)?);
    Ok(LeashHttpClient::new(svid, token)?.transport(url.to_owned()))
}

type SseStream = BoxStream<'static, Result<sse_stream::Sse, SseError>>;

impl StreamableHttpClient for LeashHttpClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        let (http, token) = self.prepare().await?;
        http.post_message(uri, message, session_id, token, custom_headers)
            .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        let (http, token) = self.prepare().await?;
        http.post_message_with_max_sse_event_size(
            uri,
            message,
            session_id,
            token,
            custom_headers,
            max_sse_event_size,
        )
        .await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        let (http, token) = self.prepare().await?;
        http.post_message_with_response_limits(
            uri,
            message,
            session_id,
            token,
            custom_headers,
            limits,
        )
        .await
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), StreamableHttpError<Self::Error>> {
        let (http, token) = self.prepare().await?;
        http.delete_session(uri, session_id, token, custom_headers)
            .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<SseStream, StreamableHttpError<Self::Error>> {
        let (http, token) = self.prepare().await?;
        http.get_stream(uri, session_id, last_event_id, token, custom_headers)
            .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        _auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<SseStream, StreamableHttpError<Self::Error>> {
        let (http, token) = self.prepare().await?;
        http.get_stream_with_max_sse_event_size(
            uri,
            session_id,
            last_event_id,
            token,
            custom_headers,
            max_sse_event_size,
        )
        .await
    }
}
