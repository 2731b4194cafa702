//! `module`: what only the Envoy module reads; the daemon ignores the section.

use serde::Deserialize;

/// How long a changed config's engine may take to load before Envoy's update is refused.
pub const DEFAULT_READY_TIMEOUT_MS: u64 = 5_000;
/// Envoy's main thread waits this long at most: it serves no other config update meanwhile.
pub const MAX_READY_TIMEOUT_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModuleConfig {
    /// When a listener update brings a changed config while Envoy already serves from a loaded
    /// engine: how long the new engine may take to load its key store and every provider's
    /// signing keys, ms. Past it the update is refused and Envoy keeps the previous config; so
    /// no request meets a new engine that cannot decide yet. Default 5000; 1 to 60000.
    pub ready_timeout_ms: u64,
}

impl Default for ModuleConfig {
    fn default() -> Self {
        Self {
            ready_timeout_ms: DEFAULT_READY_TIMEOUT_MS,
        }
    }
}

impl ModuleConfig {
    /// Every problem of the section, each against its field under `module.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if !(1..=MAX_READY_TIMEOUT_MS).contains(&self.ready_timeout_ms) {
            err(
                "module.ready_timeout_ms".into(),
                format!("must be between 1 and {MAX_READY_TIMEOUT_MS}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Config;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_yaml(yaml, &env)
            .map_err(|e| e.errors().iter().map(|e| e.path.clone()).collect())
    }

    #[test]
    fn ready_timeout_is_bounded() {
        assert_eq!(load("", &[]).unwrap().module.ready_timeout_ms, 5_000);
        assert_eq!(
            load("module: { ready_timeout_ms: 60000 }", &[])
                .unwrap()
                .module
                .ready_timeout_ms,
            60_000
        );
        for bad in [0, 60_001] {
            let yaml = format!("module: {{ ready_timeout_ms: {bad} }}");
            assert_eq!(load(&yaml, &[]).unwrap_err(), ["module.ready_timeout_ms"]);
        }
        assert!(load("module: { ready: 1 }", &[]).is_err());
    }

    /// What the module compares to tell a reload with the same settings from a changed one.
    #[test]
    fn configs_are_equal_by_value_whatever_the_text_or_a_redacted_secret() {
        let a = "jwt: { leeway_secs: 10 }\npolicy: { tenantless_paths: [/a, /b] }\n";
        let same =
            "# a comment\npolicy:\n  tenantless_paths: [/a, /b]\njwt:\n  leeway_secs: 10 # ten\n";
        assert_eq!(load(a, &[]).unwrap(), load(same, &[]).unwrap());
        let changed = "jwt: { leeway_secs: 10 }\npolicy: { tenantless_paths: [/a] }\n";
        assert_ne!(load(a, &[]).unwrap(), load(changed, &[]).unwrap());
        // After environment overrides.
        assert_ne!(
            load(a, &[]).unwrap(),
            load(a, &[("GYBC_AUTHZ__JWT__LEEWAY_SECS", "11")]).unwrap()
        );
        // Two passwords print alike (redacted) but are different configs.
        let redis = "redis: { urls: [\"redis://127.0.0.1:6379\"], password_env: PW }\n";
        let one = load(redis, &[("PW", "one")]).unwrap();
        let two = load(redis, &[("PW", "two")]).unwrap();
        assert_eq!(format!("{one:?}"), format!("{two:?}"));
        assert_ne!(one, two);
        assert_eq!(one, load(redis, &[("PW", "one")]).unwrap());
    }
}
