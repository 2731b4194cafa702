//! The daemon's configuration: one YAML file plus `GYBC_AUTHZ__…` environment overrides, parsed
//! strictly and validated once at start, with every error reported against its field path.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::ratelimit::RateLimit;

/// Default gRPC (ext_authz) listen address: loopback, since Envoy runs in the same pod.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// Default HTTP listen address for `/healthz` and `/readyz`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8181";
/// How long in-flight checks get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// The one path where a JWT without a tenant is allowed: creating the user's first organisation.
pub const DEFAULT_TENANTLESS_PATH: &str = "/api/v1/orgs/create";
/// Google's published certificates for Firebase ID tokens (`kid` → X.509 PEM).
pub const GOOGLE_FIREBASE_KEYS_URL: &str =
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com";
/// Clock skew tolerated on `exp`, `iat`, `nbf` and `auth_time`.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Upper bound on the leeway: more would let long-expired tokens back in.
pub const MAX_LEEWAY_SECS: u64 = 300;
/// Distinct verified tokens remembered until their `exp`.
pub const DEFAULT_JWT_CACHE_ENTRIES: u64 = 100_000;
/// At most one key fetch per provider per interval when tokens name an unknown `kid`.
pub const DEFAULT_UNKNOWN_KID_REFETCH_MS: u64 = 30_000;
/// How long a Check waits for the fetch its unknown `kid` started: below Envoy's ext_authz timeout.
pub const DEFAULT_UNKNOWN_KID_WAIT_MS: u64 = 250;
/// Key refresh period when the key endpoint sends no `Cache-Control: max-age` (and for files).
pub const DEFAULT_KEYS_REFRESH_SECS: u64 = 300;
/// Lower bound on any key refresh period, whatever `max-age` says.
pub const DEFAULT_KEYS_MIN_REFRESH_SECS: u64 = 10;
/// Timeout of one key fetch.
pub const DEFAULT_KEYS_FETCH_TIMEOUT_MS: u64 = 5_000;
/// File key store: how often the file's metadata is checked for a change.
pub const DEFAULT_FILE_RELOAD_MS: u64 = 1_000;
/// Key cache bounds and lifetimes.
pub const DEFAULT_KEY_CACHE_ENTRIES: u64 = 100_000;
pub const DEFAULT_KEY_CACHE_TTL_SECS: u64 = 10;
pub const DEFAULT_KEY_CACHE_NEGATIVE_TTL_SECS: u64 = 5;
pub const DEFAULT_KEY_CACHE_MAX_STALE_SECS: u64 = 300;
/// Rate limit for keys whose metadata names none.
pub const DEFAULT_RATE_LIMIT: &str = "100/60s";
/// Keys whose rate-limit state is held in memory at once (least recently used are dropped).
pub const DEFAULT_RATE_LIMIT_MAX_KEYS: u64 = 100_000;
/// Size caps on credential headers: a larger value is rejected without being parsed.
pub const DEFAULT_MAX_AUTHORIZATION_BYTES: usize = 8_192;
pub const DEFAULT_MAX_API_KEY_BYTES: usize = 256;
/// Request headers read per check (pseudo-headers included). Envoy itself caps a request at 100
/// headers by default, so only a misconfigured or bypassed proxy comes near this; above it the
/// request is refused rather than half-read.
pub const DEFAULT_MAX_HEADERS: usize = 256;
/// The lowest `limits.max_headers` accepted: Envoy's pseudo-headers and its own `x-*` headers
/// plus the credential headers must fit.
pub const MIN_MAX_HEADERS: usize = 16;
/// `Retry-After` on 503 `unavailable`.
pub const DEFAULT_UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;
/// Realm in `WWW-Authenticate: Bearer realm="…"`.
pub const DEFAULT_REALM: &str = "gybc";
/// Environment variables with this prefix override config fields: `GYBC_AUTHZ__SERVER__GRPC_ADDR`.
pub const ENV_PREFIX: &str = "GYBC_AUTHZ__";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listen addresses and shutdown.
    pub server: ServerConfig,
    /// Firebase / Identity Platform token verification.
    pub jwt: JwtConfig,
    /// Where API key records come from.
    pub key_store: KeyStoreConfig,
    /// The shared Redis (key store, revocations, rate limits), when either uses it.
    pub redis: Option<RedisConfig>,
    /// In-process cache in front of the Redis key store (an in-memory store is not cached again).
    pub key_cache: KeyCacheConfig,
    /// Rate limiting of API-key traffic.
    pub rate_limit: RateLimitConfig,
    /// Tenant rules.
    pub policy: PolicyConfig,
    /// Names of the identity headers set upstream.
    pub headers: HeaderNames,
    /// What denials and allows carry back to the client.
    pub response: ResponseConfig,
    /// Caps on what a request may carry.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// OpenTelemetry spans of decisions, sent to an OTLP collector. Off unless set.
    pub tracing_export: Option<TracingExportConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// ext_authz gRPC (and gRPC health) listen address. Default `127.0.0.1:50051`.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address for `/healthz` and `/readyz`. Default `127.0.0.1:8181`.
    pub http_addr: SocketAddr,
    /// Seconds in-flight checks get to finish after SIGTERM. Default 10.
    pub shutdown_grace_secs: u64,
    /// The HTTP authorization mode (nginx `auth_request`, Traefik `ForwardAuth`, Caddy
    /// `forward_auth`, Envoy's `http_service`); off unless set.
    pub http_authz: Option<HttpAuthzConfig>,
}

