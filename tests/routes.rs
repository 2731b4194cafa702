//! Per-route settings from Envoy's `context_extensions` (`gybc.*`), against the real daemon.

mod support;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use support::*;

fn with_route(headers: &[(&str, &str)], route: &[(&str, &str)]) -> CheckRequest {
    let h: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut req = gybc_authz::cli::check::check_request("POST", API_PATH, "api.example.com", &h);
    req.attributes.as_mut().unwrap().context_extensions = route
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    req
}

#[tokio::test]
async fn a_public_route_needs_no_credential_but_still_verifies_and_strips() {
    let env = TestEnv::start().await;
    let public = [("gybc.public", "true")];
    // No credential: allowed, no identity upstream, every client identity header stripped.
    let a = allowed(
        &env.check_raw(with_route(
            &[("x-tenant-id", "spoofed"), ("x-user-id", "spoofed")],
            &public,
        ))
        .await,
    );
    assert!(a.upstream.is_empty(), "{:?}", a.upstream);
    assert_eq!(a.removed, expected_removed(&a.upstream));
    assert!(
        a.removed.contains(&"x-tenant-id".to_owned())
            && a.removed.contains(&"x-auth-method".to_owned())
    );
    // A valid credential still sets the identity.
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    let a = allowed(
        &env.check_raw(with_route(
            &[("authorization", &jwt), ("x-tenant-id", "spoofed")],
            &public,
        ))
        .await,
    );
    assert_eq!(a.upstream["x-tenant-id"], TENANT);
    // A bad credential is still denied.
    assert_denied(
        &env.check_raw(with_route(&[("authorization", "Bearer a.b.c")], &public))
            .await,
        401,
        "invalid_token",
    );
    assert_denied(
        &env.check_raw(with_route(&[("x-api-key", &env.keys.revoked)], &public))
            .await,
        401,
        "invalid_api_key",
    );
    // Without the setting, the same request needs credentials.
    assert_denied(
        &env.check_raw(with_route(&[], &[])).await,
        401,
        "missing_credentials",
    );
    env.stop().await;
}

#[tokio::test]
async fn required_scopes_apply_to_api_keys() {
    let env = TestEnv::start().await;
    let route = [("gybc.required_scopes", "threads:read users:impersonate")];
    // key_secret has threads:read only; key_impersonator has both.
    assert_denied(
        &env.check_raw(with_route(&[("x-api-key", &env.keys.secret)], &route))
            .await,
        403,
        "insufficient_scope",
    );
    allowed(
        &env.check_raw(with_route(&[("x-api-key", &env.keys.impersonator)], &route))
            .await,
    );
    let app_jwt = format!("Bearer {}", env.app_user_token("u1", None));
    assert_denied(
        &env.check_raw(with_route(
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &app_jwt),
            ],
            &route,
        ))
        .await,
        403,
        "insufficient_scope",
    );
    // Dashboard users carry no scopes: the setting is about keys.
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    allowed(
        &env.check_raw(with_route(&[("authorization", &jwt)], &route))
            .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn a_tenantless_route_admits_a_jwt_without_tenant() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("new_user", None));
    assert_denied(
        &env.check_raw(with_route(&[("authorization", &jwt)], &[]))
            .await,
        403,
        "tenant_required",
    );
    let a = allowed(
        &env.check_raw(with_route(
            &[("authorization", &jwt)],
            &[("gybc.tenantless", "true")],
        ))
        .await,
    );
    assert_eq!(
        a.upstream,
        map(&[("x-user-id", "new_user"), ("x-auth-method", "jwt")])
    );
    env.stop().await;
}

#[tokio::test]
async fn allowed_methods_restrict_the_credential_kind() {
    let env = TestEnv::start().await;
    let backends_only = [("gybc.allowed_methods", "api_key")];
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    let app_jwt = format!("Bearer {}", env.app_user_token("u1", None));
    allowed(
        &env.check_raw(with_route(
            &[("x-api-key", &env.keys.secret)],
            &backends_only,
        ))
        .await,
    );
    assert_denied(
        &env.check_raw(with_route(&[("authorization", &jwt)], &backends_only))
            .await,
        403,
        "method_not_allowed",
    );
    assert_denied(
        &env.check_raw(with_route(
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &app_jwt),
            ],
            &backends_only,
        ))
        .await,
        403,
        "method_not_allowed",
    );
    // Authentication comes first: a bad token is still a 401.
    assert_denied(
        &env.check_raw(with_route(
            &[("authorization", "Bearer a.b.c")],
            &backends_only,
        ))
        .await,
        401,
        "invalid_token",
    );
    allowed(
        &env.check_raw(with_route(
            &[("authorization", &jwt)],
            &[("gybc.allowed_methods", "jwt, publishable_key")],
        ))
        .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn a_typo_in_a_route_setting_refuses_the_request_and_is_counted() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    for (route, key) in [
        (vec![("gybc.pubilc", "true")], "gybc.pubilc"),
        (vec![("gybc.public", "yes")], "gybc.public"),
        (
            vec![("gybc.allowed_methods", "basic")],
            "gybc.allowed_methods",
        ),
    ] {
        let resp = env
            .check_raw(with_route(&[("authorization", &jwt)], &route))
            .await;
        let d = assert_denied(&resp, 403, "route_misconfigured");
        assert_ne!(d.grpc_code, 13, "a denial, not an internal error");
        let m = scrape(&env).await;
        assert_eq!(
            m.get("gybc_authz_route_config_errors_total", &[("key", key)]),
            1.0,
            "{key}"
        );
    }
    // Keys of other prefixes are not ours and are ignored.
    allowed(
        &env.check_raw(with_route(
            &[("authorization", &jwt)],
            &[("team", "search")],
        ))
        .await,
    );
    env.stop().await;
}
