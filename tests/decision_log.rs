//! The decision log at its most verbose (every target at TRACE, allows and denials logged) never
//! contains a credential: no key, no token, no `Authorization` value, for every decision-table case.
//! Under a flood of denials it stays within `log.deny_lines_per_sec` per reason, and what it leaves
//! out is counted and reported.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_credential_is_ever_logged() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || sink.clone())
        .init();

    let env = TestEnv::start_with(EnvOptions {
        log_yaml: Some("log: { level: trace, allow_level: warn, deny_level: warn }".into()),
        ..Default::default()
    })
    .await;
    let k = env.keys.clone();
    let jwt = env.user_token("user_abc", Some(TENANT));
    let no_tenant = env.user_token("user_new", None);
    let app_jwt = env.app_user_token("end_user", None);
    let other_tenant = env.app_user_token("end_user", Some(OTHER_TENANT));
    let mut bad = env.claims("u", Some(TENANT));
    bad["aud"] = "x".into();
    let bad = env.sign(&bad);
    let bearer = |t: &str| format!("Bearer {t}");
    let long_obo = "u".repeat(200);

    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (API_PATH, vec![]),
        (API_PATH, vec![("authorization", bearer(&jwt))]),
        (ORG_CREATE, vec![("authorization", bearer(&no_tenant))]),
        (API_PATH, vec![("authorization", bearer(&no_tenant))]),
        (API_PATH, vec![("authorization", bearer(&bad))]),
        (API_PATH, vec![("x-api-key", k.secret.clone())]),
        (
            API_PATH,
            vec![
                ("x-api-key", k.impersonator.clone()),
                ("x-on-behalf-of", "user_1".into()),
            ],
        ),
        (
            API_PATH,
            vec![
                ("x-api-key", k.secret.clone()),
                ("x-on-behalf-of", "user_1".into()),
            ],
        ),
        (
            API_PATH,
            vec![
                ("authorization", bearer(&jwt)),
                ("x-on-behalf-of", "user_1".into()),
            ],
        ),
        (
            API_PATH,
            vec![
                ("x-api-key", k.impersonator.clone()),
                ("x-on-behalf-of", long_obo.clone()),
            ],
        ),
        (
            API_PATH,
            vec![
                ("x-api-key", k.publishable.clone()),
                ("authorization", bearer(&app_jwt)),
            ],
        ),
        (API_PATH, vec![("x-api-key", k.publishable.clone())]),
        (
            API_PATH,
            vec![
                ("x-api-key", k.publishable.clone()),
                ("authorization", bearer(&other_tenant)),
            ],
        ),
        (
            API_PATH,
            vec![
                ("x-api-key", k.publishable.clone()),
                ("authorization", bearer(&app_jwt)),
                ("origin", "https://evil.example".into()),
            ],
        ),
        (
            API_PATH,
            vec![
                ("x-api-key", k.secret.clone()),
                ("authorization", bearer(&jwt)),
            ],
        ),
        (
            API_PATH,
            vec![
                ("authorization", bearer(&jwt)),
                ("authorization", bearer(&jwt)),
            ],
        ),
        (
            API_PATH,
            vec![("authorization", "Basic dXNlcjpodW50ZXIy".into())],
        ),
        (
            API_PATH,
            vec![("x-api-key", k.secret.replacen("sk_", "rk_", 1))],
        ),
        (API_PATH, vec![("x-api-key", k.unknown.clone())]),
        (API_PATH, vec![("x-api-key", k.revoked.clone())]),
        (API_PATH, vec![("x-api-key", k.expired.clone())]),
        (API_PATH, vec![("x-api-key", k.limited.clone())]),
        (API_PATH, vec![("x-api-key", k.limited.clone())]),
        (API_PATH, vec![("x-api-key", k.limited.clone())]),
    ];
    for (path, headers) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.check(path, &h).await;
    }
    env.stop().await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let decision_lines = text
        .lines()
        .filter(|l| l.contains("\"message\":\"Decision.\""))
        .count();
    assert_eq!(decision_lines, cases.len(), "one decision line per Check");

    let mut secrets: Vec<String> = vec![
        k.secret,
        k.impersonator,
        k.limited,
        k.revoked,
        k.expired,
        k.unknown,
        k.publishable,
        k.publishable_ip,
        "dXNlcjpodW50ZXIy".into(),
    ];
    for token in [&jwt, &no_tenant, &app_jwt, &other_tenant, &bad] {
        secrets.push(token.clone());
        // No part of a token either: its signature, or its payload.
        let parts: Vec<&str> = token.split('.').collect();
        secrets.push(parts[1].to_owned());
        secrets.push(parts[2].to_owned());
    }
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "a credential appears in the log: …{}…",
            &s[..s.len().min(12)]
        );
    }
    for s in &secrets[..8] {
        // Nor the full SHA-256 of a key: it is what the stores are keyed by.
        let hash = gybc_authz_engine::authn::apikey::KeyHash::of(s).to_hex();
        assert!(!text.contains(&hash), "a key hash appears in the log");
    }
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
}

#[tokio::test]
async fn a_flood_of_denials_is_logged_within_budget_and_what_is_left_out_is_counted() {
    // This test's own subscriber, for this thread only: the daemon runs on this test's
    // single-threaded runtime, and the other test keeps the global one.
    let captured = Captured::default();
    let sink = captured.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || sink.clone())
            .finish(),
    );
    let env = TestEnv::start_with(EnvOptions {
        log_yaml: Some(
            "log: { allow_level: info, deny_level: info, deny_lines_per_sec: 5 }".into(),
        ),
        ..Default::default()
    })
    .await;
    let jwt = format!("Bearer {}", env.user_token("user_abc", Some(TENANT)));

    // The test clock stands still: all of this falls in one second of the budget.
    for _ in 0..12 {
        assert_denied(&env.check(API_PATH, &[]).await, 401, "missing_credentials");
    }
    for _ in 0..3 {
        assert_denied(
            &env.check(API_PATH, &[("x-api-key", &env.keys.unknown)])
                .await,
            401,
            "invalid_api_key",
        );
    }
    for _ in 0..8 {
        allowed(&env.check(API_PATH, &[("authorization", &jwt)]).await);
    }
    env.clock.advance(std::time::Duration::from_secs(1));
    assert_denied(&env.check(API_PATH, &[]).await, 401, "missing_credentials");
    let m = scrape(&env).await;
    env.stop().await;

    let lines: Vec<serde_json::Value> = String::from_utf8(captured.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "Decision.")
        .collect();
    let of = |reason: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|v| v["fields"]["reason"] == reason)
            .map(|v| &v["fields"])
            .collect()
    };
    let missing = of("missing_credentials");
    assert_eq!(missing.len(), 6, "5 in the first second, 1 in the next");
    assert!(missing[..5].iter().all(|f| f.get("suppressed").is_none()));
    assert_eq!(
        missing[5]["suppressed"], 7,
        "the next line reports what was left out"
    );
    assert_eq!(
        of("invalid_api_key").len(),
        3,
        "another reason, its own budget"
    );
    assert_eq!(of("ok").len(), 8, "allows are not limited");

    let suppressed = |reason| {
        m.get(
            "gybc_authz_decision_log_suppressed_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(suppressed("missing_credentials"), 7.0);
    assert_eq!(suppressed("invalid_api_key"), 0.0);
    assert_eq!(
        m.get(
            "gybc_authz_decisions_total",
            &[("method", "none"), ("reason", "missing_credentials")]
        ),
        13.0,
        "every decision is counted, logged or not"
    );
}
