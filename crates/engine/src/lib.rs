//! The gybc-authz decision engine: who is calling, and may they. It knows no transport.
//!
//! A request flows through the modules in this order: a door (the daemon's gRPC or HTTP port, or
//! the Envoy module) reads its wire format into a `request::RequestContext` → `credentials`
//! (which credential, the rules that need no lookup) → `authorize` (authenticate through `authn`
//! and `store`, apply `policy`, count in `ratelimit`) → `decision` (allow or deny) → `answer` (the
//! answer as data: headers to set and remove, status, body) → `observe` (the decision's log line
//! and metrics; with `tracing_export`, `otel` also makes it a span in the caller's trace, read
//! by `trace_context`; `usage` counts a known key's decision for its hourly usage). The door
//! writes the answer back in its own format. `engine` builds it all from a validated `config`.
#![forbid(unsafe_code)]

// The request path, in order.
pub mod request;
pub mod trace_context;
pub mod route;
pub mod credentials;
pub mod authorize;
pub mod authn;
pub mod store;
pub mod redis_conn;
pub mod breaker;
pub mod policy;
pub mod ratelimit;
pub mod decision;
pub mod answer;
pub mod browser;
pub mod observe;
pub mod otel;
pub mod metrics;
pub mod usage;

// Around it.
pub mod engine;
pub mod config;
pub mod proto;
pub mod clock;
pub mod event;
pub mod telemetry;

pub use answer::Answer;
pub use engine::{Engine, EngineOptions, KeySource, StartError, Started};
