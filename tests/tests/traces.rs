//! OpenTelemetry traces (issue 9), end to end: a broker on a real
//! `redis-server` exports over OTLP/gRPC to a receiver built from the official
//! `opentelemetry-proto` service definitions, and the SDK sends a W3C
//! `traceparent`:
//!
//! - the BeginTask RPC span is a child of the SDK's trace parent (same trace
//!   id, parent span id = the traceparent's parent id), named after the
//!   method, with the `rpc.*` attributes;
//! - below it, spans for identity (SVID check, actor class), policy (template
//!   decision, Cedar), minting and the store, checked as a tree by parent ids;
//! - the SDK's background renewal carries the task's trace id too;
//! - the audit events of the task carry the trace id;
//! - no span attribute holds a credential value.
//!
//! The OpenTelemetry pipeline is process-wide, so this binary runs one broker
//! with telemetry, in one test.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a test failure")]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use leash_e2e::{BrokerOptions, RedisServer, TestBroker, eventually, pb};
use leash_sdk::{Client, TaskRequest, TraceParent};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// A span as received, with the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// The OTLP trace receiver: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Every span of the trace `trace_id` (hex) received so far.
    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|r| hex(&r.span.trace_id) == trace_id)
            .cloned()
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value_text(&kv.value))
}

/// Starts the receiver on a loopback port; returns its address.
async fn start_receiver(receiver: Receiver) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// True when `span` descends from the span with id `ancestor` within `spans`.
fn descends_from(span: &Span, ancestor: &[u8], spans: &HashMap<Vec<u8>, Span>) -> bool {
    let mut parent = span.parent_span_id.clone();
    for _ in 0..32 {
        if parent == ancestor {
            return true;
        }
        match spans.get(&parent) {
            Some(p) => parent = p.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

/// The names of the spans that must hang below one BeginTask.
const BEGIN_CHILDREN: &[&str] = &[
    "identity.verify_svid",
    "identity.actor_class",
    "policy.decide",
    "policy.authorize",
    "credentials.mint",
    "store.begin",
];

const SDK_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TASK_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn begin_task_is_one_span_tree_below_the_sdks_traceparent() {
    let receiver = Receiver::default();
    let collector = start_receiver(receiver.clone()).await;
    let redis = RedisServer::start();
    let mut options = BrokerOptions::redis(&redis);
    options.policies = leash_e2e::example_policies();
    options.extra_toml = format!(
        r#"[admin]
callers = ["spiffe://acme.test/admin/ops"]
[telemetry]
otlp_endpoint = "http://{collector}"
service_name = "leash-traces-test"
batch_interval = "100ms"
export_timeout = "5s"
"#
    );
    let broker = TestBroker::start(options).await;
    let svid = broker.pki.svid("agent/traced");
    let client = Client::builder()
        .broker(broker.url())
        .svid_files(&svid.cert, &svid.key)
        .bundle_file(broker.pki.bundle())
        .traceparent(SDK_TRACE)
        .connect()
        .await
        .unwrap();
    let sdk = TraceParent::parse(SDK_TRACE).unwrap();
    assert_eq!(client.trace_parent(), Some(sdk));

    let task = client
        .begin_task(
            TaskRequest::new("review")
                .param("repo", "acme/widgets")
                .intent("review pull request 42 (traced)"),
        )
        .await
        .unwrap();
    assert_eq!(task.trace_parent(), Some(sdk));
    let secrets: Vec<String> = task
        .credentials()
        .iter()
        .map(|c| c.secret().to_owned())
        .collect();
    assert_eq!(secrets.len(), 2);

    // The RPC span ends after its children: once it and every child are here,
    // the tree is complete.
    let complete = |spans: &[Received]| {
        spans
            .iter()
            .any(|r| r.span.name == "leash.v1.Broker/BeginTask")
            && BEGIN_CHILDREN
                .iter()
                .all(|n| spans.iter().any(|r| r.span.name == *n))
    };
    let arrived = eventually(Duration::from_secs(60), || {
        let spans = receiver.trace(&sdk.trace_id());
        async move { complete(&spans) }
    })
    .await;
    let spans = receiver.trace(&sdk.trace_id());
    assert!(
        arrived.is_some(),
        "the BeginTask span tree did not arrive: {:?}",
        spans.iter().map(|r| &r.span.name).collect::<Vec<_>>()
    );

    let begin: Vec<&Received> = spans
        .iter()
        .filter(|r| r.span.name == "leash.v1.Broker/BeginTask")
        .collect();
    assert_eq!(begin.len(), 1, "one BeginTask call, one RPC span");
    let rpc = &begin[0].span;
    assert_eq!(begin[0].service, "leash-traces-test");
    assert_eq!(hex(&rpc.trace_id), sdk.trace_id());
    assert_eq!(
        hex(&rpc.parent_span_id),
        sdk.parent_id(),
        "the SDK's traceparent is the RPC span's parent"
    );
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    for (key, want) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "leash.v1.Broker"),
        ("rpc.method", "BeginTask"),
        ("rpc.grpc.status_code", "0"),
    ] {
        assert_eq!(
            string_attr(&rpc.attributes, key).as_deref(),
            Some(want),
            "{key}"
        );
    }

    // The tree, by parent span ids: every child span descends from the RPC span.
    let by_id: HashMap<Vec<u8>, Span> = spans
        .iter()
        .map(|r| (r.span.span_id.clone(), r.span.clone()))
        .collect();
    for name in BEGIN_CHILDREN {
        let children: Vec<&Received> = spans.iter().filter(|r| r.span.name == *name).collect();
        assert!(!children.is_empty(), "no {name} span");
        for child in children {
            assert!(
                descends_from(&child.span, &rpc.span_id, &by_id),
                "{name} is not below the BeginTask span"
            );
            assert_ne!(child.span.span_id, rpc.span_id);
        }
    }
    // One mint per grant.
    assert_eq!(
        spans
            .iter()
            .filter(|r| r.span.name == "credentials.mint")
            .count(),
        2
    );

    // The audit trail names the trace.
    let mut admin = broker.admin("admin/ops").await;
    let story = admin
        .audit_trace(pb::AuditTraceRequest {
            id: task.id().to_owned(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!story.is_empty());
    for e in &story {
        assert_eq!(e.trace_id, sdk.trace_id(), "{}", e.event);
    }

    // A task with its own trace parent: its background renewal carries it.
    let own = TraceParent::parse(TASK_TRACE).unwrap();
    let renewing = client
        .begin_task(
            TaskRequest::new("review")
                .param("repo", "acme/gadgets")
                .intent("review pull request 43 (traced)")
                .traceparent(own),
        )
        .await
        .unwrap();
    let mut renewed = renewing.watch();
    // The review template's lease is 2 s: the SDK renews within about 1.3 s.
    tokio::time::timeout(Duration::from_secs(30), renewed.changed())
        .await
        .expect("the SDK did not renew")
        .unwrap();
    let renewal = eventually(Duration::from_secs(60), || {
        let spans = receiver.trace(&own.trace_id());
        async move {
            spans
                .iter()
                .any(|r| r.span.name == "leash.v1.Broker/RenewLease")
        }
    })
    .await;
    assert!(renewal.is_some(), "no RenewLease span in the task's trace");
    let own_spans = receiver.trace(&own.trace_id());
    let renew = own_spans
        .iter()
        .find(|r| r.span.name == "leash.v1.Broker/RenewLease")
        .unwrap();
    assert_eq!(hex(&renew.span.parent_span_id), own.parent_id());
    assert!(
        own_spans.iter().any(|r| r.span.name == "store.renew"
            && descends_from(
                &r.span,
                &renew.span.span_id,
                &own_spans
                    .iter()
                    .map(|r| (r.span.span_id.clone(), r.span.clone()))
                    .collect()
            )),
        "no store.renew below the RenewLease span"
    );
    let renewed_secrets: Vec<String> = renewing
        .credentials()
        .iter()
        .map(|c| c.secret().to_owned())
        .collect();

    // No span carries a credential value, or the signature part of a JWT.
    let everything = receiver.spans.lock().unwrap().clone();
    for r in &everything {
        let texts = r
            .span
            .attributes
            .iter()
            .map(|kv| value_text(&kv.value))
            .chain(std::iter::once(r.span.name.clone()));
        for text in texts {
            for secret in secrets.iter().chain(&renewed_secrets) {
                assert!(
                    !text.contains(secret.as_str()),
                    "a credential reached span {}",
                    r.span.name
                );
                if let Some((_, tail)) = secret.rsplit_once('.')
                    && tail.len() >= 20
                {
                    assert!(
                        !text.contains(tail),
                        "a signature reached span {}",
                        r.span.name
                    );
                }
            }
        }
    }
    // A refused call, with a traceparent set by hand: its status is recorded.
    const RAW_TRACE: &str = "00-11111111111111111111111111111111-2222222222222222-01";
    let mut raw = client.broker_client();
    let mut request = tonic::Request::new(pb::RenewLeaseRequest {
        task_id: "not-a-task-id".into(),
    });
    request
        .metadata_mut()
        .insert("traceparent", RAW_TRACE.parse().unwrap());
    let refused = raw.renew_lease(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let raw_trace = TraceParent::parse(RAW_TRACE).unwrap();
    let rpc_of = |trace: &TraceParent| {
        receiver
            .trace(&trace.trace_id())
            .into_iter()
            .find(|r| r.span.name == "leash.v1.Broker/RenewLease")
    };
    let seen = eventually(Duration::from_secs(60), || {
        let found = rpc_of(&raw_trace).is_some();
        async move { found }
    })
    .await;
    assert!(seen.is_some(), "no span for the refused call");
    let refused_span = rpc_of(&raw_trace).unwrap().span;
    assert_eq!(hex(&refused_span.parent_span_id), raw_trace.parent_id());
    assert_eq!(
        string_attr(&refused_span.attributes, "rpc.grpc.status_code").as_deref(),
        Some("3")
    );

    assert_eq!(leash_broker::telemetry::dropped_spans(), 0);

    drop(renewing);
    task.complete(leash_sdk::Outcome::Succeeded, "done")
        .await
        .unwrap();
    broker.stop().await;
}
