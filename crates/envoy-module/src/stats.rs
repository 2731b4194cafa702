//! The engine's `gybc_authz_*` metrics as Envoy stats, so Envoy's `/stats/prometheus` is the one
//! scrape target. Envoy only accepts new stats while a filter config is created and only counts
//! from a stream's hook, so every family is declared up front and the engine's registry is
//! copied over from requests as they pass, at most once per `SYNC_EVERY`. What is copied was
//! read from the registry off Envoy's workers ([`Gathered`], refreshed every `SYNC_EVERY` on the
//! module's runtime): gathering builds every series afresh and reads `/proc` for the `process_*`
//! families, work that has no place on a worker thread in the middle of a request.
//!
//! With `dynamic_module_config.metrics_namespace: gybc` the names come out as
//! `envoy_gybc_authz_*`, the daemon's family names behind Envoy's `envoy_` prefix. The check
//! latency is recorded as `authz_check_duration_microseconds` (Envoy histograms hold integers),
//! for one decision in `LATENCY_SAMPLE` of each worker thread.
//!
//! Stat ids belong to one filter config, while Envoy keeps a stat by name, for as long as some
//! config's scope holds it: one that only a draining listener's config ever touched goes with
//! that config. Configs share engines (`engines`), so what of an engine's registry has been added
//! to Envoy is kept per engine ([`Copies`]: each increase added once, whichever config copies it),
//! and every config touches each series it copies at least once (adding nothing if there is
//! nothing new), so the series outlives the configs before it. The module's own engine counts
//! (`authz_engines_live`, `authz_engine_configs_total`) are the process's, copied the same way.

use std::collections::{HashMap, HashSet};
use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gybc_authz_engine::metrics::Metrics;
use gybc_authz_engine::metrics::proto::{MetricFamily, MetricType};
use siphasher::sip128::{Hasher128, SipHasher13};
use smallvec::SmallVec;

use crate::ffi::{CounterId, EnvoyConfig, EnvoyFilter, GaugeId, HistogramId};

/// `authz_check_duration_microseconds` records one decision in this many, per worker thread.
pub const LATENCY_SAMPLE: u32 = 16;

