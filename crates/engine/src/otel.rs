//! Decisions as OpenTelemetry spans: one span per decision, a child of the caller's trace
//! context (`RequestContext::trace`), and child spans for the slow parts (a key-store lookup on
//! a cache miss, a signing-key fetch, a Redis rate-limit call). Spans are handed to a bounded
//! queue and exported in batches by one background task, so a slow or unreachable collector
//! costs dropped spans (counted in `gybc_authz_trace_spans_dropped_total`), never a slower or
//! failed decision. Built only when `tracing_export` is configured; otherwise nothing here runs.
//!
//! Spans are made with the OpenTelemetry API directly rather than through `tracing` and
//! `tracing-opentelemetry`: that layer would live in the process-wide subscriber, which the Envoy
//! module does not own and which cannot serve two engines with different collectors (the tests
//! run several daemons in one process); and every `tracing` span would pay for it.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample as _, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::config::{OtlpProtocol, TracingExportConfig};
use crate::decision::{Decision, Reason};
use crate::metrics::Metrics;
use crate::request::RequestContext;

/// The decision span's name.
pub const DECISION_SPAN: &str = "gybc_authz.decision";
/// Child spans' names.
pub const KEY_STORE_LOOKUP_SPAN: &str = "gybc_authz.key_store.lookup";
pub const JWKS_FETCH_SPAN: &str = "gybc_authz.jwks.fetch";
pub const REDIS_RATE_LIMIT_SPAN: &str = "gybc_authz.rate_limit.redis";

/// Set once any engine in the process exports spans: until then a child span costs one atomic
/// load, not even a look at the current context.
static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
#[error("cannot set up trace export: {0}")]
pub struct TracingSetupError(String);

/// The engine's span maker and the handle of its export task.
pub struct DecisionTracing {
    tracer: SdkTracer,
    /// Decides for callers that deferred their sampling decision (B3 without a flag), on the
    /// trace id as roots are decided, so every hop that defers agrees.
    deferred: Sampler,
    flushes: mpsc::Sender<oneshot::Sender<()>>,
}

/// Put in the decision's context so child spans find the tracer wherever they are made.
#[derive(Clone)]
struct Traced(SdkTracer);

impl DecisionTracing {
    /// The OTLP exporter of `cfg` and its export task, spawned on the current tokio runtime.
    pub fn start(
        cfg: &TracingExportConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), TracingSetupError> {
        let exporter = otlp_exporter(cfg).map_err(|e| TracingSetupError(e.to_string()))?;
        Ok(Self::with_exporter(cfg, exporter, metrics))
    }