/// The same decisions over plain HTTP: 2xx with the identity headers means allow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthzConfig {
    /// Listen address. Only the proxy may reach it: it trusts the proxy's forwarded headers.
    pub addr: SocketAddr,
    /// Where the original method and path come from. `forwarded` (default): the headers named
    /// by `method_header` and `uri_header`, which the proxy must set itself. `direct`: the
    /// request line itself (Envoy's `http_service`), after `path_prefix`.
    #[serde(default)]
    pub source: HttpAuthzSource,
    /// With `source: direct`, the prefix the proxy puts before the original path. Default none.
    #[serde(default)]
    pub path_prefix: String,
    /// With `source: forwarded`, the one header that carries the original method. Default
    /// `x-forwarded-method` (Traefik, Caddy; the shipped nginx config sets it too). Only this
    /// header is read: a proxy overwrites the header it sets, but passes a client's copy of any
    /// other one on, so trying a second name would let the client choose.
    #[serde(default = "default_method_header")]
    pub method_header: String,
    /// With `source: forwarded`, the one header that carries the original path and query.
    /// Default `x-forwarded-uri`. The path decides tenantless routes, so the proxy must set it.
    #[serde(default = "default_uri_header")]
    pub uri_header: String,
}

pub const DEFAULT_HTTP_AUTHZ_METHOD_HEADER: &str = "x-forwarded-method";
pub const DEFAULT_HTTP_AUTHZ_URI_HEADER: &str = "x-forwarded-uri";

fn default_method_header() -> String {
    DEFAULT_HTTP_AUTHZ_METHOD_HEADER.to_owned()
}

fn default_uri_header() -> String {
    DEFAULT_HTTP_AUTHZ_URI_HEADER.to_owned()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum HttpAuthzSource {
    #[default]
    Forwarded,
    Direct,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("valid default"),
            http_addr: DEFAULT_HTTP_ADDR.parse().expect("valid default"),
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            http_authz: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Token issuers. A plain `Authorization: Bearer` request is verified against the default
    /// provider; a publishable key names its own.
    pub providers: Vec<ProviderConfig>,
    /// Provider for plain bearer tokens. Default: the first provider.
    pub default_provider: Option<String>,
    /// Clock skew tolerated on token times, seconds. Default 30, at most 300.
    pub leeway_secs: u64,
    /// Verified tokens cached until their `exp`. Default 100000.
    pub cache_max_entries: u64,
    /// Minimum time between key fetches caused by unknown `kid`s, ms. Default 30000.
    pub unknown_kid_refetch_interval_ms: u64,
    /// How long a Check waits for the key fetch its unknown `kid` started, ms; the fetch itself
    /// goes on to completion. Keep it below Envoy's ext_authz timeout. Default 250.
    pub unknown_kid_wait_ms: u64,
    /// Refresh period when the endpoint sends no `max-age`, seconds. Default 300.
    pub keys_refresh_secs: u64,
    /// Floor on the refresh period, seconds. Default 10.
    pub keys_min_refresh_secs: u64,
    /// Timeout of one key fetch, ms. Default 5000.
    pub keys_fetch_timeout_ms: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            default_provider: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            cache_max_entries: DEFAULT_JWT_CACHE_ENTRIES,
            unknown_kid_refetch_interval_ms: DEFAULT_UNKNOWN_KID_REFETCH_MS,
            unknown_kid_wait_ms: DEFAULT_UNKNOWN_KID_WAIT_MS,
            keys_refresh_secs: DEFAULT_KEYS_REFRESH_SECS,
            keys_min_refresh_secs: DEFAULT_KEYS_MIN_REFRESH_SECS,
            keys_fetch_timeout_ms: DEFAULT_KEYS_FETCH_TIMEOUT_MS,
        }
    }
}

