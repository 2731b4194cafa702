//! gybc-authz inside Envoy: the decision engine as an HTTP filter dynamic module
//! (`libgybc_authz_envoy.so`) for Envoy 1.40's dynamic-module ABI.
//!
//! `ffi` is Envoy's C ABI, its hooks, safe wrappers and the traits a door implements (the one
//! place in the project where `unsafe_code` is allowed; it names no other module); `filter` is
//! the door (Envoy's headers in, the engine's answer out), registered by its one
//! `ffi::declare_filter!` call; `engines` keeps one engine per distinct config per process, so a
//! listener update with the same settings keeps its engine; `runtime` is the engines' I/O
//! runtime, one per Envoy process; `stats` copies the engine's metrics into Envoy's stats.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;
mod filter;
mod engines;
mod runtime;
mod stats;
