//! An OTLP trace receiver of the tests' own, over gRPC or HTTP, that decodes the collector
//! protocol's real protobuf and keeps every export (decoded and raw, to search for secrets), and
//! helpers to read the spans: the daemon's (`tracing.rs`) and Envoy's with the module in it
//! (`module_tracing.rs`) are checked against the same receiver.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::wait_until;

/// The decision span's name.
pub const DECISION: &str = "gybc_authz.decision";

// === the receiver ===

/// One export request as decoded, and its protobuf bytes.
pub type Export = (ExportTraceServiceRequest, Vec<u8>);

/// What the receiver was sent.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Export>>>);

impl Received {
    pub fn push(&self, bytes: Vec<u8>) -> Result<(), prost::DecodeError> {
        let request = ExportTraceServiceRequest::decode(bytes.as_slice())?;
        self.0.lock().unwrap().push((request, bytes));
        Ok(())
    }

    /// Every span received, with its resource's `service.name`.
    pub fn spans(&self) -> Vec<(String, Span)> {
        let mut out = Vec::new();
        for (request, _) in self.0.lock().unwrap().iter() {
            for rs in &request.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .map(|kv| value(kv).unwrap_or_default())
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    out.extend(ss.spans.iter().map(|s| (service.clone(), s.clone())));
                }
            }
        }
        out
    }

    pub fn decisions_in(&self, trace_id: &[u8]) -> Vec<Span> {
        self.spans()
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == DECISION && s.trace_id == trace_id)
            .collect()
    }

    /// Everything the collector was sent, decoded and raw, to search for secrets.
    pub fn everything(&self) -> (String, Vec<u8>) {
        let received = self.0.lock().unwrap();
        let text = received.iter().map(|(r, _)| format!("{r:?}")).collect();
        let bytes = received.iter().flat_map(|(_, b)| b.clone()).collect();
        (text, bytes)
    }
}

#[derive(Clone)]
struct GrpcCollector(Received);

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .push(request.into_inner().encode_to_vec())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(State(received): State<Received>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    match received.push(body.to_vec()) {
        Ok(()) => (
            [("content-type", "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response(),
        Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// An OTLP receiver on 127.0.0.1:0 that can be stopped while the daemon runs.
pub struct Receiver {
    pub addr: SocketAddr,
    pub received: Received,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn grpc() -> Self {
        let received = Received::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(GrpcCollector(received.clone()));
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        Self {
            addr,
            received,
            stop: Some(stop),
            task,
        }
    }

    pub async fn http() -> Self {
        let received = Received::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let app = axum::Router::new()
            .route("/v1/traces", post(http_export))
            .with_state(received.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            received,
            stop: Some(stop),
            task,
        }
    }

    /// Stops listening and drops every connection: the collector is gone.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.task).await;
        self.task.abort();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === helpers ===

pub fn tracing_yaml(protocol: &str, addr: SocketAddr, sample_ratio: f64) -> String {
    format!(
        "tracing_export: {{ otlp_endpoint: \"http://{addr}\", protocol: {protocol}, sample_ratio: {sample_ratio}, service_name: gybc-authz-test, batch_interval_ms: 50, export_timeout_ms: 1000 }}\n"
    )
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh W3C parent: random-enough ids from the clock and a counter.
pub fn parent(n: u8) -> ([u8; 16], [u8; 8]) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut trace = nanos.to_be_bytes();
    trace[0] = n;
    let mut span = [0xa5u8; 8];
    span[7] = n;
    (trace, span)
}

pub fn traceparent(trace: &[u8; 16], span: &[u8; 8], sampled: bool) -> String {
    format!(
        "00-{}-{}-{}",
        hex(trace),
        hex(span),
        if sampled { "01" } else { "00" }
    )
}

pub fn value(kv: &opentelemetry_proto::tonic::common::v1::KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

pub fn attributes(span: &Span) -> BTreeMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), value(kv)?)))
        .collect()
}

#[track_caller]
pub fn assert_attributes(span: &Span, expected: &[(&str, &str)]) {
    let attrs = attributes(span);
    for (k, v) in expected {
        assert_eq!(
            attrs.get(*k).map(String::as_str),
            Some(*v),
            "{k} on {}: {attrs:?}",
            span.name
        );
    }
}

pub fn children_of(received: &Received, span: &Span) -> Vec<Span> {
    received
        .spans()
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.trace_id == span.trace_id && s.parent_span_id == span.span_id)
        .collect()
}

pub async fn wait_for_decisions(received: &Received, traces: &[[u8; 16]]) {
    wait_until(
        "decision spans reach the receiver",
        Duration::from_secs(15),
        async || traces.iter().all(|t| !received.decisions_in(t).is_empty()),
    )
    .await;
}
