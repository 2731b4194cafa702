//! The composition root: builds stores, caches, key sets, the limiter and the services from a
//! validated config, binds both ports, latches readiness, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::{self, Readiness};
use crate::authn::{JwtVerifier, Provider};
use crate::authorize::Authorizer;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, KeyStoreConfig, RateLimitBackend};
use crate::grpc::AuthzService;
use crate::http_authz::{self, HttpAuthz};
use crate::jwks::{self, Jwks, JwksTiming};
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::ratelimit::{LocalLimiter, RateLimiter, RedisLimiter};
use crate::redis_conn::Redis;
use crate::response::Responder;
use crate::store::redis::spawn_event_listener;
use crate::store::{CachedStore, FileStore, KeyStore, NoStore, RedisStore};

/// How often the Redis connection-state gauge is refreshed.
const REDIS_HEALTH_EVERY: Duration = Duration::from_secs(2);

/// What `start` takes besides the config: seams that tests and dev mode replace.
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// Replaces `key_store` from the config (dev mode's in-memory keys, tests' failing stores).
    pub store: Option<Arc<dyn KeyStore>>,
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
    KeyFile(#[from] crate::store::KeyFileError),
    #[error("cannot build the HTTP client for key fetching: {0}")]
    HttpClient(String),
    #[error(transparent)]
    Redis(#[from] crate::redis_conn::RedisSetupError),
}

/// A started daemon. Dropping it does not stop it; call `shutdown`.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The HTTP authorization mode's address, when enabled.
    pub http_authz_addr: Option<SocketAddr>,
    pub ready: Arc<Readiness>,
    pub keys: Arc<CachedStore>,
    pub jwt: Arc<JwtVerifier>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
}

pub async fn start(cfg: Config, opts: Options) -> Result<Running, StartError> {
    let clock = opts.clock;

    let metrics = Arc::new(Metrics::new());
    let observer = Arc::new(Observer::new(metrics.clone(), &cfg.log));

    // Readiness gates: each resolves once its dependency has loaded.
    let mut gates: Vec<BoxFuture<'static, ()>> = Vec::new();
    let mut background = Vec::new();

    let needs_redis = opts.store.is_none() && cfg.key_store == KeyStoreConfig::Redis
        || cfg.rate_limit.backend == RateLimitBackend::Redis;
    let redis = match (&cfg.redis, needs_redis) {
        (Some(r), true) => {
            let redis = Redis::connect(r).await?;
            let probe = redis.clone();
            gates.push(Box::pin(async move {
                while !probe.ping().await {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }));
            // The connection-state gauge.
            let (probe, obs) = (redis.clone(), observer.clone());
            background.push(tokio::spawn(async move {
                loop {
                    obs.redis_health(probe.ping().await);
                    tokio::time::sleep(REDIS_HEALTH_EVERY).await;
                }
            }));
            Some(redis)
        }
        _ => None,
    };

    // Key store, and the cache in front of it. A file store drops the cache whenever it reloads;
    // the Redis store follows the key events channel.
    let mut file_store = None;
    let store: Arc<dyn KeyStore> = match (opts.store, &cfg.key_store) {
        (Some(s), _) => s,
        (
            None,
            KeyStoreConfig::File {
                path,
                reload_interval_ms,
            },
        ) => {
            let s = Arc::new(FileStore::open(path)?);
            background.push(s.spawn_watcher(Duration::from_millis(*reload_interval_ms)));
            tracing::info!(keys = s.len(), path = %path.display(), "Key file loaded.");
            file_store = Some(s.clone());
            s
        }
        (None, KeyStoreConfig::Redis) => Arc::new(RedisStore::new(
            redis.clone().expect("validated: redis section present"),
        )),
        (None, KeyStoreConfig::None) => {
            tracing::info!("No key store configured: API keys are refused.");
            Arc::new(NoStore)
        }
    };
    let keys = Arc::new(CachedStore::new(store, &cfg.key_cache).with_observer(observer.clone()));
    if let Some(s) = &file_store {
        let mut changes = s.subscribe();
        let keys = Arc::downgrade(&keys);
        background.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                match keys.upgrade() {
                    Some(k) => k.invalidate_all(),
                    None => return,
                }
            }
        }));
    }
    if let (Some(r), KeyStoreConfig::Redis) = (&redis, &cfg.key_store) {
        background.push(spawn_event_listener(r.clone(), Arc::downgrade(&keys)));
    }

    // Rate limits: this replica's own, or the fleet's in Redis with the local one standing in.
    let local = Arc::new(LocalLimiter::new(clock.clone(), cfg.rate_limit.max_keys));
    let limiter: Arc<dyn RateLimiter> = match (&redis, cfg.rate_limit.backend) {
        (Some(r), RateLimitBackend::Redis) => Arc::new(
            RedisLimiter::new(
                r.clone(),
                clock.clone(),
                cfg.rate_limit.failure_mode,
                local,
                cfg.rate_limit.max_keys,
            )
            .with_observer(observer.clone()),
        ),
        _ => local,
    };

    // Signing keys per provider, loading in the background.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.jwt.keys_fetch_timeout_ms))
        .user_agent(concat!("gybc-authz/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StartError::HttpClient(e.to_string()))?;
    let timing = JwksTiming::from(&cfg.jwt);
    let mut providers = Vec::new();
    for p in &cfg.jwt.providers {
        let set = Jwks::observed(
            &p.name,
            jwks::source_from_config(&p.keys, &client),
            timing,
            observer.clone(),
        );
        let mut loaded = set.loaded();
        gates.push(Box::pin(async move {
            let _ = loaded.wait_for(|l| *l).await;
        }));
        background.push(set.spawn_refresher());
        providers.push(Provider::new(&p.name, &p.project_id, &p.tenant_claim, set));
    }
    let jwt = Arc::new(
        JwtVerifier::new(
            providers,
            cfg.default_provider_name(),
            clock.clone(),
            cfg.jwt.leeway_secs,
            cfg.jwt.cache_max_entries,
        )
        .with_observer(observer.clone()),
    );

    let authorizer = Arc::new(Authorizer {
        jwt: jwt.clone(),
        keys: keys.clone(),
        limiter,
        clock,
        default_rate_limit: cfg.rate_limit.default,
        tenantless_paths: cfg.policy.tenantless_paths.clone(),
        observer: observer.clone(),
    });
    let responder = Arc::new(Responder::new(&cfg));
    let http_authz = cfg.server.http_authz.clone().map(|config| {
        Arc::new(HttpAuthz {
            authorizer: authorizer.clone(),
            responder: responder.clone(),
            limits: cfg.limits.clone(),
            observer: observer.clone(),
            config,
        })
    });
    let service = AuthzService {
        authorizer,
        responder,
        limits: cfg.limits.clone(),
        observer,
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
        let (ready, health) = (ready.clone(), health.clone());
        background.push(tokio::spawn(async move {
            futures_util::future::join_all(gates).await;
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
        let app = admin::router(ready.clone(), metrics.clone(), opts.dev_jwks.clone());
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
        keys,
        jwt,
        metrics,
        shutdown,
        servers,
        background,
        grace: Duration::from_secs(cfg.server.shutdown_grace_secs),
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
