//! One engine per distinct config per Envoy process. Envoy makes a new filter config for every
//! listener update, and most updates leave gybc-authz's settings alone: a config equal to a
//! running engine's (the validated `Config`, after environment overrides, compared field by field
//! with secrets by value) shares that engine, with its caches, limiter state, Redis connection,
//! signing keys and background tasks. A changed config starts a new engine, and while Envoy
//! already serves from a loaded engine, waits until the new one can decide before Envoy may route
//! to it: past `module.ready_timeout_ms` the filter config fails, so Envoy refuses the update and
//! keeps the old listener. An engine stops with the last filter config (or stream) holding it.
//!
//! What outlives every engine is one per process: the clock, and the local limiter per
//! `rate_limit.max_keys`, so no config change hands a key a fresh quota (the Redis limiter's
//! state lives in Redis and outlives engines the same way).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use gybc_authz_engine::clock::{Clock, SystemClock};
use gybc_authz_engine::config::Config;
use gybc_authz_engine::ratelimit::LocalLimiter;
use gybc_authz_engine::{Engine, EngineOptions};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::stats::{Copies, Gathered, Lifecycle, SYNC_EVERY};

/// A running engine, shared by every filter config whose config equals `config`.
pub struct Running {
    pub engine: Arc<Engine>,
    /// How much of this engine's metrics is in Envoy's stats already, whichever config copied it.
    pub copies: Copies,
    /// This engine's metrics as last read on the runtime, what the configs copy from.
    pub gathered: Arc<Gathered>,
    background: Vec<JoinHandle<()>>,
    /// For the log lines: which start a reuse or a stop belongs to.
    number: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The counts of its last flush interval are written on the runtime, which outlives every
        // engine: a listener update must not lose a key's usage.
        if let Ok(runtime) = crate::runtime::get() {
            let engine = self.engine.clone();
            runtime.spawn(async move { engine.flush_usage(FINAL_FLUSH_WITHIN).await });
        }
        // The runtime outlives every engine; this one's refreshers and watchers must not.
        for task in &self.background {
            task.abort();
        }
        let live = COUNTS.live.fetch_sub(1, Ordering::SeqCst) - 1;
        tracing::info!(
            engine = self.number,
            engines_live = live,
            "Engine stopped: no filter config holds it any more."
        );
    }
}

/// How long a stopping engine's last usage counts get to reach Redis.
const FINAL_FLUSH_WITHIN: Duration = Duration::from_secs(2);

struct Entry {
    config: Config,
    running: Weak<Running>,
}

/// Engines by config: a few per process at most (one per distinct config, plus the ones
/// draining), so a list scanned in order.
static ENGINES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
/// Local limiters by `rate_limit.max_keys`, held by the engines that use them.
static LIMITERS: Mutex<Vec<(u64, Weak<LocalLimiter>)>> = Mutex::new(Vec::new());

struct Counts {
    live: AtomicU64,
    started: AtomicU64,
    reused: AtomicU64,
    refused: AtomicU64,
}

static COUNTS: Counts = Counts {
    live: AtomicU64::new(0),
    started: AtomicU64::new(0),
    reused: AtomicU64::new(0),
    refused: AtomicU64::new(0),
};

/// The process's engine counts, for Envoy's stats.
pub fn lifecycle() -> Lifecycle {
    Lifecycle {
        live: COUNTS.live.load(Ordering::SeqCst),
        started: COUNTS.started.load(Ordering::SeqCst),
        reused: COUNTS.reused.load(Ordering::SeqCst),
        refused: COUNTS.refused.load(Ordering::SeqCst),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The engine for `cfg`: the running one with an equal config, or a new one. Runs in config_new,
/// which Envoy calls on its main thread, one at a time: an engine is registered before the next
/// config can look for it. The registry's lock is never held while waiting on the runtime.
pub fn engine_for(cfg: &Config, runtime: &Runtime) -> Result<Arc<Running>, String> {
    if let Some(running) = find(cfg) {
        COUNTS.reused.fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            engine = running.number,
            engines_live = COUNTS.live.load(Ordering::SeqCst),
            "Engine reused: the new filter config's settings equal a running engine's."
        );
        return Ok(running);
    }
    // Envoy already routes to a loaded engine: the update must not take traffic before the new
    // one can decide. Otherwise (Envoy's start, or an engine that never loaded) nothing better
    // is being replaced, and the new engine fails closed until it has loaded.
    let must_wait = any_loaded();
    let clock = clock();
    let local = local_limiter(cfg.rate_limit.max_keys, &clock);
    let options = EngineOptions { clock, store: None };
    let started = runtime
        .block_on(Engine::start_with_limiter(cfg, options, Some(local)))
        .map_err(|e| e.to_string())?;
    let number = COUNTS.started.fetch_add(1, Ordering::SeqCst) + 1;
    let live = COUNTS.live.fetch_add(1, Ordering::SeqCst) + 1;
    let gathered = Arc::new(Gathered::default());
    let mut background = started.background;
    background.push(runtime.spawn(gather_every_second(
        started.engine.clone(),
        gathered.clone(),
    )));
    let running = Arc::new(Running {
        engine: started.engine,
        copies: Copies::default(),
        gathered,
        background,
        number,
    });
    tracing::info!(
        engine = number,
        engines_live = live,
        waits_until_loaded = must_wait,
        "Engine started for a new config."
    );
    if must_wait {
        let within = Duration::from_millis(cfg.module.ready_timeout_ms);
        // Made inside the runtime: a timer needs its reactor.
        let wait = async { tokio::time::timeout(within, running.engine.wait_loaded()).await };
        let loaded = runtime.block_on(wait);
        if loaded.is_err() {
            COUNTS.refused.fetch_add(1, Ordering::SeqCst);
            let missing = running.engine.not_loaded().join(", ");
            // Dropping `running` stops it.
            return Err(format!(
                "the changed config's engine was not ready within {} ms (module.ready_timeout_ms): \
                 not loaded: {missing}. The update is refused; Envoy keeps the previous config.",
                within.as_millis()
            ));
        }
    }
    let mut engines = lock(&ENGINES);
    engines.retain(|e| e.running.strong_count() > 0);
    engines.push(Entry {
        config: cfg.clone(),
        running: Arc::downgrade(&running),
    });
    Ok(running)
}

/// Reads the engine's metrics for the stats copy, now and every `SYNC_EVERY`, until the engine
/// stops (`Running`'s drop aborts it).
async fn gather_every_second(engine: Arc<Engine>, gathered: Arc<Gathered>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        gathered.refresh(&engine.metrics);
    }
}

