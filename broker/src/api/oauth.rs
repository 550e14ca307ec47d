//! The OAuth 2.0 front door over HTTP: RFC 8414 metadata, the JWK Set,
//! RFC 8693 token exchange, RFC 7662 introspection and RFC 7009 revocation.
//!
//! Every endpoint that reads or changes a credential authenticates its
//! caller by the X509-SVID of the TLS connection (`tls_client_auth`, RFC
//! 8705), checked at each request against the bundles of that moment, and
//! then applies the rules of the gRPC services: the token endpoint those of
//! the Broker (the caller's own task), introspection those of the Verifier
//! (`verifier.callers`, audience-scoped). Errors are RFC 6749 §5.2 JSON
//! objects; no response is cached (`Cache-Control: no-store`); no token is
//! logged.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use super::PeerConnection;
use crate::{
    credentials::act_claim,
    identity::{Identity, TrustBundleSource},
    lease::{ExchangeRefusal, ExchangeRequest, LeaseError, LeaseService},
    store::{LeaseStore, StoredKind},
};

/// The grant type of RFC 8693.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type of an OAuth access token (RFC 8693 §3).
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The token type of a JWT (RFC 8693 §3).
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Largest form body an endpoint reads.
pub const MAX_FORM_BYTES: usize = 64 * 1024;

/// Where the metadata lives (RFC 8414 §3).
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
/// Where the JWK Set lives.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/token";
/// The introspection endpoint's path.
pub const INTROSPECT_PATH: &str = "/introspect";
/// The revocation endpoint's path.
pub const REVOKE_PATH: &str = "/revoke";

/// The OAuth endpoints over a [`LeaseService`].
#[derive(Debug)]
pub struct OAuthApi<S> {
    service: Arc<LeaseService<S>>,
    bundles: Arc<TrustBundleSource>,
    base_url: String,
}

impl<S: LeaseStore> OAuthApi<S> {
    /// Serves `service`, authenticating callers against `bundles`; every
    /// endpoint the metadata names is under `base_url` (no trailing `/`).
    pub fn new(
        service: Arc<LeaseService<S>>,
        bundles: Arc<TrustBundleSource>,
        base_url: String,
    ) -> Self {
        Self {
            service,
            bundles,
            base_url,
        }
    }

    /// The router of every endpoint; handlers read the connection's
    /// [`PeerConnection`] from `ConnectInfo`.
    pub fn router(self: Arc<Self>) -> Router {
        let mut router = Router::new()
            .route(METADATA_PATH, get(metadata::<S>))
            .route(JWKS_PATH, get(jwks::<S>))
            .route(TOKEN_PATH, post(token::<S>))
            .route(INTROSPECT_PATH, post(introspect::<S>))
            .route(REVOKE_PATH, post(revoke::<S>));
        // RFC 8414 §3.1: an issuer with a path has its metadata at the
        // well-known prefix followed by that path.
        if let Some(path) = issuer_path(self.service.minter().issuer()) {
            router = router.route(&format!("{METADATA_PATH}{path}"), get(metadata::<S>));
        }
        router
            .fallback(|| async {
                oauth_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request",
                    "no such endpoint; see /.well-known/oauth-authorization-server",
                )
            })
            .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
            .with_state(self)
    }

    /// The RFC 8414 metadata document.
    pub fn metadata(&self) -> Value {
        let base = &self.base_url;
        let tls = ["tls_client_auth"];
        json!({
            "issuer": self.service.minter().issuer(),
            "token_endpoint": format!("{base}{TOKEN_PATH}"),
            "jwks_uri": format!("{base}{JWKS_PATH}"),
            "introspection_endpoint": format!("{base}{INTROSPECT_PATH}"),
            "revocation_endpoint": format!("{base}{REVOKE_PATH}"),
            "grant_types_supported": [TOKEN_EXCHANGE],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": tls,
            "introspection_endpoint_auth_methods_supported": tls,
            "revocation_endpoint_auth_methods_supported": tls,
            "tls_client_certificate_bound_access_tokens": true,
        })
    }

    /// The caller of this request, by the connection's X509-SVID now.
    fn caller(&self, peer: &PeerConnection) -> Result<Identity, OAuthError> {
        if !peer.has_certs() {
            return Err(oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "a client X509-SVID is required: authenticate with mutual TLS (tls_client_auth, RFC 8705)",
            ));
        }
        peer.identity(&self.bundles.current(), SystemTime::now())
            .map_err(|e| {
                tracing::warn!(reason = %e, "OAuth caller's X509-SVID no longer verifies");
                oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    &format!(
                        "the client X509-SVID does not verify against the current trust bundle: {e}"
                    ),
                )
            })
    }
}

