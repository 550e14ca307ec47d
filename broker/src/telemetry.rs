//! OpenTelemetry traces: one span per gRPC call, child spans through identity,
//! policy, store and minting, exported over OTLP/gRPC.
//!
//! # Layout
//!
//! - [`layer`]: the `tracing` layer that turns the broker's spans into
//!   OpenTelemetry spans. The binary installs it with its log layer at start,
//!   before the configuration is read; it does nothing until [`start`].
//! - [`start`]: from `[telemetry]`, connects the OTLP exporter (lazily: an
//!   unreachable collector never delays the start) and switches the layer on;
//!   the returned [`Telemetry`] flushes and switches it off again.
//! - [`RpcTraceLayer`]: the tower layer on every gRPC listener: one span per
//!   call, named after the method (`leash.v1.Broker/BeginTask`), whose parent
//!   is the caller's W3C `traceparent` when it sent a valid one.
//! - [`current_trace_id`]: the trace id of the call being served, for audit events.
//!
//! # Guarantees
//!
//! - **Exporting never blocks a request.** A finished span is offered to a
//!   bounded queue ([`crate::config::Telemetry::queue_size`]) without waiting;
//!   when the queue is full it is dropped and counted ([`dropped_spans`]). One
//!   task drains the queue in batches, each export bounded by `export_timeout`.
//! - **Off by default, and free when off.** Without `otlp_endpoint` the layer
//!   records nothing and no trace ids are made.
//! - **No secrets in spans.** Spans carry method names, status codes, task ids
//!   and template names; never a credential value, token, key or request body.
//!   Log events are not copied into spans.
//! - A malformed `traceparent` is ignored (the call starts a new trace), never
//!   an error.
//!
//! The OpenTelemetry pipeline is process-wide: one exporter per process. A
//! second [`start`] in the same process (tests running several brokers) takes
//! over from the first; the first's [`Telemetry`] then stops only its own exporter.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, TextMapPropagator as _},
    trace::{Link, SpanKind, TraceContextExt as _, TraceId, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        Sampler, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample, Span, SpanData,
        SpanExporter, SpanProcessor,
    },
};
use tokio::sync::{mpsc, oneshot};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    Layer,
    layer::{Context as LayerContext, Filter},
    registry::LookupSpan,
};

use crate::config::Telemetry as TelemetryConfig;

/// Most spans sent in one export call.
pub const MAX_EXPORT_BATCH: usize = 512;

/// The `tracing` targets whose spans become OpenTelemetry spans: the broker's own.
const TRACED_TARGET_PREFIX: &str = "leash_broker";

/// The target of the per-call spans, the only spans that may start a trace.
const RPC_TARGET: &str = "leash_broker::rpc";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from `otlp_endpoint`.
    #[error("telemetry.otlp_endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    /// [`start`] was called outside a Tokio runtime.
    #[error("telemetry: must start inside a Tokio runtime")]
    NoRuntime,
}

/// The process-wide pipeline behind [`layer`]: a tracer whose processor
/// forwards to the exporter queue installed by [`start`], if any.
struct Pipeline {
    tracer: SdkTracer,
    // Kept so the tracer's provider lives as long as the process.
    _provider: SdkTracerProvider,
    shared: Arc<Shared>,
}

/// What the processor, the sampler, [`start`] and the counters share.
#[derive(Debug, Default)]
struct Shared {
    enabled: AtomicBool,
    // f64 bits of the root sample ratio.
    ratio: AtomicU64,
    queue: RwLock<Option<Queue>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

/// The installed exporter queue.
#[derive(Debug, Clone)]
struct Queue {
    id: u64,
    tx: mpsc::Sender<Message>,
}

#[derive(Debug)]
enum Message {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<Pipeline> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let shared = Arc::new(Shared::default());
        shared.ratio.store(1.0f64.to_bits(), Ordering::Relaxed);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor {
                shared: Arc::clone(&shared),
            })
            .with_sampler(Sampler::ParentBased(Box::new(RootSampler {
                shared: Arc::clone(&shared),
            })))
            .build();
        let tracer = provider.tracer("leash-broker");
        Pipeline {
            tracer,
            _provider: provider,
            shared,
        }
    })
}

