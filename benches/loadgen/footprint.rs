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
