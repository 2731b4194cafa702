//! The benchmarks' floor door (`--features floor`, never shipped): the least an HTTP filter can do
//! through this crate's `ffi`. It sets one request header (`x-floor: 1`) and continues,
//! allocating nothing of its own.
//!
//! With the filter config `gybc-headers` it writes instead what the real door writes for a cached
//! `sk_` key, with no decision behind it: `x-api-key` removed, four identity headers added, and
//! three `x-ratelimit-*` headers added to the response once its lines are read. What that costs
//! over the plain floor is Envoy's price of the contract's headers through this ABI.
//!
//! `--only envoy-instructions` (BENCHMARKS.md) counts Envoy's worker-thread instructions per
//! request with this door loaded, so what Envoy + the floor costs over Envoy alone is the price of
//! hosting the module's ABI layer (Envoy's dynamic-module filter, `ffi`'s per-stream state and
//! panic guards, one header call), the part no change to the real door (`filter`) can remove.

use crate::ffi::{
    EnvoyConfig, EnvoyFilter, HeadersStatus, HttpFilter, HttpFilterConfig, HttpRouteConfig,
};

// Exports Envoy's hooks for these types instead of `filter`'s (lib.rs compiles one or the other).
crate::ffi::declare_filter!(FloorConfig, FloorRoute);

/// Whether the floor writes (a)'s headers (`gybc-headers`) or its one header (anything else).
pub struct FloorConfig {
    gybc_headers: bool,
}

impl HttpFilterConfig for FloorConfig {
    type Filter = Floor;

    fn new(_envoy: &mut EnvoyConfig, _name: &str, config: &[u8]) -> Result<FloorConfig, String> {
        Ok(FloorConfig {
            gybc_headers: config == b"gybc-headers",
        })
    }

    fn new_filter(&self) -> Floor {
        Floor {
            gybc_headers: self.gybc_headers,
        }
    }
}

/// One stream's floor.
pub struct Floor {
    gybc_headers: bool,
}

/// (a)'s identity headers, as the module answers the benchmarks' key.
const IDENTITY: [(&str, &str); 4] = [
    ("x-tenant-id", "tenant_bench"),
    ("x-auth-method", "api_key"),
    ("x-api-key-id", "key_bench"),
    ("x-scopes", "threads:read"),
];
const RATE_LIMIT: [(&str, &str); 3] = [
    ("x-ratelimit-limit", "10000000"),
    ("x-ratelimit-remaining", "9999999"),
    ("x-ratelimit-reset", "1767225600"),
];

impl HttpFilter for Floor {
    fn on_request_headers(
        &mut self,
        envoy: &mut EnvoyFilter,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        if !self.gybc_headers {
            envoy.set_request_header("x-floor", "1");
            return HeadersStatus::Continue;
        }
        envoy.remove_request_header("x-api-key");
        for (name, value) in IDENTITY {
            envoy.add_request_header(name, value);
        }
        HeadersStatus::Continue
    }

    /// Never called: the floor hands out no scheduler.
    fn on_scheduled(&mut self, _envoy: &mut EnvoyFilter, _event_id: u64) {}

    fn on_response_headers(
        &mut self,
        envoy: &mut EnvoyFilter,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        if self.gybc_headers {
            // Read as the real door reads them, to learn which it must replace.
            let lines = envoy.response_headers();
            let sent = RATE_LIMIT.map(|(name, _)| lines.iter().any(|(k, _)| k == name.as_bytes()));
            drop(lines);
            for ((name, value), sent) in RATE_LIMIT.into_iter().zip(sent) {
                if sent {
                    envoy.set_response_header(name, value);
                } else {
                    envoy.add_response_header(name, value);
                }
            }
        }
        HeadersStatus::Continue
    }

    /// Never called: nothing here panics.
    fn on_panic(&mut self, _envoy: &mut EnvoyFilter) {}
}

/// Any route config: the floor reads none.
pub struct FloorRoute;

impl HttpRouteConfig for FloorRoute {
    fn new(_name: &str, _config: &[u8]) -> Result<FloorRoute, String> {
        Ok(FloorRoute)
    }
}
