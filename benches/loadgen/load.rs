//! The load loop: one run of concurrent Checks over gRPC, latencies in an HDR histogram.

use super::*;

#[derive(Clone)]
pub(crate) struct LoadSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) pid: Option<u32>,
    pub(crate) mix: Vec<(Kind, u32)>,
    pub(crate) connections: usize,
    pub(crate) concurrency: usize,
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) rate: u64,
    pub(crate) keyset: u64,
    pub(crate) sequential: bool,
    /// Stop after this many requests in all (0: no limit).
    pub(crate) max_requests: u64,
    pub(crate) check: bool,
}

#[derive(Serialize, Clone, Default, Debug)]
pub(crate) struct LoadResult {
    pub(crate) requests: u64,
    pub(crate) secs: f64,
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
    /// Server CPU (utime+stime) per answered Check, µs.
    pub(crate) server_cpu_us: Option<f64>,
    pub(crate) server_rss_mb: Option<f64>,
    /// This process's CPU per Check, µs.
    pub(crate) client_cpu_us: f64,
    pub(crate) errors: u64,
    pub(crate) mismatches: u64,
    pub(crate) first_problem: Option<String>,
}

pub(crate) struct WorkerOut {
    pub(crate) hist: Histogram<u64>,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) mismatches: u64,
    pub(crate) first_problem: Option<String>,
}

pub(crate) async fn run_load(spec: &LoadSpec, factory: Arc<RequestFactory>) -> Res<LoadResult> {
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

pub(crate) async fn cmd_run(a: RunArgs) -> Res<()> {
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
