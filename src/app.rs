//! The daemon's composition root: starts the engine from a validated config, opens its doors
//! (gRPC ext_authz, the HTTP authorization mode, the admin port), latches readiness, and drains
//! on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use gybc_authz_engine::authn::JwtVerifier;
use gybc_authz_engine::clock::{Clock, SystemClock};
use gybc_authz_engine::config::Config;
use gybc_authz_engine::metrics::Metrics;
use gybc_authz_engine::store::Keys;
use gybc_authz_engine::{Engine, EngineOptions, KeySource};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::{self, Readiness};
use crate::transport::grpc::AuthzService;
use crate::transport::http_authz::{self, HttpAuthz};

/// What `start` takes besides the config: seams that tests and dev mode replace.
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// Replaces `key_store` from the config (dev mode's in-memory keys, tests' failing stores).
    pub store: Option<KeySource>,
    /// Served at `/dev/jwks.json` (dev mode).
    pub dev_jwks: Option<Arc<str>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            store: None,
            dev_jwks: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] gybc_authz_engine::StartError),
}

/// A started daemon. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The HTTP authorization mode's address, when enabled.
    pub http_authz_addr: Option<SocketAddr>,
    pub ready: Arc<Readiness>,
    /// How keys are looked up (the store directly, or the cache in front of Redis).
    pub keys: Keys,
    pub jwt: Arc<JwtVerifier>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
    /// Kept for the last flush of decision spans on shutdown.
    engine: Arc<Engine>,
}

/// On shutdown, how long queued decision spans get to reach the collector, and unflushed usage
/// counts to reach Redis (each bound separately).
const FLUSH_WITHIN: Duration = Duration::from_secs(2);

pub async fn start(cfg: Config, opts: Options) -> Result<Running, StartError> {
    let started = Engine::start(
        &cfg,
        EngineOptions {
            clock: opts.clock,
            store: opts.store,
        },
    )
    .await?;
    let engine = started.engine;
    let mut background = started.background;
    let http_authz = cfg.server.http_authz.clone().map(|config| {
        Arc::new(HttpAuthz {
            engine: engine.clone(),
            config,
        })
    });
    let service = AuthzService {
        engine: engine.clone(),
    };

    let (shutdown, _) = watch::channel(false);
    let ready = Arc::new(Readiness::default());
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<AuthorizationServer<AuthzService>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;

    let grpc = TcpListener::bind(cfg.server.grpc_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.server.grpc_addr,
            source,
        })?;
    let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.server.grpc_addr,
        source,
    })?;
    let http = TcpListener::bind(cfg.server.http_addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.server.http_addr,
            source,
        })?;
    let http_addr = http.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.server.http_addr,
        source,
    })?;

    let http_authz = match http_authz {
        Some(svc) => {
            let addr = svc.config.addr;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?;
            Some((listener, bound, svc))
        }
        None => None,
    };
    let http_authz_addr = http_authz.as_ref().map(|(_, a, _)| *a);

    // Readiness: every provider's keys loaded (the file store loaded before we got here).
    {
        let (ready, health, engine) = (ready.clone(), health.clone(), engine.clone());
        background.push(tokio::spawn(async move {
            engine.wait_loaded().await;
            health
                .set_serving::<AuthorizationServer<AuthzService>>()
                .await;
            // Probes that name no service ask about the server as a whole.
            health.set_service_status("", ServingStatus::Serving).await;
            ready.set_loaded();
            tracing::info!("Ready.");
        }));
    }

    let mut servers = Vec::new();
    {
        let mut stop = shutdown.subscribe();
        let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
        servers.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(AuthorizationServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed.");
            }
        }));
    }
    if let Some((listener, _, svc)) = http_authz {
        let mut stop = shutdown.subscribe();
        servers.push(tokio::spawn(async move {
            let result = axum::serve(listener, http_authz::router(svc))
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "HTTP authorization server failed.");
            }
        }));
    }
    {
        let mut stop = shutdown.subscribe();
        let app = admin::router(ready.clone(), engine.metrics.clone(), opts.dev_jwks.clone());
        servers.push(tokio::spawn(async move {
            let result = axum::serve(http, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "HTTP server failed.");
            }
        }));
    }
    // Keep the health reporter alive for the drain below.
    let drain_health = health;
    {
        let mut stop = shutdown.subscribe();
        let ready = ready.clone();
        background.push(tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            ready.set_draining();
            drain_health
                .set_not_serving::<AuthorizationServer<AuthzService>>()
                .await;
            drain_health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        }));
    }
    tracing::info!(%grpc_addr, %http_addr, "Listening.");

    Ok(Running {
        grpc_addr,
        http_addr,
        http_authz_addr,
        ready,
        keys: engine.keys.clone(),
        jwt: engine.jwt.clone(),
        metrics: engine.metrics.clone(),
        shutdown,
        servers,
        background,
        grace: Duration::from_secs(cfg.server.shutdown_grace_secs),
        engine,
    })
}

impl Running {
    /// Stops accepting, lets in-flight checks finish (bounded by the grace period), stops tasks.
    pub async fn shutdown(self) {
        self.ready.set_draining();
        let _ = self.shutdown.send(true);
        let servers = futures_util::future::join_all(self.servers);
        if tokio::time::timeout(self.grace, servers).await.is_err() {
            tracing::warn!("Drain took longer than the grace period; stopping anyway.");
        }
        self.engine.flush_traces(FLUSH_WITHIN).await;
        self.engine.flush_usage(FLUSH_WITHIN).await;
        for task in self.background {
            task.abort();
        }
        tracing::info!("Stopped.");
    }

    /// Waits until every provider's keys have loaded.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ready.is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}