/// The `tracing` layer that makes OpenTelemetry spans of the broker's spans
/// (targets under `leash_broker`; log events are not copied). It records
/// nothing until [`start`] switches it on, so install it unconditionally.
pub fn layer<S>() -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let p = pipeline();
    tracing_opentelemetry::layer()
        .with_tracer(p.tracer.clone())
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(TracedSpans {
            shared: Arc::clone(&p.shared),
        })
}

/// Only the broker's own spans, only while an exporter is installed, and only
/// inside a call: a background loop (reaper, feed, reloader) starts no traces.
struct TracedSpans {
    shared: Arc<Shared>,
}

impl TracedSpans {
    fn traced(meta: &tracing::Metadata<'_>) -> bool {
        meta.is_span() && meta.target().starts_with(TRACED_TARGET_PREFIX)
    }
}

impl<S> Filter<S> for TracedSpans
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &tracing::Metadata<'_>, cx: &LayerContext<'_, S>) -> bool {
        Self::traced(meta)
            && self.shared.enabled.load(Ordering::Relaxed)
            && (meta.target() == RPC_TARGET || cx.lookup_current().is_some())
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        // `sometimes`: the answer changes when telemetry starts or stops.
        if Self::traced(meta) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}

/// The root sampler: keeps the configured fraction of new traces by trace id.
/// Wrapped in `ParentBased`, so a caller's sampled flag decides its calls.
#[derive(Debug, Clone)]
struct RootSampler {
    shared: Arc<Shared>,
}

impl ShouldSample for RootSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let ratio = f64::from_bits(self.shared.ratio.load(Ordering::Relaxed));
        Sampler::TraceIdRatioBased(ratio).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
}

/// Offers every finished span to the installed queue without waiting.
#[derive(Debug)]
struct QueueProcessor {
    shared: Arc<Shared>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let queue = self
            .shared
            .queue
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(queue) = queue else { return };
        if queue.tx.try_send(Message::Span(Box::new(span))).is_err() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    // Flushing is asynchronous ([`Telemetry::flush`]): blocking a thread here
    // would stall the runtime the exporter needs (a current-thread runtime
    // would never finish the flush).
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Spans dropped since the process started because the export queue was full
/// (or its exporter had stopped): the cost of never blocking a request.
pub fn dropped_spans() -> u64 {
    pipeline().shared.dropped.load(Ordering::Relaxed)
}

/// Spans lost since the process started because an export call failed or
/// timed out (the collector was unreachable or refused them).
pub fn failed_spans() -> u64 {
    pipeline().shared.failed.load(Ordering::Relaxed)
}

/// The W3C trace id (32 lowercase hex digits) of the current span, or `None`
/// when there is no valid trace context (outside a call, or telemetry off).
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The running exporter of this process, started by [`start`].
#[derive(Debug)]
pub struct Telemetry {
    id: u64,
    tx: mpsc::Sender<Message>,
    worker: tokio::task::JoinHandle<()>,
}

/// Starts exporting traces as `config` says, or returns `None` when
/// `otlp_endpoint` is not set. The connection to the collector is opened
/// lazily; a collector that is down costs failed exports, never a request.
///
/// # Errors
/// [`TelemetryError::Exporter`] when the exporter cannot be built;
/// [`TelemetryError::NoRuntime`] outside a Tokio runtime.
pub fn start(config: &TelemetryConfig) -> Result<Option<Telemetry>, TelemetryError> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let telemetry = start_with_exporter(exporter, resource, config);
    tracing::info!(
        %endpoint,
        sample_ratio = config.sample_ratio,
        queue_size = config.queue_size,
        "exporting traces over OTLP/gRPC"
    );
    Ok(Some(telemetry))
}

