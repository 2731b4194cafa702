//! The one place that turns a decision into an answer, as plain data every door writes out in
//! its own format. An allow sets every identity header it has (replacing any client copy) and
//! removes the client's copies of the rest; a denial carries a status, a JSON body and, for
//! key-authenticated requests, the rate-limit headers.

use std::borrow::Cow;

use smallvec::SmallVec;

use crate::browser::{
    RATELIMIT, RATELIMIT_POLICY, RETRY_AFTER, WWW_AUTHENTICATE, X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING, X_RATELIMIT_RESET,
};
use crate::config::{Config, HeaderNames};
use crate::decision::{Decision, Denial, Grant, Reason};
use crate::ratelimit::RateStatus;
use crate::request::{X_API_KEY, X_ON_BEHALF_OF};

/// One header of an answer. Names are lowercase; every header an answer sets replaces any copy
/// the client sent (doors must overwrite, never append).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: &'a str,
    pub value: Value<'a>,
}

/// An answer's headers: at most 8 (a denial's content type, challenge, rate-limit headers and
/// retry delay), held inline so that building an answer needs no heap allocation for them.
pub type Headers<'a> = SmallVec<[Header<'a>; 8]>;

/// A header's value as text: borrowed from the config or the decision, a number written in
/// place (the rate-limit headers of every allow, without a heap allocation), or text built for
/// this answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    Number(Digits),
}

/// A `u64` in decimal, held inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digits {
    bytes: [u8; 20],
    len: u8,
}

impl Digits {
    pub fn new(n: u64) -> Self {
        let mut buffer = itoa::Buffer::new();
        let text = buffer.format(n).as_bytes();
        let mut bytes = [0; 20];
        bytes[..text.len()].copy_from_slice(text);
        Self {
            bytes,
            len: text.len() as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("digits are ASCII")
    }
}

impl Value<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            Value::Text(t) => t,
            Value::Number(n) => n.as_str(),
        }
    }

    pub fn into_owned(self) -> String {
        match self {
            Value::Text(t) => t.into_owned(),
            Value::Number(n) => n.as_str().to_owned(),
        }
    }
}

impl std::ops::Deref for Value<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Value<'_> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a door does with a request.
// An allow's lists are inline and large: an answer lives on the stack for the request that made
// it and is consumed there, and boxing it would be the heap allocation the lists avoid.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Let it through to the service.
    Allow {
        /// Set on the request upstream, replacing every client copy.
        upstream: Headers<'a>,
        /// Removed from the request upstream: identity headers this answer does not set, and the
        /// credentials that stop here.
        remove_upstream: SmallVec<[&'a str; 8]>,
        /// Added to the response the client gets (the rate-limit headers).
        downstream: Headers<'a>,
    },
    /// Answer the client directly; the service never sees the request.
    Deny {
        reason: Reason,
        status: u16,
        headers: Headers<'a>,
        body: &'a str,
    },
}

/// Everything the builder needs from config, prepared once. A denial's body and challenge depend
/// only on its reason and the config, so they are rendered here rather than per request: a flood
/// of denials (random keys, bad tokens) then costs a copy, not a JSON serialisation.
#[derive(Debug, Clone)]
pub struct Answers {
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

impl Answers {
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

    /// Every request header an allow may set or remove upstream. A door whose header removals
    /// cost something (Envoy's) can skip removing one the request does not carry.
    pub fn upstream_names(&self) -> [&str; 8] {
        let n = &self.names;
        [
            &n.tenant_id,
            &n.user_id,
            &n.auth_method,
            &n.api_key_id,
            &n.scopes,
            &n.impersonated_by,
            X_API_KEY,
            X_ON_BEHALF_OF,
        ]
    }

    pub fn answer<'a>(&'a self, decision: &'a Decision) -> Answer<'a> {
        match decision {
            Decision::Allow(grant) => self.allow(grant),
            Decision::Deny(denial) => self.deny(denial),
        }
    }

