//! Decisions as spans in the caller's trace (issue 15), through the real daemon to an OTLP
//! receiver of the tests' own (`support::otlp`) that decodes the collector protocol's real
//! protobuf, over gRPC and over HTTP: the span's trace and parent ids are the request's, its
//! attributes are there and hold no secret, an unsampled caller gets no span, the slow parts are
//! child spans, and a collector that is gone costs dropped spans (counted on /metrics), never a
//! decision. In the Envoy module, Envoy's tracer records the decision: `module_tracing.rs`.

mod support;

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use gybc_authz::dev::SigningKey;
use gybc_authz_engine::authn::apikey::KeyHash;
use support::otlp::*;
use support::redis::{RedisServer, redis_yaml, seed};
use support::*;

const DROPPED: &str = "gybc_authz_trace_spans_dropped_total";
const EXPORTED: &str = "gybc_authz_trace_spans_exported_total";

// === tests ===

#[tokio::test]
async fn decision_spans_join_the_callers_trace_and_carry_no_secret() {
    let receiver = Receiver::grpc().await;
    let env = TestEnv::start_with(EnvOptions {
        extra_yaml: tracing_yaml("grpc", receiver.addr, 0.0),
        ..Default::default()
    })
    .await;
    let received = &receiver.received;

    // A second signing key, so that a token signed with it makes the daemon fetch keys while
    // the check waits: a child span.
    let rotated = signing_key("dashboard-2");
    env.dashboard_keys
        .set_body(SigningKey::jwks(&[&signing_key("dashboard-1"), &rotated]));
    let user_token = env.user_token("user-1", Some(TENANT));
    let rotated_token = rotated.sign(&env.claims("user-2", Some(TENANT)));
    let bearer = format!("Bearer {user_token}");
    let rotated_bearer = format!("Bearer {rotated_token}");
    // The unknown-kid refetch interval (300 ms in tests) counts from the start-up fetch.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let (key_trace, key_parent) = parent(1);
    let (jwt_trace, jwt_parent) = parent(2);
    let (deny_trace, deny_parent) = parent(3);
    let (fetch_trace, fetch_parent) = parent(4);
    let (unsampled_trace, unsampled_parent) = parent(5);

    let tp = traceparent(&key_trace, &key_parent, true);
    allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.secret),
                ("traceparent", &tp),
                ("tracestate", "vendor=abc"),
                ("x-request-id", "req-key"),
            ],
        )
        .await,
    );
    let tp = traceparent(&jwt_trace, &jwt_parent, true);
    allowed(
        &env.check(
            API_PATH,
            &[("authorization", &bearer), ("traceparent", &tp)],
        )
        .await,
    );
    let tp = traceparent(&deny_trace, &deny_parent, true);
    assert_denied(
        &env.check(
            API_PATH,
            &[("x-api-key", &env.keys.unknown), ("traceparent", &tp)],
        )
        .await,
        401,
        "invalid_api_key",
    );
    let tp = traceparent(&fetch_trace, &fetch_parent, true);
    allowed(
        &env.check(
            API_PATH,
            &[("authorization", &rotated_bearer), ("traceparent", &tp)],
        )
        .await,
    );
    // The caller did not sample this one, and one without a trace context is a root, which
    // `sample_ratio: 0` does not sample: neither may produce a span.
    let tp = traceparent(&unsampled_trace, &unsampled_parent, false);
    allowed(
        &env.check(
            API_PATH,
            &[("authorization", &bearer), ("traceparent", &tp)],
        )
        .await,
    );
    allowed(&env.check(API_PATH, &[("authorization", &bearer)]).await);

    wait_for_decisions(received, &[key_trace, jwt_trace, deny_trace, fetch_trace]).await;
    // Longer than a batch interval, so a span that should not exist would have arrived too.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let key = received.decisions_in(&key_trace).remove(0);
    assert_eq!(
        key.parent_span_id, key_parent,
        "parent is the caller's span"
    );
    assert_eq!(key.kind, SpanKind::Server as i32);
    assert_eq!(key.trace_state, "vendor=abc");
    assert_attributes(
        &key,
        &[
            ("gybc_authz.outcome", "allow"),
            ("gybc_authz.reason", "ok"),
            ("gybc_authz.auth_method", "api_key"),
            ("gybc_authz.tenant_id", TENANT),
            ("gybc_authz.key_id", "key_secret"),
            ("gybc_authz.request_id", "req-key"),
            ("http.request.method", "POST"),
        ],
    );
    assert!(key.end_time_unix_nano >= key.start_time_unix_nano);

    let jwt = received.decisions_in(&jwt_trace).remove(0);
    assert_eq!(jwt.parent_span_id, jwt_parent);
    assert_attributes(
        &jwt,
        &[
            ("gybc_authz.outcome", "allow"),
            ("gybc_authz.auth_method", "jwt"),
            ("gybc_authz.tenant_id", TENANT),
        ],
    );

    let deny = received.decisions_in(&deny_trace).remove(0);
    assert_eq!(deny.parent_span_id, deny_parent);
    assert_attributes(
        &deny,
        &[
            ("gybc_authz.outcome", "deny"),
            ("gybc_authz.reason", "invalid_api_key"),
            ("gybc_authz.auth_method", "api_key"),
            ("http.response.status_code", "401"),
        ],
    );

    // The signing-key fetch the rotated token caused, under its decision.
    let fetch = received.decisions_in(&fetch_trace).remove(0);
    assert_eq!(fetch.parent_span_id, fetch_parent);
    assert_attributes(&fetch, &[("gybc_authz.outcome", "allow")]);
    let children = children_of(received, &fetch);
    assert_eq!(children.len(), 1, "{children:#?}");
    assert_eq!(children[0].name, "gybc_authz.jwks.fetch");
    assert_attributes(
        &children[0],
        &[
            ("gybc_authz.provider", "dashboard"),
            ("gybc_authz.kid_found", "true"),
        ],
    );

    assert!(received.decisions_in(&unsampled_trace).is_empty());
    let spans = received.spans();
    let decisions = spans.iter().filter(|(_, s)| s.name == DECISION).count();
    assert_eq!(decisions, 4, "only the four sampled checks have spans");
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "gybc-authz-test")
    );

    // No credential, and nothing derived from one, anywhere in what the collector got.
    let (text, bytes) = received.everything();
    assert!(
        text.contains("key_secret"),
        "the search covers the attributes"
    );
    let secret_hash = KeyHash::of(&env.keys.secret).to_hex();
    let unknown_hash = KeyHash::of(&env.keys.unknown).to_hex();
    for secret in [
        env.keys.secret.as_str(),
        env.keys.unknown.as_str(),
        &env.keys.secret[..12],
        user_token.as_str(),
        rotated_token.as_str(),
        // A JWT's signature, and its payload: either alone is still the token.
        user_token.rsplit('.').next().unwrap(),
        user_token.split('.').nth(1).unwrap(),
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

    let m = scrape(&env).await;
    assert!(m.get(EXPORTED, &[]) >= 5.0);
    assert_eq!(m.get(DROPPED, &[("reason", "export_failed")]), 0.0);
    assert_eq!(m.get(DROPPED, &[("reason", "queue_full")]), 0.0);
    env.stop().await;
}