fn find(cfg: &Config) -> Option<Arc<Running>> {
    let engines = lock(&ENGINES);
    engines
        .iter()
        .filter(|e| e.config == *cfg)
        .find_map(|e| e.running.upgrade())
}

fn any_loaded() -> bool {
    let engines = lock(&ENGINES);
    engines
        .iter()
        .filter_map(|e| e.running.upgrade())
        .any(|r| r.engine.is_loaded())
}

/// The process's local limiter for this bound: the one the running engines use, or a new one.
fn local_limiter(max_keys: u64, clock: &Arc<dyn Clock>) -> Arc<LocalLimiter> {
    let mut limiters = lock(&LIMITERS);
    limiters.retain(|(_, l)| l.strong_count() > 0);
    if let Some(l) = limiters
        .iter()
        .filter(|(m, _)| *m == max_keys)
        .find_map(|(_, l)| l.upgrade())
    {
        return l;
    }
    let l = Arc::new(LocalLimiter::new(clock.clone(), max_keys));
    limiters.push((max_keys, Arc::downgrade(&l)));
    l
}

/// The process's clock: every engine and the limiters they share read the same one.
#[cfg(not(feature = "test-hooks"))]
fn clock() -> Arc<dyn Clock> {
    static CLOCK: OnceLock<Arc<dyn Clock>> = OnceLock::new();
    CLOCK.get_or_init(|| Arc::new(SystemClock)).clone()
}

/// Under test, the clock can be one the test drives, as the daemon's tests inject one: it starts
/// at `GYBC_AUTHZ_TEST_CLOCK_NANOS` and moves by each `x-gybc-test-advance-ms`.
#[cfg(feature = "test-hooks")]
fn clock() -> Arc<dyn Clock> {
    match test_clock() {
        Some(clock) => clock.clone(),
        None => Arc::new(SystemClock),
    }
}

/// The clock a test drives, when `GYBC_AUTHZ_TEST_CLOCK_NANOS` is set: one per process.
#[cfg(feature = "test-hooks")]
pub fn test_clock() -> Option<&'static Arc<gybc_authz_engine::clock::ManualClock>> {
    use gybc_authz_engine::clock::ManualClock;
    static CLOCK: OnceLock<Option<Arc<ManualClock>>> = OnceLock::new();
    CLOCK
        .get_or_init(|| {
            let nanos = std::env::var("GYBC_AUTHZ_TEST_CLOCK_NANOS")
                .ok()?
                .parse()
                .ok()?;
            let clock = Arc::new(ManualClock::at_secs(0));
            clock.set_nanos(nanos);
            Some(clock)
        })
        .as_ref()
}

// Envoy's side (config_new, LDS) is tested through the real binary: tests/envoy_reload.rs.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml, &BTreeMap::<String, String>::new()).unwrap()
    }

    #[test]
    fn an_equal_config_shares_its_engine_and_a_changed_one_must_load_in_time() {
        let runtime = crate::runtime::get().unwrap();
        let same = config("policy: { tenantless_paths: [/unit-a] }\n");
        let first = engine_for(&same, runtime).unwrap();
        runtime.block_on(first.engine.wait_loaded());
        // Written otherwise, the same settings: the same engine.
        let again = engine_for(
            &config("policy:\n  tenantless_paths: [\"/unit-a\"] # same\n"),
            runtime,
        );
        assert!(Arc::ptr_eq(&first, &again.unwrap()));
        // A changed config whose signing keys cannot load, while a loaded engine serves: refused,
        // naming what did not load, and not kept.
        let slow = config(
            "policy: { tenantless_paths: [/unit-b] }\nmodule: { ready_timeout_ms: 50 }\n\
             jwt: { providers: [{ name: unit, project_id: p, keys: { type: url, url: \"http://127.0.0.1:1/keys\" } }] }\n",
        );
        let err = engine_for(&slow, runtime).err().unwrap();
        assert!(
            err.contains("within 50 ms") && err.contains("provider `unit`"),
            "{err}"
        );
        assert!(find(&slow).is_none());
        // The last holder gone, the engine is gone.
        drop(first);
        assert!(find(&same).is_none());
    }

    #[test]
    fn engines_share_the_local_limiter_of_their_bound() {
        let clock = clock();
        let a = local_limiter(1_000, &clock);
        assert!(Arc::ptr_eq(&a, &local_limiter(1_000, &clock)));
        assert!(!Arc::ptr_eq(&a, &local_limiter(2_000, &clock)));
    }
}
