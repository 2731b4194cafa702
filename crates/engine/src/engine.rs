//! The engine as its doors see it: built once from a validated config, then asked per request
//! to `decide`, to turn the decision into an `answer`, and to `observe` it. Everything that
//! loads or refreshes in the background (key file, signing keys, Redis events) is started here
//! and owned by the caller.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::answer::{Answer, Answers};
use crate::authn::jwks::{self, Jwks, JwksTiming};
use crate::authn::{JwtVerifier, Provider};
use crate::authorize::Authorizer;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, KeySourceConfig, KeyStoreConfig, LimitsConfig, RateLimitBackend};
use crate::decision::{Decision, Denial, Reason};
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::otel::{DecisionTracing, TracingSetupError};
use crate::ratelimit::{LocalLimiter, RateLimiter, RedisLimiter};
use crate::redis_conn::{Redis, RedisSetupError};
use crate::request::RequestContext;
use crate::store::redis::spawn_event_listener;
use crate::store::{CachedStore, FileStore, KeyFileError, KeyStore, Keys, RedisStore};
use crate::usage::Usage;

/// How often the Redis connection-state gauge is refreshed.
const REDIS_HEALTH_EVERY: Duration = Duration::from_secs(2);

/// Seams that tests and dev mode replace.
pub struct EngineOptions {
    pub clock: Arc<dyn Clock>,
    /// Replaces `key_store` from the config (dev mode's in-memory keys, tests' failing stores).
    pub store: Option<KeySource>,
}

/// A key store given to the engine instead of the configured one.
pub enum KeySource {
    /// Keys held in memory (dev mode): looked up directly, like a key file's.
    Memory(Arc<FileStore>),
    /// A remote store (tests' stand-ins for Redis): behind the key cache, like Redis.
    Remote(Arc<dyn KeyStore>),
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
    #[error(transparent)]
    Tracing(#[from] TracingSetupError),
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
    /// Decision spans, when `tracing_export` is configured.
    traces: Option<DecisionTracing>,
    /// Set once the key store and every provider's signing keys have loaded; never cleared.
    loaded: watch::Receiver<bool>,
    /// What has not loaded yet, by name, for a door that must say why it is not ready.
    loading: Arc<Mutex<Vec<String>>>,
    pub keys: Keys,
    pub jwt: Arc<JwtVerifier>,
    pub metrics: Arc<Metrics>,
    /// Each known key's decisions per hour; `None` when `usage.enabled` is false.
    usage: Option<Arc<Usage>>,
}

impl Engine {
    /// Builds every part from the config and starts their background work on the current tokio
    /// runtime. Returns before the signing keys have loaded: until then every decision is 503.
    pub async fn start(cfg: &Config, opts: EngineOptions) -> Result<Started, StartError> {
        Self::start_with_limiter(cfg, opts, None).await
    }