#[tokio::test]
async fn a_collector_that_is_gone_costs_dropped_spans_not_decisions() {
    let mut receiver = Receiver::grpc().await;
    let env = TestEnv::start_with(EnvOptions {
        extra_yaml: tracing_yaml("grpc", receiver.addr, 0.0),
        ..Default::default()
    })
    .await;
    let bearer = format!("Bearer {}", env.user_token("user-1", Some(TENANT)));

    // Connected and exporting first, so the outage is one of a collector that was there.
    let (trace, span) = parent(1);
    let tp = traceparent(&trace, &span, true);
    allowed(
        &env.check(
            API_PATH,
            &[("authorization", &bearer), ("traceparent", &tp)],
        )
        .await,
    );
    wait_for_decisions(&receiver.received, &[trace]).await;
    receiver.stop().await;

    for n in 0..20 {
        let (trace, span) = parent(n);
        let tp = traceparent(&trace, &span, true);
        let checked = tokio::time::timeout(
            Duration::from_secs(1),
            env.check(
                API_PATH,
                &[("authorization", &bearer), ("traceparent", &tp)],
            ),
        )
        .await
        .expect("a check returns within 1 s while the collector is down");
        allowed(&checked);
    }

    wait_until(
        "spans the collector never got are counted",
        Duration::from_secs(15),
        async || {
            scrape(&env)
                .await
                .get(DROPPED, &[("reason", "export_failed")])
                >= 1.0
        },
    )
    .await;
    let m = scrape(&env).await;
    assert_eq!(m.get(EXPORTED, &[]), 1.0);
    assert_eq!(
        m.get(
            "gybc_authz_decisions_total",
            &[("method", "jwt"), ("outcome", "allow"), ("reason", "ok")]
        ),
        21.0
    );
    // Still deciding after the export failures.
    allowed(&env.check(API_PATH, &[("authorization", &bearer)]).await);
    env.stop().await;
}

