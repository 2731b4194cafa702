//! `headers`: the names of the identity headers set upstream.

use std::collections::HashSet;

use serde::Deserialize;

/// Upstream identity header names (lower case). Each is stripped from the client's request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    pub tenant_id: String,
    pub user_id: String,
    pub auth_method: String,
    pub api_key_id: String,
    pub scopes: String,
    pub impersonated_by: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        Self {
            tenant_id: "x-tenant-id".into(),
            user_id: "x-user-id".into(),
            auth_method: "x-auth-method".into(),
            api_key_id: "x-api-key-id".into(),
            scopes: "x-scopes".into(),
            impersonated_by: "x-impersonated-by".into(),
        }
    }
}

impl HeaderNames {
    pub fn all(&self) -> [&str; 6] {
        [
            &self.tenant_id,
            &self.user_id,
            &self.auth_method,
            &self.api_key_id,
            &self.scopes,
            &self.impersonated_by,
        ]
    }
}

impl HeaderNames {
    /// Every problem of the section, each against its field under `headers.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let mut seen = HashSet::new();
        let reserved = [
            "authorization",
            "x-api-key",
            "x-on-behalf-of",
            "host",
            "origin",
        ];
        for (field, name) in [
            ("tenant_id", &self.tenant_id),
            ("user_id", &self.user_id),
            ("auth_method", &self.auth_method),
            ("api_key_id", &self.api_key_id),
            ("scopes", &self.scopes),
            ("impersonated_by", &self.impersonated_by),
        ] {
            let path = format!("headers.{field}");
            if !is_header_name(name) {
                err(
                    path,
                    "must be a lower-case header name (a-z, 0-9, -, _)".into(),
                );
            } else if reserved.contains(&name.as_str()) {
                err(
                    path,
                    format!("`{name}` is a request header the daemon reads"),
                );
            } else if !seen.insert(name.as_str()) {
                err(path, format!("`{name}` is used for two identity headers"));
            }
        }
    }
}

/// A lower-case HTTP header name, as both transports compare them.
pub(super) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}
