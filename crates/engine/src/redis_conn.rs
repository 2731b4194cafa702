//! The connection to the shared Redis: a single node, a Redis Cluster, or the primary a set of
//! Redis Sentinels names (plain or TLS); one multiplexed connection per process that follows a
//! failover without a restart (`redis_conn/primary.rs`, `redis_conn/cluster.rs`), with the
//! command timeout applied by the client, and the circuit breaker every command on it goes
//! through. Key and channel names live here, so docs/key-store.md has one place to match.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value,
};
use tokio::sync::SetOnce;

use crate::authn::apikey::KeyHash;
use crate::breaker::{Breaker, probe_delays};
use crate::config::{BreakerConfig, RedisConfig, SentinelConfig};
use crate::observe::Observer;

pub use crate::event::RedisFailure;

mod cluster;
mod primary;

use primary::{Locate, Primary};

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
    /// A single node, or the primary the sentinels name: connected again, to wherever the
    /// primary is then, when a command shows a failover.
    Primary(Arc<Primary>),
    /// Filled once the cluster's slot map has been read; until then every command fails fast.
    Cluster(Arc<SetOnce<ClusterConnection>>),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Primary(p) => {
                let p = p.clone();
                Box::pin(async move {
                    p.request(|mut c| async move { c.req_packed_command(cmd).await })
                        .await
                })
            }
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
            RedisConn::Primary(p) => {
                let p = p.clone();
                Box::pin(async move {
                    p.request(|mut c| async move {
                        c.req_packed_commands(pipeline, offset, count).await
                    })
                    .await
                })
            }
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
            RedisConn::Primary(p) => p.db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

fn not_connected() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "Redis Cluster not connected yet"))
}

