//! The key service through the real Envoy with gybc-authz in front of it (the shipped
//! `deploy/envoy/key-service.yaml`, addresses moved to loopback), in both modes, with a real Redis
//! and two replicas of the data path sharing it: a key made through the API is allowed on both
//! replicas within a second with its tenant and scopes, a changed limit is in force within a
//! second, a revocation is refused by both within a second, a rotation keeps the old secret for
//! its grace period only; and who may call, as the data path and the service decide together.
//! And every refusal, whoever makes it (the key service, its HTTP handling, or Envoy itself), is
//! the documented JSON error with its status, as a client of that Envoy receives it.

mod support;

use std::time::{Duration, Instant};

use gybc_authz_engine::clock::Clock;
use serde_json::{Value, json};
use support::envoy::*;
use support::key_service::{Backend, KeyService, PREFIX};
use support::redis::{RedisServer, redis_yaml};
use support::*;

/// Two data-path replicas sharing one Redis, the key service over the same Redis, and the
/// key-service Envoy with replica `a`'s engine in front of it.
struct Fleet {
    a: Stack,
    b: Stack,
    front: Envoy,
    /// Time the tests' clocks moved that the front's module clock has not yet (`Mode::Module`).
    front_advance_ms: std::sync::atomic::AtomicU64,
    _ks: KeyService,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

fn opts(redis: &RedisServer, keys: &TestKeys) -> EnvOptions {
    let mut o = redis_yaml(&[redis.url()], false, "fail_open");
    o.keys = Some(keys.clone());
    o
}

async fn fleet(mode: Mode) -> Fleet {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    let a = Stack::start_with(mode, opts(&redis, &keys)).await;
    let b = Stack::start_with(mode, opts(&redis, &keys)).await;
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(
        dir.path(),
        &Backend::Redis(redis.url()),
        &[
            "--allowed-scope",
            "keys:manage",
            "--allowed-scope",
            "users:impersonate",
            "--allowed-scope",
            "threads:read",
        ],
    );

    let front = front_envoy(mode, &a.env, ks.addr).await;
    Fleet {
        a,
        b,
        front,
        front_advance_ms: Default::default(),
        _ks: ks,
        _redis: redis,
        _dir: dir,
    }
}

/// The shipped `deploy/envoy/key-service.yaml` on free loopback ports, in front of the key service
/// at `ks`, with `env`'s engine deciding: its daemon over ext_authz, or (`Mode::Module`) the same
/// config loaded into Envoy, waited for until it has loaded.
async fn front_envoy(mode: Mode, env: &TestEnv, ks: std::net::SocketAddr) -> Envoy {
    let mut cfg = EnvoyConfig::load(&deploy_envoy_path("key-service.yaml"));
    cfg.set_cluster_endpoint("gybc_authz", env.daemon.as_ref().unwrap().grpc_addr);
    cfg.set_cluster_endpoint("key_service", ks);
    for l in ["ingress", "stats"] {
        let addr = &mut cfg.listener(l)["address"]["socket_address"];
        addr["address"] = "127.0.0.1".into();
        addr["port_value"] = 0.into();
    }
    match mode {
        Mode::Sidecar => Envoy::start(&cfg).await,
        Mode::Module => {
            let path = env.dir.path().join("gybc-authz.yaml");
            std::fs::write(&path, &env.config_yaml).unwrap();
            let envoy = Envoy::start_module(&cfg.into_module(&path), env.clock.now_nanos()).await;
            // Until the module's engine has loaded, every answer is its 503.
            let http = client();
            wait_until("the module loaded", Duration::from_secs(20), async || {
                http.post(envoy.url(&format!("{PREFIX}/list-keys")))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    != 503
            })
            .await;
            envoy
        }
    }
}

impl Fleet {
    /// A call of the key API through the front Envoy, with these credential headers.
    async fn api(&self, method: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
        let mut req = self
            .a
            .http
            .post(self.front.url(&format!("{PREFIX}/{method}")))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        // The front's engine (the module's, in module mode) keeps time with the replicas'.
        let advance = self
            .front_advance_ms
            .swap(0, std::sync::atomic::Ordering::SeqCst);
        if self.a.mode == Mode::Module && advance > 0 {
            req = req.header("x-gybc-test-advance-ms", advance.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn user(&self, tenant: &str) -> String {
        format!("Bearer {}", self.a.env.user_token("alice", Some(tenant)))
    }

    async fn as_user(&self, tenant: &str, method: &str, body: Value) -> Value {
        let auth = self.user(tenant);
        let (status, v) = self.api(method, &[("authorization", &auth)], body).await;
        assert_eq!(status, 200, "{method}: {v}");
        v
    }

    /// Polls both replicas with `key` until `done` holds for each, for at most a second.
    async fn on_both_within_a_second(&self, what: &str, key: &str, done: impl Fn(&Reply) -> bool) {
        let started = Instant::now();
        for replica in [&self.a, &self.b] {
            loop {
                let r = replica.post(API_PATH, &[("x-api-key", key)]).await;
                if done(&r) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "{what}: not on both replicas within a second; last: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    fn advance(&self, by: Duration) {
        self.a.advance(by);
        self.b.advance(by);
        self.front_advance_ms
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    async fn stop(self) {
        drop(self.front);
        self.a.stop().await;
        self.b.stop().await;
    }
}

both_modes!(
    keys_made_through_the_api_reach_every_replica_within_a_second,
    only_the_tenants_users_and_key_managers_reach_its_keys,
    every_refusal_is_the_json_error_through_envoy,
);

async fn keys_made_through_the_api_reach_every_replica_within_a_second(mode: Mode) {
    let f = fleet(mode).await;

    // Created → allowed on both replicas, with its tenant and scopes.
    let created = f
        .as_user(
            "acme",
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "scopes": ["threads:read", "users:impersonate"],
                   "rateLimit": "100/60s"}),
        )
        .await;
    let secret = created["secret"].as_str().unwrap().to_owned();
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    f.on_both_within_a_second("a new key is allowed", &secret, |r| r.status == 200)
        .await;
    for replica in [&f.a, &f.b] {
        let r = replica.post(API_PATH, &[("x-api-key", &secret)]).await;
        assert_eq!(
            r.allowed().identity(),
            map(&[
                ("x-tenant-id", "acme"),
                ("x-auth-method", "api_key"),
                ("x-api-key-id", &id),
                ("x-scopes", "threads:read users:impersonate"),
            ])
        );
        assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    }

    // Rotated with a grace period: both secrets work; after it, only the new one.
    let rotated = f
        .as_user(
            "acme",
            "rotate-key",
            json!({"id": id, "gracePeriod": "30s"}),
        )
        .await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let new_id = rotated["key"]["id"].as_str().unwrap().to_owned();
    f.on_both_within_a_second("the new secret is allowed", &new_secret, |r| {
        r.status == 200
    })
    .await;
    f.on_both_within_a_second(
        "the old secret still works in its grace period",
        &secret,
        |r| r.status == 200,
    )
    .await;
    f.advance(Duration::from_secs(120));
    for replica in [&f.a, &f.b] {
        replica
            .post(API_PATH, &[("x-api-key", &secret)])
            .await
            .denied(401, "invalid_api_key");
        let r = replica.post(API_PATH, &[("x-api-key", &new_secret)]).await;
        assert_eq!(r.allowed().one("x-api-key-id"), Some(new_id.as_str()));
    }

    // A changed limit is in force on both within a second.
    f.as_user(
        "acme",
        "update-key",
        json!({"id": new_id, "rateLimit": "1/60s"}),
    )
    .await;
    f.on_both_within_a_second("the new limit", &new_secret, |r| {
        r.header("x-ratelimit-limit") == Some("1")
    })
    .await;

    // Revoked → refused by both within a second.
    f.as_user("acme", "revoke-key", json!({"id": new_id})).await;
    f.on_both_within_a_second("the revocation", &new_secret, |r| r.status == 401)
        .await;
    for replica in [&f.a, &f.b] {
        replica
            .post(API_PATH, &[("x-api-key", &new_secret)])
            .await
            .denied(401, "invalid_api_key");
    }
    f.stop().await;
}

async fn only_the_tenants_users_and_key_managers_reach_its_keys(mode: Mode) {
    let f = fleet(mode).await;
    let theirs = f
        .as_user("globex", "create-key", json!({"kind": "KEY_KIND_SECRET"}))
        .await;
    let their_id = theirs["key"]["id"].as_str().unwrap().to_owned();
    let manager = f
        .as_user(
            "acme",
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "scopes": ["keys:manage"]}),
        )
        .await;
    let manager = manager["secret"].as_str().unwrap().to_owned();
    let impersonator = f
        .as_user(
            "acme",
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "scopes": ["keys:manage", "users:impersonate"]}),
        )
        .await;
    let impersonator = impersonator["secret"].as_str().unwrap().to_owned();
    let publishable = f
        .as_user(
            "acme",
            "create-key",
            json!({"kind": "KEY_KIND_PUBLISHABLE", "jwtProvider": "endusers"}),
        )
        .await;
    let publishable = publishable["secret"].as_str().unwrap().to_owned();
    // The new keys are on the front's engine within a second (it shares the Redis).
    let user = f.user("acme");
    wait_until(
        "the manager key is known",
        Duration::from_secs(1),
        async || {
            f.api("list-keys", &[("x-api-key", &manager)], json!({}))
                .await
                .0
                == 200
        },
    )
    .await;

