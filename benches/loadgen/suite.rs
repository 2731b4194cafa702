//! The suite: its plan, the shared context, and the order its parts run in.

use super::*;

pub(crate) struct Plan {
    pub(crate) smoke: bool,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) paced_rate: u64,
    pub(crate) unique_tokens: usize,
    pub(crate) big_store: u64,
    pub(crate) cached_keys: u64,
    pub(crate) ready_starts: usize,
    pub(crate) wrk_secs: u64,
    pub(crate) wrk_conns: usize,
    /// Rounds of the interleaved wrk triple (Envoy alone, module (a), native (a)).
    pub(crate) wrk_rounds: usize,
    /// The soak's measured length (`--soak-minutes`) and its total request rate.
    pub(crate) soak: Duration,
    pub(crate) soak_rate: u64,
    /// RSS samples per second in the soak.
    pub(crate) soak_samples_per_sec: f64,
    /// `envoy-instructions`: requests counted in its two runs per variant, and the uncounted
    /// warm-up before them.
    pub(crate) envoy_instr_requests: [u64; 2],
    pub(crate) envoy_instr_warmup: u64,
}

impl Plan {
    pub(crate) fn new(smoke: bool) -> Self {
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
                wrk_rounds: 1,
                soak: Duration::from_secs(6),
                soak_rate: 400,
                soak_samples_per_sec: 5.0,
                envoy_instr_requests: [20, 80],
                envoy_instr_warmup: 3,
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
                wrk_rounds: 5,
                soak: Duration::from_secs(600),
                soak_rate: 2_050,
                soak_samples_per_sec: 1.0,
                envoy_instr_requests: [500, 2_500],
                envoy_instr_warmup: 50,
            }
        }
    }
}

#[derive(Serialize, Clone)]
pub(crate) struct ScenarioResult {
    pub(crate) name: String,
    pub(crate) what: String,
    /// Closed loop: as fast as the server answers.
    pub(crate) max: LoadResult,
    /// Open loop at the plan's fixed rate (same for every scenario).
    pub(crate) paced: Option<LoadResult>,
}

#[derive(Serialize, Clone)]
pub(crate) struct EnvoyResult {
    pub(crate) name: String,
    pub(crate) what: String,
    pub(crate) wrk: WrkResult,
    /// Envoy's resident memory after the run.
    pub(crate) envoy_rss_mb: f64,
}

#[derive(Serialize, Default)]
pub(crate) struct Footprint {
    pub(crate) binary_bytes: u64,
    pub(crate) idle_rss_mb: f64,
    pub(crate) idle_anon_mb: f64,
    pub(crate) ready_ms: Vec<f64>,
    pub(crate) store_keys_rss_mb: f64,
    pub(crate) store_keys_anon_mb: f64,
    pub(crate) cached_keys: u64,
    pub(crate) cached_keys_rss_mb: f64,
    pub(crate) cached_keys_anon_mb: f64,
    /// The same two with `usage.enabled: false`.
    pub(crate) no_usage_store_keys_rss_mb: f64,
    pub(crate) no_usage_cached_keys_rss_mb: f64,
    /// The file rewritten with one key more while every key is held: peak RSS during the
    /// reload, and RSS once settled.
    pub(crate) reload_peak_rss_mb: f64,
    pub(crate) reload_rss_mb: f64,
    /// Envoy (`--concurrency 1`, no filter) at rest, then Envoy with the module and the same
    /// file: loaded, every key used once through Envoy, and the reload's peak and after.
    pub(crate) envoy_alone_rss_mb: f64,
    pub(crate) module_loaded_rss_mb: f64,
    pub(crate) module_used_rss_mb: f64,
    pub(crate) module_reload_peak_rss_mb: f64,
    pub(crate) module_reload_rss_mb: f64,
    /// The same number of keys served from Redis, every one in the key cache.
    pub(crate) redis_cached_rss_mb: f64,
    pub(crate) redis_cached_anon_mb: f64,
    pub(crate) big_store_keys: u64,
    pub(crate) big_store_file_mb: f64,
    pub(crate) big_store_ready_ms: f64,
    pub(crate) big_store_rss_mb: f64,
    pub(crate) big_store_peak_rss_mb: f64,
}

#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) smoke: bool,
    pub(crate) machine: String,
    pub(crate) daemon: String,
    pub(crate) connections: usize,
    pub(crate) concurrency: usize,
    pub(crate) paced_rate: u64,
    pub(crate) scenarios: Vec<ScenarioResult>,
    pub(crate) envoy: Vec<EnvoyResult>,
    /// The interleaved wrk triples of `--only envoy`.
    pub(crate) envoy_interleaved: Option<Interleaved>,
    pub(crate) instructions: Vec<InstrResult>,
    pub(crate) envoy_instructions: Vec<EnvoyInstrResult>,
    pub(crate) footprint: Footprint,
    pub(crate) soak: Option<SoakResult>,
}

/// Memory over a long run of allowed traffic with a flood of unknown keys and unique tokens.
#[derive(Serialize, Clone, Default)]
pub(crate) struct SoakResult {
    pub(crate) minutes: f64,
    pub(crate) rate: u64,
    pub(crate) mix: String,
    pub(crate) requests: u64,
    /// Errors and wrong answers.
    pub(crate) problems: u64,
    pub(crate) first_problem: Option<String>,
    /// (seconds into the run, RSS MB).
    pub(crate) samples: Vec<(f64, f64)>,
    /// Peak RSS of the first, middle and last third of the run.
    pub(crate) third_peaks_mb: [f64; 3],
    /// Whether the last third's peak is within 10 % of the first's.
    pub(crate) steady: bool,
}

