//! Browsers' CORS through the real Envoy, as a browser would send it but over plain HTTP (the
//! real browser is tests/browser.rs): every shipped Envoy config carries the CORS policy the
//! engine names (`crates/engine/src/browser.rs`), Envoy's CORS filter answers preflights before
//! authorization (no decision, no upstream request), every answer — allowed, 401, 403, 429,
//! 503 — carries `Access-Control-Allow-Origin` and the exposed headers, and bad input (origins
//! `null`, with a path, with CR/LF or non-ASCII bytes; huge or malformed
//! `Access-Control-Request-Headers`) is never reflected and never a 5xx. In both modes.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use gybc_authz_engine::browser;
use gybc_authz_engine::config::Config;
use serde_json::Value;
use support::envoy::*;
use support::*;

const CORS_FILTER: &str = "envoy.filters.http.cors";

both_modes!(
    preflights_are_answered_by_envoy_in_every_shipped_config,
    every_answer_carries_the_cors_headers,
    bad_origins_and_request_headers_are_never_reflected_nor_a_5xx,
    a_secret_key_sent_by_a_browser_is_refused_and_readable,
);

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The policy shipped for the defaults, as `gybc-authz cors-policy` prints it.
fn expected_policy() -> Value {
    browser::envoy_cors_policy(&Config::default())
}

fn expose() -> String {
    browser::header_list(&browser::exposed_response_headers(&Config::default()))
}

// === the shipped files ===

#[test]
fn every_shipped_envoy_config_carries_the_engine_s_cors_policy_before_authorization() {
    for file in [
        "envoy.yaml",
        "envoy-module.yaml",
        "per-route.yaml",
        "key-service.yaml",
    ] {
        let mut cfg = EnvoyConfig::load(&deploy_envoy_path(file));
        let hcm = cfg.ingress_hcm();
        let vhost = &hcm["route_config"]["virtual_hosts"][0];
        let policy: Value =
            serde_json::to_value(&vhost["typed_per_filter_config"][CORS_FILTER]).unwrap();
        assert_eq!(policy, expected_policy(), "{file}'s CORS policy");
        let filters: Vec<&str> = hcm["http_filters"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(filters.first(), Some(&CORS_FILTER), "{file}: {filters:?}");
        assert!(
            filters.contains(&"envoy.filters.http.ext_authz") || filters.contains(&MODULE_FILTER),
            "{file}: the authorizer follows the CORS filter: {filters:?}"
        );
    }
}

// === helpers ===

/// A CORS preflight as Chromium sends it for the example page's call.
async fn preflight(s: &Stack, path: &str, origin: &str) -> Reply {
    s.send(
        "OPTIONS",
        path,
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type,x-api-key",
            ),
        ],
    )
    .await
}

#[track_caller]
fn assert_preflight_answered(r: &Reply, origin: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.upstream.is_none(),
        "a preflight reached the upstream: {r:?}"
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(origin),
        "{r:?}"
    );
    let policy = expected_policy();
    for (header, field) in [
        ("access-control-allow-headers", "allow_headers"),
        ("access-control-allow-methods", "allow_methods"),
        ("access-control-max-age", "max_age"),
    ] {
        assert_eq!(r.header(header), policy[field].as_str(), "{header}: {r:?}");
    }
    assert!(r.body.is_empty(), "{r:?}");
}

#[track_caller]
fn assert_readable(r: &Reply, origin: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(origin),
        "{r:?}"
    );
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some(expose().as_str()),
        "{r:?}"
    );
}

// === preflights ===

