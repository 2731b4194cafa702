//! A web page with a publishable key, in a real browser: Debian's headless Chromium opens
//! `examples/web/` (served from an origin of its own, another loopback port) and calls the API
//! with `fetch()` through the real Envoy with its shipped config (`deploy/envoy/envoy.yaml`), in
//! both modes. From JavaScript, the page reads each answer: 200 with `X-RateLimit-Remaining`; an
//! expired user token's 401 and its JSON body; 429 and `Retry-After`; the 403 of an origin the
//! key does not allow, which never reaches the upstream; a secret key's 403. Chromium's
//! preflights reach neither the engine (its decisions, hence the key's usage) nor the upstream.
//! On failure, a screenshot of the page is kept under `target/browser-screenshots/`.

mod support;

use std::path::PathBuf;

use gybc_authz::dev::firebase_claims;
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use serde_json::{Value, json};
use support::browser::{Browser, StaticSite};
use support::envoy::*;
use support::*;

both_modes!(a_web_page_with_a_publishable_key_reads_every_answer);

/// The keys of this test's key file: the page's (allowing the page's origin, 3 a minute),
/// another app's (allowing another origin only) and a backend's secret key.
struct PageKeys {
    page: String,
    elsewhere: String,
    secret: String,
}

impl PageKeys {
    fn file(&self, page_origin: &str) -> String {
        let h = |k: &str| format!("sha256:{}", KeyHash::of(k).to_hex());
        format!(
            r#"keys:
  - {{ id: key_page, hash: "{}", kind: publishable, tenant: {TENANT}, jwt_provider: endusers, allowed_origins: ["{page_origin}"], rate_limit: 3/60s }}
  - {{ id: key_elsewhere, hash: "{}", kind: publishable, tenant: {TENANT}, jwt_provider: endusers, allowed_origins: ["{APP_ORIGIN}"] }}
  - {{ id: key_backend, hash: "{}", kind: secret, tenant: {TENANT} }}
"#,
            h(&self.page),
            h(&self.elsewhere),
            h(&self.secret),
        )
    }
}

fn examples_web() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/web")
}

/// Fills the page's form and calls its `listThreads()`: what the page learnt, and what it shows.
const CALL: &str = r#"
const [key, token, done] = arguments;
document.getElementById("key").value = key;
document.getElementById("token").value = token;
listThreads().then((result) => done({
  result,
  quota: document.getElementById("quota").textContent,
  error: document.getElementById("error").textContent,
}));
"#;

/// A secret key as a careless page would send it (alone: with a token beside it the answer is
/// 400 ambiguous_credentials).
const SECRET_CALL: &str = r#"
const [api, key, done] = arguments;
fetch(api + "/api/v1/llm/gateway/list-threads", { method: "POST", headers: { "X-API-Key": key } })
  .then(async (r) => done({ status: r.status, body: await r.json() }))
  .catch((e) => done({ thrown: String(e) }));
"#;