/// One Firebase project (or any issuer following Firebase's token rules).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name that publishable keys refer to (`jwt_provider`).
    pub name: String,
    /// Firebase project id: `iss` must be `https://securetoken.google.com/<project_id>`, `aud` must be it.
    pub project_id: String,
    /// Claim holding the tenant. Default `tenant_id`.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Where the signing keys come from. Default: Google's Firebase certificate endpoint.
    #[serde(default)]
    pub keys: KeySourceConfig,
}

fn default_tenant_claim() -> String {
    "tenant_id".to_owned()
}

/// A key endpoint (Google's `kid` → X.509 map or a JWK set) or a local file in the same formats.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum KeySourceConfig {
    Url {
        url: String,
    },
    File {
        path: PathBuf,
    },
    /// Keys given inline (dev mode); not meant for production files.
    Inline {
        json: String,
    },
}

impl Default for KeySourceConfig {
    fn default() -> Self {
        Self::Url {
            url: GOOGLE_FIREBASE_KEYS_URL.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum KeyStoreConfig {
    /// No key store: every API key is unknown. For JWT-only deployments.
    #[default]
    None,
    /// A YAML or JSON file of key records (hashes only), reloaded when it changes.
    File {
        path: PathBuf,
        /// How often the file is checked for a change, ms. Default 1000.
        #[serde(default = "default_file_reload_ms")]
        reload_interval_ms: u64,
    },
    /// Records in the shared Redis (section `redis`), written by the platform's key service;
    /// revocations arrive on its pub/sub channel. Layout: docs/key-store.md.
    Redis,
}

/// Default prefix of every Redis key and channel name.
pub const DEFAULT_REDIS_PREFIX: &str = "gybc";
/// Default per-command Redis timeout: a decision never waits longer on Redis.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 200;
pub const DEFAULT_REDIS_CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Connection to the shared Redis. Credentials never sit in this file: they come from a mounted
/// file or an environment variable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379` or `rediss://host:6380` (TLS); with `cluster: true`, one or more
    /// seed nodes. No password in the URL.
    pub urls: Vec<String>,
    /// Redis Cluster. Default false.
    #[serde(default)]
    pub cluster: bool,
    /// ACL user name, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose content is the password (a mounted Secret); trailing newline ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of the CA that signs the servers' certificates (`rediss://` with a private CA).
    /// Default: the public web roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every key and channel name. Default `gybc`.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Per-command timeout, ms. Default 200.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// Connect timeout, ms. Default 1000.
    #[serde(default = "default_redis_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// When to stop waiting on a Redis that keeps timing out or failing, and how it is tested
    /// again.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// The password, read from `password_file` or `password_env` while loading.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// Redis timeouts or errors in a row that open the circuit breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 3;
/// First wait before probing an open breaker's Redis, ms.
pub const DEFAULT_BREAKER_PROBE_INTERVAL_MS: u64 = 200;
/// Longest wait between probes, ms: below a second, so the fleet limit is back within a second
/// of Redis answering again.
pub const DEFAULT_BREAKER_MAX_PROBE_INTERVAL_MS: u64 = 500;
/// Upper bound on `redis.breaker.failures`: a breaker that waits for more is no breaker.
pub const MAX_BREAKER_FAILURES: u32 = 100;
/// Lower bound on the probe intervals, ms, so an open breaker cannot become a busy loop.
pub const MIN_BREAKER_PROBE_INTERVAL_MS: u64 = 10;

/// The circuit breaker on the Redis connection. After `failures` timeouts or errors in a row the
/// replica stops sending commands: the rate limiter answers by `rate_limit.failure_mode` at once
/// and an uncached key gets 503 `unavailable` at once, instead of each waiting `timeout_ms`.
/// Cached keys keep working. One PING per probe interval tests Redis; the first answer closes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Timeouts or errors in a row that open the breaker. Default 3, at most 100.
    pub failures: u32,
    /// Wait before the first probe, ms; doubled after each unanswered probe. Default 200, at
    /// least 10.
    pub probe_interval_ms: u64,
    /// Longest wait between probes, ms. Default 500, at least `probe_interval_ms`. Redis is
    /// noticed back within about this long, so keep it under 1000 for the fleet limit to be
    /// exact again within a second.
    pub max_probe_interval_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: DEFAULT_BREAKER_FAILURES,
            probe_interval_ms: DEFAULT_BREAKER_PROBE_INTERVAL_MS,
            max_probe_interval_ms: DEFAULT_BREAKER_MAX_PROBE_INTERVAL_MS,
        }
    }
}

