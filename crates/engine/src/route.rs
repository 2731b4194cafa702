//! Per-route settings from Envoy's `context_extensions` (`ExtAuthzPerRoute.check_settings`), under
//! the `gybc.` prefix. A key under the prefix that is not known, or a value that does not parse, is
//! an error: a typo in an Envoy route must never silently open it.

use std::collections::HashMap;

use crate::decision::AuthMethod;

pub const PREFIX: &str = "gybc.";
/// `"true"`: no credential needed; one that is sent is still verified (and a bad one denied).
pub const PUBLIC: &str = "gybc.public";
/// Scopes an API key must hold on this route, separated by commas or spaces.
pub const REQUIRED_SCOPES: &str = "gybc.required_scopes";
/// `"true"`: a JWT without a tenant is allowed on this route too.
pub const TENANTLESS: &str = "gybc.tenantless";
/// Which credentials this route accepts: `jwt`, `api_key`, `publishable_key`, comma-separated.
pub const ALLOWED_METHODS: &str = "gybc.allowed_methods";
pub const KNOWN: [&str; 4] = [PUBLIC, REQUIRED_SCOPES, TENANTLESS, ALLOWED_METHODS];

/// A route's settings; the default is the global behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    pub public: bool,
    pub required_scopes: Vec<String>,
    pub tenantless: bool,
    /// `None`: every method.
    pub allowed_methods: Option<Vec<AuthMethod>>,
}

/// What is wrong with a route's settings. `key` is operator input from the Envoy config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route setting `{key}`: {why}")]
pub struct RouteError {
    pub key: String,
    pub why: &'static str,
}

/// Longest key name carried into logs and metric labels.
const MAX_KEY_CHARS: usize = 64;

impl RouteSettings {
    pub fn parse(ext: &HashMap<String, String>) -> Result<Self, RouteError> {
        let mut s = RouteSettings::default();
        // Sorted, so the same bad config always reports the same key.
        let mut keys: Vec<&String> = ext.keys().filter(|k| k.starts_with(PREFIX)).collect();
        keys.sort();
        for key in keys {
            let value = ext[key].trim();
            let bad = |why| RouteError {
                key: key.chars().take(MAX_KEY_CHARS).collect(),
                why,
            };
            match key.as_str() {
                PUBLIC => s.public = parse_bool(value).ok_or(bad("must be true or false"))?,
                TENANTLESS => {
                    s.tenantless = parse_bool(value).ok_or(bad("must be true or false"))?
                }
                REQUIRED_SCOPES => {
                    s.required_scopes = value
                        .split([',', ' '])
                        .filter(|x| !x.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if s.required_scopes.is_empty() {
                        return Err(bad("names no scope"));
                    }
                }
                ALLOWED_METHODS => {
                    let mut methods = Vec::new();
                    for m in value.split([',', ' ']).filter(|x| !x.is_empty()) {
                        methods.push(match m {
                            "jwt" => AuthMethod::Jwt,
                            "api_key" => AuthMethod::ApiKey,
                            "publishable_key" => AuthMethod::PublishableKey,
                            _ => return Err(bad("methods are jwt, api_key, publishable_key")),
                        });
                    }
                    if methods.is_empty() {
                        return Err(bad("names no method"));
                    }
                    s.allowed_methods = Some(methods);
                }
                _ => return Err(bad("unknown key")),
            }
        }
        Ok(s)
    }

    pub fn allows_method(&self, m: AuthMethod) -> bool {
        self.allowed_methods
            .as_ref()
            .is_none_or(|ms| ms.contains(&m))
    }

    /// The first required scope `scopes` lacks.
    pub fn missing_scope<'a>(&'a self, scopes: &[String]) -> Option<&'a str> {
        self.required_scopes
            .iter()
            .find(|r| !scopes.contains(r))
            .map(String::as_str)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<RouteSettings, RouteError> {
        RouteSettings::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn settings_table() {
        assert_eq!(parse(&[]).unwrap(), RouteSettings::default());
        assert_eq!(
            parse(&[("other.key", "x"), ("virtual_host", "a")]).unwrap(),
            RouteSettings::default(),
            "other prefixes are not ours"
        );
        let s = parse(&[
            (PUBLIC, "true"),
            (TENANTLESS, "false"),
            (REQUIRED_SCOPES, "threads:read, threads:write"),
            (ALLOWED_METHODS, "api_key,publishable_key"),
        ])
        .unwrap();
        assert!(s.public && !s.tenantless);
        assert_eq!(s.required_scopes, ["threads:read", "threads:write"]);
        assert!(s.allows_method(AuthMethod::ApiKey) && !s.allows_method(AuthMethod::Jwt));
        assert_eq!(
            s.missing_scope(&["threads:read".into()]),
            Some("threads:write")
        );
        assert_eq!(
            s.missing_scope(&["threads:write".into(), "threads:read".into()]),
            None
        );

        for (k, v, why) in [
            ("gybc.pubilc", "true", "unknown key"),
            ("gybc.public", "yes", "must be true or false"),
            ("gybc.tenantless", "1", "must be true or false"),
            ("gybc.required_scopes", " , ", "names no scope"),
            (
                "gybc.allowed_methods",
                "jwt,basic",
                "methods are jwt, api_key, publishable_key",
            ),
            ("gybc.allowed_methods", "", "names no method"),
        ] {
            let e = parse(&[(k, v)]).unwrap_err();
            assert_eq!((e.key.as_str(), e.why), (k, why));
        }
        let long = format!("gybc.{}", "x".repeat(500));
        assert_eq!(
            parse(&[(&long, "1")]).unwrap_err().key.chars().count(),
            64,
            "bounded in logs and labels"
        );
    }
}
