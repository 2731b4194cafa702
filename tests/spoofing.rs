//! No client can spoof an identity header: on every allow path each identity header is either set
//! by the daemon (overwriting) or listed for removal, and no spoofed value reaches the upstream.

mod support;

use support::*;

const SPOOFED: &str = "spoofed-by-client";

/// The six identity headers as a client would send them, in mixed case.
fn spoofs() -> Vec<(String, String)> {
    [
        "X-Tenant-Id",
        "x-user-id",
        "X-AUTH-METHOD",
        "x-api-key-id",
        "X-Scopes",
        "x-impersonated-by",
    ]
    .iter()
    .map(|h| (h.to_string(), SPOOFED.to_owned()))
    .collect()
}

#[track_caller]
fn assert_unspoofable(a: &Allowed, path: &str) {
    for h in IDENTITY_HEADERS {
        let set = a.upstream.contains_key(h);
        let removed = a.removed.iter().any(|r| r == h);
        assert!(
            set ^ removed,
            "{path}: {h} must be either overwritten or removed (set={set}, removed={removed})"
        );
    }
    assert!(
        a.upstream.values().all(|v| v != SPOOFED),
        "{path}: spoofed value upstream: {:?}",
        a.upstream
    );
    assert!(
        a.removed.iter().any(|r| r == "x-api-key"),
        "{path}: X-API-Key is not forwarded"
    );
    assert!(
        a.removed.iter().any(|r| r == "x-on-behalf-of"),
        "{path}: X-On-Behalf-Of is consumed"
    );
}

#[tokio::test]
async fn identity_headers_are_overwritten_or_removed_on_every_allow_path() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    let tenantless_jwt = format!("Bearer {}", env.user_token("u1", None));
    let app_jwt = format!("Bearer {}", env.app_user_token("u1", None));
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let paths: Vec<Case> = vec![
        (
            "jwt with tenant",
            API_PATH,
            vec![("authorization", jwt.as_str())],
        ),
        (
            "jwt without tenant (no tenant set)",
            ORG_CREATE,
            vec![("authorization", tenantless_jwt.as_str())],
        ),
        (
            "secret key (no user set)",
            API_PATH,
            vec![("x-api-key", env.keys.secret.as_str())],
        ),
        (
            "secret key impersonating",
            API_PATH,
            vec![
                ("x-api-key", env.keys.impersonator.as_str()),
                ("x-on-behalf-of", "user_7"),
            ],
        ),
        (
            "publishable key",
            API_PATH,
            vec![
                ("x-api-key", env.keys.publishable.as_str()),
                ("authorization", app_jwt.as_str()),
            ],
        ),
    ];
    let spoofs = spoofs();
    for (name, path, creds) in paths {
        let mut headers: Vec<(&str, &str)> = spoofs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        headers.extend(creds);
        let a = allowed(&env.check(path, &headers).await);
        assert_unspoofable(&a, name);
    }
    env.stop().await;
}

#[tokio::test]
async fn a_spoofed_tenant_never_changes_the_derived_tenant() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    let a = allowed(
        &env.check(
            API_PATH,
            &[("x-tenant-id", OTHER_TENANT), ("authorization", &jwt)],
        )
        .await,
    );
    assert_eq!(a.upstream["x-tenant-id"], TENANT);
    // A tenantless token cannot borrow a tenant from a header either.
    let jwt = format!("Bearer {}", env.user_token("u1", None));
    assert_denied(
        &env.check(
            API_PATH,
            &[("x-tenant-id", TENANT), ("authorization", &jwt)],
        )
        .await,
        403,
        "tenant_required",
    );
    // Nor can a key impersonate through a spoofed x-user-id.
    let a = allowed(
        &env.check(
            API_PATH,
            &[("x-user-id", "admin"), ("x-api-key", &env.keys.secret)],
        )
        .await,
    );
    assert!(!a.upstream.contains_key("x-user-id"));
    assert!(a.removed.contains(&"x-user-id".to_owned()));
    env.stop().await;
}

#[tokio::test]
async fn renamed_identity_headers_are_protected_too() {
    let env = TestEnv::start_with(EnvOptions {
        extra_yaml: "headers: { tenant_id: x-gybc-tenant, user_id: x-gybc-user }\n".into(),
        ..Default::default()
    })
    .await;
    let a = allowed(
        &env.check(
            API_PATH,
            &[("x-gybc-user", SPOOFED), ("x-api-key", &env.keys.secret)],
        )
        .await,
    );
    assert_eq!(a.upstream["x-gybc-tenant"], TENANT);
    assert!(a.removed.contains(&"x-gybc-user".to_owned()));
    assert!(!a.upstream.contains_key("x-tenant-id"));
    env.stop().await;
}