/// What the daemon keeps of its Redis: the command connection, how to reach its nodes directly
/// (pub/sub, scans), the names.
#[derive(Clone)]
pub struct Redis {
    pub conn: RedisConn,
    pub names: Names,
    pub timeout: Duration,
    connect_timeout: Duration,
    /// The single node, or the cluster's seed nodes: credentials and TLS for every node.
    seeds: Vec<redis::Client>,
    /// The cluster's layout as last probed (empty otherwise).
    layout: Arc<cluster::Layout>,
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

/// A CA file as the `redis` crate takes it.
fn ca(
    path: Option<&std::path::Path>,
    field: &str,
) -> Result<Option<TlsCertificates>, RedisSetupError> {
    path.map(|path| {
        Ok(TlsCertificates {
            client_tls: None,
            root_cert: Some(
                std::fs::read(path)
                    .map_err(|e| RedisSetupError(format!("{field} {}: {e}", path.display())))?,
            ),
        })
    })
    .transpose()
}

/// Asks the sentinels for the primary, with their own credentials and TLS, and connects to the
/// data nodes with `redis`'s.
fn sentinel_client(
    cfg: &RedisConfig,
    s: &SentinelConfig,
    data_certs: Option<TlsCertificates>,
) -> Result<redis::sentinel::SentinelClient, RedisSetupError> {
    let setup = |e: redis::RedisError| RedisSetupError(format!("redis.sentinel: {e}"));
    let sentinels = s
        .urls
        .iter()
        .map(|u| u.as_str().into_connection_info().map(|i| i.addr().clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(setup)?;
    let mut b = SentinelClientBuilder::new(sentinels, &s.master_name, SentinelServerType::Master)
        .map_err(setup)?;
    if let Some(user) = &s.username {
        b = b.set_client_to_sentinel_username(user);
    }
    if let Some(pw) = &s.password {
        b = b.set_client_to_sentinel_password(pw.expose());
    }
    if let Some(c) = ca(s.tls_ca_file.as_deref(), "redis.sentinel.tls_ca_file")? {
        b = b.set_client_to_sentinel_certificates(c);
    }
    if let Some(user) = &cfg.username {
        b = b.set_client_to_redis_username(user);
    }
    if let Some(pw) = &cfg.password {
        b = b.set_client_to_redis_password(pw.expose());
    }
    if s.data_nodes_tls {
        b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
    }
    if let Some(c) = data_certs {
        b = b.set_client_to_redis_certificates(c);
    }
    b.build().map_err(setup)
}

impl Redis {
    /// Builds the clients. Connecting happens lazily and in the background: a Redis that is down at
    /// start makes lookups fail (and readiness wait), not the process exit.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, RedisSetupError> {
        Self::connect_observed(cfg, Arc::default()).await
    }

    /// [`Redis::connect`], with the breaker and the failovers seen reported to `observer`.
    pub async fn connect_observed(
        cfg: &RedisConfig,
        observer: Arc<Observer>,
    ) -> Result<Self, RedisSetupError> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let certs = ca(cfg.tls_ca_file.as_deref(), "tls_ca_file")?;
        let client = |info: redis::ConnectionInfo| {
            match &certs {
                Some(c) => redis::Client::build_with_tls(info, c.clone()),
                None => redis::Client::open(info),
            }
            .map_err(|e| RedisSetupError(e.to_string()))
        };
        let seeds = cfg
            .urls
            .iter()
            .map(|u| client(connection_info(u, cfg)?))
            .collect::<Result<Vec<_>, _>>()?;
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(connect_timeout));
        // One attempt to reach the primary: a sentinel lookup (a connect, one command, and a
        // connect to the primary it names for `ROLE`) and the connect itself.
        let attempt = connect_timeout * 2 + timeout * 2;
        let conn = match &cfg.sentinel {
            Some(s) => {
                let locate = Locate::Sentinel {
                    client: tokio::sync::Mutex::new(sentinel_client(cfg, s, certs)?),
                    master_name: s.master_name.clone(),
                };
                RedisConn::Primary(Primary::start(locate, config, attempt, 0, observer.clone()))
            }
            None if cfg.cluster => {
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
                let cell = Arc::new(SetOnce::new());
                let fill = cell.clone();
                tokio::spawn(async move {
                    let _ = fill.set(cluster::connect(client).await);
                });
                RedisConn::Cluster(cell)
            }
            None => {
                let node = seeds
                    .first()
                    .cloned()
                    .ok_or_else(|| RedisSetupError("redis.urls: no URL".into()))?;
                let db = node.get_connection_info().redis_settings().db();
                RedisConn::Primary(Primary::start(
                    Locate::Node(node),
                    config,
                    attempt,
                    db,
                    observer.clone(),
                ))
            }
        };
        Ok(Self {
            conn,
            names: Names::new(&cfg.key_prefix),
            timeout,
            connect_timeout,
            seeds,
            layout: Arc::default(),
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
            tokio::spawn(probe(Arc::downgrade(&self.breaker), self.clone()));
        }
        Err(failure)
    }

    /// Whether Redis takes commands now, as the data path would send them: the primary answers
    /// a PING, or every shard of a cluster has a primary (`redis_conn/cluster.rs`); a cluster
    /// connection still being set up is waited for. Readiness waits for the first success and
    /// the health gauge shows the last; the cluster's layout (and so its failovers) is read here.
    pub async fn check(&self) -> bool {
        self.checked(false).await
    }

    /// [`Redis::check`] for the breaker's probe: with Sentinel, the sentinels are asked afresh
    /// where the primary is, and the probe passes only once it answers.
    async fn probe_passes(&self) -> bool {
        self.checked(true).await
    }

    async fn checked(&self, ask_sentinels: bool) -> bool {
        let within = self.connect_timeout + self.timeout * 2;
        let check = async {
            match &self.conn {
                RedisConn::Primary(p) => p.ping(ask_sentinels).await.is_ok(),
                RedisConn::Cluster(cell) => {
                    let mut c = cell.wait().await.clone();
                    match cluster::probe(&mut c, &self.names.prefix).await {
                        Ok(shards) => {
                            self.layout.update(shards, &self.breaker.observer);
                            true
                        }
                        Err(_) => false,
                    }
                }
            }
        };
        tokio::time::timeout(within, check).await.unwrap_or(false)
    }

    /// The nodes the key-events subscription may use, in the order to try them: the primary
    /// (named by the sentinels now, with Sentinel), or every node of a cluster, primaries
    /// first, then the seed nodes. A cluster publishes an event on every node, so any one that
    /// answers will do, and none of them has to be alive for the subscription to work.
    pub async fn subscription_nodes(&self) -> Vec<redis::Client> {
        match &self.conn {
            RedisConn::Primary(p) => p.locate().await.into_iter().collect(),
            RedisConn::Cluster(cell) => {
                let mut addrs = Vec::new();
                if let Some(c) = cell.get() {
                    let mut c = c.clone();
                    if let Ok(Ok(shards)) =
                        tokio::time::timeout(self.timeout, cluster::slots(&mut c)).await
                    {
                        addrs = cluster::nodes(&shards);
                    }
                }
                if addrs.is_empty() {
                    addrs = self.layout.nodes();
                }
                let mut clients: Vec<redis::Client> =
                    addrs.iter().filter_map(|a| self.node(a)).collect();
                for seed in &self.seeds {
                    let addr = seed.get_connection_info().addr().to_string();
                    if !addrs.contains(&addr) {
                        clients.push(seed.clone());
                    }
                }
                clients
            }
        }
    }

    /// A client for every primary: the one node, the primary the sentinels name, or each
    /// cluster shard's (a SCAN must visit them all).
    pub async fn primaries(&self) -> redis::RedisResult<Vec<redis::Client>> {
        match &self.conn {
            RedisConn::Primary(p) => Ok(vec![p.locate().await?]),
            RedisConn::Cluster(cell) => {
                let mut c = tokio::time::timeout(self.connect_timeout, cell.wait())
                    .await
                    .map_err(|_| not_connected())?
                    .clone();
                let shards = cluster::slots(&mut c).await?;
                let mut seen = std::collections::BTreeSet::new();
                Ok(shards
                    .iter()
                    .filter(|s| seen.insert(s.primary.clone()))
                    .filter_map(|s| self.node(&s.primary))
                    .collect())
            }
        }
    }

    /// A client for the cluster node `host:port`, with the seeds' credentials and TLS.
    fn node(&self, addr: &str) -> Option<redis::Client> {
        let (host, port) = addr.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let base = self.seeds.first()?.get_connection_info().clone();
        let addr = match base.addr() {
            redis::ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
        };
        redis::Client::open(base.set_addr(addr)).ok()
    }

    /// How long to wait before subscribing again after failed attempts: as the breaker probes.
    pub fn retry_delays(&self) -> impl Iterator<Item = Duration> + use<> {
        probe_delays(self.breaker.probe_interval, self.breaker.max_probe_interval)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The primary's address each time it changes; `None` for a cluster, whose every node
    /// carries the key events.
    pub fn primary_changes(&self) -> Option<tokio::sync::watch::Receiver<Option<Arc<str>>>> {
        match &self.conn {
            RedisConn::Primary(p) => Some(p.changes()),
            RedisConn::Cluster(_) => None,
        }
    }

    /// Where the parts of this connection report.
    pub fn observer(&self) -> &Observer {
        &self.breaker.observer
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

/// The one probe of an open breaker: a [`Redis::probe_passes`] per interval, backing off (and at once
/// when the primary moves), until one passes (closing the breaker) or the connection is dropped. The check is what the data path
/// needs, not a PING to any node: a cluster's surviving nodes answer a PING while one shard has
/// no primary, and closing on that made the breaker open and close many times in one failover.
async fn probe(breaker: Weak<RedisBreaker>, redis: Redis) {
    // The probe's own clone must not keep the breaker alive.
    let redis = Redis {
        breaker: Arc::new(RedisBreaker {
            breaker: Breaker::new(1),
            probe_interval: redis.breaker.probe_interval,
            max_probe_interval: redis.breaker.max_probe_interval,
            observer: redis.breaker.observer.clone(),
        }),
        ..redis
    };
    let opened = Instant::now();
    let delays = probe_delays(
        redis.breaker.probe_interval,
        redis.breaker.max_probe_interval,
    );
    // The sentinels naming a new primary is worth a probe at once.
    let mut moved = redis.primary_changes();
    for (probes, delay) in (1u32..).zip(delays) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            Ok(()) = async {
                match moved.as_mut() {
                    Some(m) => m.changed().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        // Held only between sleeps, so a dropped engine ends the probe within one interval.
        let Some(b) = breaker.upgrade() else { return };
        if redis.probe_passes().await {
            if b.breaker.close() {
                b.observer.redis_breaker_closed(opened.elapsed(), probes);
            }
            return;
        }
    }
}
