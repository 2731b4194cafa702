//! `usage`: counting each key's decisions per hour, for billing and support
//! (docs/key-store.md has the Redis layout).

use serde::Deserialize;

pub const DEFAULT_USAGE_FLUSH_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_USAGE_RETENTION_DAYS: u32 = 35;
pub const DEFAULT_USAGE_MAX_KEYS_PER_INTERVAL: usize = 100_000;
pub const DEFAULT_USAGE_MAX_HELD_ENTRIES: usize = 200_000;
/// The longest retention: a year and a month of hourly hashes per key.
pub const MAX_USAGE_RETENTION_DAYS: u32 = 400;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Count every decision about a known key (allowed, rate_limited, denied) per hour. Default
    /// true: the cost is one short lock per such decision.
    pub enabled: bool,
    /// How often the counts are written: with Redis, one pipeline per interval per replica.
    /// Default 1000; at least 100, at most 60000.
    pub flush_interval_ms: u64,
    /// Days an hour's counts are kept in Redis. Default 35 (a month's bills and some); 1 to 400.
    pub retention_days: u32,
    /// Most distinct keys counted in one interval; decisions of further keys are not counted
    /// but counted as lost (`gybc_authz_usage_dropped_total{reason="key_cap"}`). Default 100000.
    pub max_keys_per_interval: usize,
    /// Most (key, hour) entries held for a retry while Redis cannot be written, about 40 bytes
    /// each (the bound of usage's memory with `max_keys_per_interval`); what does not fit is
    /// counted as lost (`held_full`). Default 200000; at least `max_keys_per_interval`.
    pub max_held_entries: usize,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_interval_ms: DEFAULT_USAGE_FLUSH_INTERVAL_MS,
            retention_days: DEFAULT_USAGE_RETENTION_DAYS,
            max_keys_per_interval: DEFAULT_USAGE_MAX_KEYS_PER_INTERVAL,
            max_held_entries: DEFAULT_USAGE_MAX_HELD_ENTRIES,
        }
    }
}

impl UsageConfig {
    /// Every problem of the section, each against its field under `usage.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if !(100..=60_000).contains(&self.flush_interval_ms) {
            err(
                "usage.flush_interval_ms".into(),
                "must be between 100 and 60000".into(),
            );
        }
        if !(1..=MAX_USAGE_RETENTION_DAYS).contains(&self.retention_days) {
            err(
                "usage.retention_days".into(),
                format!("must be between 1 and {MAX_USAGE_RETENTION_DAYS}"),
            );
        }
        if self.max_keys_per_interval == 0 {
            err(
                "usage.max_keys_per_interval".into(),
                "must be at least 1".into(),
            );
        }
        if self.max_held_entries < self.max_keys_per_interval {
            err(
                "usage.max_held_entries".into(),
                "must be at least usage.max_keys_per_interval".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::config::Config;

    #[test]
    fn usage_is_on_by_default_and_every_bad_field_is_named() {
        let cfg = Config::from_yaml("", &BTreeMap::new()).unwrap();
        assert_eq!(cfg.usage, super::UsageConfig::default());
        assert!(cfg.usage.enabled);
        let err = Config::from_yaml(
            "usage: { flush_interval_ms: 10, retention_days: 0, max_keys_per_interval: 0, max_held_entries: 0 }",
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        for field in [
            "usage.flush_interval_ms",
            "usage.retention_days",
            "usage.max_keys_per_interval",
        ] {
            assert!(err.contains(field), "{field} not named: {err}");
        }
        let err = Config::from_yaml(
            "usage: { max_keys_per_interval: 10, max_held_entries: 5 }",
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("usage.max_held_entries"), "{err}");
        assert!(Config::from_yaml("usage: { enabeld: false }", &BTreeMap::new()).is_err());
    }
}
