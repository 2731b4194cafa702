//! The daemon's configuration: one YAML file plus `GYBC_AUTHZ__…` environment overrides, parsed
//! strictly and validated once at start, with every error reported against its field path.
//!
//! One file per section of the file (each with its types, `DEFAULT_*` constants and its part of
//! `validate()`); `env` reads the overrides, `error` says what was refused. This file holds the
//! whole: loading, in order, and the one `validate()` that asks every section.

mod env;
mod error;
mod headers;
mod jwt;
mod key_cache;
mod key_service;
mod key_store;
mod limits;
mod log;
mod module;
mod policy;
mod rate_limit;
mod redis;
mod response;
mod server;
mod tracing_export;
mod usage;

use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value;

// Every section's types and constants stay at `config::X`, where the daemon, the module and the
// tests name them.
pub use env::*;
pub use error::*;
pub use headers::*;
pub use jwt::*;
pub use key_cache::*;
pub use key_service::*;
pub use key_store::*;
pub use limits::*;
pub use log::*;
pub use module::*;
pub use policy::*;
pub use rate_limit::*;
pub use redis::*;
pub use response::*;
pub use server::*;
pub use tracing_export::*;
pub use usage::*;

/// The whole configuration file.
/// Equality is the Envoy module's test for "the same config" (a reload that may keep its engine):
/// every field by value, secrets included.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listen addresses and shutdown.
    pub server: ServerConfig,
    /// Firebase / Identity Platform token verification.
    pub jwt: JwtConfig,
    /// Where API key records come from.
    pub key_store: KeyStoreConfig,
    /// The shared Redis (key store, revocations, rate limits), when either uses it.
    pub redis: Option<RedisConfig>,
    /// In-process cache in front of the Redis key store (an in-memory store is not cached again).
    pub key_cache: KeyCacheConfig,
    /// Rate limiting of API-key traffic.
    pub rate_limit: RateLimitConfig,
    /// Tenant rules.
    pub policy: PolicyConfig,
    /// Names of the identity headers set upstream.
    pub headers: HeaderNames,
    /// What denials and allows carry back to the client.
    pub response: ResponseConfig,
    /// Caps on what a request may carry.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// OpenTelemetry spans of decisions, sent to an OTLP collector. Off unless set.
    pub tracing_export: Option<TracingExportConfig>,
    /// What only the Envoy module reads (config reloads); the daemon ignores it.
    pub module: ModuleConfig,
    /// Each key's decisions per hour, for billing and support.
    pub usage: UsageConfig,
    /// What only `gybc-authz key-service` reads; the daemon and the module ignore it.
    pub key_service: KeyServiceConfig,
}

// === loading ===

impl Config {
    /// Reads, overrides, parses and validates a config file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, env)
    }

    /// Parses YAML text (an empty text means all defaults), applies environment overrides, validates.
    pub fn from_yaml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut value: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| invalid("(file)", e.to_string()))?
        };
        if value.is_null() {
            value = Value::Mapping(Default::default());
        }
        apply_env(&mut value, env)?;
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(
                if path == "." { "(root)".into() } else { path },
                e.into_inner().to_string(),
            )
        })?;
        config.validate()?;
        config.resolve_secrets(env)?;
        Ok(config)
    }

    /// Reads the Redis password from its file or environment variable.
    fn resolve_secrets(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        match self.redis.as_mut() {
            Some(r) => r.resolve_password(env),
            None => Ok(()),
        }
    }

    /// Every semantic problem, each with its field path, section by section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut err = |path: String, msg: String| errs.push(FieldError { path, message: msg });

        self.server.validate(&mut err);
        self.jwt.validate(&mut err);
        self.key_store.validate(&mut err);
        let needs_redis = self.key_store == KeyStoreConfig::Redis
            || self.rate_limit.backend == RateLimitBackend::Redis;
        match &self.redis {
            None if needs_redis => err(
                "redis".into(),
                "required by key_store.type: redis or rate_limit.backend: redis".into(),
            ),
            None => {}
            Some(r) => r.validate(&mut err),
        }
        self.key_cache.validate(&mut err);
        self.rate_limit.validate(&mut err);
        self.policy.validate(&mut err);
        self.headers.validate(&mut err);
        self.response.validate(&mut err);
        self.limits.validate(&mut err);
        if let Some(t) = &self.tracing_export {
            t.validate(&mut err);
        }
        self.log.validate(&mut err);
        self.module.validate(&mut err);
        self.usage.validate(&mut err);
        self.key_service.validate(&mut err);

        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(ErrorList(errs)))
        }
    }

    /// The provider plain bearer tokens are verified against.
    pub fn default_provider_name(&self) -> Option<&str> {
        self.jwt
            .default_provider
            .as_deref()
            .or_else(|| self.jwt.providers.first().map(|p| p.name.as_str()))
    }
}

#[cfg(test)]
mod tests;
