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

/// Connection to the shared Redis. Credentials never sit in this file: they come from a mounted
/// file or an environment variable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379` or `rediss://host:6380` (TLS); with `cluster: true`, one or more
    /// seed nodes. No password in the URL.
    pub urls: Vec<String>,
    /// Redis Cluster. Default false.
    #[serde(default)]
    pub cluster: bool,
    /// ACL user name, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose content is the password (a mounted Secret); trailing newline ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of the CA that signs the servers' certificates (`rediss://` with a private CA).
    /// Default: the public web roots.
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
        if self.urls.is_empty() {
            err("redis.urls".into(), "needs at least one URL".into());
        }
        if self.urls.len() > 1 && !self.cluster {
            err(
                "redis.urls".into(),
                "several URLs need `cluster: true`".into(),
            );
        }
        for (i, u) in self.urls.iter().enumerate() {
            let path = format!("redis.urls[{i}]");
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
                        err(path, "must not contain a password: use redis.password_file or redis.password_env".into());
                    }
                }
            }
        }
        if self.tls_ca_file.is_some() && !self.urls.iter().all(|u| u.starts_with("rediss://")) {
            err(
                "redis.tls_ca_file".into(),
                "is for rediss:// URLs only".into(),
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

    /// Reads the password from its file or environment variable.
    pub(super) fn resolve_password(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "redis.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            self.password = Some(Secret::new(text.trim_end_matches(['\n', '\r'])));
        } else if let Some(var) = &self.password_env {
            let value = env
                .vars()
                .into_iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    invalid(
                        "redis.password_env",
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
            self.password = Some(Secret::new(value));
        }
        Ok(())
    }
}
