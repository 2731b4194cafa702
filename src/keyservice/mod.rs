//! `gybc-authz key-service`: the tenants' API for their own keys, `POST
//! /api/v1/iam/api-keys/<method>` with protojson bodies (`proto`), served behind Envoy with
//! gybc-authz in front. It authenticates nobody: `caller` reads the identity headers gybc-authz
//! set and decides who may manage keys; `validate` checks each request before anything is
//! written; `http` is the door and its method table; every change goes through the engine's
//! `store::admin`, the same code as the `keys` CLI; `audit` writes one line per change. Its own
//! port (`admin`) answers the kubelet's probes and Prometheus (`metrics`), apart from the API.

pub mod admin;
pub mod audit;
pub mod caller;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gybc_authz_engine::clock::SystemClock;
use gybc_authz_engine::config::{
    DEFAULT_KEY_SERVICE_MAX_TRACKED_CALLERS, HeaderNames, KeyServiceConfig,
};
use gybc_authz_engine::ratelimit::LocalLimiter;
use gybc_authz_engine::store::admin::AdminStore;

use self::admin::Readiness;
use self::caller::Caller;
use self::http::ApiError;

/// What the service needs, built once by the command (or a test, or dev mode).
pub struct Service {
    pub store: AdminStore,
    pub policy: validate::Policy,
    /// The identity headers' names, as gybc-authz in front of it sets them.
    pub headers: HeaderNames,
    /// The `key_service` section, with the command's flags applied.
    pub config: KeyServiceConfig,
    pub metrics: metrics::Metrics,
    /// Each caller's calls, per replica (`key_service.caller_rate_limit`).
    limiter: LocalLimiter,
}

impl Service {
    pub fn new(
        store: AdminStore,
        config: KeyServiceConfig,
        headers: HeaderNames,
        jwt_providers: Vec<String>,
    ) -> Self {
        Self {
            store,
            policy: validate::Policy {
                allowed_scopes: config.allowed_scopes.clone(),
                jwt_providers,
            },
            headers,
            config,
            metrics: metrics::Metrics::new(&http::Method::ALL.map(http::Method::name)),
            limiter: LocalLimiter::new(
                Arc::new(SystemClock),
                DEFAULT_KEY_SERVICE_MAX_TRACKED_CALLERS,
            ),
        }
    }

    /// Counts one call of `caller` against `key_service.caller_rate_limit`: the engine's GCRA,
    /// per replica, keyed by tenant and caller (never stored or shown).
    fn rate_limit(&self, caller: &Caller) -> Result<(), ApiError> {
        let who = format!("{}\n{}", caller.tenant(), caller.actor());
        let status = self.limiter.check_now(&who, self.config.caller_rate_limit);
        match status.retry_after {
            Some(secs) if !status.allowed => Err(ApiError::RateLimited(secs)),
            _ => Ok(()),
        }
    }
}

/// A running key service: its addresses, and a handle that stops it.
pub struct Running {
    /// The API.
    pub addr: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    pub ready: Arc<Readiness>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Not ready at once; stops accepting; finishes the requests in flight.
    pub async fn shutdown(self) {
        self.ready.set_draining();
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.watch.abort();
    }
}

/// How often readiness asks the store whether it answers.
pub const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// Binds `key_service.listen_addr` (the API) and `key_service.admin_addr` (probes and metrics),
/// and serves both until `shutdown`.
pub async fn start(service: Service) -> std::io::Result<Running> {
    let api = tokio::net::TcpListener::bind(service.config.listen_addr).await?;
    let admin_listener = tokio::net::TcpListener::bind(service.config.admin_addr).await?;
    let (addr, admin_addr) = (api.local_addr()?, admin_listener.local_addr()?);
    let service = Arc::new(service);
    let ready = Arc::new(Readiness::default());
    let watch = tokio::spawn(admin::follow_store(service.clone(), ready.clone()));
    let (tx, _) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (listener, app, what) in [
        (api, http::router(service.clone()), "API"),
        (
            admin_listener,
            admin::router(service.clone(), ready.clone()),
            "admin",
        ),
    ] {
        let mut stop = tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, port = what, "Key service listener failed.");
            }
        }));
    }
    Ok(Running {
        addr,
        admin_addr,
        ready,
        shutdown: tx,
        tasks,
        watch,
    })
}