/// The path of an `https` issuer, if it has one other than `/`.
fn issuer_path(issuer: &str) -> Option<&str> {
    let rest = issuer.strip_prefix("https://")?;
    let path = &rest[rest.find('/')?..];
    let path = path.trim_end_matches('/');
    (!path.is_empty()).then_some(path)
}

/// An RFC 6749 §5.2 error, answered as JSON (never cached).
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn oauth_error(status: StatusCode, error: &'static str, description: &str) -> OAuthError {
    OAuthError {
        status,
        error,
        description: description.to_owned(),
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (
            status,
            axum::Json(json!({ "error": self.error, "error_description": self.description })),
        )
            .into_response();
        no_store(response.headers_mut());
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6749 §5.2 asks for a challenge with a 401; the scheme names
            // how to authenticate here, which is the TLS client certificate.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Mutual-TLS realm=\"leash\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// A domain error as an OAuth error response; internal details are logged.
fn lease_error(err: LeaseError) -> OAuthError {
    let (status, code) = match &err {
        LeaseError::Exchange { refusal, .. } => (StatusCode::BAD_REQUEST, refusal.as_str()),
        LeaseError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        // The caller authenticated, but no actor class or verifier entry
        // lets it do this.
        LeaseError::PermissionDenied(_) => (StatusCode::BAD_REQUEST, "unauthorized_client"),
        LeaseError::TaskNotFound(_)
        | LeaseError::TemplateNotFound(_)
        | LeaseError::FailedPrecondition(_) => (
            StatusCode::BAD_REQUEST,
            ExchangeRefusal::InvalidGrant.as_str(),
        ),
        LeaseError::TooSoon { .. } | LeaseError::QuotaExceeded { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable")
        }
        LeaseError::Unavailable(m) | LeaseError::OutcomeUnknown(m) => {
            tracing::warn!(reason = %m, "store unavailable; OAuth request refused");
            (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
        }
        LeaseError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error; the broker logged the detail",
            );
        }
    };
    let message = match &err {
        LeaseError::OutcomeUnknown(m) => {
            format!("outcome unknown: {m}; retry the same request")
        }
        LeaseError::Unavailable(m) => format!("{m}; nothing was changed, retry with backoff"),
        other => other.to_string(),
    };
    oauth_error(status, code, &message)
}

/// The parameters of a form body, each at most once (RFC 6749 §3.2): a
/// repeated one is an error, except those named in `repeatable`.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(headers: &HeaderMap, body: &Bytes, repeatable: &[&str]) -> Result<Self, OAuthError> {
        let form_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if form_type != Some(true) {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded (RFC 6749 section 3.2)",
            ));
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).map_err(|_| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body is not a valid form (application/x-www-form-urlencoded)",
            )
        })?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if !repeatable.contains(&name.as_str()) && pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("parameter {name:?} is repeated (RFC 6749 section 3.2)"),
                ));
            }
        }
        Ok(Self(pairs))
    }

    /// The value of `name`; an empty value counts as absent (RFC 6749 §3.1).
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name).ok_or_else(|| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("parameter {name:?} is required"),
            )
        })
    }
}

/// `client_id`, when a client sends it (RFC 8705 §2), must be the SPIFFE ID
/// its certificate proves.
fn check_client_id(form: &Form, caller: &Identity) -> Result<(), OAuthError> {
    match form.get("client_id") {
        Some(id) if id != caller.spiffe_id.as_str() => Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client_id is not the SPIFFE ID of the client X509-SVID",
        )),
        _ => Ok(()),
    }
}

/// A client that tries another authentication method is told it is not
/// supported rather than silently authenticated by its certificate alone.
fn check_no_other_auth(headers: &HeaderMap, form: &Form) -> Result<(), OAuthError> {
    if headers.contains_key(header::AUTHORIZATION)
        || form.get("client_secret").is_some()
        || form.get("client_assertion").is_some()
    {
        return Err(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "only tls_client_auth is supported: authenticate with the client X509-SVID, without client_secret, client_assertion or an Authorization header",
        ));
    }
    Ok(())
}

async fn metadata<S: LeaseStore>(State(api): State<Arc<OAuthApi<S>>>) -> Response {
    let mut response = axum::Json(api.metadata()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=60"),
    );
    response
}

async fn jwks<S: LeaseStore>(State(api): State<Arc<OAuthApi<S>>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json"),
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        api.service.jwks().to_string(),
    )
        .into_response()
}