async fn a_web_page_with_a_publishable_key_reads_every_answer(mode: Mode) {
    let site = StaticSite::start(&examples_web()).await;
    let keys = PageKeys {
        page: ApiKey::generate(KeyKind::Publishable),
        elsewhere: ApiKey::generate(KeyKind::Publishable),
        secret: ApiKey::generate(KeyKind::Secret),
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.yaml");
    std::fs::write(&key_file, keys.file(&site.origin())).unwrap();
    let s = Stack::start_with(
        mode,
        EnvOptions {
            key_store_yaml: Some(format!(
                "key_store: {{ type: file, path: \"{}\" }}",
                key_file.display()
            )),
            ..Default::default()
        },
    )
    .await;
    let browser = Browser::start().await;
    let name = format!("browser-{}", format!("{mode:?}").to_lowercase());
    browser
        .checked(&name, the_page_calls_the_api(&s, &site, &browser, &keys))
        .await;
    browser.quit().await;
    s.stop().await;
}

async fn the_page_calls_the_api(s: &Stack, site: &StaticSite, browser: &Browser, keys: &PageKeys) {
    let api = format!("http://{}", s.envoy.ingress);
    let now = s.env.now();
    let user = s.env.app_user_token("page_user", Some(TENANT));
    let expired = signing_key("app-1").sign(&firebase_claims(
        APP_PROJECT,
        "page_user",
        Some(TENANT),
        now - 7200,
        3600,
    ));
    browser.get(&format!("{}/?api={api}", site.origin())).await;
    let cors_before = s.envoy.counter("http.ingress.cors.origin_valid").await;
    let checks = s.engine_checks().await;
    let call = async |key: &str, token: &str| browser.run(CALL, json!([key, token])).await;

    // Allowed: the page reads the upstream's answer and the quota left.
    let got = call(&keys.page, &user).await;
    let r = &got["result"];
    assert_eq!(r["status"], 200, "{got:#}");
    assert_eq!(
        (r["limit"].as_str(), r["remaining"].as_str()),
        (Some("3"), Some("2")),
        "{got:#}"
    );
    assert!(
        r["reset"].as_str().unwrap().parse::<u64>().unwrap() > now,
        "{got:#}"
    );
    assert_eq!(
        r["body"]["headers"]["x-auth-method"],
        json!(["publishable_key"]),
        "the upstream saw the user's identity: {got:#}"
    );
    assert!(
        got["quota"]
            .as_str()
            .unwrap()
            .starts_with("Requests left: 2 of 3"),
        "{got:#}"
    );
    assert_eq!(got["error"], "", "{got:#}");

    // An expired user token: 401, the JSON body and the challenge readable, a sentence shown.
    let got = call(&keys.page, &expired).await;
    let r = assert_refused(&got, 401, "invalid_token", "sign in again");
    assert_eq!(r["body"]["code"], "unauthenticated", "{got:#}");
    let challenge = r["wwwAuthenticate"].as_str().unwrap();
    assert!(challenge.contains("invalid_token"), "{got:#}");

    // Over the key's limit (3 a minute; the 401 did not count): 429 and Retry-After.
    for remaining in ["1", "0"] {
        let got = call(&keys.page, &user).await;
        assert_eq!(got["result"]["remaining"], remaining, "{got:#}");
    }
    let got = call(&keys.page, &user).await;
    let retry_after = got["result"]["retryAfter"].as_str().unwrap_or("none");
    let r = assert_refused(
        &got,
        429,
        "rate_limited",
        &format!("try again in {retry_after} s"),
    );
    assert!(retry_after.parse::<u64>().unwrap() > 0, "{got:#}");
    assert_eq!(r["remaining"], "0", "{got:#}");

    // A key that does not allow this page's origin: refused, readable, never upstream.
    let got = call(&keys.elsewhere, &user).await;
    assert_refused(&got, 403, "origin_not_allowed", "may not use this API key");

    // A secret key in a page: refused, and the page can read why.
    let got = browser.run(SECRET_CALL, json!([api, keys.secret])).await;
    assert_eq!(got["status"], 403, "{got:#}");
    assert_eq!(got["body"]["reason"], "secret_key_in_browser", "{got:#}");

    // What reached the upstream: the three allowed calls, and no preflight.
    let seen: Vec<_> = (0..s.upstream.count())
        .map(|i| s.upstream.seen(i))
        .collect();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    for r in &seen {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", API_PATH),
            "{r:?}"
        );
        assert_eq!(r.one("origin"), Some(site.origin().as_str()));
    }
    // Chromium preflighted (Envoy's CORS filter saw more requests with an origin than the page
    // made calls), yet exactly the seven calls reached the engine, each a decision about its
    // key: no preflight was a decision, so none reached the key's usage either (usage counts a
    // known key's decisions).
    let calls = 7;
    let cors_seen = s.envoy.counter("http.ingress.cors.origin_valid").await - cors_before;
    assert!(
        cors_seen > calls,
        "no preflight seen: {cors_seen} requests with an origin"
    );
    s.engine_checks_settle_at(checks + calls as usize).await;
    s.key_decisions_settle_at(calls as f64).await;
}

/// Asserts the page read a refusal (its status and the body's reason) and shows a sentence
/// containing `shown`; returns what the page learnt.
#[track_caller]
fn assert_refused<'a>(got: &'a Value, status: u16, reason: &str, shown: &str) -> &'a Value {
    let r = &got["result"];
    assert_eq!(r["status"], status, "{got:#}");
    assert_eq!(r["body"]["reason"], reason, "{got:#}");
    let error = got["error"].as_str().unwrap_or_default();
    assert!(error.contains(shown), "the page shows {error:?}: {got:#}");
    r
}
