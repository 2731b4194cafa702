//! `log`: the log filter, its format, and the per-decision lines.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter directive (`info`, `gybc_authz=debug`). Default `info`.
    pub level: String,
    /// `json` (default) or `text`.
    pub format: LogFormat,
    /// Level of the per-decision line for allows. Default `debug` (off at `level: info`).
    pub allow_level: DecisionLevel,
    /// Level of the per-decision line for denials. Default `info`.
    pub deny_level: DecisionLevel,
    /// Most denial lines written per second for each reason. Default 100, at least 1. A flood
    /// of denials (a bot replaying a bad key) then cannot flood the log; the lines left out
    /// are counted in `gybc_authz_decision_log_suppressed_total` and reported as `suppressed`
    /// on the next line written for that reason. Allows are not limited.
    pub deny_lines_per_sec: u32,
}

/// Denial lines per second per reason.
pub const DEFAULT_DENY_LINES_PER_SEC: u32 = 100;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Json,
            allow_level: DecisionLevel::Debug,
            deny_level: DecisionLevel::Info,
            deny_lines_per_sec: DEFAULT_DENY_LINES_PER_SEC,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecisionLevel {
    Off,
    Debug,
    Info,
    Warn,
}

impl LogConfig {
    /// Every problem of the section, each against its field under `log.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            err(
                "log.level".into(),
                format!("`{}` is not a valid filter", self.level),
            );
        }
        if self.deny_lines_per_sec == 0 {
            err(
                "log.deny_lines_per_sec".into(),
                "must be at least 1 (to log no denials, set log.deny_level: off)".into(),
            );
        }
    }
}
