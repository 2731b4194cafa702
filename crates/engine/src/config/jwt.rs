//! `jwt`: the token providers, where their signing keys come from, and the verified-token cache.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

/// Google's published certificates for Firebase ID tokens (`kid` → X.509 PEM).
pub const GOOGLE_FIREBASE_KEYS_URL: &str =
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com";
/// Clock skew tolerated on `exp`, `iat`, `nbf` and `auth_time`.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Upper bound on the leeway: more would let long-expired tokens back in.
pub const MAX_LEEWAY_SECS: u64 = 300;
/// Distinct verified tokens remembered until their `exp`.
pub const DEFAULT_JWT_CACHE_ENTRIES: u64 = 100_000;
/// At most one key fetch per provider per interval when tokens name an unknown `kid`.
pub const DEFAULT_UNKNOWN_KID_REFETCH_MS: u64 = 30_000;
/// How long a Check waits for the fetch its unknown `kid` started: below Envoy's ext_authz timeout.
pub const DEFAULT_UNKNOWN_KID_WAIT_MS: u64 = 250;
/// Key refresh period when the key endpoint sends no `Cache-Control: max-age` (and for files).
pub const DEFAULT_KEYS_REFRESH_SECS: u64 = 300;
/// Lower bound on any key refresh period, whatever `max-age` says.
pub const DEFAULT_KEYS_MIN_REFRESH_SECS: u64 = 10;
/// Timeout of one key fetch.
pub const DEFAULT_KEYS_FETCH_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Token issuers. A plain `Authorization: Bearer` request is verified against the default
    /// provider; a publishable key names its own.
    pub providers: Vec<ProviderConfig>,
    /// Provider for plain bearer tokens. Default: the first provider.
    pub default_provider: Option<String>,
    /// Clock skew tolerated on token times, seconds. Default 30, at most 300.
    pub leeway_secs: u64,
    /// Verified tokens cached until their `exp`. Default 100000.
    pub cache_max_entries: u64,
    /// Minimum time between key fetches caused by unknown `kid`s, ms. Default 30000.
    pub unknown_kid_refetch_interval_ms: u64,
    /// How long a Check waits for the key fetch its unknown `kid` started, ms; the fetch itself
    /// goes on to completion. Keep it below Envoy's ext_authz timeout. Default 250.
    pub unknown_kid_wait_ms: u64,
    /// Refresh period when the endpoint sends no `max-age`, seconds. Default 300.
    pub keys_refresh_secs: u64,
    /// Floor on the refresh period, seconds. Default 10.
    pub keys_min_refresh_secs: u64,
    /// Timeout of one key fetch, ms. Default 5000.
    pub keys_fetch_timeout_ms: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            default_provider: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            cache_max_entries: DEFAULT_JWT_CACHE_ENTRIES,
            unknown_kid_refetch_interval_ms: DEFAULT_UNKNOWN_KID_REFETCH_MS,
            unknown_kid_wait_ms: DEFAULT_UNKNOWN_KID_WAIT_MS,
            keys_refresh_secs: DEFAULT_KEYS_REFRESH_SECS,
            keys_min_refresh_secs: DEFAULT_KEYS_MIN_REFRESH_SECS,
            keys_fetch_timeout_ms: DEFAULT_KEYS_FETCH_TIMEOUT_MS,
        }
    }
}

/// One Firebase project (or any issuer following Firebase's token rules).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name that publishable keys refer to (`jwt_provider`).
    pub name: String,
    /// Firebase project id: `iss` must be `https://securetoken.google.com/<project_id>`, `aud` must be it.
    pub project_id: String,
    /// Claim holding the tenant. Default `tenant_id`.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Where the signing keys come from. Default: Google's Firebase certificate endpoint.
    #[serde(default)]
    pub keys: KeySourceConfig,
}

fn default_tenant_claim() -> String {
    "tenant_id".to_owned()
}

/// A key endpoint (Google's `kid` → X.509 map or a JWK set) or a local file in the same formats.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum KeySourceConfig {
    Url {
        url: String,
    },
    File {
        path: PathBuf,
    },
    /// Keys given inline (dev mode); not meant for production files.
    Inline {
        json: String,
    },
}

impl Default for KeySourceConfig {
    fn default() -> Self {
        Self::Url {
            url: GOOGLE_FIREBASE_KEYS_URL.to_owned(),
        }
    }
}

impl JwtConfig {
    /// Every problem of the section, each against its field under `jwt.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let mut names = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            let at = format!("jwt.providers[{i}]");
            if p.name.trim().is_empty() {
                err(format!("{at}.name"), "must not be empty".into());
            } else if !names.insert(p.name.as_str()) {
                err(
                    format!("{at}.name"),
                    format!("duplicate provider name `{}`", p.name),
                );
            }
            if p.project_id.trim().is_empty() || p.project_id.contains(char::is_whitespace) {
                err(
                    format!("{at}.project_id"),
                    "must be a non-empty Firebase project id".into(),
                );
            }
            if p.tenant_claim.trim().is_empty() {
                err(format!("{at}.tenant_claim"), "must not be empty".into());
            }
            match &p.keys {
                KeySourceConfig::Url { url } => {
                    if !(url.starts_with("https://") || url.starts_with("http://")) {
                        err(format!("{at}.keys.url"), "must be an http(s) URL".into());
                    }
                }
                KeySourceConfig::File { path } => {
                    if path.as_os_str().is_empty() {
                        err(format!("{at}.keys.path"), "must not be empty".into());
                    }
                }
                KeySourceConfig::Inline { json } => {
                    if json.trim().is_empty() {
                        err(format!("{at}.keys.json"), "must not be empty".into());
                    }
                }
            }
        }
        if let Some(d) = &self.default_provider
            && !names.contains(d.as_str())
        {
            err(
                "jwt.default_provider".into(),
                format!("no provider named `{d}`"),
            );
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            err(
                "jwt.leeway_secs".into(),
                format!("must be at most {MAX_LEEWAY_SECS}"),
            );
        }
        if self.cache_max_entries == 0 {
            err("jwt.cache_max_entries".into(), "must be at least 1".into());
        }
        if self.keys_fetch_timeout_ms == 0 {
            err(
                "jwt.keys_fetch_timeout_ms".into(),
                "must be at least 1".into(),
            );
        }
        if self.keys_min_refresh_secs == 0 {
            err(
                "jwt.keys_min_refresh_secs".into(),
                "must be at least 1".into(),
            );
        }
        if self.keys_refresh_secs < self.keys_min_refresh_secs {
            err(
                "jwt.keys_refresh_secs".into(),
                "must be at least jwt.keys_min_refresh_secs".into(),
            );
        }
    }
}
