//! `policy`: the tenant rules.

use serde::Deserialize;

/// The one path where a JWT without a tenant is allowed: creating the user's first organisation.
pub const DEFAULT_TENANTLESS_PATH: &str = "/api/v1/orgs/create";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Exact paths (no query) where a JWT without a tenant claim is allowed.
    /// Default `[/api/v1/orgs/create]`.
    pub tenantless_paths: Vec<String>,
    /// Forward `X-API-Key` upstream. Default false: services never see the secret.
    pub forward_api_key: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            tenantless_paths: vec![DEFAULT_TENANTLESS_PATH.to_owned()],
            forward_api_key: false,
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