    // acme's user and acme's manager key: globex's key is "not found", as a missing one is.
    for creds in [
        vec![("authorization", user.as_str())],
        vec![("x-api-key", manager.as_str())],
    ] {
        let (status, list) = f.api("list-keys", &creds, json!({})).await;
        assert_eq!(status, 200, "{list}");
        assert!(
            list["keys"]
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k["tenant"] == "acme")
        );
        for (method, body) in [
            ("get-key", json!({"id": their_id})),
            ("update-key", json!({"id": their_id, "name": "x"})),
            ("rotate-key", json!({"id": their_id})),
            ("revoke-key", json!({"id": their_id})),
        ] {
            let (status, v) = f.api(method, &creds, body).await;
            assert_eq!(status, 404, "{method}: {v}");
            assert_eq!(v["reason"], "key_not_found");
        }
    }
    let still = f
        .as_user("globex", "get-key", json!({"id": their_id}))
        .await;
    assert_eq!(still["key"]["state"], "KEY_STATE_ACTIVE");

    // A manager key cannot mint a key with a scope it lacks.
    let (status, v) = f
        .api(
            "create-key",
            &[("x-api-key", &manager)],
            json!({"kind": "KEY_KIND_SECRET", "scopes": ["users:impersonate"]}),
        )
        .await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (403, Some("scope_escalation"))
    );

    // A publishable key (with its user), an impersonated request, a tenantless user: 403.
    let end_user = format!("Bearer {}", f.a.env.app_user_token("u1", None));
    let (status, v) = f
        .api(
            "list-keys",
            &[("x-api-key", &publishable), ("authorization", &end_user)],
            json!({}),
        )
        .await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (403, Some("publishable_key")),
        "{v}"
    );
    let (status, v) = f
        .api(
            "list-keys",
            &[("x-api-key", &impersonator), ("x-on-behalf-of", "bob")],
            json!({}),
        )
        .await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (403, Some("impersonated")),
        "{v}"
    );
    let tenantless = format!("Bearer {}", f.a.env.user_token("newbie", None));
    let (status, _) = f
        .api("list-keys", &[("authorization", &tenantless)], json!({}))
        .await;
    assert_eq!(status, 403);

    // Spoofed identity headers without a credential never reach the service: gybc-authz's 401.
    let (status, v) = f
        .api(
            "list-keys",
            &[
                ("x-tenant-id", "acme"),
                ("x-user-id", "alice"),
                ("x-auth-method", "jwt"),
            ],
            json!({}),
        )
        .await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (401, Some("missing_credentials"))
    );
    // And only the key API is served through this Envoy.
    let (status, _) = f
        .api("../../other", &[("authorization", &user)], json!({}))
        .await;
    assert_eq!(status, 404);
    f.stop().await;
}