fn default_redis_prefix() -> String {
    DEFAULT_REDIS_PREFIX.into()
}
fn default_redis_timeout_ms() -> u64 {
    DEFAULT_REDIS_TIMEOUT_MS
}
fn default_redis_connect_timeout_ms() -> u64 {
    DEFAULT_REDIS_CONNECT_TIMEOUT_MS
}

/// A credential that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn default_file_reload_ms() -> u64 {
    DEFAULT_FILE_RELOAD_MS
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyCacheConfig {
    /// Most key lookups (positive and negative) held. Default 100000.
    pub max_entries: u64,
    /// A found key is fresh this long; after it, it is served while a refresh runs. Default 10.
    pub ttl_secs: u64,
    /// An unknown key is remembered this long. Default 5.
    pub negative_ttl_secs: u64,
    /// A found key is never served older than this, even when the store is down. Default 300.
    pub max_stale_secs: u64,
}

impl Default for KeyCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_KEY_CACHE_ENTRIES,
            ttl_secs: DEFAULT_KEY_CACHE_TTL_SECS,
            negative_ttl_secs: DEFAULT_KEY_CACHE_NEGATIVE_TTL_SECS,
            max_stale_secs: DEFAULT_KEY_CACHE_MAX_STALE_SECS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Limit for keys whose metadata names none, `<requests>/<window>` (`100/60s`, `1000/1h`).
    pub default: RateLimit,
    /// Keys whose limiter state is held at once. Default 100000.
    pub max_keys: u64,
    /// Also send the IETF draft `RateLimit` and `RateLimit-Policy` fields. Default false.
    pub ietf_headers: bool,
    /// `local` (per replica, default) or `redis` (one limit across the fleet; section `redis`).
    pub backend: RateLimitBackend,
    /// With `backend: redis`, what happens while Redis cannot answer: `fail_open` (default) counts
    /// against this replica's local limiter; `fail_closed` answers 503 `unavailable`.
    pub failure_mode: FailureMode,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    #[default]
    FailOpen,
    FailClosed,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            default: DEFAULT_RATE_LIMIT.parse().expect("valid default"),
            max_keys: DEFAULT_RATE_LIMIT_MAX_KEYS,
            ietf_headers: false,
            backend: RateLimitBackend::Local,
            failure_mode: FailureMode::FailOpen,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Exact paths (no query) where a JWT without a tenant claim is allowed.
    /// Default `[/api/v1/orgs/create]`.
    pub tenantless_paths: Vec<String>,
    /// Forward `X-API-Key` upstream. Default false: services never see the secret.
    pub forward_api_key: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            tenantless_paths: vec![DEFAULT_TENANTLESS_PATH.to_owned()],
            forward_api_key: false,
        }
    }
}

