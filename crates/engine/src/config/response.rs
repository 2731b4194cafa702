//! `response`: what denials carry back to the client.

use serde::Deserialize;

/// `Retry-After` on 503 `unavailable`.
pub const DEFAULT_UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;
/// Realm in `WWW-Authenticate: Bearer realm="…"`.
pub const DEFAULT_REALM: &str = "gybc";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseConfig {
    /// Realm in `WWW-Authenticate`. Default `gybc`.
    pub realm: String,
    /// `Retry-After` seconds on 503 `unavailable`. Default 5.
    pub unavailable_retry_after_secs: u64,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            realm: DEFAULT_REALM.into(),
            unavailable_retry_after_secs: DEFAULT_UNAVAILABLE_RETRY_AFTER_SECS,
        }
    }
}

impl ResponseConfig {
    /// Every problem of the section, each against its field under `response.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.realm.contains('"') || self.realm.contains(char::is_control) {
            err(
                "response.realm".into(),
                "must not contain quotes or control characters".into(),
            );
        }
    }
}
