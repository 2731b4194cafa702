//! The engine's `gybc_authz_*` metrics as Envoy stats, so Envoy's `/stats/prometheus` is the one
//! scrape target. Envoy only accepts new stats while a filter config is created and only counts
//! from a stream's hook, so every family is declared up front and the engine's registry is
//! copied over from requests as they pass, at most once per `SYNC_EVERY`.
//!
//! With `dynamic_module_config.metrics_namespace: gybc` the names come out as
//! `envoy_gybc_authz_*`, the daemon's family names behind Envoy's `envoy_` prefix. The check
//! latency is recorded per request as `authz_check_duration_microseconds` (Envoy histograms hold
//! integers).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gybc_authz_engine::metrics::{Metrics, proto::MetricType};

use crate::ffi::{CounterId, EnvoyConfig, EnvoyFilter, GaugeId, HistogramId};

const SYNC_EVERY: Duration = Duration::from_secs(1);
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

pub struct Stats {
    by_family: HashMap<String, Declared>,
    check_duration: HistogramId,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last copy.
    synced_at: AtomicU64,
    /// What each counter series stood at when last copied, so only the increase is added.
    copied: Mutex<HashMap<(String, Vec<String>), u64>>,
}

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
        Ok(Self {
            by_family,
            check_duration,
            epoch: Instant::now(),
            synced_at: AtomicU64::new(0),
            copied: Mutex::new(HashMap::new()),
        })
    }

    /// One decision's latency, and the registry copied over if it is time.
    pub fn decided(&self, envoy: &EnvoyFilter, metrics: &Metrics, latency: Duration) {
        envoy.record_histogram(self.check_duration, &[], latency.as_micros() as u64);
        self.sync(envoy, metrics);
    }

    /// Copies the engine's registry into Envoy's stats, from one worker at a time.
    pub fn sync(&self, envoy: &EnvoyFilter, metrics: &Metrics) {
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
        let Ok(mut copied) = self.copied.try_lock() else {
            return;
        };
        for family in metrics.gather() {
            let Some(declared) = self.by_family.get(family.name()) else {
                continue;
            };
            for series in family.get_metric() {
                let values: Vec<String> = declared
                    .labels
                    .iter()
                    .map(|name| {
                        series
                            .get_label()
                            .iter()
                            .find(|p| p.name() == name)
                            .map_or_else(String::new, |p| p.value().to_owned())
                    })
                    .collect();
                let labels: Vec<&str> = values.iter().map(String::as_str).collect();
                match declared.stat {
                    Stat::Counter(id) => {
                        let now = series.get_counter().get_value() as u64;
                        let key = (family.name().to_owned(), values.clone());
                        match copied.get_mut(&key) {
                            Some(before) if now > *before => {
                                envoy.increment_counter(id, &labels, now - *before);
                                *before = now;
                            }
                            Some(_) => {}
                            // First sight, zero or not: the series appears in Envoy as it does on
                            // the daemon's page, so rates and alerts work from the start.
                            None => {
                                envoy.increment_counter(id, &labels, now);
                                copied.insert(key, now);
                            }
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
}
