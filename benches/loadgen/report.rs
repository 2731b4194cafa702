//! The report: results.md's tables and the smoke run's checks.

use super::*;

pub(crate) fn render(r: &Report) -> String {
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
    if !r.envoy_instructions.is_empty() {
        render_envoy_instructions(&mut s, &r.envoy_instructions);
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
    if let Some(i) = &r.envoy_interleaved {
        render_interleaved(&mut s, i);
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
            "| the same with `usage.enabled: false`: loaded / all looked up | {:.1} MB / {:.1} MB |",
            f.no_usage_store_keys_rss_mb, f.no_usage_cached_keys_rss_mb
        );
        let _ = writeln!(
            s,
            "| reload of that file (one key more), all keys held: peak RSS / RSS after (× the resting {:.1} MB) | {:.1} MB / {:.1} MB ({:.2}× / {:.2}×) |",
            f.cached_keys_rss_mb,
            f.reload_peak_rss_mb,
            f.reload_rss_mb,
            f.reload_peak_rss_mb / f.cached_keys_rss_mb,
            f.reload_rss_mb / f.cached_keys_rss_mb
        );
        let added = |rss: f64| rss - f.envoy_alone_rss_mb;
        let _ = writeln!(
            s,
            "| Envoy alone (`--concurrency 1`, no filter) | {:.1} MB |",
            f.envoy_alone_rss_mb
        );
        let _ = writeln!(
            s,
            "| Envoy + module, the same {} keys loaded / all used once through Envoy: RSS (added to Envoy alone) | {:.1} MB ({:+.1}) / {:.1} MB ({:+.1}) |",
            f.cached_keys,
            f.module_loaded_rss_mb,
            added(f.module_loaded_rss_mb),
            f.module_used_rss_mb,
            added(f.module_used_rss_mb)
        );
        let _ = writeln!(
            s,
            "| Envoy + module, reload of the file: peak RSS / RSS after (added to Envoy alone) | {:.1} MB ({:+.1}) / {:.1} MB ({:+.1}) |",
            f.module_reload_peak_rss_mb,
            added(f.module_reload_peak_rss_mb),
            f.module_reload_rss_mb,
            added(f.module_reload_rss_mb)
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

/// The interleaved wrk triples: each round's req/s and ratios, then their medians.
fn render_interleaved(s: &mut String, i: &Interleaved) {
    let [alone, module, native] = &i.names;
    let _ = writeln!(
        s,
        "### Interleaved wrk triples (one Envoy worker each, the same `sk_` request)\n\n\
         Three Envoys side by side, each loaded in turn within every round (`{alone}`, `{module}`, \
         `{native}`: Envoy's own (a) chain, checked against an echo upstream first), so that the \
         machine's other load weighs on the three alike.\n\n\
         | round | `{alone}` req/s | `{module}` req/s | `{native}` req/s | module × alone | native × alone | module × native |\n\
         |---:|---:|---:|---:|---:|---:|---:|"
    );
    let (ma, na, mn) = (i.ratios(1, 0), i.ratios(2, 0), i.ratios(1, 2));
    for (n, r) in i.rounds.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.2}× |",
            n + 1,
            r[0].rps,
            r[1].rps,
            r[2].rps,
            ma[n],
            na[n],
            mn[n]
        );
    }
    let _ = writeln!(
        s,
        "| median | | | | {:.2}× | {:.2}× | {:.2}× |\n",
        median(&ma),
        median(&na),
        median(&mn)
    );
}

