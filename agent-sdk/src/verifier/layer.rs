//! A tower layer that puts a [`Verifier`] in front of every call of a tonic server.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    Status,
    body::Body,
    codegen::http::{Request, Response},
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

use super::{Claims, Verifier, VerifyError};

/// The verified claims, inserted into request extensions for handlers
/// (`request.extensions().get::<VerifiedToken>()`).
#[derive(Debug, Clone)]
pub struct VerifiedToken(pub Arc<Claims>);

/// Requires `authorization: Bearer <leash jwt>` on every request, verified by a
/// [`Verifier`] with an optional required scope. The token's certificate
/// binding is checked against the caller's TLS client certificate when the
/// server runs tonic's TLS; refused calls get `UNAUTHENTICATED` (no or invalid
/// token), `PERMISSION_DENIED` (missing scope) or `UNAVAILABLE` (revocation
/// state unknown).
#[derive(Debug, Clone)]
pub struct VerifierLayer {
    verifier: Verifier,
    scope: Option<Arc<str>>,
}

impl VerifierLayer {
    /// Verifies with `verifier`, requiring `scope` when given.
    pub fn new(verifier: Verifier, scope: Option<&str>) -> Self {
        Self {
            verifier,
            scope: scope.map(Arc::from),
        }
    }
}

impl<S> Layer<S> for VerifierLayer {
    type Service = VerifierService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VerifierService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`VerifierLayer`].
#[derive(Debug, Clone)]
pub struct VerifierService<S> {
    inner: S,
    layer: VerifierLayer,
}

fn refusal(e: &VerifyError) -> Status {
    match e {
        VerifyError::MissingScope(_) => Status::permission_denied(e.to_string()),
        VerifyError::RevocationsUnknown => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(format!("credential refused: {e}")),
    }
}

impl<S, B> Service<Request<B>> for VerifierService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
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
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|c| c.first().map(|d| d.as_ref().to_vec()));
        let verdict = match token {
            None => Err(Status::unauthenticated(
                "authorization: Bearer <credential> required",
            )),
            Some(t) => self
                .layer
                .verifier
                .verify(t, self.layer.scope.as_deref(), cert.as_deref())
                .map_err(|e| refusal(&e)),
        };
        match verdict {
            Ok(claims) => {
                req.extensions_mut().insert(VerifiedToken(Arc::new(claims)));
                // The clone that was polled ready must serve this request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}