#[tokio::test]
async fn over_http_the_key_store_and_redis_limiter_calls_are_child_spans() {
    let receiver = Receiver::http().await;
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let mut opts = redis_yaml(&[redis.url()], false, "fail_open");
    opts.keys = Some(keys.clone());
    // Every root sampled here, so a check without a trace context starts its own trace.
    opts.extra_yaml
        .push_str(&tracing_yaml("http", receiver.addr, 1.0));
    let env = TestEnv::start_with(opts).await;
    let received = &receiver.received;

    let (first_trace, first_parent) = parent(1);
    let (second_trace, second_parent) = parent(2);
    for (trace, span) in [(first_trace, first_parent), (second_trace, second_parent)] {
        let tp = traceparent(&trace, &span, true);
        allowed(
            &env.check(
                API_PATH,
                &[("x-api-key", &keys.secret), ("traceparent", &tp)],
            )
            .await,
        );
    }
    allowed(&env.check(API_PATH, &[("x-api-key", &keys.secret)]).await);
    wait_for_decisions(received, &[first_trace, second_trace]).await;
    wait_until(
        "the root's span arrives",
        Duration::from_secs(15),
        async || {
            received
                .spans()
                .iter()
                .any(|(_, s)| s.name == DECISION && s.parent_span_id.is_empty())
        },
    )
    .await;

    // The first use of the key misses the cache and asks Redis for it; both checks ask the
    // Redis limiter.
    let first = received.decisions_in(&first_trace).remove(0);
    assert_eq!(first.parent_span_id, first_parent);
    assert_attributes(&first, &[("gybc_authz.key_id", "key_secret")]);
    let mut children = children_of(received, &first);
    children.sort_by_key(|s| s.start_time_unix_nano);
    let names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["gybc_authz.key_store.lookup", "gybc_authz.rate_limit.redis"]
    );
    assert_attributes(&children[0], &[("gybc_authz.key_found", "true")]);
    assert_eq!(children[1].kind, SpanKind::Client as i32);
    assert_attributes(&children[1], &[("db.system.name", "redis")]);
    for child in &children {
        assert!(child.start_time_unix_nano >= first.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= first.end_time_unix_nano);
    }

    let second = received.decisions_in(&second_trace).remove(0);
    let names: Vec<String> = children_of(received, &second)
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        ["gybc_authz.rate_limit.redis"],
        "a cached key is no lookup"
    );

    let (text, bytes) = received.everything();
    assert!(!text.contains(&keys.secret));
    assert!(
        !bytes
            .windows(keys.secret.len())
            .any(|w| w == keys.secret.as_bytes())
    );
    env.stop().await;
}
