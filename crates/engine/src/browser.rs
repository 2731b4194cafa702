//! What a browser needs from the API, kept in one place: the request headers a CORS preflight
//! must allow (the credential headers the engine reads, plus what a JSON call and its trace
//! context carry), and the response headers a page must be able to read (everything the answer
//! writes for the client). Envoy's CORS policy, the Helm chart, Istio's `corsPolicy` and the
//! KrakenD gateway are all checked against these lists, so a header added to an answer cannot be
//! forgotten in one of them.
//!
//! Preflights are not the engine's: Envoy's CORS filter answers them in front of the authorizer
//! (docs/browsers.md says why). [`envoy_cors_policy`] writes the policy the shipped Envoy configs
//! and the Helm chart carry, and `gybc-authz cors-policy` prints it for a given config.

use crate::config::Config;
use crate::request::{AUTHORIZATION, X_API_KEY, X_ON_BEHALF_OF};
use crate::trace_context::{TRACEPARENT, TRACESTATE};

/// The client's rate-limit headers, on every answer to a key-authenticated request.
pub const X_RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
pub const X_RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
pub const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";
/// Seconds to wait, on 429 and 503.
pub const RETRY_AFTER: &str = "retry-after";
/// The IETF draft fields, with `rate_limit.ietf_headers`.
pub const RATELIMIT: &str = "ratelimit";
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// The token challenge on a 401 for a bearer token (RFC 6750).
pub const WWW_AUTHENTICATE: &str = "www-authenticate";
/// The key service's answer to a replayed `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// The request headers of a JSON call besides credentials: its body's type and the key
/// service's retry key.
pub const CONTENT_TYPE: &str = "content-type";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The methods a page may call the API with (`Access-Control-Allow-Methods`). GET, HEAD and POST
/// need no preflight approval; the others are listed for APIs that use them.
pub const ALLOWED_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The origins a preflight is answered for by default: any well-formed one, `http` or `https`,
/// a lower-case ASCII host name or a bracketed IPv6 address, an optional port, and nothing
/// else (no path, no `null`, no upper case, no control or non-ASCII byte), so the origin Envoy
/// reflects in `Access-Control-Allow-Origin` is never text a client made up. Which origins may
/// use a key is the key's own allowlist (`origin_not_allowed`); a preflight grants nothing. A
/// full match (Envoy's `safe_regex`, RE2), kept small: Envoy refuses a regex whose compiled
/// program is over 100 (`re2.max_program_size.error_level`).
pub const DEFAULT_PREFLIGHT_ORIGIN_REGEX: &str =
    r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?";

/// How long a browser may reuse a preflight's answer (`Access-Control-Max-Age`), in seconds:
/// two hours, the most Chromium honours (Firefox allows a day).
pub const DEFAULT_PREFLIGHT_MAX_AGE_SECS: u32 = 7200;

/// The type URL of Envoy's per-route CORS policy.
pub const ENVOY_CORS_POLICY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// Request headers a page may send cross-origin (`Access-Control-Allow-Headers`), lower case.
pub fn allowed_request_headers(_config: &Config) -> Vec<&'static str> {
    vec![
        X_API_KEY,
        AUTHORIZATION,
        X_ON_BEHALF_OF,
        CONTENT_TYPE,
        IDEMPOTENCY_KEY,
        TRACEPARENT,
        TRACESTATE,
    ]
}

/// Response headers a page must be able to read (`Access-Control-Expose-Headers`), lower case:
/// exactly the ones the engine's answers (and the key service's) write for the client under this
/// config.
pub fn exposed_response_headers(config: &Config) -> Vec<&'static str> {
    let mut names = vec![
        X_RATELIMIT_LIMIT,
        X_RATELIMIT_REMAINING,
        X_RATELIMIT_RESET,
        RETRY_AFTER,
    ];
    if config.rate_limit.ietf_headers {
        names.extend([RATELIMIT, RATELIMIT_POLICY]);
    }
    names.extend([WWW_AUTHENTICATE, IDEMPOTENT_REPLAYED]);
    names
}

/// A header list as a CORS header carries it: names joined by `", "`.
pub fn header_list(names: &[&str]) -> String {
    names.join(", ")
}

/// Envoy's CORS policy (`envoy.extensions.filters.http.cors.v3.CorsPolicy`, set in the virtual
/// host's `typed_per_filter_config` for `envoy.filters.http.cors`) for this config, with the
/// default origins and max age: what deploy/envoy/*.yaml and the Helm chart carry, field for
/// field. A preflight whose origin does not match is answered by Envoy without CORS headers
/// (`forward_not_matching_preflights: false`), so no preflight ever reaches the authorizer.
pub fn envoy_cors_policy(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "@type": ENVOY_CORS_POLICY_TYPE,
        "allow_origin_string_match": [{"safe_regex": {"regex": DEFAULT_PREFLIGHT_ORIGIN_REGEX}}],
        "allow_methods": header_list(&ALLOWED_METHODS),
        "allow_headers": header_list(&allowed_request_headers(config)),
        "expose_headers": header_list(&exposed_response_headers(config)),
        "max_age": DEFAULT_PREFLIGHT_MAX_AGE_SECS.to_string(),
        "forward_not_matching_preflights": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ietf_fields_are_exposed_only_when_sent() {
        let mut config = Config::default();
        assert!(!exposed_response_headers(&config).contains(&RATELIMIT));
        config.rate_limit.ietf_headers = true;
        let exposed = exposed_response_headers(&config);
        assert!(exposed.contains(&RATELIMIT) && exposed.contains(&RATELIMIT_POLICY));
    }

    #[test]
    fn envoy_s_policy_carries_the_lists_for_this_config() {
        let mut config = Config::default();
        config.rate_limit.ietf_headers = true;
        let policy = envoy_cors_policy(&config);
        let list = |field: &str| {
            policy[field]
                .as_str()
                .unwrap()
                .split(", ")
                .collect::<Vec<_>>()
        };
        assert_eq!(list("allow_headers"), allowed_request_headers(&config));
        assert_eq!(list("expose_headers"), exposed_response_headers(&config));
        assert_eq!(list("allow_methods"), ALLOWED_METHODS);
        assert_eq!(
            policy["max_age"],
            DEFAULT_PREFLIGHT_MAX_AGE_SECS.to_string()
        );
        // A preflight the policy does not match never reaches the authorizer.
        assert_eq!(policy["forward_not_matching_preflights"], false);
    }

    #[test]
    fn the_credential_headers_the_engine_reads_are_allowed() {
        let allowed = allowed_request_headers(&Config::default());
        for name in [X_API_KEY, AUTHORIZATION, X_ON_BEHALF_OF] {
            assert!(allowed.contains(&name), "{name}");
        }
    }
}
