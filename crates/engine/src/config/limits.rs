//! `limits`: caps on what a request may carry.

use serde::Deserialize;

/// Size caps on credential headers: a larger value is rejected without being parsed.
pub const DEFAULT_MAX_AUTHORIZATION_BYTES: usize = 8_192;
pub const DEFAULT_MAX_API_KEY_BYTES: usize = 256;
/// Request headers read per check (pseudo-headers included). Envoy itself caps a request at 100
/// headers by default, so only a misconfigured or bypassed proxy comes near this; above it the
/// request is refused rather than half-read.
pub const DEFAULT_MAX_HEADERS: usize = 256;
/// The lowest `limits.max_headers` accepted: Envoy's pseudo-headers and its own `x-*` headers
/// plus the credential headers must fit.
pub const MIN_MAX_HEADERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest `Authorization` value parsed, bytes. Default 8192.
    pub max_authorization_bytes: usize,
    /// Largest `X-API-Key` value looked at, bytes. Default 256.
    pub max_api_key_bytes: usize,
    /// Most request headers read for one check, pseudo-headers and repeated lines included.
    /// Default 256, at least 16. A request with more is refused with 400 `malformed_credentials`
    /// without reading the rest, so a header flood costs a bounded amount of work and a
    /// credential can never hide past the cap.
    pub max_headers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_authorization_bytes: DEFAULT_MAX_AUTHORIZATION_BYTES,
            max_api_key_bytes: DEFAULT_MAX_API_KEY_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

impl LimitsConfig {
    /// Every problem of the section, each against its field under `limits.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.max_authorization_bytes < 64 {
            err(
                "limits.max_authorization_bytes".into(),
                "must be at least 64".into(),
            );
        }
        if self.max_api_key_bytes < 16 {
            err(
                "limits.max_api_key_bytes".into(),
                "must be at least 16".into(),
            );
        }
        if self.max_headers < MIN_MAX_HEADERS {
            err(
                "limits.max_headers".into(),
                format!("must be at least {MIN_MAX_HEADERS}"),
            );
        }
    }
}
