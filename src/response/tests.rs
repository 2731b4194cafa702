use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;

use super::*;
use crate::decision::{AuthMethod, Identity};

fn responder(cfg: &str) -> Responder {
    Responder::new(&Config::from_yaml(cfg, &std::collections::BTreeMap::new()).unwrap())
}

fn map(h: &[HeaderValueOption]) -> Vec<(String, String)> {
    h.iter()
        .map(|o| {
            assert_eq!(
                o.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "every header overwrites: {o:?}"
            );
            let hv = o.header.as_ref().unwrap();
            (hv.key.clone(), hv.value.clone())
        })
        .collect()
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
            scopes: vec![],
            impersonated_by: None,
        }),
        rate: None,
    };
    let resp = responder("").build(&Decision::Allow(grant));
    assert_eq!(resp.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!()
    };
    assert_eq!(
        map(&ok.headers),
        vec![
            ("x-user-id".into(), "u1".into()),
            ("x-auth-method".into(), "jwt".into())
        ]
    );
    assert_eq!(
        ok.headers_to_remove,
        vec![
            "x-tenant-id",
            "x-api-key-id",
            "x-scopes",
            "x-impersonated-by",
            "x-api-key",
            "x-on-behalf-of"
        ]
    );
    assert!(ok.response_headers_to_add.is_empty());
}

#[test]
fn allow_with_key_carries_rate_headers_to_the_client_only() {
    let grant = Grant {
        identity: Some(Identity {
            method: AuthMethod::ApiKey,
            tenant: Some("t1".into()),
            user: Some("u9".into()),
            key_id: Some("key_1".into()),
            scopes: vec!["a".into(), "users:impersonate".into()],
            impersonated_by: Some("key_1".into()),
        }),
        rate: Some(rate()),
    };
    let resp = responder("policy: { forward_api_key: true }\nrate_limit: { ietf_headers: true }\n")
        .build(&Decision::Allow(grant));
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!()
    };
    let up = map(&ok.headers);
    assert!(up.contains(&("x-scopes".into(), "a users:impersonate".into())));
    assert!(up.contains(&("x-impersonated-by".into(), "key_1".into())));
    assert!(up.iter().all(|(k, _)| !k.starts_with("x-ratelimit")));
    assert_eq!(
        ok.headers_to_remove,
        vec!["x-on-behalf-of"],
        "x-api-key forwarded by config"
    );
    assert_eq!(
        map(&ok.response_headers_to_add),
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
fn every_denial_has_status_json_body_and_nonzero_grpc_code() {
    let r = responder("");
    for reason in Reason::ALL {
        let resp = r.build(&Decision::Deny(Denial::new(reason)));
        let code = resp.status.as_ref().unwrap().code;
        assert_ne!(code, 0, "{reason:?}: code 0 would be an allow");
        let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
            panic!()
        };
        assert_eq!(d.status.unwrap().code, reason.http_status() as i32);
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["reason"], reason.as_str());
        assert_eq!(body["code"], reason.code().as_str());
        assert!(body["message"].as_str().unwrap().len() > 10);
        let headers = map(&d.headers);
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
    let resp = responder("").build(&Decision::Deny(Denial {
        rate: Some(status),
        ..Denial::new(Reason::RateLimited)
    }));
    let Some(HttpResponse::DeniedResponse(d)) = resp.http_response else {
        panic!()
    };
    assert_eq!(d.status.unwrap().code, 429);
    let h = map(&d.headers);
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
