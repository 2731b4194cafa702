//! `key_store`: where API key records come from.

use std::path::PathBuf;

use serde::Deserialize;

/// File key store: how often the file's metadata is checked for a change.
pub const DEFAULT_FILE_RELOAD_MS: u64 = 1_000;

#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum KeyStoreConfig {
    /// No key store: every API key is unknown. For JWT-only deployments.
    #[default]
    None,
    /// A YAML or JSON file of key records (hashes only), reloaded when it changes.
    File {
        path: PathBuf,
        /// How often the file is checked for a change, ms. Default 1000.
        #[serde(default = "default_file_reload_ms")]
        reload_interval_ms: u64,
    },
    /// Records in the shared Redis (section `redis`), written by the platform's key service;
    /// revocations arrive on its pub/sub channel. Layout: docs/key-store.md.
    Redis,
}

fn default_file_reload_ms() -> u64 {
    DEFAULT_FILE_RELOAD_MS
}

impl KeyStoreConfig {
    /// Every problem of the section, each against its field under `key_store.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if let KeyStoreConfig::File {
            path,
            reload_interval_ms,
        } = self
        {
            if path.as_os_str().is_empty() {
                err("key_store.path".into(), "must not be empty".into());
            }
            if *reload_interval_ms == 0 {
                err(
                    "key_store.reload_interval_ms".into(),
                    "must be at least 1".into(),
                );
            }
        }
    }
}
