use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use opentelemetry_sdk::error::OTelSdkError;

use super::*;
use crate::config::OtlpProtocol;
use crate::decision::{AuthMethod, Denial, Grant};
use crate::trace_context::TraceParent;

const TRACE: [u8; 16] = [0x4b; 16];
const PARENT: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

/// Keeps what it is sent; can refuse, or never answer.
#[derive(Debug, Clone, Default)]
struct Collect {
    spans: Arc<Mutex<Vec<SpanData>>>,
    refuse: Arc<AtomicBool>,
    stuck: bool,
}

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.stuck {
            std::future::pending::<()>().await;
        }
        if self.refuse.load(Ordering::SeqCst) {
            return Err(OTelSdkError::InternalFailure("collector down".into()));
        }
        self.spans.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Collect {
    fn spans(&self) -> Vec<SpanData> {
        self.spans.lock().unwrap().clone()
    }
}

fn cfg(sample_ratio: f64) -> TracingExportConfig {
    TracingExportConfig {
        otlp_endpoint: "http://127.0.0.1:4317".into(),
        protocol: OtlpProtocol::Grpc,
        sample_ratio,
        service_name: "gybc-authz-test".into(),
        max_queue_spans: 64,
        max_batch_spans: 8,
        batch_interval_ms: 10,
        export_timeout_ms: 1_000,
    }
}

fn tracing_with(cfg: &TracingExportConfig, exporter: Collect) -> (DecisionTracing, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (tracing, _task) = DecisionTracing::with_exporter(cfg, exporter, metrics.clone());
    (tracing, metrics)
}

fn request(sampled: Option<bool>) -> RequestContext {
    RequestContext {
        method: "POST".into(),
        request_id: Some("req-1".into()),
        trace: Some(TraceParent {
            trace_id: TRACE,
            span_id: PARENT,
            sampled,
            trace_state: Some("vendor=1".into()),
        }),
        ..Default::default()
    }
}