    /// `start` with the local limiter given (`None`: a new one), so the limits' state outlives
    /// this engine: the Envoy module gives every engine of its process the same one, and a config
    /// change never hands a key a fresh quota.
    pub async fn start_with_limiter(
        cfg: &Config,
        opts: EngineOptions,
        local: Option<Arc<LocalLimiter>>,
    ) -> Result<Started, StartError> {
        let clock = opts.clock;
        let metrics = Arc::new(Metrics::new());
        let observer = Arc::new(Observer::new(metrics.clone(), &cfg.log).with_clock(clock.clone()));

        // Readiness gates, by name: each resolves once its dependency has loaded.
        let mut gates: Vec<(String, BoxFuture<'static, ()>)> = Vec::new();
        let mut background = Vec::new();

        let needs_redis = opts.store.is_none() && cfg.key_store == KeyStoreConfig::Redis
            || cfg.rate_limit.backend == RateLimitBackend::Redis;
        let redis = match (&cfg.redis, needs_redis) {
            (Some(r), true) => {
                let redis = Redis::connect_observed(r, observer.clone()).await?;
                let probe = redis.clone();
                let gate = async move {
                    while !probe.check().await {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                };
                gates.push(("Redis".into(), Box::pin(gate)));
                // The connection-state gauge (and, for a cluster, its layout: a failover seen).
                let (probe, obs) = (redis.clone(), observer.clone());
                background.push(tokio::spawn(async move {
                    loop {
                        obs.redis_health(probe.check().await);
                        tokio::time::sleep(REDIS_HEALTH_EVERY).await;
                    }
                }));
                Some(redis)
            }
            _ => None,
        };

        // Usage per key: into Redis when this engine has it, else this replica's memory.
        let to_redis = redis.clone().zip(cfg.redis.as_ref());
        let usage = Usage::start(
            &cfg.usage,
            to_redis.map(|(r, c)| (r, c.key_prefix.clone(), c.cluster)),
            clock.clone(),
            observer.clone(),
        )
        .map(|(usage, flush)| {
            background.push(flush);
            usage
        });

        // Key store: an in-memory one is asked directly; a remote one (Redis) has the cache in
        // front, which follows the key events channel.
        let cached = |store: Arc<dyn KeyStore>| {
            observer.metrics.register_key_cache();
            Keys::Cached(Arc::new(
                CachedStore::new(store, &cfg.key_cache).with_observer(observer.clone()),
            ))
        };
        let keys = match (opts.store, &cfg.key_store) {
            (Some(KeySource::Memory(s)), _) => Keys::Memory(s),
            (Some(KeySource::Remote(s)), _) => cached(s),
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
                Keys::Memory(s)
            }
            (None, KeyStoreConfig::Redis) => cached(Arc::new(RedisStore::new(
                redis.clone().expect("validated: redis section present"),
            ))),
            (None, KeyStoreConfig::None) => {
                tracing::info!("No key store configured: API keys are refused.");
                Keys::None
            }
        };
        observer.metrics.register_key_store(keys.kind());
        if let (Some(r), KeyStoreConfig::Redis, Keys::Cached(cache)) =
            (&redis, &cfg.key_store, &keys)
        {
            background.push(spawn_event_listener(r.clone(), Arc::downgrade(cache)));
        }

        // Rate limits: this replica's own, or the fleet's in Redis with the local one standing in.
        let local = local
            .unwrap_or_else(|| Arc::new(LocalLimiter::new(clock.clone(), cfg.rate_limit.max_keys)));
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

        // Signing keys per provider, loading in the background. The HTTPS client loads the
        // system's CA store (half a megabyte of every pod's memory), so it is built only when a
        // provider fetches its keys over HTTP(S): file and inline keys need none.
        let mut client = None;
        if cfg
            .jwt
            .providers
            .iter()
            .any(|p| matches!(p.keys, KeySourceConfig::Url { .. }))
        {
            client = Some(
                reqwest::Client::builder()
                    .timeout(Duration::from_millis(cfg.jwt.keys_fetch_timeout_ms))
                    .user_agent(concat!("gybc-authz/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| StartError::HttpClient(e.to_string()))?,
            );
        }
        let timing = JwksTiming::from(&cfg.jwt);
        let mut providers = Vec::new();
        for p in &cfg.jwt.providers {
            let set = Jwks::observed(
                &p.name,
                jwks::source_from_config(&p.keys, client.as_ref()),
                timing,
                observer.clone(),
            );
            let mut loaded = set.loaded();
            let gate = async move {
                let _ = loaded.wait_for(|l| *l).await;
            };
            let name = format!("signing keys of provider `{}`", p.name);
            gates.push((name, Box::pin(gate)));
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

        let traces = match &cfg.tracing_export {
            Some(t) => {
                let (traces, export) = DecisionTracing::start(t, metrics.clone())?;
                background.push(export);
                tracing::info!(endpoint = %t.otlp_endpoint, protocol = ?t.protocol, "Decision spans are exported.");
                Some(traces)
            }
            None => None,
        };

        let (set_loaded, loaded) = watch::channel(false);
        let loading = Arc::new(Mutex::new(gates.iter().map(|(n, _)| n.clone()).collect()));
        let waits: Vec<_> = gates
            .into_iter()
            .map(|(name, gate)| {
                let loading: Arc<Mutex<Vec<String>>> = loading.clone();
                async move {
                    gate.await;
                    let mut left = loading.lock().unwrap_or_else(|p| p.into_inner());
                    left.retain(|n| *n != name);
                }
            })
            .collect();
        background.push(tokio::spawn(async move {
            futures_util::future::join_all(waits).await;
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
                secret_key_from_browser: cfg.policy.secret_key_from_browser,
                observer: observer.clone(),
            },
            answers: Answers::new(cfg),
            limits: cfg.limits.clone(),
            observer,
            traces,
            loaded,
            loading,
            keys,
            jwt,
            metrics,
            usage,
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

    /// What has not loaded yet (`Redis`, ``signing keys of provider `name` ``); empty once
    /// `is_loaded`.
    pub fn not_loaded(&self) -> Vec<String> {
        self.loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves once `is_loaded` is true.
    pub async fn wait_loaded(&self) {
        let mut loaded = self.loaded.clone();
        let _ = loaded.wait_for(|l| *l).await;
    }

    /// Allow or deny. Until everything has loaded the answer is 503: an engine that cannot yet
    /// verify anything fails closed, never open. With `tracing_export`, a sampled request's
    /// decision is a span in its trace (`req.trace`, which a door may set from its own
    /// transport's span instead of the headers).
    pub async fn decide(&self, req: &RequestContext) -> Decision {
        match &self.traces {
            Some(t) => t.decision(req, self.decide_untraced(req)).await,
            None => self.decide_untraced(req).await,
        }
    }

    /// `decide` without this engine's own span, for a door that records the decision on its
    /// transport's span instead (the Envoy module, when Envoy traces the request): one decision,
    /// one span, whatever `tracing_export` says.
    pub async fn decide_untraced(&self, req: &RequestContext) -> Decision {
        if !self.is_loaded() {
            return Decision::Deny(Denial::because(Reason::Unavailable, "not_ready"));
        }
        #[cfg(feature = "test-hooks")]
        test_hooks::maybe_panic(req).await;
        self.authorizer.decide(req).await
    }

    /// Sends the decision spans still queued, waiting at most `within`; for shutdown.
    pub async fn flush_traces(&self, within: Duration) {
        if let Some(t) = &self.traces {
            t.flush(within).await;
        }
    }

    /// Writes the usage counts not yet flushed, waiting at most `within`; for shutdown, so a
    /// stopping replica does not lose its last interval of counts.
    pub async fn flush_usage(&self, within: Duration) {
        if let Some(u) = &self.usage
            && tokio::time::timeout(within, u.flush_now()).await.is_err()
        {
            tracing::warn!("Usage counts were not all written before shutdown.");
        }
    }

    /// Every request header an allow may set or remove upstream (see `Answers::upstream_names`).
    pub fn upstream_names(&self) -> [&str; 8] {
        self.answers.upstream_names()
    }

    /// The decision as headers, status and body, for the door to write out.
    pub fn answer<'a>(&'a self, decision: &'a Decision) -> Answer<'a> {
        self.answers.answer(decision)
    }

    /// One decision made: its log line and metrics.
    pub fn observe(&self, req: &RequestContext, decision: &Decision, latency: Duration) {
        self.observer.decision(req, decision, latency);
        if let Some(u) = &self.usage {
            u.count(decision);
        }
    }

    /// Usage counting, when enabled: to flush it on shutdown, or to read a replica's own counts.
    pub fn usage(&self) -> Option<&Arc<Usage>> {
        self.usage.as_ref()
    }

    /// The answer a door gives when deciding itself failed (a panic caught at the door): 503,
    /// counted.
    pub fn failed(&self) -> Decision {
        self.observer.panicked();
        Decision::Deny(Denial::because(Reason::Unavailable, "panic"))
    }
}

#[cfg(feature = "test-hooks")]
mod test_hooks {
    use crate::request::RequestContext;

    /// Panics on the test paths: at once (a door deciding inline), or after the decision has
    /// waited once (a door whose decision finishes on another thread).
    pub async fn maybe_panic(req: &RequestContext) {
        match req.path.as_str() {
            "/__gybc_test/panic" => panic!("test hook: a panic inside the engine"),
            "/__gybc_test/panic-after-io" => {
                tokio::task::yield_now().await;
                panic!("test hook: a panic inside the engine, after it waited")
            }
            _ => {}
        }
    }
}