    /// Like `start`, with any exporter (tests use in-memory ones).
    pub fn with_exporter<E: SpanExporter + 'static>(
        cfg: &TracingExportConfig,
        mut exporter: E,
        metrics: Arc<Metrics>,
    ) -> (Self, JoinHandle<()>) {
        // `Resource::builder` also reads OTEL_RESOURCE_ATTRIBUTES (pod, namespace, ...).
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        exporter.set_resource(&resource);
        let (spans, queued) = mpsc::channel(cfg.max_queue_spans);
        let (flushes, flush_requests) = mpsc::channel(4);
        let overflowing = Arc::new(AtomicBool::new(false));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue {
                spans,
                metrics: metrics.clone(),
                overflowing: overflowing.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("gybc-authz")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        let worker = Exporter {
            exporter,
            metrics,
            overflowing,
            max_batch: cfg.max_batch_spans,
            timeout: Duration::from_millis(cfg.export_timeout_ms),
            failing: false,
        };
        let task = tokio::spawn(worker.run(
            queued,
            flush_requests,
            Duration::from_millis(cfg.batch_interval_ms),
        ));
        ENABLED.store(true, Ordering::Relaxed);
        let tracing = Self {
            tracer,
            deferred: Sampler::TraceIdRatioBased(cfg.sample_ratio),
            flushes,
        };
        (tracing, task)
    }

    /// Runs `decide` inside the request's decision span, if the request is sampled, and records
    /// the outcome on it.
    pub async fn decision(
        &self,
        req: &RequestContext,
        decide: impl Future<Output = Decision>,
    ) -> Decision {
        let Some(cx) = self.start_span(req) else {
            return decide.await;
        };
        let decision = decide.with_context(cx.clone()).await;
        let span = cx.span();
        span.set_attributes(
            decision_attributes(req, &decision)
                .into_iter()
                .map(|(key, value)| KeyValue::new(key, value)),
        );
        if let Some(why) = decision_error(&decision) {
            span.set_status(Status::error(why));
        }
        span.end();
        decision
    }

    /// The decision's span in a context for its children; `None` when it is not sampled: the
    /// caller said no, or, without a caller's decision, `sample_ratio` did.
    fn start_span(&self, req: &RequestContext) -> Option<Context> {
        let parent = match &req.trace {
            Some(p) => {
                let trace_id = TraceId::from_bytes(p.trace_id);
                if !p.sampled.unwrap_or_else(|| self.sample_deferred(trace_id)) {
                    return None;
                }
                let state = p
                    .trace_state
                    .as_deref()
                    .and_then(|s| TraceState::from_str(s).ok())
                    .unwrap_or_default();
                Context::new().with_remote_span_context(SpanContext::new(
                    trace_id,
                    SpanId::from_bytes(p.span_id),
                    TraceFlags::SAMPLED,
                    true,
                    state,
                ))
            }
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(DECISION_SPAN)
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        if !span.is_recording() {
            return None;
        }
        Some(
            parent
                .with_span(span)
                .with_value(Traced(self.tracer.clone())),
        )
    }

    fn sample_deferred(&self, trace_id: TraceId) -> bool {
        let r =
            self.deferred
                .should_sample(None, trace_id, DECISION_SPAN, &SpanKind::Server, &[], &[]);
        r.decision == SamplingDecision::RecordAndSample
    }

    /// Exports what is queued, waiting at most `within` (shutdown: the last seconds of spans
    /// would otherwise be lost).
    pub async fn flush(&self, within: Duration) {
        let (done, flushed) = oneshot::channel();
        let _ = tokio::time::timeout(within, async {
            if self.flushes.send(done).await.is_ok() {
                let _ = flushed.await;
            }
        })
        .await;
    }
}

/// One attribute value of a decision span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanValue {
    Text(String),
    Int(i64),
}

impl fmt::Display for SpanValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpanValue::Text(t) => f.write_str(t),
            SpanValue::Int(i) => write!(f, "{i}"),
        }
    }
}

impl From<&str> for SpanValue {
    fn from(text: &str) -> Self {
        SpanValue::Text(text.to_owned())
    }
}

impl From<SpanValue> for Value {
    fn from(v: SpanValue) -> Self {
        match v {
            SpanValue::Text(t) => Value::from(t),
            SpanValue::Int(i) => Value::from(i),
        }
    }
}

