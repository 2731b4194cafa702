//! The HTTP authorization mode: the decision engine behind a plain HTTP endpoint, for proxies
//! that ask one (nginx `auth_request`, Traefik `ForwardAuth`, Caddy `forward_auth`, Envoy's
//! `http_service`). Only the transport differs: the request is read into the same
//! `RequestContext`, decided by the same engine, and its `Answer` written as HTTP.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use gybc_authz_engine::Engine;
use gybc_authz_engine::answer::{Answer, Header};
use gybc_authz_engine::config::{HttpAuthzConfig, HttpAuthzSource};
use gybc_authz_engine::request::RequestContext;

/// The denial's fields as headers too: nginx's `auth_request` never passes the body on and only
/// passes 401 and 403 through, so its config rebuilds the answer from these.
pub const X_AUTHZ_STATUS: &str = "x-authz-status";
pub const X_AUTHZ_REASON: &str = "x-authz-reason";
pub const X_AUTHZ_CODE: &str = "x-authz-code";
pub const X_AUTHZ_MESSAGE: &str = "x-authz-message";

pub struct HttpAuthz {
    pub engine: Arc<Engine>,
    pub config: HttpAuthzConfig,
}

pub fn router(service: Arc<HttpAuthz>) -> Router {
    Router::new().fallback(handle).with_state(service)
}

async fn handle(State(s): State<Arc<HttpAuthz>>, req: Request) -> Response {
    let started = Instant::now();
    let ctx = s.read(&req);
    let decision = s.engine.decide(&ctx).await;
    let response = write(s.engine.answer(&decision));
    s.engine.observe(&ctx, &decision, started.elapsed());
    response
}

impl HttpAuthz {
    fn read(&self, req: &Request) -> RequestContext {
        let h = req.headers();
        let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (method, path) = match self.config.source {
            // One configured header each, never a fallback list: the proxy overwrites the one it
            // sets and passes a client's copy of any other on.
            HttpAuthzSource::Forwarded => (
                header(&self.config.method_header).unwrap_or_else(|| req.method().to_string()),
                header(&self.config.uri_header).unwrap_or_else(|| req.uri().path().to_owned()),
            ),
            HttpAuthzSource::Direct => {
                let p = req.uri().path();
                let p = p
                    .strip_prefix(self.config.path_prefix.as_str())
                    .unwrap_or(p);
                (
                    req.method().to_string(),
                    if p.is_empty() {
                        "/".into()
                    } else {
                        p.to_owned()
                    },
                )
            }
        };
        // The host is only logged, never decided on.
        let host = header("x-forwarded-host")
            .or_else(|| header("host"))
            .unwrap_or_default();
        let headers = h
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes())))
            .collect::<Vec<(&str, Cow<'_, str>)>>();
        RequestContext::read(&method, &path, &host, headers, self.engine.limits())
    }
}

/// The answer as HTTP. Allow: 200 with the identity headers; the ones the answer does not set are
/// sent empty, so a proxy that copies them overwrites a client's copy (nginx's `proxy_set_header`
/// with an empty value removes it). Deny: the status, headers and JSON body, and the denial's
/// fields as `x-authz-*` headers.
fn write(answer: Answer<'_>) -> Response {
    fn add(b: axum::http::response::Builder, h: &Header<'_>) -> axum::http::response::Builder {
        match (
            HeaderName::try_from(h.name),
            HeaderValue::try_from(h.value.as_ref()),
        ) {
            (Ok(n), Ok(v)) => b.header(n, v),
            _ => b,
        }
    }
    let mut out = Response::builder();
    match answer {
        Answer::Allow {
            upstream,
            remove_upstream,
            downstream,
        } => {
            out = out.status(StatusCode::OK);
            for h in upstream.iter().chain(&downstream) {
                out = add(out, h);
            }
            for name in remove_upstream {
                out = out.header(name, "");
            }
            out = out.header(X_AUTHZ_STATUS, "200");
            out.body(Body::empty())
        }
        Answer::Deny {
            reason,
            status,
            headers,
            body,
        } => {
            out = out.status(StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN));
            for h in &headers {
                out = add(out, h);
            }
            out = out
                .header(X_AUTHZ_STATUS, status.to_string())
                .header(X_AUTHZ_REASON, reason.as_str())
                .header(X_AUTHZ_CODE, reason.code().as_str())
                .header(X_AUTHZ_MESSAGE, reason.message());
            out.body(Body::from(body.to_owned()))
        }
    }
    .unwrap_or_else(|_| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::FORBIDDEN;
        r
    })
}
