//! gybc-authz: Envoy's ext_authz service for the GYBC API platform.
//!
//! A Check flows through the modules in this order:
//! `grpc` (adapter) → `request` (read the CheckRequest) → `credentials` (which credential, the
//! rules that need no lookup) → `authorize` (authenticate through `authn` + `store`, apply
//! `policy`, count in `ratelimit`) → `decision` (allow or deny) → `response` (the wire answer) →
//! `observe` (the decision's log line). `app` wires it all together from `config`.
#![forbid(unsafe_code)]

pub mod config;

pub mod apikey;
pub mod authn;
pub mod authorize;
pub mod credentials;
pub mod decision;
pub mod grpc;
pub mod jwks;
pub mod observe;
pub mod policy;
pub mod ratelimit;
pub mod request;
pub mod response;
pub mod store;

pub mod admin;
pub mod app;
pub mod client;
pub mod clock;
pub mod dev;
pub mod telemetry;
