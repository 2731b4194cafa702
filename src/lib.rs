//! The gybc-authz daemon: the decision engine (`gybc_authz_engine`) served as a sidecar.
//!
//! `app` builds the engine from the config and opens its doors: `transport::grpc` (Envoy's
//! ext_authz Check) and `transport::http_authz` (the HTTP authorization mode), both thin
//! adapters that read their wire format into the engine's `RequestContext` and write its
//! `Answer` back; `admin` serves health, readiness and metrics. `cli` holds the commands that
//! are not `serve`, and `dev` the throwaway credentials of dev mode.
#![forbid(unsafe_code)]

pub mod app;
pub mod transport;
pub mod admin;
pub mod cli;
pub mod dev;
pub mod keyservice;
