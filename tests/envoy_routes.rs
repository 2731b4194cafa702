//! Per-route settings through the real Envoy: the shipped example `deploy/envoy/per-route.yaml`
//! (only its addresses moved to free loopback ports) in front of the real daemon and an echo
//! upstream. Each example route's `gybc.*` setting travels as Envoy's `context_extensions` in the
//! Check; asserted are what the client got and what the upstream received, and, for a route with
//! a typo in a setting's name, that nothing ever gets through.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use gybc_authz_engine::route::{KNOWN, RouteSettings};
use serde_yaml_ng::Value;
use support::envoy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The example routes (prefixes and paths in `deploy/envoy/per-route.yaml`).
const PUBLIC: &str = "/api/v1/public/status";
const SUPPORT: &str = "/api/v1/support/threads";
const JOIN: &str = "/api/v1/orgs/join";
const INTERNAL: &str = "/api/v1/internal/reindex";

fn example_path() -> std::path::PathBuf {
    deploy_envoy_path("per-route.yaml")
}

fn example() -> EnvoyConfig {
    EnvoyConfig::load(&example_path())
}

/// The engine, the echo upstream, and the per-route example in front of them.
async fn stack(mode: Mode, cfg: EnvoyConfig) -> Stack {
    Stack::start_with_envoy(mode, EnvOptions::default(), cfg).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The ext_authz per-route `context_extensions` of a route (null when it has none).
fn extensions(route: &mut Value) -> &mut Value {
    &mut route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"]
}

fn validate(path: &Path) -> Output {
    Command::new(envoy_bin())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(path)
        .output()
        .unwrap()
}

const SPOOFED: &str = "spoofed-by-client";

/// Every identity header, sent by the client, twice.
fn spoofs() -> Vec<(&'static str, &'static str)> {
    IDENTITY_HEADERS
        .iter()
        .flat_map(|h| [(*h, SPOOFED), (*h, SPOOFED)])
        .collect()
}

#[track_caller]
fn assert_no_spoof_upstream(up: &Seen) {
    for (name, values) in &up.headers {
        assert!(
            !values.iter().any(|v| v.contains(SPOOFED)),
            "spoofed {name} reached the upstream: {up:?}"
        );
    }
}

// === the file ===

#[test]
fn the_example_passes_envoy_validate_and_a_bare_bool_would_not() {
    let out = validate(&example_path());
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The file's comment says to quote "true": context_extensions is a string map, and a YAML
    // bool there stops Envoy.
    let mut cfg = example();
    let public = cfg
        .ingress_routes()
        .iter_mut()
        .find(|r| r["match"]["prefix"] == "/api/v1/public/")
        .expect("the public route");
    extensions(public)["gybc.public"] = Value::Bool(true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, cfg.to_yaml()).unwrap();
    let out = validate(&path);
    assert!(!out.status.success(), "a bool in context_extensions loads");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("context_extensions"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_is_the_sidecar_config_plus_one_route_per_setting() {
    let mut example = example();
    let mut shipped = EnvoyConfig::shipped();
    let ours = example.ingress_routes().clone();
    let theirs = shipped.ingress_routes().clone();
    // The sidecar's routes, in order: its health routes first, its catch-all last; the example
    // routes in between.
    let (catch_all, health) = theirs.split_last().unwrap();
    assert_eq!(&ours[..health.len()], health);
    assert_eq!(ours.last(), Some(catch_all));
    // Everything else is exactly deploy/envoy/envoy.yaml (the file the other end-to-end tests
    // and the chart use), so the example cannot drift from it.
    *example.ingress_routes() = theirs.clone();
    assert!(
        example.0 == shipped.0,
        "per-route.yaml differs from envoy.yaml outside the routes"
    );
    // Each setting the daemon knows is shown, on its own route, with a value it accepts.
    let mut shown = BTreeSet::new();
    for route in &ours[health.len()..ours.len() - 1] {
        let ext: BTreeMap<String, String> =
            serde_yaml_ng::from_value(extensions(&mut route.clone()).clone())
                .unwrap_or_else(|e| panic!("context_extensions of {route:?}: {e}"));
        assert_eq!(ext.len(), 1, "one setting per example route: {ext:?}");
        RouteSettings::parse(&ext.clone().into_iter().collect())
            .unwrap_or_else(|e| panic!("the example route {route:?} is refused: {e}"));
        shown.extend(ext.into_keys());
    }
    assert_eq!(
        shown,
        KNOWN.iter().map(|k| k.to_string()).collect::<BTreeSet<_>>()
    );
}

// === each setting, end to end ===

async fn a_public_route_needs_no_credential_but_verifies_one_that_is_sent(mode: Mode) {
    let s = stack(mode, example()).await;
    // No credential: allowed, the upstream sees no identity, and none of the client's copies.
    let r = s.send("GET", PUBLIC, &spoofs()).await;
    let up = r.allowed();
    assert!(up.identity().is_empty(), "{up:?}");
    assert_no_spoof_upstream(up);
    assert_eq!(r.header("x-ratelimit-limit"), None);
    // A credential that is sent is verified: a bad one is denied, as on any route.
    let r = s
        .send("GET", PUBLIC, &[("authorization", "Bearer a.b.c")])
        .await;
    r.denied(401, "invalid_token");
    s.send("GET", PUBLIC, &[("x-api-key", &s.env.keys.revoked)])
        .await
        .denied(401, "invalid_api_key");
    // A good one sets the identity, replacing the client's copies.
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    let mut headers = spoofs();
    headers.push(("authorization", &jwt));
    let r = s.send("GET", PUBLIC, &headers).await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-user-id", "u1"),
            ("x-auth-method", "jwt")
        ])
    );
    assert_no_spoof_upstream(up);
    // It is the route that opens it: the same request elsewhere needs a credential.
    s.send("GET", API_PATH, &spoofs())
        .await
        .denied(401, "missing_credentials");
    s.stop().await;
}