/// The attributes of a decision's span, wherever it is recorded (this module's exporter, or the
/// Envoy module's span in Envoy's trace): bounded codes and ids only, never a key, a token or a
/// hash.
pub fn decision_attributes(
    req: &RequestContext,
    decision: &Decision,
) -> Vec<(&'static str, SpanValue)> {
    let mut out = Vec::with_capacity(9);
    out.push(("gybc_authz.outcome", decision.outcome().into()));
    out.push(("http.request.method", known_method(&req.method).into()));
    if let Some(id) = &req.request_id {
        out.push(("gybc_authz.request_id", SpanValue::Text(id.clone())));
    }
    let (method, tenant, key_id) = match decision {
        Decision::Allow(g) => {
            out.push(("gybc_authz.reason", "ok".into()));
            g.identity.as_ref().map_or((None, None, None), |i| {
                (Some(i.method), i.tenant.as_deref(), i.key_id.as_deref())
            })
        }
        Decision::Deny(d) => {
            out.push(("gybc_authz.reason", d.reason.as_str().into()));
            out.push((
                "http.response.status_code",
                SpanValue::Int(i64::from(d.reason.http_status())),
            ));
            if let Some(detail) = d.detail {
                out.push(("gybc_authz.detail", detail.into()));
            }
            d.who.as_deref().map_or((None, None, None), |w| {
                (Some(w.method), w.tenant.as_deref(), w.key_id.as_deref())
            })
        }
    };
    if let Some(m) = method {
        out.push(("gybc_authz.auth_method", m.as_str().into()));
    }
    if let Some(t) = tenant {
        out.push(("gybc_authz.tenant_id", t.into()));
    }
    if let Some(k) = key_id {
        out.push(("gybc_authz.key_id", k.into()));
    }
    out
}

/// Why a decision's span is an error, if it is: a denial is an answer, not a failure; only a
/// decision that could not be made (503 `unavailable`) is.
pub fn decision_error(decision: &Decision) -> Option<&'static str> {
    match decision {
        Decision::Deny(d) if d.reason == Reason::Unavailable => {
            Some(d.detail.unwrap_or("unavailable"))
        }
        _ => None,
    }
}

/// OpenTelemetry's rule for `http.request.method`: a known method, or `_OTHER`, so a client
/// cannot put arbitrary text in the span.
fn known_method(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("_OTHER")
}

// === child spans ===

/// One slow part of a traced decision, as a child of its span. Outside a traced decision it is
/// inert and costs nothing. The span is written when this is dropped, so a part that turned out
/// not to be slow (a cache hit) can be `discard`ed.
#[must_use = "the span covers the time until it is dropped"]
pub struct ChildSpan(Option<Box<OpenChild>>);

struct OpenChild {
    tracer: SdkTracer,
    parent: Context,
    name: &'static str,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    error: Option<&'static str>,
}

impl ChildSpan {
    /// Starts timing `name` if the current task is inside a traced decision.
    pub fn start(name: &'static str) -> Self {
        Self::of_kind(name, SpanKind::Internal)
    }

    /// A call to another service (Redis): `SpanKind::Client`.
    pub fn client(name: &'static str) -> Self {
        Self::of_kind(name, SpanKind::Client)
    }

    fn of_kind(name: &'static str, kind: SpanKind) -> Self {
        if !ENABLED.load(Ordering::Relaxed) {
            return ChildSpan(None);
        }
        ChildSpan(Context::map_current(|cx| {
            let Traced(tracer) = cx.get::<Traced>()?;
            Some(Box::new(OpenChild {
                tracer: tracer.clone(),
                parent: cx.clone(),
                name,
                kind,
                start: SystemTime::now(),
                attributes: Vec::new(),
                error: None,
            }))
        }))
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(open) = &mut self.0 {
            open.attributes.push(KeyValue::new(key, value));
        }
    }

    /// Marks the part failed; `why` is a bounded code.
    pub fn fail(&mut self, why: &'static str) {
        if let Some(open) = &mut self.0 {
            open.error = Some(why);
        }
    }

    /// Nothing slow happened: no span.
    pub fn discard(mut self) {
        self.0 = None;
    }
}

impl Drop for ChildSpan {
    fn drop(&mut self) {
        let Some(open) = self.0.take() else {
            return;
        };
        let mut span = open
            .tracer
            .span_builder(open.name)
            .with_kind(open.kind)
            .with_start_time(open.start)
            .with_attributes(open.attributes)
            .start_with_context(&open.tracer, &open.parent);
        if let Some(why) = open.error {
            span.set_status(Status::error(why));
        }
        span.end();
    }
}

// === export ===

