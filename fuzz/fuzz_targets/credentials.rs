//! Request reading and credential extraction: a CheckRequest built from arbitrary bytes through
//! the gRPC door's `read` and `credentials::extract`. Checks the invariants a decision relies
//! on, and that the HTTP mode reads the same header lines the same way.
//!
//! Input: `PB` + a protobuf CheckRequest, as Envoy sends it; or text, so seeds read like requests:
//! a first line of flags and the path (`raw small /api/v1/x?q`: `raw` for one entry per header
//! line as with `encode_raw_headers`, else Envoy's comma-joined map; `small` for tight limits),
//! then `Name: value` lines, and `@key=value` lines for the route's `context_extensions`.
#![no_main]

use std::borrow::Cow;
use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use gybc_authz::transport::grpc;
use gybc_authz_engine::config::LimitsConfig;
use gybc_authz_engine::credentials::{self, Credentials};
use gybc_authz_engine::request::{HeaderField, RequestContext};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn limits(small: bool) -> LimitsConfig {
    if small {
        LimitsConfig {
            max_authorization_bytes: 64,
            max_api_key_bytes: 16,
            max_headers: 16,
        }
    } else {
        LimitsConfig::default()
    }
}

fn check(
    path: &str,
    headers: &[(String, String)],
    raw: bool,
    ext: HashMap<String, String>,
) -> CheckRequest {
    let mut http = HttpRequest {
        method: "POST".into(),
        path: path.into(),
        host: "api.example.com".into(),
        ..Default::default()
    };
    if raw {
        http.header_map = Some(HeaderMap {
            headers: headers
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.clone(),
                    value: v.clone(),
                    raw_value: v.as_bytes().to_vec(),
                })
                .collect(),
        });
    } else {
        for (k, v) in headers {
            http.headers
                .entry(k.clone())
                .and_modify(|e| {
                    e.push(',');
                    e.push_str(v)
                })
                .or_insert_with(|| v.clone());
        }
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(http),
                ..Default::default()
            }),
            context_extensions: ext,
            ..Default::default()
        }),
    }
}

/// What every extraction must satisfy, whatever the request.
fn judge(ctx: &RequestContext, limits: &LimitsConfig) {
    for field in [&ctx.authorization, &ctx.api_key] {
        if let HeaderField::Present(v) = field {
            assert!(!v.contains(','), "a comma-joined credential is a duplicate");
        }
    }
    if let HeaderField::Present(v) = &ctx.authorization {
        assert!(v.len() <= limits.max_authorization_bytes);
    }
    if let HeaderField::Present(v) = &ctx.api_key {
        assert!(v.len() <= limits.max_api_key_bytes);
    }
    let result = credentials::extract(ctx);
    if ctx.too_many_headers {
        assert!(
            result.is_err(),
            "a request read only in part is never judged"
        );
    }
    match result {
        Ok(Credentials::None) => {
            assert!(ctx.authorization.is_absent() && ctx.api_key.is_absent());
        }
        Ok(Credentials::Bearer {
            token,
            on_behalf_of,
        }) => {
            assert!(ctx.api_key.is_absent());
            assert!(!token.is_empty());
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(&b))
            );
            assert!(ctx.authorization.value().is_some_and(|v| v.contains(token)));
            check_user(on_behalf_of);
        }
        Ok(Credentials::SecretKey { key, on_behalf_of }) => {
            assert_eq!(ctx.api_key.value(), Some(key.expose()));
            assert!(key.expose().starts_with("sk_"));
            assert!(
                ctx.authorization.is_absent(),
                "sk_ with Authorization is ambiguous"
            );
            check_user(on_behalf_of);
        }
        Ok(Credentials::PublishableKey {
            key,
            user_token,
            on_behalf_of,
        }) => {
            assert_eq!(ctx.api_key.value(), Some(key.expose()));
            assert!(key.expose().starts_with("pk_"));
            assert_eq!(user_token.is_none(), ctx.authorization.is_absent());
            check_user(on_behalf_of);
        }
        Err(d) => {
            let status = d.reason.http_status();
            assert!(status == 400 || status == 401, "{d:?}");
        }
    }
}

/// An `X-On-Behalf-Of` that got through follows the contract's rules.
fn check_user(user: Option<&str>) {
    if let Some(u) = user {
        let n = u.chars().count();
        assert!((1..=128).contains(&n));
        assert!(
            !u.chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == ',')
        );
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.strip_prefix(b"PB") {
        let Ok(req) = CheckRequest::decode(bytes) else {
            return;
        };
        let limits = LimitsConfig::default();
        if let Ok(ctx) = grpc::read(&req, &limits) {
            judge(&ctx, &limits);
        }
        return;
    }
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    let mut words: Vec<&str> = first.split(' ').collect();
    let path = words.pop().unwrap_or_default().to_owned();
    let raw = words.contains(&"raw");
    let limits = limits(words.contains(&"small"));
    let mut headers = Vec::new();
    let mut ext = HashMap::new();
    for line in lines {
        if let Some(kv) = line.strip_prefix('@') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            ext.insert(k.to_owned(), v.to_owned());
        } else {
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            headers.push((k.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()));
        }
    }
    let req = check(&path, &headers, raw, ext);
    let ctx = grpc::read(&req, &limits).expect("HTTP attributes are set");
    assert!(!ctx.path.contains(['?', '#']));
    judge(&ctx, &limits);
    if raw {
        // The HTTP mode reads the same lines into the same context.
        let http = RequestContext::read(
            "POST",
            &path,
            "api.example.com",
            headers
                .iter()
                .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
            &limits,
        );
        assert_eq!(http.authorization, ctx.authorization);
        assert_eq!(http.api_key, ctx.api_key);
        assert_eq!(http.on_behalf_of, ctx.on_behalf_of);
        assert_eq!(http.origin, ctx.origin);
        assert_eq!(http.too_many_headers, ctx.too_many_headers);
        assert_eq!(http.path, ctx.path);
    }
});