/// `envoy-instructions`: the table against Envoy alone, then each module's costliest functions.
fn render_envoy_instructions(s: &mut String, results: &[EnvoyInstrResult]) {
    let alone = results
        .iter()
        .find(|e| e.name == "envoy")
        .map(|e| e.per_request);
    let [n1, n2] = results[0].requests;
    let _ = writeln!(
        s,
        "### Envoy + module: instructions per request (callgrind, Envoy's worker thread)\n\n\
         Envoy 1.40, one worker, `direct_response` route, sequential requests on one keep-alive \
         connection; instructions counted on the worker thread only (`--separate-threads=yes`), \
         from the slope between a {n1}- and a {n2}-request run, so start-up and idle work cancel out. \
         \"module's own code\" is what ran inside the module's shared object; the rest of the \
         difference to Envoy alone ran inside Envoy, answering the module's calls. \
         \"× Envoy alone, same request\": against Envoy alone sent the variant's own credential \
         headers (`envoy-c`: (c)'s `authorization: Bearer` instead of `x-api-key`), so Envoy's \
         cost of the headers themselves cancels out; (d)'s request has one header more than \
         `envoy-c`'s (its `x-api-key` pk_ key). \
         \"× native\": against Envoy's own C++ filters doing the nearest job on the same request \
         (`native-a` for (a), `native-c` for (c); each checked against an echo upstream before it \
         is counted).\n"
    );
    let _ = writeln!(
        s,
        "| variant | what | instructions per request | × Envoy alone | target | met? | × Envoy alone, same request | × native | in the module's own code |\n|---|---|---:|---:|---:|---|---:|---:|---:|"
    );
    for e in results {
        let ratio = alone.filter(|a| *a > 0.0).map(|a| e.per_request / a);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            e.name,
            e.what,
            e.per_request,
            ratio.map_or("–".into(), |x| format!("{x:.2}×")),
            e.target.map_or("–".into(), |t| format!("≤ {t:.2}×")),
            match (e.target, ratio) {
                (Some(t), Some(x)) if x <= t => "met",
                (Some(_), Some(_)) => "**missed**",
                _ => "",
            },
            match (&e.same_request_baseline, e.same_request_ratio) {
                (Some(base), Some(x)) => format!("{x:.2}× `{base}`"),
                _ => "–".into(),
            },
            match (&e.native_baseline, e.native_ratio) {
                (Some(base), Some(x)) => format!("{x:.2}× `{base}`"),
                _ => "–".into(),
            },
            e.module_per_request
                .map_or("–".into(), |m| format!("{m:.0}")),
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Where they ran, per request, by shared object (`envoy` includes Envoy's allocator, which \
         the module's allocations use too; `???`: code callgrind places in no object):\n\n\
         | variant | `envoy` | the module | `libc.so.6` | `???` | other |\n|---|---:|---:|---:|---:|---:|"
    );
    for e in results {
        let of = |name: &str| {
            e.by_object
                .iter()
                .filter(|(o, _)| o == name)
                .map(|(_, ir)| ir)
                .sum::<f64>()
        };
        let module = e.module_per_request.unwrap_or(0.0);
        let (envoy, libc, unknown) = (of("envoy"), of("libc.so.6"), of("???"));
        let other =
            e.by_object.iter().map(|(_, ir)| ir).sum::<f64>() - envoy - libc - unknown - module;
        let _ = writeln!(
            s,
            "| {} | {envoy:.0} | {} | {libc:.0} | {unknown:.0} | {other:.0} |",
            e.name,
            e.module_per_request
                .map_or("–".into(), |m| format!("{m:.0}"))
        );
    }
    let _ = writeln!(s);
    for e in results.iter().filter(|e| !e.top.is_empty()) {
        let _ = writeln!(
            s,
            "`{}`: the module's own functions, exclusive instructions per request\n\n| function | instructions per request |\n|---|---:|",
            e.name
        );
        for (f, ir) in &e.top {
            let _ = writeln!(s, "| `{}` | {ir:.0} |", f.replace('|', "\\|"));
        }
        let _ = writeln!(s);
    }
}

/// The smoke run proves every part ran and produced numbers; it never judges speed.
pub(crate) fn check_smoke(r: &Report, complete: bool) -> Res<()> {
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
    for e in &r.envoy_instructions {
        if e.per_request <= 0.0 || e.worker_instructions[1] <= e.worker_instructions[0] {
            problems.push(format!(
                "envoy-instructions {}: {:?} worker instructions for {:?} requests",
                e.name, e.worker_instructions, e.requests
            ));
        }
    }
    // A broken Envoy setup fails every request; a few slow ones on a busy CI machine (Envoy's
    // 0.5 s ext_authz timeout) must not fail the smoke run.
    let triples = r
        .envoy_interleaved
        .iter()
        .flat_map(|i| i.rounds.iter().flat_map(|round| round.iter().zip(&i.names)));
    for (w, name) in triples {
        if w.requests == 0 || (w.non_2xx + w.socket_errors) * 10 > w.requests {
            problems.push(format!("interleaved {name}: {w:?}"));
        }
    }
    if !r.envoy.is_empty()
        && r.envoy_interleaved
            .as_ref()
            .is_none_or(|i| i.rounds.is_empty())
    {
        problems.push("the interleaved wrk triples did not run".into());
    }
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
            || f.no_usage_cached_keys_rss_mb <= 0.0
            || f.reload_peak_rss_mb <= 0.0
            || f.module_used_rss_mb <= 0.0
            || f.module_reload_peak_rss_mb <= 0.0
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
    if complete
        && (r.scenarios.len() < 15
            || r.envoy.len() < 9
            || r.envoy_instructions.len() < VARIANTS.len())
    {
        problems.push(format!(
            "only {} scenarios, {} Envoy variants and {} Envoy instruction counts ran",
            r.scenarios.len(),
            r.envoy.len(),
            r.envoy_instructions.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("bench smoke failed:\n  {}", problems.join("\n  ")).into())
    }
}
