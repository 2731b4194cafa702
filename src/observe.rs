//! One call per decision emits its log line. Fields are ids and bounded codes only: never a key,
//! a token or an `Authorization` value.

use std::time::Duration;

use crate::config::{DecisionLevel, LogConfig};
use crate::decision::Decision;
use crate::request::RequestContext;

#[derive(Debug, Clone, Copy)]
pub struct DecisionLog {
    allow: DecisionLevel,
    deny: DecisionLevel,
}

impl DecisionLog {
    pub fn new(cfg: &LogConfig) -> Self {
        Self {
            allow: cfg.allow_level,
            deny: cfg.deny_level,
        }
    }

    pub fn record(&self, ctx: &RequestContext, decision: &Decision, latency: Duration) {
        let (level, reason, detail, identity) = match decision {
            Decision::Allow(g) => (self.allow, "ok", None, Some(&g.identity)),
            Decision::Deny(d) => (self.deny, d.reason.as_str(), d.detail, None),
        };
        macro_rules! emit {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: "gybc_authz::decision",
                    request_id = ctx.request_id.as_deref().unwrap_or(""),
                    http_method = %ctx.method,
                    outcome = decision.outcome(),
                    reason,
                    detail = detail.unwrap_or(""),
                    auth_method = identity.map_or("", |i| i.method.as_str()),
                    tenant = identity.and_then(|i| i.tenant.as_deref()).unwrap_or(""),
                    key_id = identity.and_then(|i| i.key_id.as_deref()).unwrap_or(""),
                    latency_us = latency.as_micros() as u64,
                    "Decision."
                )
            };
        }
        match level {
            DecisionLevel::Off => {}
            DecisionLevel::Debug => emit!(debug),
            DecisionLevel::Info => emit!(info),
            DecisionLevel::Warn => emit!(warn),
        }
    }
}