/// Upstream identity header names (lower case). Each is stripped from the client's request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    pub tenant_id: String,
    pub user_id: String,
    pub auth_method: String,
    pub api_key_id: String,
    pub scopes: String,
    pub impersonated_by: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        Self {
            tenant_id: "x-tenant-id".into(),
            user_id: "x-user-id".into(),
            auth_method: "x-auth-method".into(),
            api_key_id: "x-api-key-id".into(),
            scopes: "x-scopes".into(),
            impersonated_by: "x-impersonated-by".into(),
        }
    }
}

impl HeaderNames {
    pub fn all(&self) -> [&str; 6] {
        [
            &self.tenant_id,
            &self.user_id,
            &self.auth_method,
            &self.api_key_id,
            &self.scopes,
            &self.impersonated_by,
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseConfig {
    /// Realm in `WWW-Authenticate`. Default `gybc`.
    pub realm: String,
    /// `Retry-After` seconds on 503 `unavailable`. Default 5.
    pub unavailable_retry_after_secs: u64,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            realm: DEFAULT_REALM.into(),
            unavailable_retry_after_secs: DEFAULT_UNAVAILABLE_RETRY_AFTER_SECS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest `Authorization` value parsed, bytes. Default 8192.
    pub max_authorization_bytes: usize,
    /// Largest `X-API-Key` value looked at, bytes. Default 256.
    pub max_api_key_bytes: usize,
    /// Most request headers read for one check, pseudo-headers and repeated lines included.
    /// Default 256, at least 16. A request with more is refused with 400 `malformed_credentials`
    /// without reading the rest, so a header flood costs a bounded amount of work and a
    /// credential can never hide past the cap.
    pub max_headers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_authorization_bytes: DEFAULT_MAX_AUTHORIZATION_BYTES,
            max_api_key_bytes: DEFAULT_MAX_API_KEY_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive (`info`, `gybc_authz=debug`). Default `info`.
    pub level: String,
    /// `json` (default) or `text`.
    pub format: LogFormat,
    /// Level of the per-decision line for allows. Default `debug` (off at `level: info`).
    pub allow_level: DecisionLevel,
    /// Level of the per-decision line for denials. Default `info`.
    pub deny_level: DecisionLevel,
    /// Most denial lines written per second for each reason. Default 100, at least 1. A flood
    /// of denials (a bot replaying a bad key) then cannot flood the log; the lines left out
    /// are counted in `gybc_authz_decision_log_suppressed_total` and reported as `suppressed`
    /// on the next line written for that reason. Allows are not limited.
    pub deny_lines_per_sec: u32,
}

/// Denial lines per second per reason.
pub const DEFAULT_DENY_LINES_PER_SEC: u32 = 100;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Json,
            allow_level: DecisionLevel::Debug,
            deny_level: DecisionLevel::Info,
            deny_lines_per_sec: DEFAULT_DENY_LINES_PER_SEC,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecisionLevel {
    Off,
    Debug,
    Info,
    Warn,
}

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
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
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

// === errors ===

/// One problem with the configuration, named by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration was refused: every problem found, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ErrorList),
}

#[derive(Debug)]
pub struct ErrorList(pub Vec<FieldError>);

impl fmt::Display for ErrorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} error(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub fn errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid(list) => &list.0,
            ConfigError::Read { .. } => &[],
        }
    }
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(ErrorList(vec![FieldError {
        path: path.into(),
        message: message.into(),
    }]))
}

// === environment ===

/// Where environment overrides come from. Tests pass a map instead of mutating the process.
pub trait Env {
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

// === loading ===

impl Config {
    /// Reads, overrides, parses and validates a config file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, env)
    }

