//! The load generator and the benchmark suite (BENCHMARKS.md, `./scripts/bench.sh`).
//!
//! - `suite [--smoke]`: everything, in one session: fixtures, the no-op floor, scenarios (a)–(h)
//!   against the real daemon as a separate process, Envoy + `wrk`, Envoy's worker-thread
//!   instructions per request under callgrind (`envoy-instructions`), footprint, the soak; writes
//!   `<out>/results.md` and `<out>/results.json`.
//! - `run`: one load run against any ext_authz server (connections, in-flight, duration, mix).
//! - `noop`: the floor, a no-op ext_authz server that always allows and adds one header.
//!
//! Server CPU per decision comes from the server process's utime+stime (`/proc/<pid>/stat`), so it
//! does not depend on how busy the shared machine is. Under `cargo test` (no subcommand) this does
//! nothing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValue, HeaderValueOption, SocketAddress, address,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use gybc_authz::dev::{SigningKey, firebase_claims};
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::store::redis::encode_record;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const PROJECT: &str = "gybc-bench";
const TENANT: &str = "t1";
const API_PATH: &str = "/api/v1/llm/gateway/list-threads";
/// Rate limit of every allowed key: high enough that allows stay allows for a whole run, and a
/// GCRA interval (6 µs) that the Redis script still counts in whole microseconds.
const HIGH_LIMIT: &str = "10000000/60s";
/// JWTs in the pool of scenario (c): each verified once, then answered from the cache.
const TOKEN_POOL: usize = 100;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

mod floor;
mod fixtures;
mod requests;
mod measure;
mod load;
mod procs;
mod envoy;
mod envoy_instr;
mod suite;
mod scenarios;
mod footprint;
mod report;

use envoy::*;
use envoy_instr::*;
use fixtures::*;
use floor::*;
use footprint::*;
use load::*;
use measure::*;
use procs::*;
use report::*;
use requests::*;
use scenarios::*;
use suite::*;

// === CLI ===

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "gybc-authz load generator and benchmark suite"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every benchmark and write results.md / results.json.
    Suite(SuiteArgs),
    /// One load run against an ext_authz server.
    Run(RunArgs),
    /// Serve the no-op ext_authz floor; prints `LISTENING <addr>`.
    Noop {
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Answer with the header set gybc-authz answers a cached `sk_` key with (4 identity
        /// headers set, 4 removed, 3 rate-limit headers for the client) instead of one header,
        /// so Envoy's cost of applying the contract's headers can be told apart from the
        /// daemon's own.
        #[arg(long)]
        gybc_headers: bool,
    },
}

#[derive(Args, Clone)]
struct SuiteArgs {
    /// Seconds-long run that only proves every part works (CI).
    #[arg(long)]
    smoke: bool,
    /// Where fixtures, configs, logs and results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The daemon binary. Default: the one cargo built with this bench (release under `cargo bench`).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// The Envoy binary. Default: `ENVOY_BIN`, `.venv/bin/envoy`, `.venv-bench/bin/envoy`.
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// Comma-separated sections or scenario names to run (default: all).
    #[arg(long)]
    only: Option<String>,
    /// Comma-separated envoy-instructions variants to run (default: all): `envoy`, `envoy-c`,
    /// `envoy+floor`, `module-a`, … The baselines their ratios need (`envoy`; `envoy-c` for
    /// `module-c` and `module-d`) run too.
    #[arg(long)]
    variants: Option<String>,
    /// Connections to the server.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Where `--only envoy-instructions` finds libgybc_authz_envoy.so and
    /// libgybc_authz_envoy_floor.so. Default: target/profiling (`cargo build --profile
    /// profiling`); in --smoke, the debug builds beside the daemon.
    #[arg(long)]
    module_dir: Option<PathBuf>,
    /// Minutes the soak runs (`--only soak`); the smoke run soaks for a few seconds.
    #[arg(long, default_value_t = 10.0)]
    soak_minutes: f64,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// The ext_authz server.
    #[arg(long)]
    addr: SocketAddr,
    /// The server's process id, for its CPU time and RSS.
    #[arg(long)]
    pid: Option<u32>,
    /// `fixtures.json` written by `suite` (keys and tokens the server knows).
    #[arg(long)]
    fixtures: PathBuf,
    /// Request mix, `kind:weight,…`; kinds: sk, jwt, pk, jwt-unique, jwt-fresh, unknown, keyset,
    /// bad-token, over-limit.
    #[arg(long, default_value = "sk")]
    mix: String,
    #[arg(long, default_value_t = 2)]
    connections: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Requests per second in total (open loop); 0: as fast as answers come (closed loop).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// `keyset` requests draw from the first N keys of the fixture key set.
    #[arg(long, default_value_t = 1000)]
    keyset: u64,
    /// Do not check each answer against the outcome its kind expects.
    #[arg(long)]
    no_check: bool,
}

fn main() {
    // `cargo bench` appends `--bench`; `cargo test` runs bench targets with no subcommand at all.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if !args
        .get(1)
        .is_some_and(|a| ["suite", "run", "noop"].contains(&a.as_str()))
    {
        println!("loadgen: no subcommand; run ./scripts/bench.sh (see BENCHMARKS.md)");
        return;
    }
    let cli = Cli::parse_from(args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Cmd::Noop { addr, gybc_headers } => rt.block_on(serve_noop(addr, gybc_headers)),
        Cmd::Run(a) => rt.block_on(cmd_run(a)),
        Cmd::Suite(a) => suite(&rt, a),
    };
    if let Err(e) = result {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}
