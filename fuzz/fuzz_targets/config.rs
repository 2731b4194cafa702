//! Config parsing: `Config::from_yaml` on arbitrary text, with environment overrides taken from
//! lines of the form `GYBC_AUTHZ__…=value`. It never panics; a config it accepts validates again
//! and holds the invariants later code relies on.
#![no_main]

use std::collections::BTreeMap;

use gybc_authz_engine::config::{Config, ENV_PREFIX, MAX_LEEWAY_SECS, MIN_MAX_HEADERS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut env = BTreeMap::new();
    let mut yaml = String::new();
    for line in text.lines() {
        match line.split_once('=') {
            Some((k, v)) if k.starts_with(ENV_PREFIX) => {
                env.insert(k.to_owned(), v.to_owned());
            }
            _ => {
                yaml.push_str(line);
                yaml.push('\n');
            }
        }
    }
    let Ok(cfg) = Config::from_yaml(&yaml, &env) else {
        return;
    };
    assert!(cfg.validate().is_ok());
    assert!(cfg.jwt.leeway_secs <= MAX_LEEWAY_SECS);
    assert!(cfg.limits.max_headers >= MIN_MAX_HEADERS);
    assert!(cfg.limits.max_authorization_bytes >= 64);
    for p in &cfg.policy.tenantless_paths {
        assert!(p.starts_with('/') && !p.contains(['?', '#', '%', '\\']));
    }
    if let Some(d) = &cfg.jwt.default_provider {
        assert!(cfg.jwt.providers.iter().any(|p| &p.name == d));
    }
    let names = cfg.headers.all();
    for n in names {
        assert!(!n.is_empty() && !["authorization", "x-api-key", "x-on-behalf-of"].contains(&n));
    }
});
