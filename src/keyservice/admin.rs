//! The key service's admin port, apart from the API so the kubelet and Prometheus can reach it
//! while the API stays on loopback: `/healthz` (the process serves), `/readyz` (the key store
//! answers, and no drain has begun; unlike the daemon's latch it follows the store both ways, since
//! every request of this service needs it), `/metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::{READINESS_INTERVAL, Service};

/// Ready while the store answered the last check and no drain has begun.
#[derive(Debug, Default)]
pub struct Readiness {
    store_up: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.store_up.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

/// Asks the store every `READINESS_INTERVAL` whether it answers; logs each change once.
pub async fn follow_store(service: Arc<Service>, ready: Arc<Readiness>) {
    let mut interval = tokio::time::interval(READINESS_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        interval.tick().await;
        let up = service.store.reachable().await;
        ready.store_up.store(up, Ordering::SeqCst);
        service.metrics.store_up.set(i64::from(up));
        if last != Some(up) {
            if up {
                tracing::info!("Key store reachable: ready.");
            } else {
                tracing::error!("Key store unreachable: not ready.");
            }
            last = Some(up);
        }
    }
}

#[derive(Clone)]
struct AdminState {
    service: Arc<Service>,
    ready: Arc<Readiness>,
}

pub fn router(service: Arc<Service>, ready: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { service, ready })
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.service.metrics.render(),
    )
}
