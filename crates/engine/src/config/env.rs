//! Environment overrides: `GYBC_AUTHZ__SECTION__FIELD=value` over the file, read through a trait
//! so tests pass a map instead of mutating the process.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::error::{ConfigError, invalid};

/// Environment variables with this prefix override config fields: `GYBC_AUTHZ__SERVER__GRPC_ADDR`.
pub const ENV_PREFIX: &str = "GYBC_AUTHZ__";

/// Where environment overrides come from. Tests pass a map instead of mutating the process.
pub trait Env {
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// `GYBC_AUTHZ__SERVER__GRPC_ADDR=…` sets `server.grpc_addr`. Values are read as YAML scalars
/// (or flow collections, `[a, b]`), so numbers and booleans keep their types.
pub(super) fn apply_env(root: &mut Value, env: &dyn Env) -> Result<(), ConfigError> {
    let mut vars: Vec<_> = env
        .vars()
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (key, raw) in vars {
        let segments: Vec<String> = key[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(invalid(key, "malformed override name"));
        }
        let parsed: Value = serde_yaml_ng::from_str(&raw).unwrap_or(Value::String(raw.clone()));
        let mut node = &mut *root;
        for seg in &segments[..segments.len() - 1] {
            let map = match node {
                Value::Mapping(m) => m,
                _ => {
                    return Err(invalid(
                        key.clone(),
                        "overrides a field that is not a section",
                    ));
                }
            };
            node = map
                .entry(Value::String(seg.clone()))
                .or_insert_with(|| Value::Mapping(Default::default()));
            if node.is_null() {
                *node = Value::Mapping(Default::default());
            }
        }
        match node {
            Value::Mapping(m) => {
                m.insert(
                    Value::String(segments.last().cloned().unwrap_or_default()),
                    parsed,
                );
            }
            _ => return Err(invalid(key, "overrides a field that is not a section")),
        }
    }
    Ok(())
}
