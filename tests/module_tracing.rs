//! Issue 15 in the Envoy module: when Envoy traces a request, the decision is a child span of
//! Envoy's active span, made and exported through Envoy's tracer (the real Envoy 1.40 with its
//! OpenTelemetry tracer, exporting to the tests' OTLP receiver), with the attributes the daemon's
//! span carries and no secret; the engine's own `tracing_export` then records nothing for that
//! request (one decision, one span), and still serves requests Envoy does not trace.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::Span;
use serde_yaml_ng::Value;

use gybc_authz::dev::SigningKey;
use gybc_authz_engine::authn::apikey::KeyHash;
use support::envoy::*;
use support::otlp::*;
use support::*;

/// The `service.name` of Envoy's spans; the engine's are `gybc-authz-test` (`tracing_yaml`).
const ENVOY_SERVICE: &str = "envoy-test";
const ENGINE_SERVICE: &str = "gybc-authz-test";

/// The shipped config with Envoy's OpenTelemetry tracer on the ingress HCM, exporting to
/// `collector` over gRPC, each span as soon as it ends (Envoy's default batches 5 spans or 5 s).
fn traced_by_envoy(collector: SocketAddr) -> EnvoyConfig {
    let mut cfg = EnvoyConfig::shipped();
    cfg.ingress_hcm()["tracing"] = yaml(&format!(
        r#"
provider:
  name: envoy.tracers.opentelemetry
  typed_config:
    "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
    grpc_service: {{ envoy_grpc: {{ cluster_name: otlp }}, timeout: 1s }}
    service_name: {ENVOY_SERVICE}
"#
    ));
    let clusters = cfg.0["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    clusters.push(yaml(&format!(
        r#"
name: otlp
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: otlp
  endpoints:
    - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: "{}", port_value: {} }} }} }}
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {{ http2_protocol_options: {{}} }}
"#,
        collector.ip(),
        collector.port()
    )));
    cfg.0["layered_runtime"] = yaml(
        r#"
layers:
  - name: flush_each_span
    static_layer:
      tracing.opentelemetry.min_flush_spans: 1
      tracing.opentelemetry.flush_interval_ms: 100
"#,
    );
    cfg
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

/// Every span of `trace` with its service.
fn in_trace(received: &Received, trace: &[u8; 16]) -> Vec<(String, Span)> {
    received
        .spans()
        .into_iter()
        .filter(|(_, s)| s.trace_id == trace)
        .collect()
}

