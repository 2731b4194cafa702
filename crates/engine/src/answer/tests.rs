use super::*;
use crate::decision::{AuthMethod, Identity};

fn answers(cfg: &str) -> Answers {
    Answers::new(&Config::from_yaml(cfg, &std::collections::BTreeMap::new()).unwrap())
}

fn map(h: &[Header<'_>]) -> Vec<(String, String)> {
    h.iter()
        .map(|h| (h.name.to_owned(), h.value.to_string()))
        .collect()
}

/// The parts of an allow, or a panic.
fn allowed<'a>(a: Answer<'a>) -> (Vec<Header<'a>>, Vec<&'a str>, Vec<Header<'a>>) {
    match a {
        Answer::Allow {
            upstream,
            remove_upstream,
            downstream,
        } => (
            upstream.into_vec(),
            remove_upstream.into_vec(),
            downstream.into_vec(),
        ),
        other => panic!("not an allow: {other:?}"),
    }
}

/// The parts of a denial, or a panic.
fn denied<'a>(a: Answer<'a>) -> (Reason, u16, Vec<Header<'a>>, &'a str) {
    match a {
        Answer::Deny {
            reason,
            status,
            headers,
            body,
        } => (reason, status, headers.into_vec(), body),
        other => panic!("not a denial: {other:?}"),
    }
}

fn rate() -> RateStatus {
    RateStatus {
        allowed: true,
        limit: 100,
        remaining: 99,
        reset_at: 1_700_000_060,
        reset_after: 60,
        retry_after: None,
        window_secs: 60,
    }
}

#[test]
fn allow_sets_identity_and_removes_what_it_does_not_set() {
    let grant = Grant {
        identity: Some(Identity {
            method: AuthMethod::Jwt,
            tenant: None,
            user: Some("u1".into()),
            key_id: None,
            scopes: None,
            impersonated_by: None,
        }),
        rate: None,
    };
    let decision = Decision::Allow(grant);
    let a = answers("");
    let (upstream, remove, downstream) = allowed(a.answer(&decision));
    assert_eq!(
        map(&upstream),
        vec![
            ("x-user-id".into(), "u1".into()),
            ("x-auth-method".into(), "jwt".into())
        ]
    );
    assert_eq!(
        remove,
        vec![
            "x-tenant-id",
            "x-api-key-id",
            "x-scopes",
            "x-impersonated-by",
            "x-api-key",
            "x-on-behalf-of"
        ]
    );
    assert!(downstream.is_empty());
}

#[test]
fn allow_with_key_carries_rate_headers_to_the_client_only() {
    let grant = Grant {
        identity: Some(Identity {
            method: AuthMethod::ApiKey,
            tenant: Some("t1".into()),
            user: Some("u9".into()),
            key_id: Some("key_1".into()),
            scopes: Some(
                crate::store::Interner::default().scopes(&["a".into(), "users:impersonate".into()]),
            ),
            impersonated_by: Some("key_1".into()),
        }),
        rate: Some(rate()),
    };
    let decision = Decision::Allow(grant);
    let a = answers("policy: { forward_api_key: true }\nrate_limit: { ietf_headers: true }\n");
    let (upstream, remove, downstream) = allowed(a.answer(&decision));
    let up = map(&upstream);
    assert!(up.contains(&("x-scopes".into(), "a users:impersonate".into())));
    assert!(up.contains(&("x-impersonated-by".into(), "key_1".into())));
    assert!(up.iter().all(|(k, _)| !k.starts_with("x-ratelimit")));
    assert_eq!(
        remove,
        vec!["x-on-behalf-of"],
        "x-api-key forwarded by config"
    );
    assert_eq!(
        map(&downstream),
        vec![
            ("x-ratelimit-limit".into(), "100".into()),
            ("x-ratelimit-remaining".into(), "99".into()),
            ("x-ratelimit-reset".into(), "1700000060".into()),
            (
                "ratelimit".into(),
                "limit=100, remaining=99, reset=60".into()
            ),
            ("ratelimit-policy".into(), "100;w=60".into()),
        ]
    );
}

#[test]
fn every_denial_has_status_json_body_and_challenge() {
    let a = answers("");
    for reason in Reason::ALL {
        let decision = Decision::Deny(Denial::new(reason));
        let (said, status, headers, body) = denied(a.answer(&decision));
        assert_eq!(said, reason);
        assert_eq!(status, reason.http_status());
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["reason"], reason.as_str());
        assert_eq!(body["code"], reason.code().as_str());
        assert!(body["message"].as_str().unwrap().len() > 10);
        let headers = map(&headers);
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
        let www = headers.iter().find(|(k, _)| k == "www-authenticate");
        match reason {
            Reason::InvalidToken => assert!(
                www.unwrap()
                    .1
                    .starts_with("Bearer realm=\"gybc\", error=\"invalid_token\"")
            ),
            Reason::MissingCredentials | Reason::UserTokenRequired => {
                assert_eq!(www.unwrap().1, "Bearer realm=\"gybc\"")
            }
            _ => assert!(www.is_none(), "{reason:?}"),
        }
        let retry = headers.iter().find(|(k, _)| k == "retry-after");
        assert_eq!(retry.is_some(), reason == Reason::Unavailable, "{reason:?}");
    }
}

#[test]
fn rate_limited_denial_carries_quota_and_retry_after() {
    let status = RateStatus {
        allowed: false,
        remaining: 0,
        retry_after: Some(7),
        ..rate()
    };
    let decision = Decision::Deny(Denial {
        rate: Some(status),
        ..Denial::new(Reason::RateLimited)
    });
    let a = answers("");
    let (_, code, headers, _) = denied(a.answer(&decision));
    assert_eq!(code, 429);
    let h = map(&headers);
    for want in [
        ("x-ratelimit-limit", "100"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "1700000060"),
        ("retry-after", "7"),
    ] {
        assert!(
            h.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {h:?}"
        );
    }
}
