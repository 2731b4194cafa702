//! The HTTP authorization mode: the decision engine behind a plain HTTP endpoint, for proxies
//! that ask one (nginx `auth_request`, Traefik `ForwardAuth`, Caddy `forward_auth`, Envoy's
//! `http_service`). Only the transport differs: the request is read into the same
//! `RequestContext`, decided by the same `Authorizer`, and answered from the same CheckResponse
//! the gRPC service sends, translated to HTTP.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;

use crate::authorize::Authorizer;
use crate::config::{HttpAuthzConfig, HttpAuthzSource, LimitsConfig};
use crate::decision::Decision;
use crate::observe::Observer;
use crate::request::RequestContext;
use crate::response::Responder;

/// The denial's fields as headers too: nginx's `auth_request` never passes the body on and only
/// passes 401 and 403 through, so its config rebuilds the answer from these.
pub const X_AUTHZ_STATUS: &str = "x-authz-status";
pub const X_AUTHZ_REASON: &str = "x-authz-reason";
pub const X_AUTHZ_CODE: &str = "x-authz-code";
pub const X_AUTHZ_MESSAGE: &str = "x-authz-message";

pub struct HttpAuthz {
    pub authorizer: Arc<Authorizer>,
    pub responder: Arc<Responder>,
    pub limits: LimitsConfig,
    pub observer: Arc<Observer>,
    pub config: HttpAuthzConfig,
}

pub fn router(service: Arc<HttpAuthz>) -> Router {
    Router::new().fallback(handle).with_state(service)
}

async fn handle(State(s): State<Arc<HttpAuthz>>, req: Request) -> Response {
    let started = Instant::now();
    let ctx = s.read(&req);
    let decision = s.authorizer.decide(&ctx).await;
    let response = to_http(&s.responder.build(&decision), &decision);
    s.observer.decision(&ctx, &decision, started.elapsed());
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
        RequestContext::from_http(&method, &path, &host, headers, &self.limits)
    }
}

/// The CheckResponse as an HTTP answer. Allow: 200 with the identity headers; the ones the daemon
/// does not set are sent empty, so a proxy that copies them overwrites a client's copy (nginx's
/// `proxy_set_header` with an empty value removes it). Deny: the status, headers and JSON body.
fn to_http(resp: &CheckResponse, decision: &Decision) -> Response {
    let mut out = Response::builder();
    let add = |b: axum::http::response::Builder, h: &HeaderValueOption| {
        let Some(hv) = &h.header else { return b };
        match (
            HeaderName::try_from(hv.key.as_str()),
            HeaderValue::try_from(hv.value.as_str()),
        ) {
            (Ok(n), Ok(v)) => b.header(n, v),
            _ => b,
        }
    };
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            out = out.status(StatusCode::OK);
            for h in ok.headers.iter().chain(&ok.response_headers_to_add) {
                out = add(out, h);
            }
            for name in &ok.headers_to_remove {
                out = out.header(name.as_str(), "");
            }
            out = out.header(X_AUTHZ_STATUS, "200");
            out.body(Body::empty())
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            let status = d.status.as_ref().map_or(403, |s| s.code as u16);
            out = out.status(StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN));
            for h in &d.headers {
                out = add(out, h);
            }
            if let Decision::Deny(denial) = decision {
                let r = denial.reason;
                out = out
                    .header(X_AUTHZ_STATUS, status.to_string())
                    .header(X_AUTHZ_REASON, r.as_str())
                    .header(X_AUTHZ_CODE, r.code().as_str())
                    .header(X_AUTHZ_MESSAGE, r.message());
            }
            out.body(Body::from(d.body.clone()))
        }
        _ => out.status(StatusCode::FORBIDDEN).body(Body::empty()),
    }
    .unwrap_or_else(|_| {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::FORBIDDEN;
        r
    })
}
