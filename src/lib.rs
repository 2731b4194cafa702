//! gybc-authz: Envoy's ext_authz service for the GYBC API platform.
//!
//! A Check flows through the modules in this order:
//! `grpc` (adapter) → `request` (read the CheckRequest) → `credentials` (which credential, the
//! rules that need no lookup) → `authorize` (authenticate through `authn` + `store`, apply
//! `policy`, count in `ratelimit`) → `decision` (allow or deny) → `response` (the wire answer) →
//! `observe` (the decision's log line). `app` wires it all together from `config`.
#![forbid(unsafe_code)]

// The request path, in order.
pub mod grpc;
pub mod http_authz;
pub mod request;
pub mod route;
pub mod credentials;
pub mod authorize;
pub mod apikey;
pub mod authn;
pub mod jwks;
pub mod store;
pub mod redis_conn;
pub mod policy;
pub mod ratelimit;
pub mod decision;
pub mod response;
pub mod observe;
pub mod metrics;

// Around it.
pub mod config;
pub mod proto;
pub mod app;
pub mod admin;
pub mod clock;
pub mod client;
pub mod keyadmin;
pub mod dev;
pub mod telemetry;
