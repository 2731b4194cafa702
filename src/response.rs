//! The one place that builds the wire answer. An allow overwrites every identity header it sets
//! and strips the client's copies of the rest; a denial carries a status, a JSON body and, for
//! key-authenticated requests, the rate-limit headers.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status;

use crate::config::{Config, HeaderNames};
use crate::decision::{Decision, Denial, Grant, Reason};
use crate::ratelimit::RateStatus;
use crate::request::{X_API_KEY, X_ON_BEHALF_OF};

/// Everything the builder needs from config, prepared once. A denial's body and challenge depend
/// only on its reason and the config, so they are rendered here rather than per request: a flood
/// of denials (random keys, bad tokens) then costs a copy, not a JSON serialisation.
#[derive(Debug, Clone)]
pub struct Responder {
    names: HeaderNames,
    forward_api_key: bool,
    ietf_headers: bool,
    unavailable_retry_after: String,
    /// Per `Reason::ALL` index.
    denials: Vec<PreparedDenial>,
}

#[derive(Debug, Clone)]
struct PreparedDenial {
    body: String,
    www_authenticate: Option<String>,
}

impl Responder {
    pub fn new(cfg: &Config) -> Self {
        let realm = &cfg.response.realm;
        let denials = Reason::ALL
            .iter()
            .map(|&reason| PreparedDenial {
                body: serde_json::json!({
                    "code": reason.code().as_str(),
                    "message": reason.message(),
                    "reason": reason.as_str(),
                })
                .to_string(),
                www_authenticate: reason.bearer_challenge().map(|error| match error {
                    None => format!("Bearer realm=\"{realm}\""),
                    Some(code) => format!(
                        "Bearer realm=\"{realm}\", error=\"{code}\", error_description=\"{}\"",
                        reason.message()
                    ),
                }),
            })
            .collect();
        Self {
            names: cfg.headers.clone(),
            forward_api_key: cfg.policy.forward_api_key,
            ietf_headers: cfg.rate_limit.ietf_headers,
            unavailable_retry_after: cfg.response.unavailable_retry_after_secs.to_string(),
            denials,
        }
    }

    fn prepared(&self, reason: Reason) -> &PreparedDenial {
        let i = Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("Reason::ALL lists every reason");
        &self.denials[i]
    }

    pub fn build(&self, decision: &Decision) -> CheckResponse {
        match decision {
            Decision::Allow(grant) => self.allow(grant),
            Decision::Deny(denial) => self.deny(denial),
        }
    }

    fn allow(&self, grant: &Grant) -> CheckResponse {
        let id = grant.identity.as_ref();
        let scopes = id
            .filter(|i| !i.scopes.is_empty())
            .map(|i| i.scopes.join(" "));
        let values: [(&str, Option<&str>); 6] = [
            (&self.names.tenant_id, id.and_then(|i| i.tenant.as_deref())),
            (&self.names.user_id, id.and_then(|i| i.user.as_deref())),
            (&self.names.auth_method, id.map(|i| i.method.as_str())),
            (&self.names.api_key_id, id.and_then(|i| i.key_id.as_deref())),
            (&self.names.scopes, scopes.as_deref()),
            (
                &self.names.impersonated_by,
                id.and_then(|i| i.impersonated_by.as_deref()),
            ),
        ];
        let mut headers = Vec::with_capacity(6);
        // Only headers the daemon does not set are listed for removal: a set header already
        // replaces the client's copy, and Envoy may apply removals after additions.
        let mut headers_to_remove = Vec::with_capacity(8);
        for (name, value) in values {
            match value {
                Some(v) => headers.push(overwrite(name, v)),
                None => headers_to_remove.push(name.to_owned()),
            }
        }
        if !self.forward_api_key {
            headers_to_remove.push(X_API_KEY.to_owned());
        }
        headers_to_remove.push(X_ON_BEHALF_OF.to_owned());

        CheckResponse {
            status: Some(Status {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers,
                headers_to_remove,
                response_headers_to_add: grant
                    .rate
                    .map(|r| self.rate_headers(&r))
                    .unwrap_or_default(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn deny(&self, denial: &Denial) -> CheckResponse {
        let reason = denial.reason;
        let prepared = self.prepared(reason);
        let mut headers = vec![overwrite("content-type", "application/json")];
        if let Some(challenge) = &prepared.www_authenticate {
            headers.push(overwrite("www-authenticate", challenge));
        }
        if let Some(rate) = &denial.rate {
            headers.extend(self.rate_headers(rate));
        }
        if reason == Reason::Unavailable {
            headers.push(overwrite("retry-after", &self.unavailable_retry_after));
        }
        let body = prepared.body.clone();
        CheckResponse {
            status: Some(Status {
                code: reason.code().grpc(),
                message: reason.as_str().to_owned(),
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: reason.http_status() as i32,
                }),
                headers,
                body,
            })),
            ..Default::default()
        }
    }

    fn rate_headers(&self, r: &RateStatus) -> Vec<HeaderValueOption> {
        let mut out = vec![
            overwrite("x-ratelimit-limit", &r.limit.to_string()),
            overwrite("x-ratelimit-remaining", &r.remaining.to_string()),
            overwrite("x-ratelimit-reset", &r.reset_at.to_string()),
        ];
        if let Some(after) = r.retry_after {
            out.push(overwrite("retry-after", &after.to_string()));
        }
        if self.ietf_headers {
            // draft-ietf-httpapi-ratelimit-headers: the reset is relative there, in seconds.
            out.push(overwrite(
                "ratelimit",
                &format!(
                    "limit={}, remaining={}, reset={}",
                    r.limit, r.remaining, r.reset_after
                ),
            ));
            out.push(overwrite(
                "ratelimit-policy",
                &format!("{};w={}", r.limit, r.window_secs),
            ));
        }
        out
    }
}

fn overwrite(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        // Envoy's newer source honours append_action; unset would append beside a spoofed copy.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