/// One answer as the client sees it through Envoy.
struct Got {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

impl Got {
    /// The documented error: JSON (by its content type, too) with this status, code and reason.
    #[track_caller]
    fn is_error(&self, status: u16, code: &str, reason: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let ct = self
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap());
        assert_eq!(ct, Some("application/json"), "{}", self.text);
        assert_eq!(self.body["code"], code, "{}", self.text);
        assert_eq!(self.body["reason"], reason, "{}", self.text);
        assert!(
            self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
    }
}

async fn send(req: reqwest::RequestBuilder) -> Got {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Got {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

/// Every cause of refusal, through the real Envoy in front of the real key service: the wrong
/// method (405 with `Allow`), an unknown method or path (404, from the service or from Envoy), the
/// wrong content type (415), a body over the limit (413), a body that is not JSON (400), a tenant
/// at its key bound (400), a caller over its rate limit (429 with `Retry-After`), a store too slow
/// (504), no credentials (gybc-authz's 401), and the key service gone (Envoy's 503): each the
/// JSON error `{code, reason, message}` with its status.
async fn every_refusal_is_the_json_error_through_envoy(mode: Mode) {
    let env = TestEnv::start().await;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start_with(
        dir.path(),
        &Backend::Redis(redis.url()),
        "max_body_bytes: 2048, request_timeout_ms: 1000, caller_rate_limit: 5/60s, \
         max_active_keys_per_tenant: 1",
        &[],
        // Redis answers slowly rather than not at all: the request's timeout comes first.
        &[("GYBC_AUTHZ__REDIS__TIMEOUT_MS", "10000")],
    );
    let front = front_envoy(mode, &env, ks.addr).await;
    let http = client();
    let api = |method: &str| front.url(&format!("{PREFIX}/{method}"));
    // A user of acme per case, so that no case spends another's rate limit.
    let user = |sub: &str| format!("Bearer {}", env.user_token(sub, Some("acme")));
    let post = |url: String, sub: &str| {
        http.post(url)
            .header("authorization", user(sub))
            .header("content-type", "application/json")
    };

    send(post(api("rename-everything"), "u1").body("{}"))
        .await
        .is_error(404, "not_found", "unknown_method");
    send(post(front.url("/api/v1/other/thing"), "u1").body("{}"))
        .await
        .is_error(404, "not_found", "unknown_method");
    let wrong_method = send(
        http.get(api("list-keys"))
            .header("authorization", user("u2")),
    )
    .await;
    wrong_method.is_error(405, "unimplemented", "method_not_allowed");
    assert_eq!(wrong_method.headers["allow"], "POST");
    send(
        http.post(api("list-keys"))
            .header("authorization", user("u2"))
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await
    .is_error(415, "invalid_argument", "unsupported_media_type");
    let big = json!({"kind": "KEY_KIND_SECRET", "name": "x".repeat(4096)}).to_string();
    let too_big = send(post(api("create-key"), "u3").body(big)).await;
    too_big.is_error(413, "invalid_argument", "body_too_large");
    assert_eq!(too_big.body["field"], "body");
    let not_json = send(post(api("create-key"), "u3").body("{nope")).await;
    not_json.is_error(400, "invalid_argument", "invalid_field");
    assert_eq!(not_json.body["field"], "body");

    // The tenant's bound (1 here): the second key is refused.
    let made = send(post(api("create-key"), "u4").body(r#"{"kind": "KEY_KIND_SECRET"}"#)).await;
    assert_eq!(made.status, 200, "{}", made.text);
    send(post(api("create-key"), "u4").body(r#"{"kind": "KEY_KIND_SECRET"}"#))
        .await
        .is_error(400, "failed_precondition", "key_limit_reached");

    // One caller's sixth call in a minute.
    for _ in 0..5 {
        assert_eq!(
            send(post(api("list-keys"), "u5").body("{}")).await.status,
            200
        );
    }
    let limited = send(post(api("list-keys"), "u5").body("{}")).await;
    limited.is_error(429, "resource_exhausted", "rate_limited");
    assert!(
        limited.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );

    // The store stalls (every client paused) past the request timeout (1 s).
    redis.cli(&["CLIENT", "PAUSE", "2500", "ALL"]);
    send(post(api("list-keys"), "u6").body("{}"))
        .await
        .is_error(504, "deadline_exceeded", "timeout");
    // Then it answers again.
    let mut back = false;
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if send(post(api("list-keys"), &format!("u6-{i}")).body("{}"))
            .await
            .status
            == 200
        {
            back = true;
            break;
        }
    }
    assert!(back, "the key service answers once Redis does");

    // No credentials: gybc-authz refuses before the service is asked, with its own JSON.
    send(
        http.post(api("list-keys"))
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await
    .is_error(401, "unauthenticated", "missing_credentials");

    // The key service gone: Envoy's own 503, as the same JSON.
    drop(ks);
    send(post(api("list-keys"), "u7").body("{}"))
        .await
        .is_error(503, "unavailable", "key_service_unavailable");
    drop(front);
    env.stop().await;
}