/// Instructions the server executed per Check, counted by callgrind: free of the machine's noise.
#[derive(Serialize, Clone)]
pub(crate) struct InstrResult {
    pub(crate) name: String,
    pub(crate) what: String,
    pub(crate) requests: u64,
    pub(crate) instructions: u64,
}

pub(crate) struct Ctx {
    pub(crate) plan: Plan,
    pub(crate) args: SuiteArgs,
    pub(crate) dir: PathBuf,
    pub(crate) daemon_bin: PathBuf,
    pub(crate) fx: Fixtures,
    pub(crate) jwks_json: String,
    pub(crate) small_keys: PathBuf,
    pub(crate) signing: Arc<SigningKey>,
    pub(crate) only: Option<Vec<String>>,
    /// `--variants`: the envoy-instructions variants to run (all when absent), names checked.
    pub(crate) variants: Option<Vec<String>>,
    pub(crate) big_written: std::cell::OnceCell<()>,
}

impl Ctx {
    /// Whether `--only` selects `name` (a section: `scenarios`, `envoy`, `footprint`; or a
    /// scenario name or its prefix).
    pub(crate) fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| name.starts_with(w.as_str())))
    }

    /// Whether `--only` names this section exactly (or is absent): for sections whose name
    /// starts with another's (`envoy-instructions` must not run with `--only envoy`).
    pub(crate) fn wants_exactly(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| w == name))
    }

    /// Where `envoy-instructions` loads the Envoy modules from: `--module-dir`, else the debug
    /// builds beside the daemon in a smoke run, else `target/profiling` (release with symbols).
    pub(crate) fn module_dir(&self) -> PathBuf {
        let beside_daemon = self.daemon_bin.parent().unwrap_or(Path::new("."));
        self.args.module_dir.clone().unwrap_or_else(|| {
            if self.plan.smoke {
                beside_daemon.to_path_buf()
            } else {
                beside_daemon
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join("profiling")
            }
        })
    }

    pub(crate) fn wants_scenario(&self, name: &str) -> bool {
        self.wants("scenarios") || self.wants(name)
    }

    /// A daemon config: file key store `keys`, the bench JWKS file, a high default rate limit
    /// (`rate`: more fields of `rate_limit`), and `extra` YAML.
    pub(crate) fn config(&self, name: &str, keys: &Path, extra: &str) -> Res<PathBuf> {
        self.config_with(name, keys, "", extra)
    }

    pub(crate) fn config_with(
        &self,
        name: &str,
        keys: &Path,
        rate: &str,
        extra: &str,
    ) -> Res<PathBuf> {
        let store = format!("{{ type: file, path: \"{}\" }}", keys.display());
        self.config_text(name, &store, rate, "", extra)
    }

    /// A daemon config with keys and rate limits in the Redis on `port`; `jwt` adds fields of
    /// the `jwt` section.
    pub(crate) fn config_redis(&self, name: &str, port: u16, jwt: &str) -> Res<PathBuf> {
        self.config_text(
            name,
            "{ type: redis }",
            ", backend: redis",
            jwt,
            &format!("redis: {{ urls: [\"redis://127.0.0.1:{port}\"] }}"),
        )
    }

    pub(crate) fn config_text(
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

    pub(crate) fn daemon(&self, name: &str, config: &Path) -> Res<Daemon> {
        start_daemon(
            &self.daemon_bin,
            config,
            &self.dir.join(format!("daemon-{name}.log")),
        )
    }

    pub(crate) fn spec(&self, addr: SocketAddr, pid: u32, mix: &str) -> LoadSpec {
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
pub(crate) fn measure(
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

pub(crate) fn machine() -> String {
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

pub(crate) fn suite(rt: &tokio::runtime::Runtime, args: SuiteArgs) -> Res<()> {
    let mut plan = Plan::new(args.smoke);
    if !args.smoke {
        plan.soak = Duration::from_secs_f64(args.soak_minutes.max(0.1) * 60.0);
    }
    // Before the fixtures take their minutes: a misspelt variant fails at once.
    let variants = args.variants.as_deref().map(parse_variants).transpose()?;
    let instr_left_out = args
        .only
        .as_deref()
        .is_some_and(|o| !o.split(',').any(|w| w == "envoy-instructions"));
    if variants.is_some() && instr_left_out {
        return Err(
            "--variants picks envoy-instructions variants, but --only leaves it out".into(),
        );
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
        variants,
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
        envoy_interleaved: None,
        instructions: Vec::new(),
        envoy_instructions: Vec::new(),
        footprint: Footprint::default(),
        soak: None,
    };
    let sections = [
        "envoy",
        "envoy-instructions",
        "footprint",
        "instructions",
        "soak",
    ];
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
    if ctx.wants_exactly("envoy-instructions") {
        envoy_instructions(&ctx, &mut report)?;
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
        // A run that --only or --variants cut short is not expected to have every part.
        check_smoke(&report, ctx.only.is_none() && ctx.variants.is_none())?;
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