/// [`start`] with a given exporter (tests use an in-memory one).
fn start_with_exporter<E: SpanExporter + 'static>(
    mut exporter: E,
    resource: Resource,
    config: &TelemetryConfig,
) -> Telemetry {
    let p = pipeline();
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(config.queue_size.max(1));
    let id = p.shared.next_id.fetch_add(1, Ordering::Relaxed);
    let worker = tokio::spawn(export_loop(
        exporter,
        rx,
        config.batch_interval,
        config.export_timeout,
        Arc::clone(&p.shared),
    ));
    p.shared.ratio.store(
        config.sample_ratio.clamp(0.0, 1.0).to_bits(),
        Ordering::Relaxed,
    );
    *p.shared
        .queue
        .write()
        .unwrap_or_else(PoisonError::into_inner) = Some(Queue { id, tx: tx.clone() });
    p.shared.enabled.store(true, Ordering::Relaxed);
    Telemetry { id, tx, worker }
}

impl Telemetry {
    /// Exports every span finished before this call, and waits for it (or for
    /// the worker to have stopped).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Switches the layer off (unless a later [`start`] took over), exports
    /// what is queued, and stops the exporter, waiting at most `within`.
    pub async fn shutdown(self, within: Duration) {
        let shared = &pipeline().shared;
        {
            let mut queue = shared.queue.write().unwrap_or_else(PoisonError::into_inner);
            if queue.as_ref().is_some_and(|q| q.id == self.id) {
                *queue = None;
                shared.enabled.store(false, Ordering::Relaxed);
            }
        }
        let Telemetry { tx, mut worker, .. } = self;
        // The worker exports what is left and ends when every sender is gone.
        drop(tx);
        if tokio::time::timeout(within, &mut worker).await.is_err() {
            worker.abort();
            tracing::warn!("trace export did not finish in time at shutdown; spans were lost");
        }
    }
}

/// Drains the queue: a batch leaves when it is full, when `interval` passes,
/// or on a flush; each export is bounded by `timeout`.
async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<Message>,
    interval: Duration,
    timeout: Duration,
    shared: Arc<Shared>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_EXPORT_BATCH);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(Message::Span(span)) => {
                    batch.push(*span);
                    if batch.len() >= MAX_EXPORT_BATCH {
                        export(&exporter, &mut batch, timeout, &shared, &mut failing).await;
                    }
                }
                Some(Message::Flush(done)) => {
                    export(&exporter, &mut batch, timeout, &shared, &mut failing).await;
                    let _ = done.send(());
                }
                None => {
                    export(&exporter, &mut batch, timeout, &shared, &mut failing).await;
                    let _ = exporter.shutdown_with_timeout(timeout);
                    return;
                }
            },
            _ = ticker.tick() => {
                export(&exporter, &mut batch, timeout, &shared, &mut failing).await;
            }
        }
    }
}

async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    timeout: Duration,
    shared: &Shared,
    failing: &mut bool,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::replace(batch, Vec::with_capacity(MAX_EXPORT_BATCH));
    let n = spans.len() as u64;
    let error = match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    };
    match error {
        None if *failing => {
            *failing = false;
            tracing::info!("trace export works again");
        }
        None => {}
        Some(error) => {
            shared.failed.fetch_add(n, Ordering::Relaxed);
            // Once per outage, not once per batch.
            if !*failing {
                *failing = true;
                tracing::warn!(%error, spans = n, "trace export failed; spans are lost until it works again");
            }
        }
    }
}

// ---------------------------------------------------------------- RPC spans

/// The tower layer that gives every gRPC call its span (see [`RpcTrace`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

/// One span per gRPC call, named after its method (`leash.v1.Broker/BeginTask`)
/// with the `rpc.system`, `rpc.service`, `rpc.method` and
/// `rpc.grpc.status_code` attributes. Its parent is the caller's W3C
/// `traceparent`/`tracestate` when valid (else the call starts a trace). The
/// span lasts until the response body (for streams, the whole stream) ends.
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

