//! `key_service`: what `gybc-authz key-service` reads (docs/key-service.md); the daemon and the
//! Envoy module accept the section and ignore it. Its command-line flags override these fields.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::ratelimit::RateLimit;

/// The API's address: loopback, since the service trusts the identity headers it receives and
/// only the Envoy in front of it (same pod) may reach it.
pub const DEFAULT_KEY_SERVICE_LISTEN_ADDR: &str = "127.0.0.1:8090";
/// `/healthz`, `/readyz` and `/metrics`: no credential ever crosses this port.
pub const DEFAULT_KEY_SERVICE_ADMIN_ADDR: &str = "127.0.0.1:8191";
/// Where the API lives, as every platform service: `/api/v1/<domain>/<service>`.
pub const DEFAULT_KEY_SERVICE_PATH_PREFIX: &str = "/api/v1/iam/api-keys";
/// The scopes a key may get unless the operator names others.
pub const DEFAULT_KEY_SERVICE_ALLOWED_SCOPES: [&str; 2] = ["keys:manage", "users:impersonate"];
/// A request body (protojson) larger than this is refused with 413 before it is parsed.
pub const DEFAULT_KEY_SERVICE_MAX_BODY_BYTES: usize = 64 * 1024;
/// The body limit's bounds: a create with every field at its longest fits in 32 KiB.
pub const MIN_KEY_SERVICE_MAX_BODY_BYTES: usize = 1024;
pub const MAX_KEY_SERVICE_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// A request still running after this long is answered 504: below the Envoy route's timeout
/// (10 s in deploy/envoy/key-service.yaml), so the caller gets this JSON rather than Envoy's.
pub const DEFAULT_KEY_SERVICE_REQUEST_TIMEOUT_MS: u64 = 5_000;
pub const MAX_KEY_SERVICE_REQUEST_TIMEOUT_MS: u64 = 60_000;
/// Active keys (neither revoked nor expired) one tenant may hold.
pub const DEFAULT_KEY_SERVICE_MAX_ACTIVE_KEYS_PER_TENANT: u32 = 100;
pub const MAX_KEY_SERVICE_MAX_ACTIVE_KEYS_PER_TENANT: u32 = 100_000;
/// Calls one caller (a user, or a secret key) may make per replica: a burst of 120, then two a
/// second.
pub const DEFAULT_KEY_SERVICE_CALLER_RATE_LIMIT: &str = "120/60s";
/// Callers whose rate-limit state one replica holds at most (16 bytes each).
pub const DEFAULT_KEY_SERVICE_MAX_TRACKED_CALLERS: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyServiceConfig {
    /// The API's listen address (`--listen`). Default `127.0.0.1:8090`: keep it on loopback,
    /// behind the Envoy that sends every request through gybc-authz.
    pub listen_addr: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics` listen address. Default `127.0.0.1:8191`; use
    /// `0.0.0.0:8191` for kubelet probes (the Helm chart does). It serves no key and reads no
    /// identity header, so it may be reachable where the API must not be.
    pub admin_addr: SocketAddr,
    /// Where the methods live (`--path-prefix`). Default `/api/v1/iam/api-keys`.
    pub path_prefix: String,
    /// The scopes a key may be given (`--allowed-scope`, repeated). Default `keys:manage`,
    /// `users:impersonate`.
    pub allowed_scopes: Vec<String>,
    /// The largest request body, bytes; a larger one is refused with 413. Default 65536
    /// (1024 to 4194304).
    pub max_body_bytes: usize,
    /// A request not answered within this long gets 504 `deadline_exceeded`, ms. Default 5000
    /// (100 to 60000); keep it below the Envoy route's timeout.
    pub request_timeout_ms: u64,
    /// The most active keys (neither revoked nor expired) one tenant may hold; one more is
    /// refused and nothing is written. Default 100 (1 to 100000).
    pub max_active_keys_per_tenant: u32,
    /// Calls one caller (a user or a secret key) may make, per replica, as
    /// `<requests>/<window>`; more get 429 with `Retry-After`. Default `120/60s`.
    pub caller_rate_limit: RateLimit,
}

impl Default for KeyServiceConfig {
    fn default() -> Self {
        Self {
            listen_addr: DEFAULT_KEY_SERVICE_LISTEN_ADDR
                .parse()
                .expect("valid default"),
            admin_addr: DEFAULT_KEY_SERVICE_ADMIN_ADDR
                .parse()
                .expect("valid default"),
            path_prefix: DEFAULT_KEY_SERVICE_PATH_PREFIX.to_owned(),
            allowed_scopes: DEFAULT_KEY_SERVICE_ALLOWED_SCOPES
                .map(str::to_owned)
                .to_vec(),
            max_body_bytes: DEFAULT_KEY_SERVICE_MAX_BODY_BYTES,
            request_timeout_ms: DEFAULT_KEY_SERVICE_REQUEST_TIMEOUT_MS,
            max_active_keys_per_tenant: DEFAULT_KEY_SERVICE_MAX_ACTIVE_KEYS_PER_TENANT,
            caller_rate_limit: DEFAULT_KEY_SERVICE_CALLER_RATE_LIMIT
                .parse()
                .expect("valid default"),
        }
    }
}

/// A path prefix the service can route: absolute, no trailing slash, and plain path segments
/// (no `{`, `}` or `*`, which the router would read as patterns; no empty, `.` or `..` segment).
pub fn is_path_prefix(p: &str) -> bool {
    p.len() > 1
        && p.starts_with('/')
        && !p.ends_with('/')
        && p[1..].split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':')
                })
        })
}

/// A scope name as keys carry it: visible ASCII without spaces or commas (the data path joins a
/// key's scopes with spaces in `x-scopes`).
pub fn is_scope(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

impl KeyServiceConfig {
    /// Every problem of the section, each against its field under `key_service.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if !is_path_prefix(&self.path_prefix) {
            err(
                "key_service.path_prefix".into(),
                "must start with `/`, not end with one, and hold plain segments (letters, digits, - _ . ~ :)".into(),
            );
        }
        if self.allowed_scopes.is_empty() {
            err(
                "key_service.allowed_scopes".into(),
                "must name at least one scope".into(),
            );
        }
        for (i, s) in self.allowed_scopes.iter().enumerate() {
            if !is_scope(s) {
                err(
                    format!("key_service.allowed_scopes[{i}]"),
                    "must be 1 to 128 visible ASCII characters, without spaces or commas".into(),
                );
            }
        }
        if !(MIN_KEY_SERVICE_MAX_BODY_BYTES..=MAX_KEY_SERVICE_MAX_BODY_BYTES)
            .contains(&self.max_body_bytes)
        {
            err(
                "key_service.max_body_bytes".into(),
                format!(
                    "must be between {MIN_KEY_SERVICE_MAX_BODY_BYTES} and {MAX_KEY_SERVICE_MAX_BODY_BYTES}"
                ),
            );
        }
        if !(100..=MAX_KEY_SERVICE_REQUEST_TIMEOUT_MS).contains(&self.request_timeout_ms) {
            err(
                "key_service.request_timeout_ms".into(),
                format!("must be between 100 and {MAX_KEY_SERVICE_REQUEST_TIMEOUT_MS}"),
            );
        }
        if !(1..=MAX_KEY_SERVICE_MAX_ACTIVE_KEYS_PER_TENANT)
            .contains(&self.max_active_keys_per_tenant)
        {
            err(
                "key_service.max_active_keys_per_tenant".into(),
                format!("must be between 1 and {MAX_KEY_SERVICE_MAX_ACTIVE_KEYS_PER_TENANT}"),
            );
        }
        // Port 0 (any free port) is the one address that may repeat.
        if self.admin_addr.port() != 0 && self.admin_addr == self.listen_addr {
            err(
                "key_service.admin_addr".into(),
                "must differ from key_service.listen_addr".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Config;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_yaml(yaml, &env)
            .map_err(|e| e.errors().iter().map(|e| e.path.clone()).collect())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let k = load("", &[]).unwrap().key_service;
        assert_eq!(k, KeyServiceConfig::default());
        assert_eq!(k.listen_addr.to_string(), "127.0.0.1:8090");
        assert_eq!(k.admin_addr.to_string(), "127.0.0.1:8191");
        assert_eq!(k.path_prefix, "/api/v1/iam/api-keys");
        assert_eq!(k.allowed_scopes, ["keys:manage", "users:impersonate"]);
        assert_eq!(k.max_body_bytes, 65_536);
        assert_eq!(k.request_timeout_ms, 5_000);
        assert_eq!(k.max_active_keys_per_tenant, 100);
        assert_eq!(k.caller_rate_limit.to_string(), "120/60s");
    }

    #[test]
    fn a_valid_section_loads_and_env_overrides_every_field() {
        let k = load(
            "key_service:\n  listen_addr: 127.0.0.1:9000\n  path_prefix: /api/v2/iam/keys\n  \
             allowed_scopes: [keys:manage, threads:read]\n  max_active_keys_per_tenant: 5\n  \
             caller_rate_limit: 10/1s\n",
            &[],
        )
        .unwrap()
        .key_service;
        assert_eq!(k.listen_addr.port(), 9000);
        assert_eq!(k.allowed_scopes, ["keys:manage", "threads:read"]);
        assert_eq!(k.max_active_keys_per_tenant, 5);
        assert_eq!(k.caller_rate_limit.to_string(), "10/1s");

        let k = load(
            "key_service: { max_active_keys_per_tenant: 5 }",
            &[
                ("GYBC_AUTHZ__KEY_SERVICE__LISTEN_ADDR", "127.0.0.1:9100"),
                ("GYBC_AUTHZ__KEY_SERVICE__ADMIN_ADDR", "0.0.0.0:9101"),
                ("GYBC_AUTHZ__KEY_SERVICE__PATH_PREFIX", "/keys"),
                ("GYBC_AUTHZ__KEY_SERVICE__ALLOWED_SCOPES", "[a:b, c:d]"),
                ("GYBC_AUTHZ__KEY_SERVICE__MAX_BODY_BYTES", "2048"),
                ("GYBC_AUTHZ__KEY_SERVICE__REQUEST_TIMEOUT_MS", "250"),
                ("GYBC_AUTHZ__KEY_SERVICE__MAX_ACTIVE_KEYS_PER_TENANT", "7"),
                ("GYBC_AUTHZ__KEY_SERVICE__CALLER_RATE_LIMIT", "3/1m"),
            ],
        )
        .unwrap()
        .key_service;
        assert_eq!(
            k,
            KeyServiceConfig {
                listen_addr: "127.0.0.1:9100".parse().unwrap(),
                admin_addr: "0.0.0.0:9101".parse().unwrap(),
                path_prefix: "/keys".into(),
                allowed_scopes: vec!["a:b".into(), "c:d".into()],
                max_body_bytes: 2048,
                request_timeout_ms: 250,
                max_active_keys_per_tenant: 7,
                caller_rate_limit: "3/60s".parse().unwrap(),
            }
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let errs = load(
            "key_service:\n  listen_addr: 127.0.0.1:9000\n  admin_addr: 127.0.0.1:9000\n  \
             path_prefix: /api/{method}/\n  allowed_scopes: [ok, 'a b', '']\n  \
             max_body_bytes: 10\n  request_timeout_ms: 0\n  max_active_keys_per_tenant: 0\n",
            &[],
        )
        .unwrap_err();
        for field in [
            "key_service.admin_addr",
            "key_service.path_prefix",
            "key_service.allowed_scopes[1]",
            "key_service.allowed_scopes[2]",
            "key_service.max_body_bytes",
            "key_service.request_timeout_ms",
            "key_service.max_active_keys_per_tenant",
        ] {
            assert!(
                errs.iter().any(|e| e == field),
                "{field} not named: {errs:?}"
            );
        }
        assert_eq!(
            load("key_service: { allowed_scopes: [] }", &[]).unwrap_err(),
            ["key_service.allowed_scopes"]
        );
        assert_eq!(
            load("key_service: { caller_rate_limit: lots }", &[]).unwrap_err(),
            ["key_service.caller_rate_limit"]
        );
        assert_eq!(
            load("key_service: { max_keys: 5 }", &[]).unwrap_err(),
            ["key_service.max_keys"],
            "an unknown field is refused"
        );
        // Port 0 may repeat: each gets a free port.
        assert!(
            load(
                "key_service: { listen_addr: 127.0.0.1:0, admin_addr: 127.0.0.1:0 }",
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn path_prefixes_and_scopes() {
        for good in ["/api/v1/iam/api-keys", "/keys", "/a.b/c~d/e:f"] {
            assert!(is_path_prefix(good), "{good}");
        }
        for bad in [
            "", "/", "keys", "/keys/", "//keys", "/a/../b", "/a/./b", "/{m}", "/a*", "/a b",
        ] {
            assert!(!is_path_prefix(bad), "{bad}");
        }
        assert!(is_scope("keys:manage"));
        for bad in ["", "a b", "a,b", "a\tb", &"x".repeat(129)] {
            assert!(!is_scope(bad), "{bad:?}");
        }
    }
}