    /// Parses YAML text (an empty text means all defaults), applies environment overrides, validates.
    pub fn from_yaml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut value: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| invalid("(file)", e.to_string()))?
        };
        if value.is_null() {
            value = Value::Mapping(Default::default());
        }
        apply_env(&mut value, env)?;
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(
                if path == "." { "(root)".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        config.validate()?;
        config.resolve_secrets(env)?;
        Ok(config)
    }

    /// Reads the Redis password from its file or environment variable.
    fn resolve_secrets(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        let Some(r) = self.redis.as_mut() else {
            return Ok(());
        };
        if let Some(path) = &r.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "redis.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            r.password = Some(Secret::new(text.trim_end_matches(['\n', '\r'])));
        } else if let Some(var) = &r.password_env {
            let value = env
                .vars()
                .into_iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    invalid(
                        "redis.password_env",
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
            r.password = Some(Secret::new(value));
        }
        Ok(())
    }

    /// Every semantic problem, each with its field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut err = |path: String, msg: String| errs.push(FieldError { path, message: msg });

        if let Some(h) = &self.server.http_authz {
            if !h.path_prefix.is_empty()
                && (!h.path_prefix.starts_with('/') || h.path_prefix.ends_with('/'))
            {
                err(
                    "server.http_authz.path_prefix".into(),
                    "must start with `/` and not end with one".into(),
                );
            }
            for (field, name) in [
                ("method_header", &h.method_header),
                ("uri_header", &h.uri_header),
            ] {
                if !is_header_name(name) {
                    err(
                        format!("server.http_authz.{field}"),
                        "must be a lower-case header name (a-z, 0-9, -, _)".into(),
                    );
                }
            }
            // Port 0 (any free port) is the one address that may repeat.
            if h.addr.port() != 0
                && (h.addr == self.server.grpc_addr || h.addr == self.server.http_addr)
            {
                err(
                    "server.http_authz.addr".into(),
                    "must differ from the other listen addresses".into(),
                );
            }
        }

        let mut names = HashSet::new();
        for (i, p) in self.jwt.providers.iter().enumerate() {
            let at = format!("jwt.providers[{i}]");
            if p.name.trim().is_empty() {
                err(format!("{at}.name"), "must not be empty".into());
            } else if !names.insert(p.name.as_str()) {
                err(
                    format!("{at}.name"),
                    format!("duplicate provider name `{}`", p.name),
                );
            }
            if p.project_id.trim().is_empty() || p.project_id.contains(char::is_whitespace) {
                err(
                    format!("{at}.project_id"),
                    "must be a non-empty Firebase project id".into(),
                );
            }
            if p.tenant_claim.trim().is_empty() {
                err(format!("{at}.tenant_claim"), "must not be empty".into());
            }
            match &p.keys {
                KeySourceConfig::Url { url } => {
                    if !(url.starts_with("https://") || url.starts_with("http://")) {
                        err(format!("{at}.keys.url"), "must be an http(s) URL".into());
                    }
                }
                KeySourceConfig::File { path } => {
                    if path.as_os_str().is_empty() {
                        err(format!("{at}.keys.path"), "must not be empty".into());
                    }
                }
                KeySourceConfig::Inline { json } => {
                    if json.trim().is_empty() {
                        err(format!("{at}.keys.json"), "must not be empty".into());
                    }
                }
            }
        }
        if let Some(d) = &self.jwt.default_provider
            && !names.contains(d.as_str())
        {
            err(
                "jwt.default_provider".into(),
                format!("no provider named `{d}`"),
            );
        }
        if self.jwt.leeway_secs > MAX_LEEWAY_SECS {
            err(
                "jwt.leeway_secs".into(),
                format!("must be at most {MAX_LEEWAY_SECS}"),
            );
        }
        if self.jwt.cache_max_entries == 0 {
            err("jwt.cache_max_entries".into(), "must be at least 1".into());
        }
        if self.jwt.keys_fetch_timeout_ms == 0 {
            err(
                "jwt.keys_fetch_timeout_ms".into(),
                "must be at least 1".into(),
            );
        }
        if self.jwt.keys_min_refresh_secs == 0 {
            err(
                "jwt.keys_min_refresh_secs".into(),
                "must be at least 1".into(),
            );
        }
        if self.jwt.keys_refresh_secs < self.jwt.keys_min_refresh_secs {
            err(
                "jwt.keys_refresh_secs".into(),
                "must be at least jwt.keys_min_refresh_secs".into(),
            );
        }

        if let KeyStoreConfig::File {
            path,
            reload_interval_ms,
        } = &self.key_store
        {
            if path.as_os_str().is_empty() {
                err("key_store.path".into(), "must not be empty".into());
            }
            if *reload_interval_ms == 0 {
                err(
                    "key_store.reload_interval_ms".into(),
                    "must be at least 1".into(),
                );
            }
        }

        let needs_redis = self.key_store == KeyStoreConfig::Redis
            || self.rate_limit.backend == RateLimitBackend::Redis;
        match &self.redis {
            None if needs_redis => err(
                "redis".into(),
                "required by key_store.type: redis or rate_limit.backend: redis".into(),
            ),
            None => {}
            Some(r) => {
                if r.urls.is_empty() {
                    err("redis.urls".into(), "needs at least one URL".into());
                }
                if r.urls.len() > 1 && !r.cluster {
                    err(
                        "redis.urls".into(),
                        "several URLs need `cluster: true`".into(),
                    );
                }
                for (i, u) in r.urls.iter().enumerate() {
                    let path = format!("redis.urls[{i}]");
                    let rest = u
                        .strip_prefix("redis://")
                        .or_else(|| u.strip_prefix("rediss://"));
                    match rest {
                        None => err(path, "must start with redis:// or rediss://".into()),
                        Some(rest) => {
                            let authority = rest.split('/').next().unwrap_or("");
                            if let Some((userinfo, _)) = authority.rsplit_once('@')
                                && userinfo.contains(':')
                            {
                                err(path, "must not contain a password: use redis.password_file or redis.password_env".into());
                            }
                        }
                    }
                }
                if r.tls_ca_file.is_some() && !r.urls.iter().all(|u| u.starts_with("rediss://")) {
                    err(
                        "redis.tls_ca_file".into(),
                        "is for rediss:// URLs only".into(),
                    );
                }
                if r.password_file.is_some() && r.password_env.is_some() {
                    err(
                        "redis.password_env".into(),
                        "set either password_file or password_env, not both".into(),
                    );
                }
                if r.key_prefix.is_empty() || r.key_prefix.contains(char::is_whitespace) {
                    err(
                        "redis.key_prefix".into(),
                        "must be non-empty without spaces".into(),
                    );
                }
                if r.timeout_ms == 0 {
                    err("redis.timeout_ms".into(), "must be at least 1".into());
                }
                if r.connect_timeout_ms == 0 {
                    err(
                        "redis.connect_timeout_ms".into(),
                        "must be at least 1".into(),
                    );
                }
                let b = &r.breaker;
                if !(1..=MAX_BREAKER_FAILURES).contains(&b.failures) {
                    err(
                        "redis.breaker.failures".into(),
                        format!("must be between 1 and {MAX_BREAKER_FAILURES}"),
                    );
                }
                if b.probe_interval_ms < MIN_BREAKER_PROBE_INTERVAL_MS {
                    err(
                        "redis.breaker.probe_interval_ms".into(),
                        format!("must be at least {MIN_BREAKER_PROBE_INTERVAL_MS}"),
                    );
                }
                if b.max_probe_interval_ms < b.probe_interval_ms {
                    err(
                        "redis.breaker.max_probe_interval_ms".into(),
                        "must be at least redis.breaker.probe_interval_ms".into(),
                    );
                }
            }
        }

        let c = &self.key_cache;
        if c.max_entries == 0 {
            err("key_cache.max_entries".into(), "must be at least 1".into());
        }
        if c.ttl_secs == 0 {
            err("key_cache.ttl_secs".into(), "must be at least 1".into());
        }
        if c.negative_ttl_secs == 0 {
            err(
                "key_cache.negative_ttl_secs".into(),
                "must be at least 1".into(),
            );
        }
        if c.max_stale_secs < c.ttl_secs {
            err(
                "key_cache.max_stale_secs".into(),
                "must be at least key_cache.ttl_secs".into(),
            );
        }
        if self.rate_limit.max_keys == 0 {
            err("rate_limit.max_keys".into(), "must be at least 1".into());
        }

        for (i, p) in self.policy.tenantless_paths.iter().enumerate() {
            if let Err(why) = check_normal_path(p) {
                err(format!("policy.tenantless_paths[{i}]"), why.into());
            }
        }

        let mut seen = HashSet::new();
        let reserved = [
            "authorization",
            "x-api-key",
            "x-on-behalf-of",
            "host",
            "origin",
        ];
        for (field, name) in [
            ("tenant_id", &self.headers.tenant_id),
            ("user_id", &self.headers.user_id),
            ("auth_method", &self.headers.auth_method),
            ("api_key_id", &self.headers.api_key_id),
            ("scopes", &self.headers.scopes),
            ("impersonated_by", &self.headers.impersonated_by),
        ] {
            let path = format!("headers.{field}");
            if !is_header_name(name) {
                err(
                    path,
                    "must be a lower-case header name (a-z, 0-9, -, _)".into(),
                );
            } else if reserved.contains(&name.as_str()) {
                err(
                    path,
                    format!("`{name}` is a request header the daemon reads"),
                );
            } else if !seen.insert(name.as_str()) {
                err(path, format!("`{name}` is used for two identity headers"));
            }
        }

        if self.response.realm.contains('"') || self.response.realm.contains(char::is_control) {
            err(
                "response.realm".into(),
                "must not contain quotes or control characters".into(),
            );
        }
        if self.limits.max_authorization_bytes < 64 {
            err(
                "limits.max_authorization_bytes".into(),
                "must be at least 64".into(),
            );
        }
        if self.limits.max_api_key_bytes < 16 {
            err(
                "limits.max_api_key_bytes".into(),
                "must be at least 16".into(),
            );
        }
        if self.limits.max_headers < MIN_MAX_HEADERS {
            err(
                "limits.max_headers".into(),
                format!("must be at least {MIN_MAX_HEADERS}"),
            );
        }
        if let Some(t) = &self.tracing_export {
            t.validate(&mut err);
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            err(
                "log.level".into(),
                format!("`{}` is not a valid filter", self.log.level),
            );
        }
        if self.log.deny_lines_per_sec == 0 {
            err(
                "log.deny_lines_per_sec".into(),
                "must be at least 1 (to log no denials, set log.deny_level: off)".into(),
            );
        }

        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(ErrorList(errs)))
        }
    }

    /// The provider plain bearer tokens are verified against.
    pub fn default_provider_name(&self) -> Option<&str> {
        self.jwt
            .default_provider
            .as_deref()
            .or_else(|| self.jwt.providers.first().map(|p| p.name.as_str()))
    }
}