async fn preflights_are_answered_by_envoy_in_every_shipped_config(mode: Mode) {
    for (file, path) in [
        ("envoy.yaml", API_PATH),
        ("per-route.yaml", "/api/v1/internal/jobs"),
        ("key-service.yaml", "/api/v1/iam/api-keys/create-key"),
    ] {
        let cfg = EnvoyConfig::load(&deploy_envoy_path(file));
        let s = Stack::start_with_envoy(mode, EnvOptions::default(), cfg).await;
        let checks = s.engine_checks().await;
        let cors_before = s.envoy.counter("http.ingress.cors.origin_valid").await;
        for origin in [APP_ORIGIN, "http://localhost:3000", "http://127.0.0.1:8081"] {
            let r = preflight(&s, path, origin).await;
            assert_preflight_answered(&r, origin);
        }
        // Envoy's CORS filter answered them: counted there, and never a decision.
        assert_eq!(
            s.envoy.counter("http.ingress.cors.origin_valid").await - cors_before,
            3,
            "{file}"
        );
        assert_eq!(
            s.upstream.count(),
            0,
            "{file}: nothing reached the upstream"
        );
        s.engine_checks_settle_at(checks).await;
        // The actual call after it is the engine's, and readable: here a publishable key
        // without its user's token, 401 with its challenge exposed.
        let r = s
            .post(
                path,
                &[
                    ("origin", APP_ORIGIN),
                    ("x-api-key", &s.env.keys.publishable),
                ],
            )
            .await;
        r.denied(401, "user_token_required");
        assert_readable(&r, APP_ORIGIN);
        s.engine_checks_settle_at(checks + 1).await;
        // An OPTIONS that is not a preflight (no Access-Control-Request-Method) is a request
        // like any other, checked.
        let r = s.send("OPTIONS", path, &[("origin", APP_ORIGIN)]).await;
        r.denied(401, "missing_credentials");
        assert_readable(&r, APP_ORIGIN);
        s.engine_checks_settle_at(checks + 2).await;
        s.stop().await;
    }
}

// === every answer ===

async fn every_answer_carries_the_cors_headers(mode: Mode) {
    let s = Stack::start(mode).await;
    let k = s.env.keys.clone();
    let user = bearer(&s.env.app_user_token("page_user", Some(TENANT)));
    let from_app = |extra: &[(&'static str, String)]| {
        let mut h: Vec<(&str, String)> = vec![("origin", APP_ORIGIN.into())];
        h.extend(extra.iter().cloned());
        h
    };
    let post = async |headers: Vec<(&str, String)>| {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s.post(API_PATH, &h).await
    };
    let pk = || {
        from_app(&[
            ("x-api-key", k.publishable.clone()),
            ("authorization", user.clone()),
        ])
    };

    // 200, with the upstream's answer and gybc-authz's rate-limit headers readable.
    let r = post(pk()).await;
    r.allowed();
    assert_readable(&r, APP_ORIGIN);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"), "{r:?}");
    // The upstream's own answer is not the CORS filter's to change, except for these headers.
    assert!(r.upstream.as_ref().unwrap().one("origin") == Some(APP_ORIGIN));

    // 401: no credentials, and an expired user token, with the challenge exposed.
    let r = post(from_app(&[])).await;
    r.denied(401, "missing_credentials");
    assert_readable(&r, APP_ORIGIN);
    let expired = signing_key("app-1").sign(&gybc_authz::dev::firebase_claims(
        APP_PROJECT,
        "page_user",
        Some(TENANT),
        s.env.now() - 7200,
        3600,
    ));
    let r = post(from_app(&[
        ("x-api-key", k.publishable.clone()),
        ("authorization", bearer(&expired)),
    ]))
    .await;
    r.denied(401, "invalid_token");
    assert_readable(&r, APP_ORIGIN);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );

    // 403: a well-formed origin the key does not allow. The page learns why, and the upstream
    // never sees the request (denied() checks).
    let evil = "https://evil.example";
    let r = post(vec![
        ("origin", evil.into()),
        ("x-api-key", k.publishable.clone()),
        ("authorization", user.clone()),
    ])
    .await;
    r.denied(403, "origin_not_allowed");
    assert_readable(&r, evil);

    // 429, with Retry-After exposed (the key allows 3 a minute).
    for remaining in ["1", "0"] {
        let r = post(pk()).await;
        assert_eq!(r.header("x-ratelimit-remaining"), Some(remaining), "{r:?}");
    }
    let r = post(pk()).await;
    r.denied(429, "rate_limited");
    assert_readable(&r, APP_ORIGIN);
    assert!(r.header("retry-after").is_some(), "{r:?}");

    // A request without Origin (a mobile app, a backend) is answered as before: no CORS headers.
    let r = s.post(API_PATH, &[("x-api-key", &k.secret)]).await;
    r.allowed();
    assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
    assert_eq!(r.header("access-control-expose-headers"), None, "{r:?}");

    // 503: the engine's own (the module's local reply, here a panic inside it), or, with the
    // sidecar, Envoy's when the daemon cannot be reached (ext_authz's status_on_error).
    let r = match mode {
        Mode::Module => {
            let r = s
                .post(
                    "/__gybc_test/panic",
                    &[("origin", APP_ORIGIN), ("x-api-key", &k.secret)],
                )
                .await;
            r.denied(503, "unavailable");
            r
        }
        Mode::Sidecar => {
            let mut s = s;
            s.env.daemon.take().unwrap().shutdown().await;
            let r = s.post(API_PATH, &[("origin", APP_ORIGIN)]).await;
            assert_eq!(r.status, 503, "{r:?}");
            assert!(r.upstream.is_none());
            assert_readable(&r, APP_ORIGIN);
            s.stop().await;
            return;
        }
    };
    assert_readable(&r, APP_ORIGIN);
    assert!(r.header("retry-after").is_some(), "{r:?}");
    s.stop().await;
}

