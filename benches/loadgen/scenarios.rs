//! The scenarios over gRPC: closed-loop and paced runs per credential kind, and the server's
//! instructions per Check under callgrind.

use super::*;

pub(crate) fn scenarios(rt: &tokio::runtime::Runtime, ctx: &Ctx, report: &mut Report) -> Res<()> {
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
pub(crate) fn big_store(ctx: &Ctx) -> Res<PathBuf> {
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
pub(crate) fn instructions(
    rt: &tokio::runtime::Runtime,
    ctx: &Ctx,
    report: &mut Report,
) -> Res<()> {
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
    let cases: [(&str, &str, Option<&PathBuf>, &str); 6] = [
        ("floor", "no-op ext_authz", None, "sk"),
        // What answering with the contract's header set costs without deciding anything: the
        // part of (a)'s ratio no decision code can remove.
        (
            "floor-gybc",
            "no-op answering gybc-authz's (a) header set",
            None,
            "sk",
        ),
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
            None => start_noop_wrapped(&wrapper, name == "floor-gybc")?,
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
