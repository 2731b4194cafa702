//! Tokens built to fool the verifier. Every one must end in 401 `invalid_token`, and the cheap
//! rejections must not cost a key fetch.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::*;

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn assert_invalid(env: &TestEnv, token: &str, what: &str) {
    let resp = env
        .check(API_PATH, &[("authorization", &format!("Bearer {token}"))])
        .await;
    let d = denied(&resp);
    assert_eq!(
        (d.status, d.reason.as_str()),
        (401, "invalid_token"),
        "{what}: {d:?}"
    );
    if token.len() >= 8 {
        assert!(
            !d.message.contains(token) && !d.headers.values().any(|v| v.contains(token)),
            "{what}: token echoed"
        );
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let env = TestEnv::start().await;
    let claims = env.claims("u1", Some(TENANT));
    for alg in ["none", "None", "NONE"] {
        let token = format!(
            "{}.{}.",
            b64(&json!({"alg": alg, "typ": "JWT", "kid": "dashboard-1"})),
            b64(&claims)
        );
        assert_invalid(&env, &token, alg).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_as_secret_is_refused() {
    let env = TestEnv::start().await;
    let claims = env.claims("u1", Some(TENANT));
    let jwks = gybc_authz::dev::SigningKey::jwks(&[&signing_key("dashboard-1")]);
    let n = signing_key("dashboard-1").jwk()["n"]
        .as_str()
        .unwrap()
        .to_owned();
    for secret in [
        jwks.as_bytes().to_vec(),
        n.as_bytes().to_vec(),
        URL_SAFE_NO_PAD.decode(&n).unwrap(),
    ] {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut h = Header::new(alg);
            h.kid = Some("dashboard-1".into());
            let token =
                jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&secret)).unwrap();
            assert_invalid(&env, &token, &format!("{alg:?}")).await;
        }
    }
    env.stop().await;
}

