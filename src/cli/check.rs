//! `gybc-authz check`: sends one Check as Envoy would and prints the answer as JSON. For trying
//! credentials (the dev banner's commands) and for smoke tests in a pod.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use serde_json::json;

/// A CheckRequest for an HTTP request with these headers (names lower-cased, as Envoy sends them).
pub fn check_request(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(String, String)],
) -> CheckRequest {
    let mut map: HashMap<String, String> = HashMap::new();
    for (k, v) in headers {
        // Envoy joins repeated headers with a comma.
        map.entry(k.to_ascii_lowercase())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.clone());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: host.into(),
                    headers: map,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The answer as a person reads it.
pub fn describe(resp: &CheckResponse) -> serde_json::Value {
    let headers = |hs: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
        hs.iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => json!({
            "allowed": true,
            "upstream_headers": headers(&ok.headers),
            "headers_to_remove": ok.headers_to_remove,
            "response_headers": headers(&ok.response_headers_to_add),
        }),
        Some(HttpResponse::DeniedResponse(d)) => json!({
            "allowed": false,
            "status": d.status.as_ref().map(|s| s.code),
            "headers": headers(&d.headers),
            "body": serde_json::from_str::<serde_json::Value>(&d.body).unwrap_or(json!(d.body)),
        }),
        Some(HttpResponse::ErrorResponse(e)) => json!({
            "allowed": false,
            "error": true,
            "status": e.status.as_ref().map(|s| s.code),
            "body": e.body,
        }),
        None => json!({ "allowed": resp.status.as_ref().is_some_and(|s| s.code == 0) }),
    }
}

pub async fn run(addr: &str, req: CheckRequest) -> Result<CheckResponse, String> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let mut client = AuthorizationClient::connect(url.clone())
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    client
        .check(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("Check failed: {} {}", s.code(), s.message()))
}