async fn a_route_with_required_scopes_admits_only_keys_holding_all_of_them(mode: Mode) {
    let s = stack(mode, example()).await;
    // key_secret holds threads:read only; the route also wants users:impersonate.
    s.post(SUPPORT, &[("x-api-key", &s.env.keys.secret)])
        .await
        .denied(403, "insufficient_scope");
    let r = s
        .post(SUPPORT, &[("x-api-key", &s.env.keys.impersonator)])
        .await;
    assert_eq!(
        r.allowed().identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-auth-method", "api_key"),
            ("x-api-key-id", "key_impersonator"),
            ("x-scopes", "threads:read users:impersonate"),
        ])
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    let r = s
        .post(
            SUPPORT,
            &[
                ("x-api-key", &s.env.keys.impersonator),
                ("x-on-behalf-of", "user_7"),
            ],
        )
        .await;
    assert_eq!(r.allowed().one("x-user-id"), Some("user_7"));
    // Elsewhere the key that lacks the scope is fine.
    s.post(API_PATH, &[("x-api-key", &s.env.keys.secret)])
        .await
        .allowed();
    s.stop().await;
}

async fn a_tenantless_route_admits_a_jwt_without_tenant_and_only_that_route_does(mode: Mode) {
    let s = stack(mode, example()).await;
    let jwt = bearer(&s.env.user_token("new_user", None));
    let r = s
        .post(JOIN, &[("authorization", &jwt), ("x-tenant-id", SPOOFED)])
        .await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[("x-user-id", "new_user"), ("x-auth-method", "jwt")]),
        "no tenant, and the client's x-tenant-id is gone"
    );
    assert_eq!(up.path, JOIN);
    // A normal route, and a path the exact match does not cover.
    for path in [API_PATH, "/api/v1/orgs/join/x"] {
        s.post(path, &[("authorization", &jwt)])
            .await
            .denied(403, "tenant_required");
    }
    // A JWT with a tenant still carries it there.
    let with_tenant = bearer(&s.env.user_token("u1", Some(TENANT)));
    let r = s.post(JOIN, &[("authorization", &with_tenant)]).await;
    assert_eq!(r.allowed().one("x-tenant-id"), Some(TENANT));
    s.stop().await;
}

async fn a_backends_only_route_refuses_jwts_and_publishable_keys(mode: Mode) {
    let s = stack(mode, example()).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    s.post(INTERNAL, &[("authorization", &jwt)])
        .await
        .denied(403, "method_not_allowed");
    let app_jwt = bearer(&s.env.app_user_token("u1", None));
    s.post(
        INTERNAL,
        &[
            ("x-api-key", &s.env.keys.publishable),
            ("authorization", &app_jwt),
            ("origin", APP_ORIGIN),
        ],
    )
    .await
    .denied(403, "method_not_allowed");
    // Authentication comes first: a bad token is a 401, not a 403.
    s.post(INTERNAL, &[("authorization", "Bearer a.b.c")])
        .await
        .denied(401, "invalid_token");
    let r = s.post(INTERNAL, &[("x-api-key", &s.env.keys.secret)]).await;
    assert_eq!(
        r.allowed().identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-auth-method", "api_key"),
            ("x-api-key-id", "key_secret"),
            ("x-scopes", "threads:read"),
        ])
    );
    // Elsewhere the same JWT is fine.
    s.post(API_PATH, &[("authorization", &jwt)]).await.allowed();
    s.stop().await;
}