#[tokio::test]
async fn unknown_kid_missing_kid_and_a_foreign_signer_are_refused() {
    let env = TestEnv::start().await;
    let claims = env.claims("u1", Some(TENANT));
    let rogue = signing_key("rogue-1");
    assert_invalid(&env, &rogue.sign(&claims), "unknown kid").await;

    // A rogue key that claims the real kid: the signature does not verify.
    let impostor = signing_key("impostor");
    assert_invalid(
        &env,
        &impostor.sign_as(Some("dashboard-1"), &claims),
        "real kid, rogue signature",
    )
    .await;
    // No kid at all, even when signed by the real key.
    assert_invalid(
        &env,
        &signing_key("dashboard-1").sign_as(None, &claims),
        "no kid",
    )
    .await;

    // The end-user project's token is not a dashboard token.
    assert_invalid(
        &env,
        &env.app_user_token("u1", Some(TENANT)),
        "other provider",
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn token_times_are_enforced_with_bounded_leeway() {
    let env = TestEnv::start().await;
    let now = env.now();
    let cases: &[(&str, serde_json::Value)] = &[
        (
            "expired",
            json!({"exp": now - 3600, "iat": now - 7200, "auth_time": now - 7200}),
        ),
        ("expired beyond leeway", json!({"exp": now - 31})),
        ("iat in the future", json!({"iat": now + 3600})),
        ("auth_time in the future", json!({"auth_time": now + 3600})),
        ("nbf in the future", json!({"nbf": now + 3600})),
    ];
    for (what, patch) in cases {
        let mut c = env.claims("u1", Some(TENANT));
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        assert_invalid(&env, &env.sign(&c), what).await;
    }
    // Within the 30 s leeway both ways: accepted.
    let mut c = env.claims("u1", Some(TENANT));
    c["exp"] = (now - 10).into();
    c["iat"] = (now + 10).into();
    allowed(
        &env.check(
            API_PATH,
            &[("authorization", &format!("Bearer {}", env.sign(&c)))],
        )
        .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn issuer_audience_and_subject_are_checked() {
    let env = TestEnv::start().await;
    let cases: &[(&str, &str, serde_json::Value)] = &[
        (
            "wrong iss",
            "iss",
            json!("https://securetoken.google.com/other-project"),
        ),
        (
            "iss of another scheme",
            "iss",
            json!(format!("http://securetoken.google.com/{PROJECT}")),
        ),
        ("wrong aud", "aud", json!("other-project")),
        ("aud list without project", "aud", json!(["a", "b"])),
        ("empty sub", "sub", json!("")),
        ("129-char sub", "sub", json!("s".repeat(129))),
        (
            "sub with control character",
            "sub",
            json!("user\nx-tenant-id: t2"),
        ),
        ("numeric sub", "sub", json!(42)),
        ("numeric tenant claim", "tenant_id", json!(7)),
        ("string exp", "exp", json!("tomorrow")),
    ];
    for (what, field, value) in cases {
        let mut c = env.claims("u1", Some(TENANT));
        c[*field] = value.clone();
        assert_invalid(&env, &env.sign(&c), what).await;
    }
    for field in ["sub", "exp", "iss", "aud"] {
        let mut c = env.claims("u1", Some(TENANT));
        c.as_object_mut().unwrap().remove(field);
        assert_invalid(&env, &env.sign(&c), &format!("missing {field}")).await;
    }
    // 128 characters is the limit, inclusive.
    let mut c = env.claims(&"s".repeat(128), Some(TENANT));
    c["sub"] = json!("s".repeat(128));
    allowed(
        &env.check(
            API_PATH,
            &[("authorization", &format!("Bearer {}", env.sign(&c)))],
        )
        .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn mangled_tokens_are_refused() {
    let env = TestEnv::start().await;
    let good = env.user_token("u1", Some(TENANT));
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        ("truncated", good[..good.len() - 10].to_owned()),
        ("two parts", format!("{}.{}", parts[0], parts[1])),
        ("four parts", format!("{good}.x")),
        (
            "bad base64 characters",
            format!("{}.{}*.{}", parts[0], parts[1], parts[2]),
        ),
        (
            "bad base64 length",
            format!("{}.{}A.{}", parts[0], parts[1], parts[2]),
        ),
        (
            "header not JSON",
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("nope"),
                parts[1],
                parts[2]
            ),
        ),
        (
            "payload swapped",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&env.claims("admin", Some(OTHER_TENANT))),
                parts[2]
            ),
        ),
        ("empty", String::new()),
        ("dots", "..".into()),
    ];
    for (what, token) in cases {
        assert_invalid(&env, &token, what).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn a_one_megabyte_token_is_rejected_without_parsing_or_fetching() {
    let env = TestEnv::start().await;
    let fetches = env.dashboard_keys.fetches();
    let huge = format!(
        "eyJhbGciOiJSUzI1NiIsImtpZCI6InJvZ3VlIn0.{}.sig",
        "A".repeat(1 << 20)
    );
    assert_invalid(&env, &huge, "1 MB token").await;
    // An unknown kid would have caused a fetch: this one was refused before the header was read.
    assert_eq!(env.dashboard_keys.fetches(), fetches);
    env.stop().await;
}

#[tokio::test]
async fn a_cached_verification_still_expires_with_the_clock() {
    let env = TestEnv::start().await;
    let mut c = env.claims("u1", Some(TENANT));
    c["exp"] = (env.now() + 60).into();
    let auth = format!("Bearer {}", env.sign(&c));
    allowed(&env.check(API_PATH, &[("authorization", &auth)]).await);
    allowed(&env.check(API_PATH, &[("authorization", &auth)]).await);
    env.clock.advance(std::time::Duration::from_secs(60 + 31));
    assert_invalid(
        &env,
        auth.trim_start_matches("Bearer "),
        "expired while cached",
    )
    .await;
    env.stop().await;
}