/// The OTLP exporter `cfg` names. The builders read `OTEL_EXPORTER_OTLP_*_HEADERS` for
/// collector credentials; what this file sets (endpoint, timeout) wins over the environment.
fn otlp_exporter(
    cfg: &TracingExportConfig,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    let timeout = Duration::from_millis(cfg.export_timeout_ms);
    match cfg.protocol {
        OtlpProtocol::Grpc => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.otlp_endpoint.clone())
                .with_timeout(timeout);
            if cfg.otlp_endpoint.starts_with("https://") {
                builder
                    .with_tls_config(ClientTlsConfig::new().with_enabled_roots())
                    .build()
            } else {
                builder.build()
            }
        }
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(http_traces_url(&cfg.otlp_endpoint))
            .with_timeout(timeout)
            .build(),
    }
}

/// OTLP/HTTP posts traces to `/v1/traces`; a bare collector address gets that path.
fn http_traces_url(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(mut url) if url.path() == "/" => {
            url.set_path("/v1/traces");
            url.to_string()
        }
        _ => endpoint.to_owned(),
    }
}

/// The span processor: ended spans go into the bounded queue, or are dropped and counted when it
/// is full. It never blocks the request that ended the span.
struct Queue {
    spans: mpsc::Sender<SpanData>,
    metrics: Arc<Metrics>,
    /// Set on the first drop, cleared by the next successful export: one log line per episode.
    overflowing: Arc<AtomicBool>,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("capacity", &self.spans.max_capacity())
            .finish()
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            self.metrics.trace_spans_dropped("queue_full", 1);
            if !self.overflowing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    capacity = self.spans.max_capacity(),
                    "Trace export queue full; decision spans are dropped until it drains."
                );
            }
        }
    }

    // Flushing waits on the export task, which only an async caller may do: `flush` above.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: batches from the queue, one export at a time, each bounded by the timeout.
struct Exporter<E> {
    exporter: E,
    metrics: Arc<Metrics>,
    overflowing: Arc<AtomicBool>,
    max_batch: usize,
    timeout: Duration,
    /// Whether the last export failed: one log line per outage, not per batch.
    failing: bool,
}

impl<E: SpanExporter> Exporter<E> {
    async fn run(
        mut self,
        mut queued: mpsc::Receiver<SpanData>,
        mut flush_requests: mpsc::Receiver<oneshot::Sender<()>>,
        interval: Duration,
    ) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                span = queued.recv() => match span {
                    Some(span) => {
                        batch.push(span);
                        if batch.len() >= self.max_batch {
                            self.export(&mut batch).await;
                        }
                    }
                    // The engine is gone: send what is left and stop.
                    None => {
                        self.export(&mut batch).await;
                        return;
                    }
                },
                Some(done) = flush_requests.recv() => {
                    while let Ok(span) = queued.try_recv() {
                        batch.push(span);
                        if batch.len() >= self.max_batch {
                            self.export(&mut batch).await;
                        }
                    }
                    self.export(&mut batch).await;
                    let _ = done.send(());
                }
                _ = tick.tick() => self.export(&mut batch).await,
            }
        }
    }

    async fn export(&mut self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(self.max_batch));
        let n = spans.len() as u64;
        match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => {
                self.metrics.trace_spans_exported(n);
                self.overflowing.store(false, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    tracing::info!("Trace export recovered.");
                }
            }
            Ok(Err(e)) => self.failed(n, &e),
            Err(_) => {
                let why = format!("timed out after {:?}", self.timeout);
                self.failed(n, &why)
            }
        }
    }

    /// A batch the collector did not take: counted, and logged when an outage starts.
    fn failed(&mut self, spans: u64, error: &dyn fmt::Display) {
        self.metrics.trace_spans_dropped("export_failed", spans);
        if !self.failing {
            self.failing = true;
            tracing::warn!(spans, error = %error, "Trace export failed; decision spans are dropped until the collector answers.");
        }
    }
}

#[cfg(test)]
mod tests;