/// Each span received as (service, name, trace id, span id, parent id), for failure messages.
fn summary(received: &Received) -> Vec<String> {
    received
        .spans()
        .iter()
        .map(|(service, s)| {
            format!(
                "{service} {} trace={} span={} parent={}",
                s.name,
                hex(&s.trace_id),
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect()
}

/// Envoy's span for the request the caller sent under `caller`, and the decision span in it.
#[track_caller]
fn envoy_and_decision(received: &Received, trace: &[u8; 16], caller: &[u8; 8]) -> (Span, Span) {
    let spans = in_trace(received, trace);
    let envoy: Vec<&Span> = spans
        .iter()
        .filter(|(service, s)| service == ENVOY_SERVICE && s.parent_span_id == caller)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        envoy.len(),
        1,
        "one Envoy span under the caller's: {spans:#?}"
    );
    let decisions: Vec<&(String, Span)> =
        spans.iter().filter(|(_, s)| s.name == DECISION).collect();
    assert_eq!(
        decisions.len(),
        1,
        "one decision span per request: {spans:#?}"
    );
    let (service, decision) = decisions[0];
    assert_eq!(service, ENVOY_SERVICE, "exported by Envoy's tracer");
    assert_eq!(
        decision.parent_span_id, envoy[0].span_id,
        "a child of Envoy's span: {spans:#?}"
    );
    (envoy[0].clone(), decision.clone())
}

#[tokio::test]
async fn the_decision_is_a_child_of_envoys_span_through_envoys_tracer() {
    // One receiver for both: Envoy's tracer, and the engine's own export (also configured, to
    // show it stands aside while Envoy traces).
    let receiver = Receiver::grpc().await;
    let received = &receiver.received;
    let s = Stack::start_with_envoy(
        Mode::Module,
        EnvOptions {
            extra_yaml: tracing_yaml("grpc", receiver.addr, 0.0),
            ..Default::default()
        },
        traced_by_envoy(receiver.addr),
    )
    .await;

    // A second signing key: a token signed with it makes the engine fetch keys (slowly, here),
    // so that decision waits on the engine's runtime and is applied in the scheduled hook.
    let rotated = signing_key("dashboard-2");
    s.env
        .dashboard_keys
        .set_body(SigningKey::jwks(&[&signing_key("dashboard-1"), &rotated]));
    let key = s.env.keys.secret.clone();
    let unknown = s.env.keys.unknown.clone();
    let user_token = s.env.user_token("user-1", Some(TENANT));
    let rotated_token = rotated.sign(&s.env.claims("user-2", Some(TENANT)));
    let bearer = format!("Bearer {user_token}");
    let rotated_bearer = format!("Bearer {rotated_token}");
    // The unknown-kid refetch interval (300 ms in tests) counts from the start-up fetch.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let (key_trace, key_parent) = parent(1);
    let (deny_trace, deny_parent) = parent(2);
    let (jwt_trace, jwt_parent) = parent(3);
    let (slow_trace, slow_parent) = parent(4);
    let (unsampled_trace, unsampled_parent) = parent(5);
    let (panic_trace, panic_parent) = parent(7);

    // No x-request-id from the client: Envoy makes one (its tracing decision reads it, and one
    // that is not a UUID is never traced), and the module reads Envoy's.
    let tp = traceparent(&key_trace, &key_parent, true);
    let request_id = s
        .post(API_PATH, &[("x-api-key", &key), ("traceparent", &tp)])
        .await
        .allowed()
        .one("x-request-id")
        .expect("Envoy sets x-request-id")
        .to_owned();
    let tp = traceparent(&deny_trace, &deny_parent, true);
    s.post(API_PATH, &[("x-api-key", &unknown), ("traceparent", &tp)])
        .await
        .denied(401, "invalid_api_key");
    let tp = traceparent(&jwt_trace, &jwt_parent, true);
    s.post(
        API_PATH,
        &[("authorization", &bearer), ("traceparent", &tp)],
    )
    .await
    .allowed();
    const KEY_FETCH: Duration = Duration::from_millis(120);
    s.env.dashboard_keys.set_delay(KEY_FETCH);
    let tp = traceparent(&slow_trace, &slow_parent, true);
    s.post(
        API_PATH,
        &[("authorization", &rotated_bearer), ("traceparent", &tp)],
    )
    .await
    .allowed();
    s.env.dashboard_keys.set_delay(Duration::ZERO);
    // The engine panics (a test hook): the span ends as an error.
    let tp = traceparent(&panic_trace, &panic_parent, true);
    s.post(
        "/__gybc_test/panic",
        &[("x-api-key", &key), ("traceparent", &tp)],
    )
    .await
    .denied(503, "unavailable");
    // The caller did not sample this one: Envoy follows it, and so does the decision.
    let tp = traceparent(&unsampled_trace, &unsampled_parent, false);
    s.post(API_PATH, &[("x-api-key", &key), ("traceparent", &tp)])
        .await
        .allowed();

    let sampled = [
        (key_trace, key_parent),
        (deny_trace, deny_parent),
        (jwt_trace, jwt_parent),
        (slow_trace, slow_parent),
        (panic_trace, panic_parent),
    ];
    let arrived = || {
        sampled.iter().all(|(trace, caller)| {
            let spans = in_trace(received, trace);
            spans.iter().any(|(_, s)| s.name == DECISION)
                && spans.iter().any(|(_, s)| s.parent_span_id == caller)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !arrived() {
        assert!(
            std::time::Instant::now() < deadline,
            "Envoy's spans and the decisions did not arrive; received: {:#?}\n{}",
            summary(received),
            s.envoy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Longer than both exporters' batch intervals, so a span that should not exist would be here.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (envoy, decision) = envoy_and_decision(received, &key_trace, &key_parent);
    assert_attributes(
        &decision,
        &[
            ("gybc_authz.outcome", "allow"),
            ("gybc_authz.reason", "ok"),
            ("gybc_authz.auth_method", "api_key"),
            ("gybc_authz.tenant_id", TENANT),
            ("gybc_authz.key_id", "key_secret"),
            ("gybc_authz.request_id", &request_id),
            ("http.request.method", "POST"),
        ],
    );
    assert!(!attributes(&decision).contains_key("error"));
    assert!(
        envoy.start_time_unix_nano <= decision.start_time_unix_nano
            && decision.end_time_unix_nano <= envoy.end_time_unix_nano,
        "within Envoy's span: {envoy:#?} {decision:#?}"
    );

    let (_, deny) = envoy_and_decision(received, &deny_trace, &deny_parent);
    assert_attributes(
        &deny,
        &[
            ("gybc_authz.outcome", "deny"),
            ("gybc_authz.reason", "invalid_api_key"),
            ("gybc_authz.auth_method", "api_key"),
            ("http.response.status_code", "401"),
        ],
    );

    let (_, jwt) = envoy_and_decision(received, &jwt_trace, &jwt_parent);
    assert_attributes(
        &jwt,
        &[
            ("gybc_authz.outcome", "allow"),
            ("gybc_authz.auth_method", "jwt"),
            ("gybc_authz.tenant_id", TENANT),
        ],
    );

    // Started when the request arrived, ended when the decision was applied after the fetch.
    let (_, slow) = envoy_and_decision(received, &slow_trace, &slow_parent);
    assert_attributes(&slow, &[("gybc_authz.outcome", "allow")]);
    let took = slow.end_time_unix_nano - slow.start_time_unix_nano;
    assert!(
        took >= KEY_FETCH.as_nanos() as u64,
        "the span covers the key fetch: {took} ns"
    );

    let (_, panicked) = envoy_and_decision(received, &panic_trace, &panic_parent);
    assert_attributes(&panicked, &[("error", "true")]);

    assert!(in_trace(received, &unsampled_trace).is_empty());
    // Envoy traced every request, so the engine exported none of its own.
    let spans = received.spans();
    assert!(
        spans.iter().all(|(service, _)| service == ENVOY_SERVICE),
        "{:?}",
        spans
            .iter()
            .filter(|(service, _)| service != ENVOY_SERVICE)
            .collect::<Vec<_>>()
    );

    // No credential, and nothing derived from one, anywhere Envoy exported.
    let (text, bytes) = received.everything();
    assert!(text.contains("key_secret"), "the search covers the tags");
    let secret_hash = KeyHash::of(&key).to_hex();
    let unknown_hash = KeyHash::of(&unknown).to_hex();
    for secret in [
        key.as_str(),
        unknown.as_str(),
        &key[..12],
        user_token.as_str(),
        rotated_token.as_str(),
        user_token.rsplit('.').next().unwrap(),
        user_token.split('.').nth(1).unwrap(),
        rotated_token.rsplit('.').next().unwrap(),
        secret_hash.as_str(),
        &secret_hash[..12],
        &unknown_hash[..12],
    ] {
        assert!(!text.contains(secret), "a secret in the exported spans");
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret in the exported bytes"
        );
    }

    // An Envoy that does not trace, with the same module config: the engine's own export
    // records the decision, under the caller's span, as the daemon does.
    let untraced = s.another_envoy(EnvoyConfig::shipped()).await;
    let (trace, caller) = parent(6);
    let tp = traceparent(&trace, &caller, true);
    send(
        &s.http,
        &untraced,
        &s.upstream,
        "POST",
        API_PATH,
        &[("x-api-key", &key), ("traceparent", &tp)],
    )
    .await
    .allowed();
    wait_for_decisions(received, &[trace]).await;
    let spans = in_trace(received, &trace);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let (service, decision) = &spans[0];
    assert_eq!(service, ENGINE_SERVICE);
    assert_eq!(decision.parent_span_id, caller);
    assert_attributes(decision, &[("gybc_authz.key_id", "key_secret")]);

    drop(untraced);
    s.stop().await;
}
