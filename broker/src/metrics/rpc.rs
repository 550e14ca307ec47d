//! The tower layer that times every gRPC call and counts refusals.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use prost::Message as _;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::{Metrics, REASON_HEADER, refusal_reason};

/// Every method path the broker serves (`/leash.v1.Broker/BeginTask`, the
/// health and reflection services'), from the proto descriptors: the only
/// values the `method` label takes besides `other`.
fn known_methods() -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut known = HashSet::new();
        for set in [
            leash_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(fds) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in fds.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    for method in service.method {
                        known.insert(format!(
                            "{package}.{name}/{}",
                            method.name.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        for reflection in ["v1", "v1alpha"] {
            known.insert(format!(
                "grpc.reflection.{reflection}.ServerReflection/ServerReflectionInfo"
            ));
        }
        known
    })
}

/// The `method` label of a request path: the served method's name, or `other`
/// (a path a client made up must not become a label value).
pub(crate) fn method_label(path: &str) -> &str {
    let name = path.strip_prefix('/').unwrap_or(path);
    if known_methods().contains(name) {
        name
    } else {
        "other"
    }
}

/// Times each call until its response headers and records its gRPC code (an
/// error is a trailers-only response, so its code is in the headers; a call
/// whose headers carry none answered OK so far).
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC router.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> Service<http::Request<B>> for RpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path()).to_owned();
        let start = Instant::now();
        // The clone that was made ready is the one called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = inner.call(request).await;
            let (code, reason) = match &result {
                Ok(response) => outcome(response.headers()),
                Err(_) => (tonic::Code::Unknown, None),
            };
            let refused = reason.or_else(|| refusal_reason(code));
            metrics.rpc_done(&method, code_name(code), refused, start.elapsed());
            result
        })
    }
}

/// The gRPC code of a response's headers and the refusal reason it names.
fn outcome(headers: &http::HeaderMap) -> (tonic::Code, Option<&'static str>) {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    let reason = headers
        .get(REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(known_reason);
    (code, reason)
}

/// A reason the broker sets in [`REASON_HEADER`]; anything else is ignored.
fn known_reason(value: &str) -> Option<&'static str> {
    [
        "template_not_found",
        "task_not_found",
        "too_soon",
        "quota_exceeded",
        "kill_switch",
        "policy",
    ]
    .into_iter()
    .find(|r| *r == value)
}

/// The canonical upper-case name of a gRPC code.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_are_label_values() {
        assert_eq!(
            method_label("/leash.v1.Broker/BeginTask"),
            "leash.v1.Broker/BeginTask"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/leash.v1.Broker/tsk_0123456789"), "other");
        assert_eq!(method_label("/anything"), "other");
    }

    #[test]
    fn the_code_and_reason_come_from_the_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(outcome(&h), (tonic::Code::Ok, None));
        h.insert("grpc-status", http::HeaderValue::from_static("7"));
        h.insert(REASON_HEADER, http::HeaderValue::from_static("kill_switch"));
        assert_eq!(
            outcome(&h),
            (tonic::Code::PermissionDenied, Some("kill_switch"))
        );
        h.insert(REASON_HEADER, http::HeaderValue::from_static("made-up"));
        assert_eq!(outcome(&h), (tonic::Code::PermissionDenied, None));
    }
}
