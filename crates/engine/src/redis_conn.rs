//! The connection to the shared Redis: one multiplexed, self-reconnecting connection per process
//! (single node or cluster, plain or TLS), with the command timeout applied by the client, and
//! the circuit breaker every command on it goes through. Key and channel names live here, so
//! docs/key-store.md has one place to match.

use std::future::Future;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::authn::apikey::KeyHash;
use crate::breaker::{Breaker, probe_delays};
use crate::config::{BreakerConfig, RedisConfig};
use crate::observe::Observer;

pub use crate::event::RedisFailure;

/// Names of everything the daemon reads or writes in Redis.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// `gybc:key:<hex sha256>`: a `KeyRecord` protobuf.
    pub fn key(&self, hash: &KeyHash) -> String {
        format!("{}:key:{}", self.prefix, hash.to_hex())
    }

    /// `gybc:keys:events`: `KeyEvent` protobufs.
    pub fn events_channel(&self) -> String {
        format!("{}:keys:events", self.prefix)
    }

    /// `gybc:rl:{<key id>}`: a key's GCRA state (the braces keep it in one cluster slot).
    pub fn rate_limit(&self, key_id: &str) -> String {
        format!("{}:rl:{{{key_id}}}", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("redis configuration: {0}")]
pub struct RedisSetupError(String);

/// A cheap-to-clone handle on the shared connection.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    /// Filled once the cluster's slot map has been read; until then every command fails fast.
    Cluster(Arc<OnceLock<ClusterConnection>>),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(cell) => match cell.get() {
                Some(c) => {
                    let mut c = c.clone();
                    Box::pin(async move { c.req_packed_command(cmd).await })
                }
                None => Box::pin(async { Err(not_connected()) }),
            },
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(cell) => match cell.get() {
                Some(c) => {
                    let mut c = c.clone();
                    Box::pin(async move { c.req_packed_commands(pipeline, offset, count).await })
                }
                None => Box::pin(async { Err(not_connected()) }),
            },
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

fn not_connected() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "Redis Cluster not connected yet"))
}

/// What the daemon keeps of its Redis: the command connection, a client for pub/sub, the names.
#[derive(Clone)]
pub struct Redis {
    pub conn: RedisConn,
    /// Pub/sub needs its own connection; in a cluster, PUBLISH reaches every node, so one is enough.
    pub pubsub_client: redis::Client,
    pub names: Names,
    pub timeout: Duration,
    /// One per connection, shared by every clone: the key store and the limiter see one Redis.
    breaker: Arc<RedisBreaker>,
}

/// The breaker with what it needs to probe and to report.
struct RedisBreaker {
    breaker: Breaker,
    probe_interval: Duration,
    max_probe_interval: Duration,
    observer: Arc<Observer>,
}

fn connection_info(url: &str, cfg: &RedisConfig) -> Result<redis::ConnectionInfo, RedisSetupError> {
    let info = url
        .into_connection_info()
        .map_err(|e| RedisSetupError(format!("bad URL: {e}")))?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(pw) = &cfg.password {
        settings = settings.set_password(pw.expose());
    }
    Ok(info.set_redis_settings(settings))
}