async fn a_typo_in_a_route_setting_refuses_every_request_on_that_route(mode: Mode) {
    // The example's public route, copied three times: the key misspelt, the value misspelt, and
    // a key under another prefix (not ours, so ignored).
    let mut cfg = example();
    let routes = cfg.ingress_routes();
    let at = routes
        .iter()
        .position(|r| r["match"]["prefix"] == "/api/v1/public/")
        .expect("the public route");
    for (prefix, key, value) in [
        ("/api/v1/typo/", "gybc.pubilc", "true"),
        // (Not "yes": the harness writes YAML 1.2, where a bare yes is a string, but Envoy
        // reads it as a bool and refuses the config, as it does any bool in this map.)
        ("/api/v1/bad-value/", "gybc.public", "enabled"),
        ("/api/v1/other-prefix/", "team.public", "true"),
    ] {
        let mut route = routes[at].clone();
        route["match"]["prefix"] = prefix.into();
        let ext = extensions(&mut route);
        *ext = Value::Mapping(Default::default());
        ext[key] = value.into();
        routes.insert(at, route);
    }
    let s = stack(mode, cfg).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    let app_jwt = bearer(&s.env.app_user_token("u1", None));
    let keys = s.env.keys.clone();
    let credentials: [Vec<(&str, &str)>; 4] = [
        vec![],
        vec![("authorization", &jwt)],
        vec![("x-api-key", &keys.impersonator)],
        vec![
            ("x-api-key", &keys.publishable),
            ("authorization", &app_jwt),
        ],
    ];
    for (path, key) in [
        ("/api/v1/typo/x", "gybc.pubilc"),
        ("/api/v1/bad-value/x", "gybc.public"),
    ] {
        for creds in &credentials {
            // Never an allow, whatever the credential: `denied` also asserts that nothing
            // reached the upstream.
            s.send("GET", path, creds)
                .await
                .denied(403, "route_misconfigured");
        }
        let want = credentials.len() as f64;
        let counted = async || {
            s.metric("gybc_authz_route_config_errors_total", &[("key", key)])
                .await
                == want
        };
        wait_until(&format!("{key} counted"), Duration::from_secs(10), counted).await;
    }
    // Another prefix is not ours: the route behaves as one without settings (not public).
    s.send("GET", "/api/v1/other-prefix/x", &[])
        .await
        .denied(401, "missing_credentials");
    s.send("GET", "/api/v1/other-prefix/x", &[("authorization", &jwt)])
        .await
        .allowed();
    // The correct spelling, on the shipped route, is unaffected.
    s.send("GET", PUBLIC, &[]).await.allowed();
    s.stop().await;
}

/// Sends `GET path` exactly as written (no client-side URL normalisation) and returns Envoy's
/// status and the path the upstream received, if the request got there.
async fn raw_get(envoy: &Envoy, upstream: &Upstream, path: &str) -> (u16, Option<String>) {
    let before = upstream.count();
    let mut conn = tokio::net::TcpStream::connect(envoy.ingress).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: api.example.com\r\nconnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    (
        status,
        (upstream.count() > before).then(|| upstream.seen(before).path),
    )
}

async fn a_public_prefix_is_not_left_by_dot_segments_and_encoded_slashes_stay_as_sent(mode: Mode) {
    let s = stack(mode, example()).await;
    // Dot segments, plain or percent-encoded, are resolved before routing (`normalize_path`):
    // these requests are on the backends-only route, and checked there.
    for path in [
        "/api/v1/public/../internal/x",
        "/api/v1/public/%2e%2e/internal/x",
        "/api/v1/public/.%2E/internal/x",
    ] {
        assert_eq!(
            raw_get(&s.envoy, &s.upstream, path).await,
            (401, None),
            "{path}"
        );
    }
    // An encoded slash is kept as it is (`path_with_escaped_slashes_action: KEEP_UNCHANGED`):
    // this is the public route, and the app receives exactly these bytes. The example's comment
    // says so, for apps that decode %2F before routing.
    let sneaky = "/api/v1/public/..%2Finternal/x";
    assert_eq!(
        raw_get(&s.envoy, &s.upstream, sneaky).await,
        (200, Some(sneaky.to_owned()))
    );
    // The listener setting the comment recommends for such apps refuses it instead.
    let mut strict = example();
    strict.ingress_hcm()["path_with_escaped_slashes_action"] = "REJECT_REQUEST".into();
    let strict = s.another_envoy(strict).await;
    assert_eq!(raw_get(&strict, &s.upstream, sneaky).await, (400, None));
    assert_eq!(
        raw_get(&strict, &s.upstream, PUBLIC).await,
        (200, Some(PUBLIC.to_owned()))
    );
    drop(strict);
    s.stop().await;
}

// Every per-route setting, with the engine as a sidecar and inside Envoy.
both_modes!(
    a_public_route_needs_no_credential_but_verifies_one_that_is_sent,
    a_route_with_required_scopes_admits_only_keys_holding_all_of_them,
    a_tenantless_route_admits_a_jwt_without_tenant_and_only_that_route_does,
    a_backends_only_route_refuses_jwts_and_publishable_keys,
    a_typo_in_a_route_setting_refuses_every_request_on_that_route,
    a_public_prefix_is_not_left_by_dot_segments_and_encoded_slashes_stay_as_sent,
);
