//! `redis`: the shared Redis connection, its circuit breaker, and its password (never in the file).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::env::Env;
use super::error::{ConfigError, invalid};

/// Default prefix of every Redis key and channel name.
pub const DEFAULT_REDIS_PREFIX: &str = "gybc";
/// Default per-command Redis timeout: a decision never waits longer on Redis.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 200;
pub const DEFAULT_REDIS_CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Connection to the shared Redis: a single node, a Redis Cluster, or the primary a set of Redis
/// Sentinels names. Credentials never sit in this file: they come from a mounted file or an
/// environment variable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379` or `rediss://host:6380` (TLS); with `cluster: true`, one or more
    /// seed nodes. No password in the URL. Empty (the default) only with `sentinel`, where the
    /// sentinels name the primary.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Redis Cluster. Default false.
    #[serde(default)]
    pub cluster: bool,
    /// Redis Sentinel: ask these sentinels which node is the primary, and follow it when they
    /// fail over. Default: none (the node or cluster in `urls`).
    #[serde(default)]
    pub sentinel: Option<SentinelConfig>,
    /// ACL user name on the data nodes, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose content is the data nodes' password (a mounted Secret); trailing newline
    /// ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the data nodes' password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of the CA that signs the data nodes' certificates (`rediss://`, or
    /// `sentinel.data_nodes_tls`, with a private CA). Default: the public web roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Prefix of every key and channel name. Default `gybc`.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Per-command timeout, ms. Default 200.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// Connect timeout, ms. Default 1000.
    #[serde(default = "default_redis_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// When to stop waiting on a Redis that keeps timing out or failing, and how it is tested
    /// again.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// The password, read from `password_file` or `password_env` while loading.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// The sentinels of a Redis Sentinel setup (`redis.sentinel`): where to ask for the primary, and
/// how to talk to the sentinels themselves (their credentials and TLS are their own; the data
/// nodes use `redis.username`, `redis.password_*` and `redis.tls_ca_file`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> …`). Required.
    pub master_name: String,
    /// The sentinels: `redis://host:26379`, or `rediss://` for TLS. No password in the URL. At
    /// least one; a production setup has three or more, all listed. Required.
    pub urls: Vec<String>,
    /// ACL user name on the sentinels, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose content is the sentinels' password; trailing newline ignored. Default: none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the sentinels' password. Default: none.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of the CA that signs the sentinels' certificates (`rediss://` sentinels with a
    /// private CA). Default: the public web roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The primary and replicas the sentinels name speak TLS (the sentinels give an address, not a
    /// URL), checked against `redis.tls_ca_file`. Default false.
    #[serde(default)]
    pub data_nodes_tls: bool,
    /// The sentinels' password, read from `password_file` or `password_env` while loading.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// Redis timeouts or errors in a row that open the circuit breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 3;
/// First wait before probing an open breaker's Redis, ms.
pub const DEFAULT_BREAKER_PROBE_INTERVAL_MS: u64 = 200;
/// Longest wait between probes, ms: below a second, so the fleet limit is back within a second
/// of Redis answering again.
pub const DEFAULT_BREAKER_MAX_PROBE_INTERVAL_MS: u64 = 500;
/// Upper bound on `redis.breaker.failures`: a breaker that waits for more is no breaker.
pub const MAX_BREAKER_FAILURES: u32 = 100;
/// Lower bound on the probe intervals, ms, so an open breaker cannot become a busy loop.
pub const MIN_BREAKER_PROBE_INTERVAL_MS: u64 = 10;

/// The circuit breaker on the Redis connection. After `failures` timeouts or errors in a row the
/// replica stops sending commands: the rate limiter answers by `rate_limit.failure_mode` at once
/// and an uncached key gets 503 `unavailable` at once, instead of each waiting `timeout_ms`.
/// Cached keys keep working. One PING per probe interval tests Redis; the first answer closes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Timeouts or errors in a row that open the breaker. Default 3, at most 100.
    pub failures: u32,
    /// Wait before the first probe, ms; doubled after each unanswered probe. Default 200, at
    /// least 10.
    pub probe_interval_ms: u64,
    /// Longest wait between probes, ms. Default 500, at least `probe_interval_ms`. Redis is
    /// noticed back within about this long, so keep it under 1000 for the fleet limit to be
    /// exact again within a second.
    pub max_probe_interval_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: DEFAULT_BREAKER_FAILURES,
            probe_interval_ms: DEFAULT_BREAKER_PROBE_INTERVAL_MS,
            max_probe_interval_ms: DEFAULT_BREAKER_MAX_PROBE_INTERVAL_MS,
        }
    }
}

fn default_redis_prefix() -> String {
    DEFAULT_REDIS_PREFIX.into()
}
fn default_redis_timeout_ms() -> u64 {
    DEFAULT_REDIS_TIMEOUT_MS
}
fn default_redis_connect_timeout_ms() -> u64 {
    DEFAULT_REDIS_CONNECT_TIMEOUT_MS
}

