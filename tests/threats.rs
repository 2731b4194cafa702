//! The threat model's tests that no other suite holds (docs/security.md names each one): request
//! limits, work per request, cache poisoning, `kid` and algorithm games with keys the attacker
//! controls, key documents built to replace the good set, and key-store flooding.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use futures_util::future::BoxFuture;
use gybc_authz::cli::check::check_request;
use gybc_authz::dev::SigningKey;
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::authn::jwks::{self, Jwks, JwksTiming};
use gybc_authz_engine::config::{DEFAULT_MAX_HEADERS, KeySourceConfig};
use gybc_authz_engine::store::{FileStore, Found, Key, KeyStore, StoreError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::*;

const CACHE: &str = "gybc_authz_cache_requests_total";

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// The test config's unknown-kid refetch interval (300 ms), plus margin.
async fn past_refetch_interval() {
    tokio::time::sleep(Duration::from_millis(350)).await;
}

/// An RSA key whose private half the test holds, so it can put anything in a token's header.
struct OwnKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl OwnKey {
    fn generate(kid: &str) -> Self {
        let pair = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let der = STANDARD.encode(pair.as_der().unwrap().as_ref());
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{der}\n-----END PRIVATE KEY-----\n");
        let public = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        Self {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            jwk: json!({
                "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(&public.n),
                "e": URL_SAFE_NO_PAD.encode(&public.e),
            }),
        }
    }

    fn sign(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding).unwrap()
    }

    fn header(&self, alg: Algorithm) -> Header {
        let mut h = Header::new(alg);
        h.kid = Some(self.kid.clone());
        h
    }
}

fn raw_headers(path: &str, lines: &[(String, String)]) -> CheckRequest {
    let mut req = check_request("POST", path, "api.example.com", &[]);
    let http = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap();
    http.header_map = Some(HeaderMap {
        headers: lines
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.clone(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    });
    req
}

fn joined_headers(path: &str, map: HashMap<String, String>) -> CheckRequest {
    let mut req = check_request("POST", path, "api.example.com", &[]);
    req.attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap()
        .headers = map;
    req
}

// === oversized and duplicated headers, and the header count ===

#[tokio::test]
async fn a_request_with_more_headers_than_the_cap_is_refused_unread() {
    let env = TestEnv::start().await;
    let key = env.keys.secret.clone();
    let filler = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("x-filler-{i}"), "v".into()))
            .collect()
    };

    // Exactly at the cap (the key is the 256th header): read and allowed.
    let mut lines = filler(DEFAULT_MAX_HEADERS - 1);
    lines.push(("x-api-key".into(), key.clone()));
    allowed(&env.check_raw(raw_headers(API_PATH, &lines)).await);

    // One more, before or after the credential: refused, whatever the credential is.
    let mut over = filler(DEFAULT_MAX_HEADERS);
    over.push(("x-api-key".into(), key.clone()));
    let d = assert_denied(
        &env.check_raw(raw_headers(API_PATH, &over)).await,
        400,
        "malformed_credentials",
    );
    assert!(!d.headers.contains_key("x-ratelimit-limit"), "not counted");
    over.rotate_right(1);
    assert_denied(
        &env.check_raw(raw_headers(API_PATH, &over)).await,
        400,
        "malformed_credentials",
    );
    // Repeated lines count one by one; Envoy's joined map counts distinct names.
    let same: Vec<(String, String)> = (0..=DEFAULT_MAX_HEADERS)
        .map(|_| ("x-same".to_owned(), "v".to_owned()))
        .collect();
    assert_denied(
        &env.check_raw(raw_headers(API_PATH, &same)).await,
        400,
        "malformed_credentials",
    );
    let mut map: HashMap<String, String> = filler(DEFAULT_MAX_HEADERS).into_iter().collect();
    map.insert("x-api-key".into(), key.clone());
    assert_denied(
        &env.check_raw(joined_headers(API_PATH, map)).await,
        400,
        "malformed_credentials",
    );
    // Even a public route does not admit a request it did not read whole.
    let mut req = raw_headers(API_PATH, &filler(DEFAULT_MAX_HEADERS + 1));
    req.attributes
        .as_mut()
        .unwrap()
        .context_extensions
        .insert("gybc.public".into(), "true".into());
    assert_denied(&env.check_raw(req).await, 400, "malformed_credentials");
    env.stop().await;
}

