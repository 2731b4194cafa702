//! What a browser needs from the API, kept in one place: the request headers a CORS preflight
//! must allow (the credential headers the engine reads, plus what a JSON call and its trace
//! context carry), and the response headers a page must be able to read (everything the answer
//! writes for the client). Envoy's CORS policy, the Helm chart, Istio's `corsPolicy` and the
//! KrakenD gateway are all checked against these lists, so a header added to an answer cannot be
//! forgotten in one of them.

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
    fn the_credential_headers_the_engine_reads_are_allowed() {
        let allowed = allowed_request_headers(&Config::default());
        for name in [X_API_KEY, AUTHORIZATION, X_ON_BEHALF_OF] {
            assert!(allowed.contains(&name), "{name}");
        }
    }
}
