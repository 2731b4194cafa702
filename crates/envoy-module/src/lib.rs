//! gybc-authz inside Envoy: the decision engine as an HTTP filter dynamic module
//! (`libgybc_authz_envoy.so`) for Envoy 1.40's dynamic-module ABI.
//!
//! `ffi` is Envoy's C ABI, its hooks, safe wrappers and the traits a door implements (the one
//! place in the project where `unsafe_code` is allowed; it names no other module); `filter` is
//! the door (Envoy's headers in, the engine's answer out), registered by its one
//! `ffi::declare_filter!` call; `engines` keeps one engine per distinct config per process, so a
//! listener update with the same settings keeps its engine; `runtime` is the engines' I/O
//! runtime, one per Envoy process; `stats` copies the engine's metrics into Envoy's stats.
//!
//! With `--features floor` (benchmarks only, never shipped) the door is `floor` instead, which
//! sets one request header and continues: the same `ffi` with nothing behind it, so the benchmarks
//! can measure what hosting the module costs Envoy. The real door and its parts are then left out
//! (its `declare_filter!` call would export the same symbols).
#![deny(unsafe_code)]

// The floor uses a few of `ffi`'s wrappers; the rest are the real door's.
#[cfg_attr(feature = "floor", allow(dead_code))]
#[allow(unsafe_code)]
mod ffi;
#[cfg(feature = "floor")]
mod floor;
#[cfg(not(feature = "floor"))]
mod filter;
#[cfg(not(feature = "floor"))]
mod engines;
#[cfg(not(feature = "floor"))]
mod runtime;
#[cfg(not(feature = "floor"))]
mod stats;