/// A tenantless path must be in normal form; then an exact match also proves the request's path
/// is normal (no dot segments, doubled or encoded slashes can sneak past the comparison).
/// A lower-case HTTP header name, as both transports compare them.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_normal_path(p: &str) -> Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("must start with `/`");
    }
    if p.contains(['?', '#', '%', '\\']) || p.contains(char::is_whitespace) {
        return Err("must be a plain path (no query, fragment, percent-encoding or backslash)");
    }
    if p.len() > 1
        && p[1..]
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("must be in normal form (no empty, `.` or `..` segments)");
    }
    Ok(())
}

/// `GYBC_AUTHZ__SERVER__GRPC_ADDR=…` sets `server.grpc_addr`. Values are read as YAML scalars
/// (or flow collections, `[a, b]`), so numbers and booleans keep their types.
fn apply_env(root: &mut Value, env: &dyn Env) -> Result<(), ConfigError> {
    let mut vars: Vec<_> = env
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (key, raw) in vars {
        let segments: Vec<String> = key[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(invalid(key, "malformed override name"));
        }
        let parsed: Value = serde_yaml_ng::from_str(&raw).unwrap_or(Value::String(raw.clone()));
        let mut node = &mut *root;
        for seg in &segments[..segments.len() - 1] {
            let map = match node {
                Value::Mapping(m) => m,
                _ => {
                    return Err(invalid(
                        key.clone(),
                        "overrides a field that is not a section",
                    ));
                }
            };
            node = map
                .entry(Value::String(seg.clone()))
                .or_insert_with(|| Value::Mapping(Default::default()));
            if node.is_null() {
                *node = Value::Mapping(Default::default());
            }
        }
        match node {
            Value::Mapping(m) => {
                m.insert(
                    Value::String(segments.last().cloned().unwrap_or_default()),
                    parsed,
                );
            }
            _ => return Err(invalid(key, "overrides a field that is not a section")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
