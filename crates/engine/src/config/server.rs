//! `server`: the listen addresses, shutdown, and the HTTP authorization mode.

use std::net::SocketAddr;

use serde::Deserialize;

use super::headers::is_header_name;

/// Default gRPC (ext_authz) listen address: loopback, since Envoy runs in the same pod.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// Default HTTP listen address for `/healthz` and `/readyz`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8181";
/// How long in-flight checks get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl ServerConfig {
    /// Every problem of the section, each against its field under `server.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if let Some(h) = &self.http_authz {
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
            if h.addr.port() != 0 && (h.addr == self.grpc_addr || h.addr == self.http_addr) {
                err(
                    "server.http_authz.addr".into(),
                    "must differ from the other listen addresses".into(),
                );
            }
        }
    }
}