#[tokio::test]
async fn the_header_cap_is_configurable() {
    let env = TestEnv::start_with(EnvOptions {
        extra_yaml: "limits: { max_headers: 16 }\n".into(),
        ..Default::default()
    })
    .await;
    let mut lines: Vec<(String, String)> = (0..15)
        .map(|i| (format!("x-filler-{i}"), "v".into()))
        .collect();
    lines.push(("x-api-key".into(), env.keys.secret.clone()));
    allowed(&env.check_raw(raw_headers(API_PATH, &lines)).await);
    lines.push(("x-one-more".into(), "v".into()));
    assert_denied(
        &env.check_raw(raw_headers(API_PATH, &lines)).await,
        400,
        "malformed_credentials",
    );
    env.stop().await;
}

#[tokio::test]
async fn oversized_credential_headers_are_refused_before_any_lookup() {
    let env = TestEnv::start().await;
    let before = scrape(&env).await;
    let fetches = env.dashboard_keys.fetches();

    // X-API-Key over 256 bytes, even one that starts like a real key.
    let long_key = format!("{}{}", env.keys.secret, "A".repeat(256));
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &long_key)]).await,
        401,
        "invalid_api_key",
    );
    // Authorization over 8192 bytes, with a header naming an unknown kid: never decoded.
    let long_token = format!(
        "eyJhbGciOiJSUzI1NiIsImtpZCI6InJvZ3VlIn0.{}.sig",
        "A".repeat(8_192)
    );
    let d = assert_denied(
        &env.check(API_PATH, &[("authorization", &bearer(&long_token))])
            .await,
        401,
        "invalid_token",
    );
    assert!(d.headers["www-authenticate"].contains("invalid_token"));
    // X-On-Behalf-Of over 512 bytes.
    let long_user = "u".repeat(513);
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.impersonator),
                ("x-on-behalf-of", &long_user),
            ],
        )
        .await,
        400,
        "invalid_on_behalf_of",
    );

    let after = scrape(&env).await;
    for (cache, result) in [("keys", "miss"), ("keys", "hit"), ("jwt", "miss")] {
        let s = [("cache", cache), ("result", result)];
        assert_eq!(
            after.get(CACHE, &s),
            before.get(CACHE, &s),
            "{cache} {result}"
        );
    }
    assert_eq!(env.dashboard_keys.fetches(), fetches, "no key fetch");
    env.stop().await;
}

#[tokio::test]
async fn a_credential_header_in_two_spellings_is_a_duplicate() {
    let env = TestEnv::start().await;
    let jwt = bearer(&env.user_token("u1", Some(TENANT)));
    for (a, b) in [
        ("authorization", "Authorization"),
        ("x-api-key", "X-API-KEY"),
    ] {
        let value = if a == "authorization" {
            jwt.clone()
        } else {
            env.keys.secret.clone()
        };
        let map = HashMap::from([(a.to_owned(), value.clone()), (b.to_owned(), value)]);
        assert_denied(
            &env.check_raw(joined_headers(API_PATH, map)).await,
            400,
            "malformed_credentials",
        );
    }
    let map = HashMap::from([
        ("x-api-key".to_owned(), env.keys.impersonator.clone()),
        ("x-on-behalf-of".to_owned(), "u1".to_owned()),
        ("X-On-Behalf-Of".to_owned(), "admin".to_owned()),
    ]);
    assert_denied(
        &env.check_raw(joined_headers(API_PATH, map)).await,
        400,
        "invalid_on_behalf_of",
    );
    env.stop().await;
}

// === denial of service: work per request ===