thread_local! {
    /// Decisions this worker thread has made, for the latency sample.
    static LATENCY_SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
/// The engine's names start with this; Envoy adds its own `envoy_<namespace>_`.
const ENGINE_PREFIX: &str = "gybc_";
/// Envoy takes at most this many labels per stat (ffi.rs).
const MAX_LABELS: usize = 8;

#[derive(Clone, Copy)]
enum Stat {
    Counter(CounterId),
    Gauge(GaugeId),
}

struct Declared {
    stat: Stat,
    /// Label names in the order Envoy was given them.
    labels: Vec<String>,
}

/// One filter config's ids for the stats it defined, and what it has touched of them.
pub struct Stats {
    by_family: HashMap<String, Declared>,
    check_duration: HistogramId,
    engines_live: GaugeId,
    engine_configs: CounterId,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last copy.
    synced_at: AtomicU64,
    /// Counter series this config has touched, and so holds in Envoy.
    held: Mutex<HashSet<Series>>,
    /// This config has touched the lifecycle counters.
    lifecycle_held: AtomicBool,
}

/// A series, by a 128-bit SipHash of its family and label values (`series_id`): the copy runs
/// through every series each time, and hashing borrowed names costs less than building owned
/// keys to look up. Two of a few hundred series share an id with a chance of about 2⁻¹¹².
type Series = u128;

fn series_id(family: &str, labels: &[&str]) -> Series {
    let mut h = SipHasher13::new();
    // Each part ends with a byte no name or label value holds, so parts cannot run together.
    for part in std::iter::once(family).chain(labels.iter().copied()) {
        h.write(part.as_bytes());
        h.write_u8(0xff);
    }
    h.finish128().as_u128()
}

/// The engine's registry as last read, off Envoy's workers (`engines` refreshes it every
/// `SYNC_EVERY`); a copy into Envoy's stats reads this, never the registry.
#[derive(Default)]
pub struct Gathered(Mutex<Arc<Vec<MetricFamily>>>);

impl Gathered {
    pub fn refresh(&self, metrics: &Metrics) {
        let families = Arc::new(metrics.gather());
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = families;
    }

    fn latest(&self) -> Arc<Vec<MetricFamily>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// How often the registry is read, and at most how often a config copies it into Envoy.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

/// How much of one engine's registry is in Envoy's stats: what each counter series stood at when
/// last copied, so only the increase is added.
#[derive(Default)]
pub struct Copies(Mutex<HashMap<Series, u64>>);

/// The process's engines, as `engines` counts them.
#[derive(Clone, Copy)]
pub struct Lifecycle {
    /// Engines running now (a draining listener's included).
    pub live: u64,
    /// Filter configs that started an engine, reused a running one, or were refused because
    /// their new engine did not load in time.
    pub started: u64,
    pub reused: u64,
    pub refused: u64,
}

/// `authz_engine_configs_total`'s `outcome` values, in `Lifecycle`'s order.
const OUTCOMES: [&str; 3] = ["started", "reused", "refused"];

/// The lifecycle counters as last copied (one Envoy counter per process, whichever config
/// copies): `None` until first copied.
static LIFECYCLE_COPIED: Mutex<[u64; 3]> = Mutex::new([0; 3]);

impl Stats {
    pub fn declare(envoy: &mut EnvoyConfig, metrics: &Metrics) -> Result<Self, String> {
        let refused = |name: &str| format!("Envoy refused to define the stat {name}");
        // Kinds come from the series that exist; a family with none yet is a labelled counter
        // (`_total`) or gauge.
        let kinds: HashMap<String, MetricType> = metrics
            .gather()
            .into_iter()
            .map(|f| (f.name().to_owned(), f.get_field_type()))
            .collect();
        let mut by_family = HashMap::new();
        for family in metrics.families() {
            let Some(short) = family.name.strip_prefix(ENGINE_PREFIX) else {
                continue;
            };
            if family.labels.len() > MAX_LABELS {
                continue;
            }
            let labels: Vec<&str> = family.labels.iter().map(String::as_str).collect();
            let kind =
                kinds
                    .get(&family.name)
                    .copied()
                    .unwrap_or(if family.name.ends_with("_total") {
                        MetricType::COUNTER
                    } else {
                        MetricType::GAUGE
                    });
            let stat = match kind {
                MetricType::COUNTER => Stat::Counter(
                    envoy
                        .define_counter(short, &labels)
                        .ok_or_else(|| refused(short))?,
                ),
                MetricType::GAUGE => Stat::Gauge(
                    envoy
                        .define_gauge(short, &labels)
                        .ok_or_else(|| refused(short))?,
                ),
                // Histograms are recorded where they happen (the check latency, below).
                _ => continue,
            };
            by_family.insert(
                family.name.clone(),
                Declared {
                    stat,
                    labels: family.labels.clone(),
                },
            );
        }
        let name = "authz_check_duration_microseconds";
        let check_duration = envoy
            .define_histogram(name, &[])
            .ok_or_else(|| refused(name))?;
        let name = "authz_engines_live";
        let engines_live = envoy.define_gauge(name, &[]).ok_or_else(|| refused(name))?;
        let name = "authz_engine_configs_total";
        let engine_configs = envoy
            .define_counter(name, &["outcome"])
            .ok_or_else(|| refused(name))?;
        Ok(Self {
            by_family,
            check_duration,
            engines_live,
            engine_configs,
            epoch: Instant::now(),
            synced_at: AtomicU64::new(0),
            held: Mutex::new(HashSet::new()),
            lifecycle_held: AtomicBool::new(false),
        })
    }

    /// One decision's latency, and the registry copied over if it is time.
    pub fn decided(
        &self,
        envoy: &EnvoyFilter,
        gathered: &Gathered,
        copies: &Copies,
        lifecycle: fn() -> Lifecycle,
        latency: Duration,
    ) {
        // One decision in `LATENCY_SAMPLE` per worker thread, the first included: Envoy's
        // histogram call costs about as much as the rest of the stats work per request, and a
        // sample describes the distribution as well (the engine's own histogram, which the
        // daemon serves, still counts every decision).
        let sampled = LATENCY_SEEN.with(|seen| {
            let n = seen.get();
            seen.set(n.wrapping_add(1));
            n % LATENCY_SAMPLE == 0
        });
        if sampled {
            envoy.record_histogram(self.check_duration, &[], latency.as_micros() as u64);
        }
        self.sync(envoy, gathered, copies, lifecycle);
    }

    /// Copies the engine's registry (and the process's engine counts) into Envoy's stats, at
    /// most once per `SYNC_EVERY` for each config, from one worker at a time.
    pub fn sync(
        &self,
        envoy: &EnvoyFilter,
        gathered: &Gathered,
        copies: &Copies,
        lifecycle: fn() -> Lifecycle,
    ) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.synced_at.load(Ordering::Relaxed);
        if last != 0 && now < last + SYNC_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .synced_at
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // Another worker copying: the next request tries again, so a new config touches what
        // it holds without waiting a whole period.
        let retry = || self.synced_at.store(last, Ordering::Relaxed);
        if !self.sync_lifecycle(envoy, lifecycle()) {
            retry();
        }
        let (Ok(mut copied), Ok(mut held)) = (copies.0.try_lock(), self.held.try_lock()) else {
            retry();
            return;
        };
        for family in gathered.latest().iter() {
            let Some(declared) = self.by_family.get(family.name()) else {
                continue;
            };
            for series in family.get_metric() {
                // Borrowed from the gathered series: nothing is allocated per series, only an
                // Envoy call made where there is something to copy.
                let pairs = series.get_label();
                let labels: SmallVec<[&str; MAX_LABELS]> = (declared.labels.iter())
                    .map(|name| {
                        pairs
                            .iter()
                            .find(|p| p.name() == name)
                            .map_or("", |p| p.value())
                    })
                    .collect();
                match declared.stat {
                    Stat::Counter(id) => {
                        let now = series.get_counter().get_value() as u64;
                        let key = series_id(family.name(), &labels);
                        let before = copied.get(&key).copied();
                        let by = now.saturating_sub(before.unwrap_or(0));
                        // First sight, zero or not: the series appears in Envoy as it does on the
                        // daemon's page, so rates and alerts work from the start.
                        if by > 0 || before.is_none() || !held.contains(&key) {
                            envoy.increment_counter(id, &labels, by);
                            held.insert(key);
                            copied.insert(key, now.max(before.unwrap_or(0)));
                        }
                    }
                    Stat::Gauge(id) => {
                        envoy.set_gauge(
                            id,
                            &labels,
                            series.get_gauge().get_value().max(0.0) as u64,
                        );
                    }
                }
            }
        }
    }

    /// The process's engine counts: the gauge as it stands, each counter by its increase since
    /// any config last copied it (and touched once by each config, even with nothing to add).
    /// False if another worker was copying them.
    fn sync_lifecycle(&self, envoy: &EnvoyFilter, lifecycle: Lifecycle) -> bool {
        envoy.set_gauge(self.engines_live, &[], lifecycle.live);
        let Ok(mut copied) = LIFECYCLE_COPIED.try_lock() else {
            return false;
        };
        let first = !self.lifecycle_held.swap(true, Ordering::Relaxed);
        let now = [lifecycle.started, lifecycle.reused, lifecycle.refused];
        for ((outcome, now), before) in OUTCOMES.iter().zip(now).zip(copied.iter_mut()) {
            // `lifecycle` may have been read before another worker's newer copy.
            let by = now.saturating_sub(*before);
            if by > 0 || first {
                envoy.increment_counter(self.engine_configs, &[outcome], by);
                *before = now.max(*before);
            }
        }
        true
    }
}
