//! `tracing_export`: decisions as OpenTelemetry spans, sent to an OTLP collector.

use serde::Deserialize;

/// `service.name` of the decision spans.
pub const DEFAULT_TRACE_SERVICE_NAME: &str = "gybc-authz";
/// Sampling of checks that arrive without a trace context: none, so only traces the caller
/// sampled get a decision span.
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.0;
/// Spans waiting for export; when full, new spans are dropped (and counted), never waited on.
pub const DEFAULT_TRACE_MAX_QUEUE_SPANS: usize = 2_048;
/// Spans sent in one export request.
pub const DEFAULT_TRACE_MAX_BATCH_SPANS: usize = 512;
/// A partial batch is sent after this long.
pub const DEFAULT_TRACE_BATCH_INTERVAL_MS: u64 = 5_000;
/// One export request (retries included) gives up after this long; its spans are dropped.
pub const DEFAULT_TRACE_EXPORT_TIMEOUT_MS: u64 = 10_000;
/// Upper bounds, so a typo cannot hold gigabytes of spans or stall export for an hour.
pub const MAX_TRACE_QUEUE_SPANS: usize = 1_000_000;
pub const MAX_TRACE_EXPORT_TIMEOUT_MS: u64 = 60_000;

/// Each decision as a span in the caller's trace: a child of the `traceparent` (or B3) context
/// the request carries, sampled as the caller sampled it, exported in batches off the request
/// path. An unreachable collector costs dropped spans (`gybc_authz_trace_spans_dropped_total`),
/// never a slower or failed decision. `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (or
/// `OTEL_EXPORTER_OTLP_HEADERS`) adds headers to export requests, e.g. a collector's API key,
/// and `OTEL_RESOURCE_ATTRIBUTES` adds resource attributes (pod name, namespace).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingExportConfig {
    /// The collector's OTLP endpoint: `http://otel-collector:4317` for `grpc`,
    /// `http://otel-collector:4318` for `http` (`/v1/traces` is added when the URL has no path).
    /// `https://` uses TLS with the public web roots. Required.
    pub otlp_endpoint: String,
    /// `grpc` (default) or `http` (OTLP/HTTP with protobuf bodies).
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Share of checks without a caller's trace context that start a trace of their own, 0 to 1.
    /// A caller's sampled flag is always followed, whatever this says. Default 0.
    #[serde(default = "default_trace_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the exported spans. Default `gybc-authz`.
    #[serde(default = "default_trace_service_name")]
    pub service_name: String,
    /// Spans held for export at most; past it new spans are dropped and counted. Default 2048.
    #[serde(default = "default_trace_max_queue_spans")]
    pub max_queue_spans: usize,
    /// Spans per export request, at most `max_queue_spans`. Default 512.
    #[serde(default = "default_trace_max_batch_spans")]
    pub max_batch_spans: usize,
    /// A batch that is not full is sent after this long, ms. Default 5000.
    #[serde(default = "default_trace_batch_interval_ms")]
    pub batch_interval_ms: u64,
    /// One export request, retries included, gives up after this long and its spans are dropped,
    /// ms. Default 10000, at most 60000.
    #[serde(default = "default_trace_export_timeout_ms")]
    pub export_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    Http,
}

fn default_trace_service_name() -> String {
    DEFAULT_TRACE_SERVICE_NAME.to_owned()
}
fn default_trace_sample_ratio() -> f64 {
    DEFAULT_TRACE_SAMPLE_RATIO
}
fn default_trace_max_queue_spans() -> usize {
    DEFAULT_TRACE_MAX_QUEUE_SPANS
}
fn default_trace_max_batch_spans() -> usize {
    DEFAULT_TRACE_MAX_BATCH_SPANS
}
fn default_trace_batch_interval_ms() -> u64 {
    DEFAULT_TRACE_BATCH_INTERVAL_MS
}
fn default_trace_export_timeout_ms() -> u64 {
    DEFAULT_TRACE_EXPORT_TIMEOUT_MS
}

impl TracingExportConfig {
    /// Every problem of the section, each against its field under `tracing_export.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let at = |f: &str| format!("tracing_export.{f}");
        if let Err(why) = check_otlp_endpoint(&self.otlp_endpoint, self.protocol) {
            err(at("otlp_endpoint"), why.into());
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            err(at("sample_ratio"), "must be between 0 and 1".into());
        }
        if self.service_name.trim().is_empty()
            || self.service_name.len() > 255
            || self.service_name.contains(char::is_control)
        {
            err(
                at("service_name"),
                "must be 1 to 255 characters without control characters".into(),
            );
        }
        if !(1..=MAX_TRACE_QUEUE_SPANS).contains(&self.max_queue_spans) {
            err(
                at("max_queue_spans"),
                format!("must be between 1 and {MAX_TRACE_QUEUE_SPANS}"),
            );
        }
        if self.max_batch_spans == 0 || self.max_batch_spans > self.max_queue_spans {
            err(
                at("max_batch_spans"),
                "must be between 1 and tracing_export.max_queue_spans".into(),
            );
        }
        if self.batch_interval_ms == 0 {
            err(at("batch_interval_ms"), "must be at least 1".into());
        }
        if !(1..=MAX_TRACE_EXPORT_TIMEOUT_MS).contains(&self.export_timeout_ms) {
            err(
                at("export_timeout_ms"),
                format!("must be between 1 and {MAX_TRACE_EXPORT_TIMEOUT_MS}"),
            );
        }
    }
}

/// An absolute http(s) URL of a host, without credentials (collector keys go in
/// `OTEL_EXPORTER_OTLP_HEADERS`, never in this file), query or fragment; gRPC takes no path.
fn check_otlp_endpoint(endpoint: &str, protocol: OtlpProtocol) -> Result<(), &'static str> {
    let url = reqwest::Url::parse(endpoint).map_err(|_| "must be an http(s) URL")?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err("must be an http(s) URL with a host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials: set OTEL_EXPORTER_OTLP_HEADERS instead");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment");
    }
    if protocol == OtlpProtocol::Grpc && url.path() != "/" {
        return Err("must have no path with protocol: grpc");
    }
    Ok(())
}
