//! The benchmarks' floor door (`--features floor`, never shipped): the least an HTTP filter can do
//! through this crate's `ffi`. It sets one request header (`x-floor: 1`) and continues,
//! allocating nothing of its own.
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

/// Any filter config: the floor reads none.
pub struct FloorConfig;

impl HttpFilterConfig for FloorConfig {
    type Filter = Floor;

    fn new(_envoy: &mut EnvoyConfig, _name: &str, _config: &[u8]) -> Result<FloorConfig, String> {
        Ok(FloorConfig)
    }

    fn new_filter(&self) -> Floor {
        Floor
    }
}

/// One stream's floor: no state.
pub struct Floor;

impl HttpFilter for Floor {
    /// The floor's one piece of work: one header set through Envoy's ABI.
    fn on_request_headers(
        &mut self,
        envoy: &mut EnvoyFilter,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        envoy.set_request_header("x-floor", "1");
        HeadersStatus::Continue
    }

    /// Never called: the floor hands out no scheduler.
    fn on_scheduled(&mut self, _envoy: &mut EnvoyFilter, _event_id: u64) {}

    fn on_response_headers(
        &mut self,
        _envoy: &mut EnvoyFilter,
        _end_of_stream: bool,
    ) -> HeadersStatus {
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
