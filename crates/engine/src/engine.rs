//! The engine as its doors see it: built once from a validated config, then asked per request
//! to `decide`, to turn the decision into an `answer`, and to `observe` it. Everything that
//! loads or refreshes in the background (key file, signing keys, Redis events) is started here
//! and owned by the caller.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::answer::{Answer, Answers};
use crate::authn::jwks::{self, Jwks, JwksTiming};
use crate::authn::{JwtVerifier, Provider};
use crate::authorize::Authorizer;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, KeyStoreConfig, LimitsConfig, RateLimitBackend};
use crate::decision::{Decision, Denial, Reason};
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::ratelimit::{LocalLimiter, RateLimiter, RedisLimiter};
use crate::redis_conn::{Redis, RedisSetupError};
use crate::request::RequestContext;
use crate::store::redis::spawn_event_listener;
use crate::store::{CachedStore, FileStore, KeyFileError, KeyStore, NoStore, RedisStore};

/// How often the Redis connection-state gauge is refreshed.
const REDIS_HEALTH_EVERY: Duration = Duration::from_secs(2);

/// Seams that tests and dev mode replace.
pub struct EngineOptions {
    pub clock: Arc<dyn Clock>,
    /// Replaces `key_store` from the config (dev mode's in-memory keys, tests' failing stores).
    pub store: Option<Arc<dyn KeyStore>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            store: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("cannot build the HTTP client for key fetching: {0}")]
    HttpClient(String),
    #[error(transparent)]
    Redis(#[from] RedisSetupError),
}

/// A started engine and the background tasks that keep it current. Aborting the tasks (or
/// dropping the runtime they run on) stops them.
pub struct Started {
    pub engine: Arc<Engine>,
    pub background: Vec<JoinHandle<()>>,
}

pub struct Engine {
    authorizer: Authorizer,
    answers: Answers,
    limits: LimitsConfig,
    observer: Arc<Observer>,
    /// Set once the key store and every provider's signing keys have loaded; never cleared.
    loaded: watch::Receiver<bool>,
    pub keys: Arc<CachedStore>,
    pub jwt: Arc<JwtVerifier>,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// Builds every part from the config and starts their background work on the current tokio
    /// runtime. Returns before the signing keys have loaded: until then every decision is 503.
    pub async fn start(cfg: &Config, opts: EngineOptions) -> Result<Started, StartError> {
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

        // Key store, and the cache in front of it. A file store drops the cache whenever it
        // reloads; the Redis store follows the key events channel.
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
        let keys =
            Arc::new(CachedStore::new(store, &cfg.key_cache).with_observer(observer.clone()));
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

        let (set_loaded, loaded) = watch::channel(false);
        background.push(tokio::spawn(async move {
            futures_util::future::join_all(gates).await;
            let _ = set_loaded.send(true);
            // Kept open so receivers never see the latch go away.
            set_loaded.closed().await;
        }));

        let engine = Arc::new(Engine {
            authorizer: Authorizer {
                jwt: jwt.clone(),
                keys: keys.clone(),
                limiter,
                clock,
                default_rate_limit: cfg.rate_limit.default,
                tenantless_paths: cfg.policy.tenantless_paths.clone(),
                observer: observer.clone(),
            },
            answers: Answers::new(cfg),
            limits: cfg.limits.clone(),
            observer,
            loaded,
            keys,
            jwt,
            metrics,
        });
        Ok(Started { engine, background })
    }

    /// How a door must bound what it reads from a request.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// True once the key store and every provider's signing keys have loaded.
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Resolves once `is_loaded` is true.
    pub async fn wait_loaded(&self) {
        let mut loaded = self.loaded.clone();
        let _ = loaded.wait_for(|l| *l).await;
    }

    /// Allow or deny. Until everything has loaded the answer is 503: an engine that cannot yet
    /// verify anything fails closed, never open.
    pub async fn decide(&self, req: &RequestContext) -> Decision {
        if !self.is_loaded() {
            return Decision::Deny(Denial::because(Reason::Unavailable, "not_ready"));
        }
        self.authorizer.decide(req).await
    }

    /// The decision as headers, status and body, for the door to write out.
    pub fn answer<'a>(&'a self, decision: &'a Decision) -> Answer<'a> {
        self.answers.answer(decision)
    }

    /// One decision made: its log line and metrics.
    pub fn observe(&self, req: &RequestContext, decision: &Decision, latency: Duration) {
        self.observer.decision(req, decision, latency);
    }

    /// The answer a door gives when deciding itself failed (a panic caught at the door): 503,
    /// counted.
    pub fn failed(&self) -> Decision {
        self.observer.panicked();
        Decision::Deny(Denial::because(Reason::Unavailable, "panic"))
    }
}