/// The caller and the form of an authenticated endpoint.
fn authenticate<S: LeaseStore>(
    api: &OAuthApi<S>,
    peer: &PeerConnection,
    headers: &HeaderMap,
    body: &Bytes,
    repeatable: &[&str],
) -> Result<(Identity, Form), OAuthError> {
    let caller = api.caller(peer)?;
    let form = Form::parse(headers, body, repeatable)?;
    check_no_other_auth(headers, &form)?;
    check_client_id(&form, &caller)?;
    Ok((caller, form))
}

/// The caller and the `token` parameter of introspection and revocation.
fn authenticated_token<S: LeaseStore>(
    api: &OAuthApi<S>,
    peer: &PeerConnection,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Identity, String), OAuthError> {
    let (caller, form) = authenticate(api, peer, headers, body, &[])?;
    let token = form.require("token")?.to_owned();
    Ok((caller, token))
}

async fn token<S: LeaseStore>(
    State(api): State<Arc<OAuthApi<S>>>,
    ConnectInfo(peer): ConnectInfo<PeerConnection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (caller, form) = match authenticate(&api, &peer, &headers, &body, &["resource"]) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    exchange(&api, &caller, &form)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn exchange<S: LeaseStore>(
    api: &OAuthApi<S>,
    caller: &Identity,
    form: &Form,
) -> Result<Response, OAuthError> {
    let bad =
        |code: &'static str, message: &str| oauth_error(StatusCode::BAD_REQUEST, code, message);
    match form.require("grant_type")? {
        TOKEN_EXCHANGE => {}
        other => {
            return Err(bad(
                "unsupported_grant_type",
                &format!(
                    "grant_type {other:?} is not supported; this endpoint does {TOKEN_EXCHANGE}"
                ),
            ));
        }
    }
    let subject_token = form.require("subject_token")?;
    match form.require("subject_token_type")? {
        ACCESS_TOKEN_TYPE | JWT_TOKEN_TYPE => {}
        other => {
            return Err(bad(
                "invalid_request",
                &format!(
                    "subject_token_type {other:?} is not supported: the subject token is a Leash credential ({ACCESS_TOKEN_TYPE} or {JWT_TOKEN_TYPE})"
                ),
            ));
        }
    }
    let issued_type = match form.get("requested_token_type") {
        None | Some(ACCESS_TOKEN_TYPE) => ACCESS_TOKEN_TYPE,
        Some(JWT_TOKEN_TYPE) => JWT_TOKEN_TYPE,
        Some(other) => {
            return Err(bad(
                "invalid_request",
                &format!(
                    "requested_token_type {other:?} is not supported; ask for {ACCESS_TOKEN_TYPE} or {JWT_TOKEN_TYPE}"
                ),
            ));
        }
    };
    if form.get("actor_token").is_some() || form.get("actor_token_type").is_some() {
        return Err(bad(
            "invalid_request",
            "actor_token is not supported: the caller is the actor its X509-SVID proves, and a delegated task's credentials carry their act chain",
        ));
    }
    let resources = form.all("resource");
    if resources.len() > 1 {
        return Err(bad(
            "invalid_target",
            "one resource per exchange: the issued token is bound to a single audience",
        ));
    }
    let audience = form.get("audience");
    let resource = match (resources.first(), audience) {
        (Some(r), Some(a)) if *r != a => {
            return Err(bad(
                "invalid_target",
                "resource and audience name different targets; send one of them",
            ));
        }
        (Some(r), _) => (*r).to_owned(),
        (None, Some(a)) => a.to_owned(),
        (None, None) => String::new(),
    };
    let scopes = form.get("scope").map(|s| {
        s.split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    });
    let exchanged = api
        .service
        .exchange(
            caller,
            ExchangeRequest {
                subject_token: subject_token.to_owned(),
                resource,
                scopes,
            },
        )
        .await
        .map_err(lease_error)?;
    let record = &exchanged.credential.record;
    let expires_in = record.expires_at_ms.saturating_sub(record.issued_at_ms) / 1000;
    let mut response = axum::Json(json!({
        "access_token": exchanged.credential.value.expose(),
        "issued_token_type": issued_type,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": record.scopes.join(" "),
    }))
    .into_response();
    no_store(response.headers_mut());
    Ok(response)
}

async fn introspect<S: LeaseStore>(
    State(api): State<Arc<OAuthApi<S>>>,
    ConnectInfo(peer): ConnectInfo<PeerConnection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (caller, token) = match authenticated_token(&api, &peer, &headers, &body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let token = token.as_str();
    // token_type_hint is optional and only a hint (RFC 7662 §2.1): every
    // Leash token is looked up the same way whatever it says.
    let answer = match api.service.introspect(&caller, token).await {
        Ok(a) => a,
        Err(LeaseError::PermissionDenied(m)) => {
            return oauth_error(StatusCode::FORBIDDEN, "unauthorized_client", &m).into_response();
        }
        Err(e) => return lease_error(e).into_response(),
    };
    let body = match answer.record.filter(|_| answer.active) {
        None => json!({ "active": false }),
        Some(r) => {
            let mut claims = serde_json::Map::new();
            let (sub, act) = match act_claim(&r.actors) {
                Some((root, act)) => (root.to_owned(), Some(act)),
                None => (r.subject.clone(), None),
            };
            claims.insert("active".into(), json!(true));
            claims.insert("scope".into(), json!(r.scopes.join(" ")));
            claims.insert("client_id".into(), json!(r.subject));
            claims.insert("token_type".into(), json!("Bearer"));
            claims.insert("exp".into(), json!(r.expires_at_ms / 1000));
            claims.insert("iat".into(), json!(r.issued_at_ms / 1000));
            claims.insert("nbf".into(), json!(r.issued_at_ms / 1000));
            claims.insert("sub".into(), json!(sub));
            claims.insert("aud".into(), json!(r.audience));
            claims.insert("iss".into(), json!(r.issuer));
            claims.insert("jti".into(), json!(r.id.to_string()));
            if let Some(act) = act {
                claims.insert("act".into(), act);
            }
            if let Some(x5t) = &r.cnf_x5t_s256 {
                // RFC 8705 §3.2: the binding, for the resource to compare.
                claims.insert("cnf".into(), json!({ "x5t#S256": x5t }));
            }
            claims.insert("task_id".into(), json!(r.id.task_id().to_string()));
            claims.insert("template".into(), json!(r.template));
            claims.insert("grant".into(), json!(r.grant));
            let classes: serde_json::Map<String, Value> = r
                .scope_class_map()
                .into_iter()
                .map(|(s, c)| (s, json!(c.as_str())))
                .collect();
            claims.insert("scope_classes".into(), Value::Object(classes));
            claims.insert(
                "leash_token_kind".into(),
                json!(match r.kind {
                    StoredKind::Jwt => "jwt",
                    StoredKind::Opaque => "opaque",
                }),
            );
            Value::Object(claims)
        }
    };
    let mut response = axum::Json(body).into_response();
    no_store(response.headers_mut());
    response
}

async fn revoke<S: LeaseStore>(
    State(api): State<Arc<OAuthApi<S>>>,
    ConnectInfo(peer): ConnectInfo<PeerConnection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (caller, token) = match authenticated_token(&api, &peer, &headers, &body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let token = token.as_str();
    match api.service.revoke_token(&caller, token).await {
        // RFC 7009 §2.2: 200 whether or not the token was valid.
        Ok(_) => {
            let mut response = StatusCode::OK.into_response();
            no_store(response.headers_mut());
            response
        }
        Err(LeaseError::PermissionDenied(m)) => {
            oauth_error(StatusCode::FORBIDDEN, "unauthorized_client", &m).into_response()
        }
        Err(e) => lease_error(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_of_an_issuer_with_a_path_is_also_at_the_inserted_path() {
        assert_eq!(issuer_path("https://leash.example"), None);
        assert_eq!(issuer_path("https://leash.example/"), None);
        assert_eq!(issuer_path("https://leash.example/t1"), Some("/t1"));
        assert_eq!(issuer_path("https://leash.example/a/b/"), Some("/a/b"));
        assert_eq!(issuer_path("spiffe://x/y"), None);
    }

    #[test]
    fn a_form_refuses_a_repeated_parameter_and_a_wrong_content_type() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        let body = Bytes::from_static(b"resource=a&resource=b&scope=x+y&empty=");
        let form = Form::parse(&headers, &body, &["resource"]).expect("parses");
        assert_eq!(form.all("resource"), ["a", "b"]);
        assert_eq!(form.get("scope"), Some("x y"));
        assert_eq!(form.get("empty"), None);
        assert!(Form::parse(&headers, &body, &[]).is_err());
        let json = {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h
        };
        assert!(Form::parse(&json, &body, &["resource"]).is_err());
        assert!(Form::parse(&HeaderMap::new(), &body, &["resource"]).is_err());
    }
}