/// A credential that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl RedisConfig {
    /// Every problem of the section, each against its field under `redis.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        match &self.sentinel {
            None if self.urls.is_empty() => err(
                "redis.urls".into(),
                "needs at least one URL (or a redis.sentinel section)".into(),
            ),
            None => {}
            Some(s) => {
                if !self.urls.is_empty() {
                    err(
                        "redis.urls".into(),
                        "leave empty with redis.sentinel: the sentinels name the primary".into(),
                    );
                }
                if self.cluster {
                    err(
                        "redis.cluster".into(),
                        "Redis Cluster and Redis Sentinel are two setups: remove one".into(),
                    );
                }
                s.validate(err);
            }
        }
        if self.urls.len() > 1 && !self.cluster {
            err(
                "redis.urls".into(),
                "several URLs need `cluster: true`".into(),
            );
        }
        check_urls(
            "redis.urls",
            &self.urls,
            "redis.password_file or redis.password_env",
            err,
        );
        let data_tls = match &self.sentinel {
            Some(s) => s.data_nodes_tls,
            None => self.urls.iter().all(|u| u.starts_with("rediss://")),
        };
        if self.tls_ca_file.is_some() && !data_tls {
            err(
                "redis.tls_ca_file".into(),
                "is for rediss:// URLs (or redis.sentinel.data_nodes_tls) only".into(),
            );
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            err(
                "redis.password_env".into(),
                "set either password_file or password_env, not both".into(),
            );
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            err(
                "redis.key_prefix".into(),
                "must be non-empty without spaces".into(),
            );
        }
        if self.timeout_ms == 0 {
            err("redis.timeout_ms".into(), "must be at least 1".into());
        }
        if self.connect_timeout_ms == 0 {
            err(
                "redis.connect_timeout_ms".into(),
                "must be at least 1".into(),
            );
        }
        let b = &self.breaker;
        if !(1..=MAX_BREAKER_FAILURES).contains(&b.failures) {
            err(
                "redis.breaker.failures".into(),
                format!("must be between 1 and {MAX_BREAKER_FAILURES}"),
            );
        }
        if b.probe_interval_ms < MIN_BREAKER_PROBE_INTERVAL_MS {
            err(
                "redis.breaker.probe_interval_ms".into(),
                format!("must be at least {MIN_BREAKER_PROBE_INTERVAL_MS}"),
            );
        }
        if b.max_probe_interval_ms < b.probe_interval_ms {
            err(
                "redis.breaker.max_probe_interval_ms".into(),
                "must be at least redis.breaker.probe_interval_ms".into(),
            );
        }
    }

    /// Reads the passwords (the data nodes', and the sentinels') from their files or
    /// environment variables.
    pub(super) fn resolve_password(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        self.password = read_password(
            "redis",
            self.password_file.as_deref(),
            self.password_env.as_deref(),
            env,
        )?;
        if let Some(s) = self.sentinel.as_mut() {
            s.password = read_password(
                "redis.sentinel",
                s.password_file.as_deref(),
                s.password_env.as_deref(),
                env,
            )?;
        }
        Ok(())
    }
}

impl SentinelConfig {
    /// Every problem of `redis.sentinel`.
    fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.master_name.is_empty()
            || self
                .master_name
                .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            err(
                "redis.sentinel.master_name".into(),
                "must be non-empty without spaces".into(),
            );
        }
        if self.urls.is_empty() {
            err(
                "redis.sentinel.urls".into(),
                "needs at least one sentinel".into(),
            );
        }
        check_urls(
            "redis.sentinel.urls",
            &self.urls,
            "redis.sentinel.password_file or redis.sentinel.password_env",
            err,
        );
        if self.tls_ca_file.is_some() && !self.urls.iter().all(|u| u.starts_with("rediss://")) {
            err(
                "redis.sentinel.tls_ca_file".into(),
                "is for rediss:// sentinel URLs only".into(),
            );
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            err(
                "redis.sentinel.password_env".into(),
                "set either password_file or password_env, not both".into(),
            );
        }
    }
}

/// `redis://` or `rediss://`, and no password in the URL (it would end up in logs and configs).
fn check_urls(
    field: &str,
    urls: &[String],
    password_fields: &str,
    err: &mut dyn FnMut(String, String),
) {
    for (i, u) in urls.iter().enumerate() {
        let path = format!("{field}[{i}]");
        let rest = u
            .strip_prefix("redis://")
            .or_else(|| u.strip_prefix("rediss://"));
        match rest {
            None => err(path, "must start with redis:// or rediss://".into()),
            Some(rest) => {
                let authority = rest.split('/').next().unwrap_or("");
                if let Some((userinfo, _)) = authority.rsplit_once('@')
                    && userinfo.contains(':')
                {
                    err(
                        path,
                        format!("must not contain a password: use {password_fields}"),
                    );
                }
            }
        }
    }
}

/// A password from its file (trailing newline dropped) or environment variable, if either is set;
/// errors name `<section>.password_file` or `<section>.password_env`.
fn read_password(
    section: &str,
    file: Option<&std::path::Path>,
    var: Option<&str>,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                format!("{section}.password_file"),
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        return Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))));
    }
    if let Some(var) = var {
        let value = env
            .vars()
            .into_iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                invalid(
                    format!("{section}.password_env"),
                    format!("environment variable `{var}` is not set"),
                )
            })?;
        return Ok(Some(Secret::new(value)));
    }
    Ok(None)
}