type HttpRequest<B> = tonic::codegen::http::Request<B>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S, B> tower::Service<HttpRequest<B>> for RpcTrace<S>
where
    S: tower::Service<HttpRequest<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest<B>) -> Self::Future {
        let span = rpc_span(request.uri().path(), request.headers());
        // The inner `call` runs the authenticating interceptor: inside the span.
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(async move {
            let response = tracing::Instrument::instrument(future, span.clone()).await?;
            // A trailers-only answer (every error) carries its status here;
            // otherwise it comes in the trailers at the end of the body.
            if let Some(code) = grpc_status(response.headers()) {
                record_status(&span, code);
            }
            Ok(response.map(|body| tonic::body::Body::new(TracedBody { inner: body, span })))
        })
    }
}

/// The call's span, child of the caller's trace context when it sent a valid one.
fn rpc_span(path: &str, headers: &tonic::codegen::http::HeaderMap) -> tracing::Span {
    // `/leash.v1.Broker/BeginTask`. A path that is no gRPC method (a client's
    // junk) gets one fixed name, so callers cannot mint span names.
    let (service, method) = grpc_method(path).unwrap_or(("unknown", "unknown"));
    let name = format!("{service}/{method}");
    let span = tracing::info_span!(
        target: RPC_TARGET,
        "rpc",
        otel.name = %name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled (telemetry off): nothing to do then.
        let _ = span.set_parent(parent);
    }
    span
}

/// `(service, method)` of a gRPC path `/pkg.Service/Method`, if it is one.
fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let ok = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || extra.contains(&b))
    };
    (ok(service, b".") && ok(method, b"")).then_some((service, method))
}

/// Records the call's gRPC status, and marks the span failed for the codes
/// that mean a server-side fault (OpenTelemetry's gRPC server conventions).
fn record_status(span: &tracing::Span, code: i64) {
    span.record("rpc.grpc.status_code", code);
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "error");
    }
}

fn grpc_status(headers: &tonic::codegen::http::HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
}

/// Reads `traceparent` and `tracestate` from request headers.
struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A response body that records the gRPC status from the trailers and keeps
/// the call's span open until the body ends.
struct TracedBody {
    inner: tonic::body::Body,
    span: tracing::Span,
}

impl fmt::Debug for TracedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracedBody").finish_non_exhaustive()
    }
}