fn refused() -> Decision {
    Decision::Deny(Denial::because(Reason::InvalidApiKey, "unknown").by(
        AuthMethod::ApiKey,
        Some("t1"),
        Some("key_1"),
    ))
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn counter(metrics: &Metrics, series: &str) -> f64 {
    let text = metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

const QUEUE_FULL: &str = r#"gybc_authz_trace_spans_dropped_total{reason="queue_full"}"#;
const EXPORT_FAILED: &str = r#"gybc_authz_trace_spans_dropped_total{reason="export_failed"}"#;
const EXPORTED: &str = "gybc_authz_trace_spans_exported_total";

#[tokio::test]
async fn a_sampled_decision_is_a_child_of_the_callers_span_with_its_outcome() {
    let exporter = Collect::default();
    let (tracing, metrics) = tracing_with(&cfg(0.0), exporter.clone());
    let decision = tracing
        .decision(&request(Some(true)), async {
            let mut lookup = ChildSpan::start(KEY_STORE_LOOKUP_SPAN);
            lookup.set("gybc_authz.key_found", false);
            drop(lookup);
            ChildSpan::start("gybc_authz.not_slow").discard();
            refused()
        })
        .await;
    assert_eq!(decision, refused());
    // Outside a decision a child span has no parent to join.
    drop(ChildSpan::start(KEY_STORE_LOOKUP_SPAN));
    tracing.flush(Duration::from_secs(5)).await;

    let spans = exporter.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let decision = spans.iter().find(|s| s.name == DECISION_SPAN).unwrap();
    assert_eq!(decision.span_context.trace_id(), TraceId::from_bytes(TRACE));
    assert_eq!(decision.parent_span_id, SpanId::from_bytes(PARENT));
    assert!(decision.parent_span_is_remote);
    assert_eq!(decision.span_kind, SpanKind::Server);
    assert_eq!(decision.span_context.trace_state().header(), "vendor=1");
    assert_eq!(decision.status, Status::Unset, "a denial is not an error");
    for (key, value) in [
        ("gybc_authz.outcome", Value::from("deny")),
        ("gybc_authz.reason", "invalid_api_key".into()),
        ("gybc_authz.detail", "unknown".into()),
        ("gybc_authz.auth_method", "api_key".into()),
        ("gybc_authz.tenant_id", "t1".into()),
        ("gybc_authz.key_id", "key_1".into()),
        ("gybc_authz.request_id", "req-1".into()),
        ("http.request.method", "POST".into()),
        ("http.response.status_code", 401_i64.into()),
    ] {
        assert_eq!(attr(decision, key), Some(value), "{key}");
    }

    let lookup = spans
        .iter()
        .find(|s| s.name == KEY_STORE_LOOKUP_SPAN)
        .unwrap();
    assert_eq!(lookup.span_context.trace_id(), TraceId::from_bytes(TRACE));
    assert_eq!(lookup.parent_span_id, decision.span_context.span_id());
    assert!(!lookup.parent_span_is_remote);
    assert_eq!(attr(lookup, "gybc_authz.key_found"), Some(false.into()));
    assert!(lookup.start_time >= decision.start_time && lookup.end_time <= decision.end_time);
    assert_eq!(counter(&metrics, EXPORTED), 2.0);
}

#[tokio::test]
async fn the_callers_sampling_decision_is_followed_and_the_ratio_only_decides_roots() {
    let root = RequestContext::default();
    let cases = [
        // (ratio, request, exported)
        (1.0, request(Some(false)), false),
        (0.0, request(Some(true)), true),
        (0.0, root.clone(), false),
        (1.0, root, true),
        // A deferred decision (B3 without a flag) is made here, as for a root.
        (0.0, request(None), false),
        (1.0, request(None), true),
    ];
    for (i, (ratio, req, exported)) in cases.into_iter().enumerate() {
        let exporter = Collect::default();
        let (tracing, _) = tracing_with(&cfg(ratio), exporter.clone());
        tracing
            .decision(&req, async {
                drop(ChildSpan::start(JWKS_FETCH_SPAN));
                Decision::Allow(Grant {
                    identity: None,
                    rate: None,
                })
            })
            .await;
        tracing.flush(Duration::from_secs(5)).await;
        let spans = exporter.spans();
        assert_eq!(spans.len(), if exported { 2 } else { 0 }, "case {i}");
        if let (Some(span), None) = (spans.iter().find(|s| s.name == DECISION_SPAN), &req.trace) {
            assert_eq!(span.parent_span_id, SpanId::INVALID, "a root has no parent");
        }
    }
}

#[tokio::test]
async fn a_decision_that_could_not_be_made_is_an_error_span() {
    let exporter = Collect::default();
    let (tracing, _) = tracing_with(&cfg(0.0), exporter.clone());
    tracing
        .decision(&request(Some(true)), async {
            Decision::Deny(Denial::because(Reason::Unavailable, "key_store"))
        })
        .await;
    tracing.flush(Duration::from_secs(5)).await;
    assert_eq!(exporter.spans()[0].status, Status::error("key_store"));
}

#[tokio::test]
async fn a_full_queue_drops_spans_without_holding_up_decisions() {
    let stuck = Collect {
        stuck: true,
        ..Default::default()
    };
    let cfg = TracingExportConfig {
        max_queue_spans: 4,
        max_batch_spans: 1,
        ..cfg(0.0)
    };
    let (tracing, metrics) = tracing_with(&cfg, stuck);
    for _ in 0..20 {
        let decided = tokio::time::timeout(
            Duration::from_secs(1),
            tracing.decision(&request(Some(true)), async { refused() }),
        )
        .await;
        assert!(decided.is_ok(), "a decision waited on the exporter");
    }
    // At most the queue and the one batch being exported are held; the rest are counted.
    assert!(counter(&metrics, QUEUE_FULL) >= 15.0);
    assert_eq!(counter(&metrics, EXPORTED), 0.0);
}

#[tokio::test]
async fn spans_the_collector_refuses_are_counted_and_export_resumes() {
    let exporter = Collect::default();
    exporter.refuse.store(true, Ordering::SeqCst);
    let (tracing, metrics) = tracing_with(&cfg(0.0), exporter.clone());
    for _ in 0..3 {
        tracing
            .decision(&request(Some(true)), async { refused() })
            .await;
    }
    tracing.flush(Duration::from_secs(5)).await;
    assert_eq!(counter(&metrics, EXPORT_FAILED), 3.0);
    assert_eq!(counter(&metrics, QUEUE_FULL), 0.0);

    exporter.refuse.store(false, Ordering::SeqCst);
    tracing
        .decision(&request(Some(true)), async { refused() })
        .await;
    tracing.flush(Duration::from_secs(5)).await;
    assert_eq!(counter(&metrics, EXPORTED), 1.0);
    assert_eq!(exporter.spans().len(), 1);
}

#[test]
fn methods_outside_the_known_set_are_not_copied() {
    assert_eq!(known_method("get"), "GET");
    assert_eq!(known_method("PATCH"), "PATCH");
    assert_eq!(known_method("X-EVIL-METHOD"), "_OTHER");
}

#[test]
fn http_endpoints_get_the_traces_path_unless_they_name_one() {
    assert_eq!(
        http_traces_url("http://collector:4318"),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(
        http_traces_url("https://collector:4318/"),
        "https://collector:4318/v1/traces"
    );
    assert_eq!(
        http_traces_url("https://otlp.example/custom/traces"),
        "https://otlp.example/custom/traces"
    );
}

#[test]
fn the_attributes_any_recorder_writes_are_codes_and_ids_as_text_or_integers() {
    let rendered: Vec<(&str, String)> = decision_attributes(&request(Some(true)), &refused())
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    assert!(rendered.contains(&("http.response.status_code", "401".into())));
    assert!(rendered.contains(&("gybc_authz.key_id", "key_1".into())));
    assert_eq!(decision_error(&refused()), None, "a denial is not an error");
    let failed = Decision::Deny(Denial::because(Reason::Unavailable, "key_store"));
    assert_eq!(decision_error(&failed), Some("key_store"));
}