// === a secret key in a page ===

async fn a_secret_key_sent_by_a_browser_is_refused_and_readable(mode: Mode) {
    let s = Stack::start(mode).await;
    let key = s.env.keys.secret.clone();
    let r = s
        .post(API_PATH, &[("origin", APP_ORIGIN), ("x-api-key", &key)])
        .await;
    let body = r.denied(403, "secret_key_in_browser");
    assert_readable(&r, APP_ORIGIN);
    assert!(!body["message"].as_str().unwrap().contains(&key));
    // The same key from a backend (no Origin) is the key's normal use.
    s.post(API_PATH, &[("x-api-key", &key)]).await.allowed();
    wait_until("the refusal counted", Duration::from_secs(10), async || {
        s.metric(
            "gybc_authz_secret_key_from_browser_total",
            &[("action", "deny")],
        )
        .await
            == 1.0
    })
    .await;
    s.stop().await;
}

// === bad input ===

/// One raw HTTP/1.1 exchange, so a test can send bytes no HTTP client would: the status and the
/// response's header block (lower case). Async: with the sidecar, the daemon answering Envoy
/// runs on this test's runtime.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let head = text.split("\r\n\r\n").next().unwrap().to_owned();
    (status, head)
}

fn request(method: &str, headers: &[&[u8]]) -> Vec<u8> {
    let mut r = format!("{method} {API_PATH} HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: 0\r\nconnection: close\r\n")
        .into_bytes();
    for h in headers {
        r.extend_from_slice(h);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// The ACAO header's value in a header block, if any.
fn acao(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("access-control-allow-origin:"))
        .map(str::trim)
}

async fn bad_origins_and_request_headers_are_never_reflected_nor_a_5xx(mode: Mode) {
    let s = Stack::start(mode).await;
    let addr = s.envoy.ingress;
    let acrm: &[u8] = b"access-control-request-method: POST";
    let checks = s.engine_checks().await;

    // Origins a browser may send but no page should be granted (`null`: sandboxed frames and
    // file: pages), or no browser sends at all: the preflight is answered by Envoy without
    // CORS headers (the browser then refuses the call), so nothing is echoed back.
    let bad_origins: &[&[u8]] = &[
        b"origin: null",
        b"origin: https://app.example.com/path",
        b"origin: https://app.example.com?x=1",
        b"origin: HTTPS://APP.EXAMPLE.COM",
        b"origin: https://app.example.com\rx-injected: 1",
        "origin: https://bücher.example".as_bytes(),
        b"origin: https://app.example.com\xff",
        b"origin: javascript:alert(1)",
        b"origin: https://app.example.com:99999999999999999999",
    ];
    for origin in bad_origins {
        let (status, head) = raw(addr, &request("OPTIONS", &[origin, acrm])).await;
        let shown = String::from_utf8_lossy(origin);
        assert!(status < 500, "{shown:?}: {status}\n{head}");
        assert_eq!(acao(&head), None, "{shown:?} reflected:\n{head}");
        assert!(!head.contains("x-injected"), "{shown:?}:\n{head}");
    }
    // A bare LF ends the line (Envoy's parser is lenient there): what is left is a well-formed
    // origin, and the header after it is a request header, never one of the answer's.
    let (status, head) = raw(
        addr,
        &request(
            "OPTIONS",
            &[b"origin: https://a.example\nx-injected: 1", acrm],
        ),
    )
    .await;
    assert!(status < 500, "{head}");
    assert!(
        acao(&head).is_none_or(|o| o == "https://a.example"),
        "{head}"
    );
    assert!(!head.contains("x-injected"), "{head}");

    // Access-Control-Request-Headers is never echoed: the allowed list is fixed. Large is
    // answered, over Envoy's header limit is 431, control bytes are 400.
    let allow = expected_policy()["allow_headers"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    let origin: &[u8] = b"origin: https://app.example.com";
    let big = format!(
        "access-control-request-headers: {}",
        "x-made-up,".repeat(3000)
    );
    let (status, head) = raw(addr, &request("OPTIONS", &[origin, acrm, big.as_bytes()])).await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains(&format!("access-control-allow-headers: {allow}")),
        "{head}"
    );
    assert!(!head.contains("x-made-up"), "{head}");
    let huge = format!(
        "access-control-request-headers: {}",
        "x-made-up,".repeat(10_000)
    );
    let (status, head) = raw(addr, &request("OPTIONS", &[origin, acrm, huge.as_bytes()])).await;
    assert_eq!(status, 431, "{head}");
    assert!(!head.contains("x-made-up"), "{head}");
    for junk in [
        &b"access-control-request-headers: \x01\x02,;;,\x7f"[..],
        b"access-control-request-headers: ,,,,",
        b"access-control-request-headers: x-api-key\r\n\tauthorization",
    ] {
        let (status, head) = raw(addr, &request("OPTIONS", &[origin, acrm, junk])).await;
        assert!(status < 500, "{:?}: {head}", String::from_utf8_lossy(junk));
        assert!(!head.contains("x-made-up"), "{head}");
    }
    // None of those reached the engine or the upstream.
    s.engine_checks_settle_at(checks).await;
    assert_eq!(s.upstream.count(), 0);

    // The same origins on an actual call reach the engine, which judges them against the key's
    // allowlist (403), and the answer carries no CORS header: the page cannot read it.
    let user = bearer(&s.env.app_user_token("page_user", Some(TENANT)));
    let key = format!("x-api-key: {}", s.env.keys.publishable);
    let auth = format!("authorization: {user}");
    // (Upper case is left out: the key's allowlist compares origins case-insensitively, and
    // no browser sends one.)
    for origin in bad_origins
        .iter()
        .filter(|o| !o.starts_with(b"origin: HTTPS"))
    {
        let (status, head) = raw(
            addr,
            &request("POST", &[origin, key.as_bytes(), auth.as_bytes()]),
        )
        .await;
        let shown = String::from_utf8_lossy(origin);
        assert!(status < 500, "{shown:?}: {status}\n{head}");
        assert_ne!(status, 200, "{shown:?}: {head}");
        assert_eq!(acao(&head), None, "{shown:?} reflected:\n{head}");
        assert!(!head.contains("x-injected"), "{shown:?}:\n{head}");
    }
    assert_eq!(s.upstream.count(), 0, "none of them was allowed");
    s.stop().await;
}