    fn allow<'a>(&'a self, grant: &'a Grant) -> Answer<'a> {
        let id = grant.identity.as_ref();
        // Joined when the key was loaded: every allow of the key borrows the same value.
        let scopes = id
            .and_then(|i| i.scopes.as_deref())
            .filter(|s| !s.is_empty())
            .map(|s| Cow::Borrowed(&*s.joined));
        let values: [(&str, Option<Cow<'a, str>>); 6] = [
            (
                &self.names.tenant_id,
                id.and_then(|i| i.tenant.as_deref()).map(Cow::Borrowed),
            ),
            (
                &self.names.user_id,
                id.and_then(|i| i.user.as_deref()).map(Cow::Borrowed),
            ),
            (
                &self.names.auth_method,
                id.map(|i| Cow::Borrowed(i.method.as_str())),
            ),
            (
                &self.names.api_key_id,
                id.and_then(|i| i.key_id.as_deref()).map(Cow::Borrowed),
            ),
            (&self.names.scopes, scopes),
            (
                &self.names.impersonated_by,
                id.and_then(|i| i.impersonated_by.as_deref())
                    .map(Cow::Borrowed),
            ),
        ];
        let mut upstream = SmallVec::new();
        // Only headers the answer does not set are listed for removal: a set header already
        // replaces the client's copy, and a door may apply removals after additions.
        let mut remove_upstream = SmallVec::new();
        for (name, value) in values {
            match value {
                Some(value) => upstream.push(Header {
                    name,
                    value: Value::Text(value),
                }),
                None => remove_upstream.push(name),
            }
        }
        if !self.forward_api_key {
            remove_upstream.push(X_API_KEY);
        }
        remove_upstream.push(X_ON_BEHALF_OF);
        let mut downstream = SmallVec::new();
        if let Some(rate) = &grant.rate {
            self.rate_headers(rate, &mut downstream);
        }
        Answer::Allow {
            upstream,
            remove_upstream,
            downstream,
        }
    }

    fn deny<'a>(&'a self, denial: &'a Denial) -> Answer<'a> {
        let reason = denial.reason;
        let prepared = self.prepared(reason);
        let mut headers = smallvec::smallvec![header("content-type", "application/json")];
        if let Some(challenge) = &prepared.www_authenticate {
            headers.push(header(WWW_AUTHENTICATE, challenge));
        }
        if let Some(rate) = &denial.rate {
            self.rate_headers(rate, &mut headers);
        }
        if reason == Reason::Unavailable {
            headers.push(header(RETRY_AFTER, &self.unavailable_retry_after));
        }
        Answer::Deny {
            reason,
            status: reason.http_status(),
            headers,
            body: &prepared.body,
        }
    }

    fn rate_headers<'a>(&self, r: &RateStatus, out: &mut Headers<'a>) {
        let number = |name: &'a str, n: u64| Header {
            name,
            value: Value::Number(Digits::new(n)),
        };
        out.push(number(X_RATELIMIT_LIMIT, r.limit.into()));
        out.push(number(X_RATELIMIT_REMAINING, r.remaining.into()));
        out.push(number(X_RATELIMIT_RESET, r.reset_at));
        if let Some(after) = r.retry_after {
            out.push(number(RETRY_AFTER, after));
        }
        if self.ietf_headers {
            // draft-ietf-httpapi-ratelimit-headers: the reset is relative there, in seconds.
            let mut n = itoa::Buffer::new();
            let mut value = String::with_capacity(64);
            for (part, number) in [
                ("limit=", u64::from(r.limit)),
                (", remaining=", r.remaining.into()),
                (", reset=", r.reset_after),
            ] {
                value.push_str(part);
                value.push_str(n.format(number));
            }
            out.push(Header {
                name: RATELIMIT,
                value: Value::Text(Cow::Owned(value)),
            });
            let mut value = String::with_capacity(24);
            value.push_str(n.format(r.limit));
            value.push_str(";w=");
            value.push_str(n.format(r.window_secs));
            out.push(Header {
                name: RATELIMIT_POLICY,
                value: Value::Text(Cow::Owned(value)),
            });
        }
    }
}

fn header<'a>(name: &'a str, value: &'a str) -> Header<'a> {
    Header {
        name,
        value: Value::Text(Cow::Borrowed(value)),
    }
}

#[cfg(test)]
mod tests;