impl Redis {
    /// Builds the clients. Connecting happens lazily and in the background: a Redis that is down at
    /// start makes lookups fail (and readiness wait), not the process exit.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, RedisSetupError> {
        Self::connect_observed(cfg, Arc::default()).await
    }

    /// [`Redis::connect`], with the breaker reporting its transitions to `observer`.
    pub async fn connect_observed(
        cfg: &RedisConfig,
        observer: Arc<Observer>,
    ) -> Result<Self, RedisSetupError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let first = connection_info(&cfg.urls[0], cfg)?;
        let certs = match &cfg.tls_ca_file {
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|e| {
                    RedisSetupError(format!("tls_ca_file {}: {e}", path.display()))
                })?),
            }),
            None => None,
        };
        let client = |info: redis::ConnectionInfo| match &certs {
            Some(c) => redis::Client::build_with_tls(info, c.clone()),
            None => redis::Client::open(info),
        };
        let pubsub_client = client(first.clone()).map_err(|e| RedisSetupError(e.to_string()))?;
        let conn = if cfg.cluster {
            let infos = cfg
                .urls
                .iter()
                .map(|u| connection_info(u, cfg))
                .collect::<Result<Vec<_>, _>>()?;
            let mut builder = ClusterClientBuilder::new(infos)
                .response_timeout(timeout)
                .connection_timeout(connect_timeout);
            if let Some(user) = &cfg.username {
                builder = builder.username(user);
            }
            if let Some(pw) = &cfg.password {
                builder = builder.password(pw.expose());
            }
            if let Some(c) = &certs {
                builder = builder.certs(c.clone());
            }
            let client = builder
                .build()
                .map_err(|e| RedisSetupError(e.to_string()))?;
            // The cluster client needs the slot map before its first command; read it in the
            // background so a cluster that is down at start delays readiness, not the process.
            let cell = Arc::new(OnceLock::new());
            let fill = cell.clone();
            tokio::spawn(async move {
                let _ = fill.set(connect_cluster(client).await);
            });
            RedisConn::Cluster(cell)
        } else {
            let client = client(first).map_err(|e| RedisSetupError(e.to_string()))?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(connect_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            RedisConn::Single(
                ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| RedisSetupError(e.to_string()))?,
            )
        };
        Ok(Self {
            conn,
            pubsub_client,
            names: Names::new(&cfg.key_prefix),
            timeout,
            breaker: Arc::new(RedisBreaker::new(&cfg.breaker, observer)),
        })
    }

    /// Runs one command, given a clone of the connection, within the command timeout, unless the
    /// breaker is open: then nothing is sent and `BreakerOpen` comes back at once. Timeouts and
    /// errors in a row open the breaker; the command that opens it starts the probe.
    pub async fn run<T, F, Fut>(&self, command: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(permit) = self.breaker.breaker.permit() else {
            return Err(RedisFailure::BreakerOpen);
        };
        let failure = match tokio::time::timeout(self.timeout, command(self.conn.clone())).await {
            Ok(Ok(value)) => {
                self.breaker.breaker.succeeded(permit);
                return Ok(value);
            }
            // An answer of an unexpected type is about the data, not about Redis being there.
            Ok(Err(e)) if e.kind() == redis::ErrorKind::UnexpectedReturnType => {
                self.breaker.breaker.succeeded(permit);
                return Err(RedisFailure::Error(e.to_string()));
            }
            Ok(Err(e)) => RedisFailure::Error(e.to_string()),
            Err(_) => RedisFailure::Timeout(self.timeout),
        };
        if self.breaker.breaker.failed(permit) {
            self.breaker.observer.redis_breaker_opened(
                self.breaker.breaker.threshold(),
                failure.kind(),
                &failure,
            );
            tokio::spawn(probe(
                Arc::downgrade(&self.breaker),
                self.conn.clone(),
                self.timeout,
            ));
        }
        Err(failure)
    }

    /// One PING; readiness waits for the first success.
    pub async fn ping(&self) -> bool {
        let mut c = self.conn.clone();
        matches!(
            tokio::time::timeout(
                self.timeout * 5,
                redis::cmd("PING").query_async::<String>(&mut c)
            )
            .await,
            Ok(Ok(_))
        )
    }
}

impl RedisBreaker {
    fn new(cfg: &BreakerConfig, observer: Arc<Observer>) -> Self {
        Self {
            breaker: Breaker::new(cfg.failures),
            probe_interval: Duration::from_millis(cfg.probe_interval_ms),
            max_probe_interval: Duration::from_millis(cfg.max_probe_interval_ms),
            observer,
        }
    }
}

/// The one probe of an open breaker: a PING per interval, backing off, until one is answered
/// (closing the breaker) or the connection is dropped.
async fn probe(breaker: Weak<RedisBreaker>, mut conn: RedisConn, timeout: Duration) {
    let opened = Instant::now();
    let delays = match breaker.upgrade() {
        Some(b) => probe_delays(b.probe_interval, b.max_probe_interval),
        None => return,
    };
    for (probes, delay) in (1u32..).zip(delays) {
        tokio::time::sleep(delay).await;
        // Held only between sleeps, so a dropped engine ends the probe within one interval.
        let Some(b) = breaker.upgrade() else { return };
        let ping = redis::cmd("PING");
        if let Ok(Ok(_)) =
            tokio::time::timeout(timeout, ping.query_async::<String>(&mut conn)).await
        {
            if b.breaker.close() {
                b.observer.redis_breaker_closed(opened.elapsed(), probes);
            }
            return;
        }
    }
}

async fn connect_cluster(client: redis::cluster::ClusterClient) -> ClusterConnection {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.get_async_connection().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "Redis Cluster not reachable yet; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