impl http_body::Body for TracedBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(grpc_status)
        {
            record_status(&self.span, code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::SpanId;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Collects exported spans; optionally never answers (a stuck collector).
    #[derive(Debug, Clone, Default)]
    struct Collector {
        spans: Arc<Mutex<Vec<SpanData>>>,
        stuck: bool,
    }

    impl SpanExporter for Collector {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.stuck {
                std::future::pending::<()>().await;
            }
            self.spans.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn config(queue_size: usize) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            queue_size,
            batch_interval: Duration::from_secs(600),
            export_timeout: Duration::from_secs(600),
            ..TelemetryConfig::default()
        }
    }

    // One test owns the process-wide pipeline, so the steps run in order.
    #[test]
    fn grpc_methods_are_recognised_and_junk_is_not() {
        assert_eq!(
            grpc_method("/leash.v1.Broker/BeginTask"),
            Some(("leash.v1.Broker", "BeginTask"))
        );
        assert_eq!(
            grpc_method("/grpc.health.v1.Health/Check"),
            Some(("grpc.health.v1.Health", "Check"))
        );
        for junk in [
            "",
            "/",
            "//",
            "/a/b/c",
            "/a/",
            "/a b/c",
            "leash.v1.Broker/BeginTask",
        ] {
            assert_eq!(grpc_method(junk), None, "{junk:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_export_with_their_parent_and_a_full_queue_drops_and_counts() {
        let subscriber = tracing_subscriber::registry().with(layer());
        let _default = tracing::subscriber::set_default(subscriber);

        // Off: no trace id, nothing recorded.
        {
            let span = rpc_span("/leash.v1.Broker/BeginTask", &Default::default());
            let _e = span.enter();
            assert_eq!(current_trace_id(), None);
        }
        {
            let span = tracing::info_span!("off");
            let _e = span.enter();
            assert_eq!(current_trace_id(), None);
        }

        let collector = Collector::default();
        let telemetry = start_with_exporter(
            collector.clone(),
            Resource::builder_empty().build(),
            &config(64),
        );
        let mut headers = tonic::codegen::http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        {
            let rpc = rpc_span("/leash.v1.Broker/BeginTask", &headers);
            let _e = rpc.enter();
            assert_eq!(
                current_trace_id().as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let child = tracing::info_span!("store.begin");
            let _c = child.enter();
            assert_eq!(
                current_trace_id().as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
        }
        // Outside a call, spans start no trace.
        {
            let span = tracing::info_span!("reaper.tick");
            let _e = span.enter();
            assert_eq!(current_trace_id(), None);
        }
        // A malformed traceparent starts a new trace.
        headers.insert("traceparent", "00-XYZ-00f067aa0ba902b7-01".parse().unwrap());
        {
            let rpc = rpc_span("/leash.v1.Broker/RenewLease", &headers);
            let _e = rpc.enter();
            let id = current_trace_id().unwrap();
            assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(id.len(), 32);
        }
        // Junk paths get one name, whatever the client sent.
        for junk in [
            "/",
            "/a/b/c",
            "/leash.v1.Broker/Begin\u{1b}Task",
            "/x y/z",
            "//",
        ] {
            let span = rpc_span(junk, &Default::default());
            let _e = span.enter();
        }
        telemetry.flush().await;
        let spans = collector.spans.lock().unwrap().clone();
        assert!(
            spans
                .iter()
                .all(|s| !s.name.contains('\u{1b}') && !s.name.contains(' ')),
            "{spans:?}"
        );
        let by_name = |n: &str| spans.iter().find(|s| s.name == n).unwrap().clone();
        let begin = by_name("leash.v1.Broker/BeginTask");
        assert_eq!(
            begin.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            begin.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_eq!(begin.span_kind, SpanKind::Server);
        let attr = |s: &SpanData, k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key.as_str() == k)
                .map(|a| a.value.to_string())
        };
        assert_eq!(attr(&begin, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(
            attr(&begin, "rpc.service").as_deref(),
            Some("leash.v1.Broker")
        );
        assert_eq!(attr(&begin, "rpc.method").as_deref(), Some("BeginTask"));
        let child = by_name("store.begin");
        assert_eq!(child.parent_span_id, begin.span_context.span_id());
        let renew = by_name("leash.v1.Broker/RenewLease");
        assert_eq!(renew.parent_span_id, SpanId::INVALID);
        by_name("unknown/unknown");
        telemetry.shutdown(Duration::from_secs(10)).await;

        // Off again: nothing recorded, nothing queued.
        {
            let span = tracing::info_span!("after");
            let _e = span.enter();
            assert_eq!(current_trace_id(), None);
        }

        // A collector that never answers: the queue fills, then spans are
        // dropped and counted, and making spans never waits.
        let stuck = Collector {
            stuck: true,
            ..Collector::default()
        };
        let telemetry = start_with_exporter(stuck, Resource::builder_empty().build(), &config(8));
        let before = dropped_spans();
        let started = std::time::Instant::now();
        for _ in 0..(MAX_EXPORT_BATCH + 100) {
            let _ = rpc_span("/leash.v1.Broker/RenewLease", &headers).entered();
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(
            dropped_spans() > before,
            "a full queue drops and counts: {}",
            dropped_spans()
        );
        // Shutdown gives up on the stuck exporter at its deadline.
        telemetry.shutdown(Duration::from_millis(200)).await;
    }
}