#[tokio::test]
async fn a_check_costs_at_most_one_verification_and_a_verified_token_none() {
    let env = TestEnv::start().await;
    let jwt_lookups = async |env: &TestEnv| {
        let m = scrape(env).await;
        (
            m.get(CACHE, &[("cache", "jwt"), ("result", "miss")]),
            m.get(CACHE, &[("cache", "jwt"), ("result", "hit")]),
        )
    };
    let fetches = env.dashboard_keys.fetches();

    // One token, twenty checks: one verification, then cache hits only.
    let (miss0, hit0) = jwt_lookups(&env).await;
    let token = bearer(&env.user_token("u1", Some(TENANT)));
    for _ in 0..20 {
        allowed(&env.check(API_PATH, &[("authorization", &token)]).await);
    }
    let (miss1, hit1) = jwt_lookups(&env).await;
    assert_eq!((miss1 - miss0, hit1 - hit0), (1.0, 19.0));

    // A publishable key's request verifies its user token once too.
    let app = bearer(&env.app_user_token("end_user", None));
    for _ in 0..3 {
        allowed(
            &env.check(
                API_PATH,
                &[
                    ("x-api-key", &env.keys.publishable),
                    ("authorization", &app),
                ],
            )
            .await,
        );
    }
    let (miss2, hit2) = jwt_lookups(&env).await;
    assert_eq!((miss2 - miss1, hit2 - hit1), (1.0, 2.0));

    // A forged signature under a known kid is never cached as good. Repeated, it costs one
    // verification and is then refused from the rejected-token cache; five different forgeries
    // cost one verification each (and only one). No key fetch either way.
    let rejected_hits = async |env: &TestEnv| {
        scrape(env)
            .await
            .get(CACHE, &[("cache", "rejected_jwt"), ("result", "hit")])
    };
    let rejected0 = rejected_hits(&env).await;
    let impostor = signing_key("impostor");
    let forged = impostor.sign_as(
        Some("dashboard-1"),
        &env.claims("admin", Some(OTHER_TENANT)),
    );
    for _ in 0..5 {
        assert_denied(
            &env.check(API_PATH, &[("authorization", &bearer(&forged))])
                .await,
            401,
            "invalid_token",
        );
    }
    let (miss3, hit3) = jwt_lookups(&env).await;
    assert_eq!((miss3 - miss2, hit3 - hit2), (1.0, 0.0));
    assert_eq!(rejected_hits(&env).await - rejected0, 4.0);
    for i in 0..5 {
        let forged = impostor.sign_as(
            Some("dashboard-1"),
            &env.claims(&format!("admin{i}"), Some(OTHER_TENANT)),
        );
        assert_denied(
            &env.check(API_PATH, &[("authorization", &bearer(&forged))])
                .await,
            401,
            "invalid_token",
        );
    }
    let (miss3, hit3) = (miss3 + 5.0, hit3);
    assert_eq!(jwt_lookups(&env).await, (miss3, hit3));
    assert_eq!(rejected_hits(&env).await - rejected0, 4.0);
    assert_eq!(env.dashboard_keys.fetches(), fetches);

    // Requests refused before authentication cost no verification at all.
    for headers in [
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![
            ("authorization", token.as_str()),
            ("x-api-key", &env.keys.secret),
        ],
        vec![("authorization", token.as_str()), ("x-on-behalf-of", "a b")],
    ] {
        denied(&env.check(API_PATH, &headers).await);
    }
    assert_eq!(jwt_lookups(&env).await, (miss3, hit3));
    env.stop().await;
}

// === cache poisoning ===

#[tokio::test]
async fn a_cached_verification_is_bound_to_its_provider_and_never_caches_a_decision() {
    let env = TestEnv::start().await;
    // The end-user project's token, verified (and cached) for a publishable key...
    let app = bearer(&env.app_user_token("end_user", None));
    allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &app),
            ],
        )
        .await,
    );
    // ...is still no dashboard token.
    assert_denied(
        &env.check(API_PATH, &[("authorization", &app)]).await,
        401,
        "invalid_token",
    );
    // And the dashboard's token, once cached, is no end user's token.
    let dash = bearer(&env.user_token("u1", Some(TENANT)));
    allowed(&env.check(API_PATH, &[("authorization", &dash)]).await);
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &dash),
            ],
        )
        .await,
        401,
        "invalid_token",
    );
    // The cache holds what a token proves, not what a request was allowed: a tenantless token
    // allowed on the tenantless path is refused on another path right after.
    let new_user = bearer(&env.user_token("new_user", None));
    allowed(&env.check(ORG_CREATE, &[("authorization", &new_user)]).await);
    assert_denied(
        &env.check(API_PATH, &[("authorization", &new_user)]).await,
        403,
        "tenant_required",
    );
    // Spoofed identity headers next to a cached token change nothing either.
    let a = allowed(
        &env.check(
            API_PATH,
            &[("authorization", &dash), ("x-tenant-id", OTHER_TENANT)],
        )
        .await,
    );
    assert_eq!(a.upstream["x-tenant-id"], TENANT);
    env.stop().await;
}

// === algorithm confusion and kid games ===

/// The dashboard provider publishes its own key and one whose private half the test holds.
async fn env_with_own_key(own: &OwnKey) -> TestEnv {
    let env = TestEnv::start().await;
    env.dashboard_keys
        .set_body(json!({ "keys": [signing_key("dashboard-1").jwk(), own.jwk] }).to_string());
    past_refetch_interval().await;
    env
}

