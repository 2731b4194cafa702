//! The audit trail: one log line per key change (create, update, rotate, revoke), whatever its
//! outcome, with the action, the tenant, the key id, who (user or key id), the request id and the
//! outcome. Never a secret: the line is built from these fields only, never from a request body.

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// 400: a bad field, or a change the key's state does not allow.
    Invalid,
    /// 401/403: not allowed to manage keys, or to grant a scope.
    Forbidden,
    /// 404: no such key in the caller's tenant (or no such method).
    NotFound,
    /// 409/422: an `Idempotency-Key` in use or reused.
    Conflict,
    /// 429: the caller is over its rate limit.
    Limited,
    /// 5xx: the store failed.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::Forbidden => "forbidden",
            Outcome::NotFound => "not_found",
            Outcome::Conflict => "conflict",
            Outcome::Limited => "limited",
            Outcome::Error => "error",
        }
    }
}

/// One change, as the audit line names it.
pub struct Change<'a> {
    pub action: &'static str,
    pub tenant: &'a str,
    pub key_id: &'a str,
    /// `user:<id>` or `key:<id>`; empty when the caller was refused before it was known.
    pub actor: &'a str,
    pub request_id: &'a str,
    pub outcome: Outcome,
}

pub fn change(c: &Change<'_>) {
    tracing::info!(
        target: "gybc_authz::audit",
        audit = true,
        action = c.action,
        tenant = c.tenant,
        key_id = c.key_id,
        actor = c.actor,
        request_id = c.request_id,
        outcome = c.outcome.as_str(),
        "Key change."
    );
}
