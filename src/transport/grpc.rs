//! The ext_authz gRPC door: CheckRequest → RequestContext → engine → Answer → CheckResponse. No
//! decision logic lives here; a gRPC error means Envoy sent something that is not an HTTP check.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use gybc_authz_engine::Engine;
use gybc_authz_engine::answer::{Answer, Header};
use gybc_authz_engine::config::LimitsConfig;
use gybc_authz_engine::request::RequestContext;
use gybc_authz_engine::route::RouteSettings;
use gybc_authz_engine::trace_context::{self, TraceHeaders, TraceParent};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

pub struct AuthzService {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let mut ctx = read(request.get_ref(), self.engine.limits())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(parent) = envoy_span(request.metadata()) {
            ctx = ctx.with_trace_parent(parent);
        }
        let decision = self.engine.decide(&ctx).await;
        let response = write(self.engine.answer(&decision));
        self.engine.observe(&ctx, &decision, started.elapsed());
        Ok(Response::new(response))
    }
}

/// A CheckRequest without HTTP attributes: Envoy misconfigured, not a client's doing.
#[derive(Debug, thiserror::Error)]
#[error("CheckRequest has no attributes.request.http")]
pub struct NoHttpAttributes;

/// The request as Envoy describes it, with the route's settings from `context_extensions`.
pub fn read(req: &CheckRequest, limits: &LimitsConfig) -> Result<RequestContext, NoHttpAttributes> {
    let attrs = req.attributes.as_ref().ok_or(NoHttpAttributes)?;
    let http = attrs
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .ok_or(NoHttpAttributes)?;
    let ctx = match &http.header_map {
        // `encode_raw_headers: true`: every header line arrives apart, bytes as sent.
        Some(map) if !map.headers.is_empty() => {
            let lines = map.headers.iter().map(|h| {
                let value = if h.raw_value.is_empty() {
                    Cow::Borrowed(h.value.as_str())
                } else {
                    String::from_utf8_lossy(&h.raw_value)
                };
                (h.key.as_str(), value)
            });
            RequestContext::read(&http.method, &http.path, &http.host, lines, limits)
        }
        // Repeated lines arrive joined with `,`, which reads as a duplicate.
        _ => {
            let lines = http.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            RequestContext::read(&http.method, &http.path, &http.host, lines, limits)
        }
    };
    Ok(ctx.with_route(RouteSettings::parse(&attrs.context_extensions)))
}

/// Envoy's own span for this Check, when Envoy traces: its gRPC client passes the span in the
/// call's metadata. It is a closer parent than the one in the request's headers, which names
/// the span before Envoy's.
fn envoy_span(metadata: &MetadataMap) -> Option<TraceParent> {
    let mut trace = TraceHeaders::default();
    for name in [
        trace_context::TRACEPARENT,
        trace_context::TRACESTATE,
        trace_context::B3,
        trace_context::X_B3_TRACE_ID,
        trace_context::X_B3_SPAN_ID,
        trace_context::X_B3_SAMPLED,
        trace_context::X_B3_FLAGS,
    ] {
        for value in metadata.get_all(name) {
            trace.header(name, value.to_str().unwrap_or_default());
        }
    }
    trace.finish()
}

/// The answer in ext_authz's terms. A denial needs a non-zero status code, or Envoy lets it
/// through.
pub fn write(answer: Answer<'_>) -> CheckResponse {
    match answer {
        Answer::Allow {
            upstream,
            remove_upstream,
            downstream,
        } => CheckResponse {
            status: Some(RpcStatus {
                code: 0,
                ..Default::default()
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: upstream.into_iter().map(overwrite).collect(),
                headers_to_remove: remove_upstream.iter().map(|h| (*h).to_owned()).collect(),
                response_headers_to_add: downstream.into_iter().map(overwrite).collect(),
                ..Default::default()
            })),
            ..Default::default()
        },
        Answer::Deny {
            reason,
            status,
            headers,
            body,
        } => CheckResponse {
            status: Some(RpcStatus {
                code: reason.code().grpc(),
                message: reason.as_str().to_owned(),
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: headers.into_iter().map(overwrite).collect(),
                body: body.to_owned(),
            })),
            ..Default::default()
        },
    }
}

/// Takes the header by value: a value the answer built (a rate-limit number) moves into the
/// message instead of being copied.
fn overwrite(h: Header<'_>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: h.name.to_owned(),
            value: h.value.into_owned(),
            ..Default::default()
        }),
        // Envoy's newer source honours append_action; unset would append beside a spoofed copy.
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use gybc_authz_engine::answer::Answers;
    use gybc_authz_engine::config::Config;
    use gybc_authz_engine::decision::{AuthMethod, Decision, Denial, Grant, Identity, Reason};
    use gybc_authz_engine::request::HeaderField;

    use super::*;

    fn check(path: &str, headers: &[(&str, &str)], ext: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        path: path.into(),
                        host: "api.example".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: ext
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn envoys_span_in_the_call_metadata_is_the_parent() {
        let mut metadata = MetadataMap::new();
        assert_eq!(envoy_span(&metadata), None);
        metadata.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let parent = envoy_span(&metadata).unwrap();
        assert_eq!(
            parent.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(parent.sampled, Some(true));
    }

    #[test]
    fn reads_joined_and_raw_header_maps_and_route_settings() {
        let limits = LimitsConfig::default();
        let ctx = read(
            &check(
                "/a?b=c",
                &[("x-api-key", "sk_a,sk_b"), ("authorization", "Bearer t")],
                &[("gybc.public", "true")],
            ),
            &limits,
        )
        .unwrap();
        assert_eq!(ctx.path, "/a");
        assert_eq!(ctx.api_key, HeaderField::Duplicated);
        assert!(ctx.route.public);

        let mut raw = check("/", &[], &[("gybc.publik", "true")]);
        let http = raw
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.header_map = Some(HeaderMap {
            headers: [("x-api-key", "sk_a"), ("X-API-KEY", "sk_b")]
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        });
        let ctx = read(&raw, &limits).unwrap();
        assert_eq!(ctx.api_key, HeaderField::Duplicated);
        assert!(ctx.route_error.is_some(), "an unknown gybc.* key refuses");

        assert!(read(&CheckRequest::default(), &limits).is_err());
    }

    #[test]
    fn every_header_overwrites_and_every_denial_has_a_nonzero_code() {
        let answers = Answers::new(&Config::from_yaml("", &BTreeMap::new()).unwrap());
        let allow = Decision::Allow(Grant {
            identity: Some(Identity {
                method: AuthMethod::Jwt,
                tenant: Some("t1".into()),
                user: Some("u1".into()),
                key_id: None,
                scopes: None,
                impersonated_by: None,
            }),
            rate: None,
        });
        let resp = write(answers.answer(&allow));
        assert_eq!(resp.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
            panic!("an allow")
        };
        assert!(
            ok.headers
                .iter()
                .all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32)
        );
        assert!(ok.headers_to_remove.contains(&"x-api-key-id".to_owned()));

        for reason in Reason::ALL {
            let deny = Decision::Deny(Denial::new(reason));
            let resp = write(answers.answer(&deny));
            assert_ne!(resp.status.unwrap().code, 0, "{reason:?}: 0 would allow");
            let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
                panic!("a denial")
            };
            assert_eq!(d.status.unwrap().code, i32::from(reason.http_status()));
            assert!(
                d.headers
                    .iter()
                    .all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32)
            );
        }
    }
}
