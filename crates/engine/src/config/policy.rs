//! `policy`: the tenant rules, and secret keys sent by browsers.

use serde::Deserialize;

/// The one path where a JWT without a tenant is allowed: creating the user's first organisation.
pub const DEFAULT_TENANTLESS_PATH: &str = "/api/v1/orgs/create";
/// A secret key in a web page is a leaked secret: refused unless the operator says otherwise.
pub const DEFAULT_SECRET_KEY_FROM_BROWSER: SecretKeyFromBrowser = SecretKeyFromBrowser::Deny;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Exact paths (no query) where a JWT without a tenant claim is allowed.
    /// Default `[/api/v1/orgs/create]`.
    pub tenantless_paths: Vec<String>,
    /// Forward `X-API-Key` upstream. Default false: services never see the secret.
    pub forward_api_key: bool,
    /// What to do with a secret (`sk_`) key sent by a browser (a request with an `Origin`
    /// header): `deny` (default) refuses it with 403 `secret_key_in_browser`, since a secret
    /// that a web page holds is a leaked secret; `allow` lets it through as any `sk_` request.
    /// Either way it is counted in `gybc_authz_secret_key_from_browser_total`.
    pub secret_key_from_browser: SecretKeyFromBrowser,
}

/// The policy for a secret key sent by a browser (`policy.secret_key_from_browser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKeyFromBrowser {
    /// Refuse it: 403 `secret_key_in_browser`.
    Deny,
    /// Let it through, counted.
    Allow,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            tenantless_paths: vec![DEFAULT_TENANTLESS_PATH.to_owned()],
            forward_api_key: false,
            secret_key_from_browser: DEFAULT_SECRET_KEY_FROM_BROWSER,
        }
    }
}

impl PolicyConfig {
    /// Every problem of the section, each against its field under `policy.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        for (i, p) in self.tenantless_paths.iter().enumerate() {
            if let Err(why) = check_normal_path(p) {
                err(format!("policy.tenantless_paths[{i}]"), why.into());
            }
        }
    }
}

/// A tenantless path must be in normal form; then an exact match also proves the request's path
/// is normal (no dot segments, doubled or encoded slashes can sneak past the comparison).
fn check_normal_path(p: &str) -> Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("must start with `/`");
    }
    if p.contains(['?', '#', '%', '\\']) || p.contains(char::is_whitespace) {
        return Err("must be a plain path (no query, fragment, percent-encoding or backslash)");
    }
    if p.len() > 1
        && p[1..]
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("must be in normal form (no empty, `.` or `..` segments)");
    }
    Ok(())
}
