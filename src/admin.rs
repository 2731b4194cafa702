//! The HTTP port: `/healthz` (the process serves), `/readyz` (keys and every provider's signing
//! keys have loaded, and no drain has begun), `/metrics` (Prometheus text), and in dev mode the
//! dev JWKS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use gybc_authz_engine::metrics::Metrics;

/// Readiness latch: set once everything has loaded, cleared for good when draining starts.
#[derive(Debug, Default)]
pub struct Readiness {
    loaded: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    ready: Arc<Readiness>,
    metrics: Arc<Metrics>,
    dev_jwks: Option<Arc<str>>,
}

pub fn router(ready: Arc<Readiness>, metrics: Arc<Metrics>, dev_jwks: Option<Arc<str>>) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler));
    if dev_jwks.is_some() {
        r = r.route("/dev/jwks.json", get(dev_jwks_handler));
    }
    r.with_state(AdminState {
        ready,
        metrics,
        dev_jwks,
    })
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn dev_jwks_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.dev_jwks.as_deref().unwrap_or("{}").to_owned(),
    )
}