#[tokio::test]
async fn only_rs256_verifies_even_with_a_published_rsa_key() {
    let own = OwnKey::generate("own-1");
    let env = env_with_own_key(&own).await;
    let claims = env.claims("u1", Some(TENANT));
    // The control: RS256 with this key is accepted (it is in the set).
    let good = own.sign(&own.header(Algorithm::RS256), &claims);
    allowed(
        &env.check(API_PATH, &[("authorization", &bearer(&good))])
            .await,
    );
    for alg in [
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        let t = own.sign(&own.header(alg), &claims);
        assert_denied(
            &env.check(API_PATH, &[("authorization", &bearer(&t))]).await,
            401,
            "invalid_token",
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn keys_named_or_embedded_in_the_token_header_are_never_used() {
    let env = TestEnv::start().await;
    let rogue = OwnKey::generate("rogue-embedded");
    let claims = env.claims("admin", Some(OTHER_TENANT));
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(rogue.jwk.clone()).unwrap();

    let mut embedded = rogue.header(Algorithm::RS256);
    embedded.jwk = Some(jwk.clone());
    let mut jku = rogue.header(Algorithm::RS256);
    jku.jku = Some("https://attacker.example/keys.json".into());
    jku.x5u = Some("https://attacker.example/cert.pem".into());
    // The real kid, with the attacker's key embedded beside it.
    let mut real_kid = rogue.header(Algorithm::RS256);
    real_kid.kid = Some("dashboard-1".into());
    real_kid.jwk = Some(jwk);
    for (what, h) in [
        ("embedded jwk", embedded),
        ("jku and x5u", jku),
        ("real kid, embedded jwk", real_kid),
    ] {
        let t = rogue.sign(&h, &claims);
        let d = assert_denied(
            &env.check(API_PATH, &[("authorization", &bearer(&t))]).await,
            401,
            "invalid_token",
        );
        assert!(!d.headers.values().any(|v| v.contains(&t)), "{what}");
    }
    env.stop().await;
}

#[tokio::test]
async fn a_kid_resolves_only_in_its_own_providers_key_set() {
    let env = TestEnv::start().await;
    // Signed by the end-user project's key, with its real kid, but shaped as a dashboard token:
    // the dashboard provider's set has no `app-1`.
    let t = signing_key("app-1").sign(&env.claims("admin", Some(TENANT)));
    assert_denied(
        &env.check(API_PATH, &[("authorization", &bearer(&t))]).await,
        401,
        "invalid_token",
    );
    // Look-alike kids name no key: no trimming, case folding or path games.
    let real = signing_key("dashboard-1");
    let claims = env.claims("u1", Some(TENANT));
    for kid in [
        "",
        "dashboard-1 ",
        "DASHBOARD-1",
        "dashboard-1\u{0}",
        "../dashboard-1",
        "dashboard-1/../dashboard-1",
        &"k".repeat(4_000),
    ] {
        let t = real.sign_as(Some(kid), &claims);
        assert_denied(
            &env.check(API_PATH, &[("authorization", &bearer(&t))]).await,
            401,
            "invalid_token",
        );
    }
    env.stop().await;
}

// === JWKS poisoning and outage ===

#[tokio::test]
async fn a_hostile_key_document_never_replaces_the_good_set() {
    let real = signing_key("dashboard-1");
    let server = KeyServer::start(SigningKey::jwks(&[&real])).await;
    let client = reqwest::Client::new();
    let source =
        jwks::source_from_config(&KeySourceConfig::Url { url: server.url() }, Some(&client));
    let timing = JwksTiming {
        unknown_kid_interval: Duration::from_secs(3600),
        unknown_kid_wait: Duration::from_millis(10),
        default_refresh: Duration::from_secs(300),
        min_refresh: Duration::from_secs(10),
    };
    let set = Jwks::new("dashboard", source, timing);
    set.refresh().await.expect("the good set loads");
    let good = set.key("dashboard-1").await.expect("known kid");

    let attacker = OwnKey::generate("dashboard-1");
    let n = attacker.jwk["n"].as_str().unwrap();
    let hostile = [
        // Larger than any key document (1 MiB cap), even if it would parse.
        (
            "oversized",
            format!(
                r#"{{"keys":[{}],"pad":"{}"}}"#,
                attacker.jwk,
                "A".repeat(1 << 20)
            ),
        ),
        // An HMAC secret under the real kid: not an RSA signing key.
        (
            "oct key",
            r#"{"keys":[{"kty":"oct","kid":"dashboard-1","k":"c2VjcmV0","alg":"HS256"}]}"#.into(),
        ),
        // RSA, but marked for encryption or another algorithm.
        (
            "enc key",
            format!(
                r#"{{"keys":[{{"kty":"RSA","kid":"dashboard-1","use":"enc","n":"{n}","e":"AQAB"}}]}}"#
            ),
        ),
        (
            "RS512 key",
            format!(
                r#"{{"keys":[{{"kty":"RSA","kid":"dashboard-1","alg":"RS512","n":"{n}","e":"AQAB"}}]}}"#
            ),
        ),
        ("not JSON", "<html>502 Bad Gateway</html>".into()),
        ("empty set", r#"{"keys":[]}"#.into()),
        ("array", "[]".into()),
    ];
    for (what, body) in hostile {
        server.set_body(body);
        assert!(set.refresh().await.is_err(), "{what} is refused");
        let still = set.key("dashboard-1").await.expect("the good key serves");
        assert!(Arc::ptr_eq(&good, &still), "{what} replaced the good key");
        assert_eq!(set.key_count(), 1, "{what}");
    }
    // An outage keeps the good set too.
    server.set_failing(true);
    assert!(set.refresh().await.is_err());
    assert!(Arc::ptr_eq(&good, &set.key("dashboard-1").await.unwrap()));
}

// === key guessing and store flooding ===

/// The test keys' store, counting lookups.
struct Counting {
    inner: FileStore,
    lookups: AtomicUsize,
}

impl KeyStore for Counting {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Ok(self
            .inner
            .get(hash)
            .map(Found::into_arc))))
    }
}

#[tokio::test]
async fn a_flood_of_random_keys_costs_one_lookup_each_and_bounded_memory() {
    let keys = TestKeys::generate();
    let store = Arc::new(Counting {
        inner: FileStore::from_records(keys.records()),
        lookups: AtomicUsize::new(0),
    });
    let env = TestEnv::start_with(EnvOptions {
        keys: Some(keys),
        store: Some(store.clone()),
        extra_yaml: "key_cache: { max_entries: 64 }\n".into(),
        ..Default::default()
    })
    .await;

    // Retrying one unknown key costs one lookup: the negative entry answers the rest.
    let guess = ApiKey::generate(KeyKind::Secret);
    for _ in 0..10 {
        assert_denied(
            &env.check(API_PATH, &[("x-api-key", &guess)]).await,
            401,
            "invalid_api_key",
        );
    }
    assert_eq!(store.lookups.load(Ordering::SeqCst), 1);

    // 300 distinct, well-formed (checksummed) random keys at once: one lookup each, every one
    // refused, and the cache stays within its bound.
    let flood: Vec<String> = (0..300)
        .map(|i| {
            ApiKey::generate(if i % 2 == 0 {
                KeyKind::Secret
            } else {
                KeyKind::Publishable
            })
        })
        .collect();
    let answers = futures_util::future::join_all(
        flood
            .iter()
            .map(|k| async { env.check(API_PATH, &[("x-api-key", k)]).await }),
    )
    .await;
    for a in &answers {
        assert_denied(a, 401, "invalid_api_key");
    }
    assert_eq!(store.lookups.load(Ordering::SeqCst), 301);
    let daemon = env.daemon.as_ref().unwrap();
    let legit = KeyHash::of(&env.keys.secret);
    wait_until(
        "cache within max_entries",
        Duration::from_secs(10),
        async || {
            // Lookups drive the cache's housekeeping, which applies the bound.
            let _ = daemon.keys.lookup(&legit).await;
            daemon.keys.cached_entries().is_some_and(|n| n <= 64)
        },
    )
    .await;
    // The real key still works.
    let a = allowed(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
    );
    assert_eq!(a.upstream["x-api-key-id"], "key_secret");
    env.stop().await;
}

// === findings (docs/security.md, "Findings") ===

/// F2 (fixed): `exp + leeway` overflowed for an `exp` within `leeway` of `u64::MAX`, and a build
/// with overflow checks panicked inside the Check. Token times now saturate: such a token is
/// simply one that expires in the far future, allowed like any other valid token, and the
/// connection stays up for the next Check.
#[tokio::test]
async fn a_token_time_near_u64_max_never_overflows() {
    let env = TestEnv::start().await;
    for exp in [u64::MAX, u64::MAX - 1] {
        let mut claims = env.claims("u1", Some(TENANT));
        claims["exp"] = exp.into();
        let t = env.sign(&claims);
        let resp = env.check(API_PATH, &[("authorization", &bearer(&t))]).await;
        let a = allowed(&resp);
        assert_eq!(
            (
                a.upstream["x-tenant-id"].as_str(),
                a.upstream["x-user-id"].as_str()
            ),
            (TENANT, "u1"),
            "exp {exp}"
        );
    }
    // A token with iat near u64::MAX is in the future, not an overflow.
    let mut claims = env.claims("u1", Some(TENANT));
    claims["iat"] = u64::MAX.into();
    let t = env.sign(&claims);
    assert_denied(
        &env.check(API_PATH, &[("authorization", &bearer(&t))]).await,
        401,
        "invalid_token",
    );
    env.stop().await;
}
