//! `gybc-authz key-service` against a key file and a real redis-server, called directly with the
//! identity headers gybc-authz sets (the Envoy suite is `tests/key_service_envoy.rs`): every
//! method, tenant isolation, who may call, no scope escalation, idempotent retries, concurrent
//! creates, every bad input a 400 naming its field with the store unchanged, one audit line per
//! change, and no secret anywhere but the create and rotate answers. And the service in
//! production: the bound on a tenant's active keys under concurrent creates from two replicas,
//! each caller's rate limit, the `key_service` section with its flags and environment overrides,
//! probes (readiness following a real Redis down and back), and metrics that move with traffic.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::key_service::{Backend, KeyService, Who};
use support::redis::RedisServer;

/// A store of each kind for one test; the Redis server lives as long as the value.
struct Store {
    backend: Backend,
    _redis: Option<RedisServer>,
    dir: tempfile::TempDir,
}

impl Store {
    fn file() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Store {
            backend: Backend::File(dir.path().join("keys.yaml")),
            _redis: None,
            dir,
        }
    }

    fn redis() -> Self {
        let redis = RedisServer::start();
        Store {
            backend: Backend::Redis(redis.url()),
            _redis: Some(redis),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn service(&self) -> KeyService {
        KeyService::start(
            self.dir.path(),
            &self.backend,
            &[
                "--allowed-scope",
                "keys:manage",
                "--allowed-scope",
                "users:impersonate",
                "--allowed-scope",
                "threads:read",
            ],
        )
    }
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod file_store {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Store::file()).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Store::redis()).await;
                }
            )*
        }
    };
}

both_stores!(
    every_method_works_and_only_create_and_rotate_show_the_secret,
    lists_run_newest_first_a_page_at_a_time_with_filters,
    a_caller_sees_only_its_own_tenants_keys,
    only_tenant_users_and_key_managers_may_call,
    a_key_cannot_mint_or_grant_a_scope_it_lacks,
    idempotent_retries_and_concurrent_creates,
    every_bad_input_is_a_400_naming_the_field_and_writes_nothing,
    the_active_key_limit_holds_under_concurrent_creates_on_two_replicas,
    expired_keys_free_their_place_and_come_back_only_within_the_bound,
);

fn alice() -> Who {
    Who::user("acme", "alice")
}

#[track_caller]
fn ok(a: &support::key_service::Answer) -> &Value {
    assert_eq!(a.status, 200, "{}", a.text);
    &a.body
}

/// Refused because the tenant holds the most active keys it may.
#[track_caller]
fn at_bound(a: &support::key_service::Answer) {
    assert_eq!(
        (a.status, a.body["code"].as_str(), a.body["reason"].as_str()),
        (400, Some("failed_precondition"), Some("key_limit_reached")),
        "{}",
        a.text
    );
}

async fn create(ks: &KeyService, who: &Who, body: Value) -> Value {
    ok(&ks.call("create-key", who, &body.to_string()).await).clone()
}

async fn every_method_works_and_only_create_and_rotate_show_the_secret(store: Store) {
    let ks = store.service();
    let created = create(
        &ks,
        &alice(),
        json!({"kind": "KEY_KIND_SECRET", "name": "backend", "scopes": ["threads:read"],
               "rateLimit": "100/60s", "expireTime": "2099-01-01T00:00:00Z"}),
    )
    .await;
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk_") && secret.len() == 41, "{secret}");
    let key = &created["key"];
    let id = key["id"].as_str().unwrap().to_owned();
    assert_eq!(key["tenant"], "acme");
    assert_eq!(key["kind"], "KEY_KIND_SECRET");
    assert_eq!(key["state"], "KEY_STATE_ACTIVE");
    assert_eq!(key["scopes"], json!(["threads:read"]));
    assert_eq!(key["rateLimit"], "100/60s");
    assert!(
        key["expireTime"]
            .as_str()
            .unwrap()
            .starts_with("2099-01-01T00:00:00")
    );
    assert!(key["createTime"].is_string());
    // Protojson's canonical timestamps: UTC with `Z`, whole seconds without a fraction.
    assert_eq!(key["expireTime"], "2099-01-01T00:00:00Z");
    let created_at = key["createTime"].as_str().unwrap();
    assert!(
        created_at.len() == 20 && created_at.ends_with('Z') && created_at.as_bytes()[10] == b'T',
        "{created_at}"
    );
    assert_eq!(key["hashPrefix"].as_str().unwrap().len(), 8);

    let pk = create(
        &ks,
        &alice(),
        json!({"kind": "KEY_KIND_PUBLISHABLE", "allowedOrigins": ["https://app.acme.example"],
               "jwtProvider": "endusers"}),
    )
    .await;
    assert!(pk["secret"].as_str().unwrap().starts_with("pk_"));
    assert_eq!(pk["key"]["jwtProvider"], "endusers");

    let got = ok(&ks
        .call("get-key", &alice(), &json!({"id": id}).to_string())
        .await)
    .clone();
    assert_eq!(got["key"], *key);

    let updated = ok(&ks
        .call(
            "update-key",
            &alice(),
            &json!({"id": id, "name": "renamed", "rateLimit": "5/1s", "clearExpireTime": true})
                .to_string(),
        )
        .await)
    .clone();
    assert_eq!(updated["key"]["name"], "renamed");
    assert_eq!(updated["key"]["rateLimit"], "5/1s");
    assert!(updated["key"].get("expireTime").is_none(), "{updated}");
    assert_eq!(
        updated["key"]["scopes"],
        json!(["threads:read"]),
        "unchanged"
    );

    let rotated = ok(&ks
        .call(
            "rotate-key",
            &alice(),
            &json!({"id": id, "gracePeriod": "3600s"}).to_string(),
        )
        .await)
    .clone();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert!(new_secret.starts_with("sk_") && new_secret != secret);
    assert_ne!(rotated["key"]["id"], id);
    assert_eq!(rotated["key"]["name"], "renamed", "the old key's settings");
    assert_eq!(rotated["replaced"]["id"], id);
    assert!(
        rotated["replaced"]["expireTime"].is_string(),
        "the old one expires"
    );

    let revoked = ok(&ks
        .call("revoke-key", &alice(), &json!({"id": id}).to_string())
        .await)
    .clone();
    assert_eq!(revoked["key"]["state"], "KEY_STATE_REVOKED");
    let again = ks
        .call("revoke-key", &alice(), &json!({"id": id}).to_string())
        .await;
    assert_eq!(again.status, 200, "revoking twice is harmless");
    let rotate_revoked = ks
        .call("rotate-key", &alice(), &json!({"id": id}).to_string())
        .await;
    assert_eq!(rotate_revoked.status, 400, "{}", rotate_revoked.text);
    let update_revoked = ks
        .call(
            "update-key",
            &alice(),
            &json!({"id": id, "name": "x"}).to_string(),
        )
        .await;
    assert_eq!(update_revoked.status, 400, "{}", update_revoked.text);

    // The secrets appear nowhere else: not in list or get answers, not in the log.
    let list = ks.call("list-keys", &alice(), "{}").await;
    assert_eq!(ok(&list)["keys"].as_array().unwrap().len(), 3);
    let get = ks
        .call("get-key", &alice(), &json!({"id": id}).to_string())
        .await;
    let log = ks.log().join("\n");
    for s in [
        secret.as_str(),
        new_secret.as_str(),
        pk["secret"].as_str().unwrap(),
    ] {
        assert!(!list.text.contains(s), "a secret in a list answer");
        assert!(!get.text.contains(s), "a secret in a get answer");
        assert!(!log.contains(s), "a secret in the log");
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()));
        assert!(
            !list.text.contains(&hash) && !log.contains(&hash),
            "a whole hash shown"
        );
    }
    assert!(!list.text.contains("secret\""), "{}", list.text);

    // One audit line per change: 2 creates, update, rotate, 2 revokes, and the 2 refused changes.
    let audit = ks.wait_audit(8);
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("create", "ok"),
            ("create", "ok"),
            ("update", "ok"),
            ("rotate", "ok"),
            ("revoke", "ok"),
            ("revoke", "ok"),
            ("rotate", "invalid"),
            ("update", "invalid"),
        ]
    );
    let first = &audit[0];
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["key_id"], id);
    assert_eq!(first["actor"], "user:alice");
    assert_eq!(audit[4]["key_id"], id);

    // The same records the `keys` CLI reads.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .args(["keys", "--output", "json", "--config"])
        .arg(&ks.config)
        .args(["show", &id])
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "revoked");
    assert_eq!(shown["name"], "renamed");
}

async fn lists_run_newest_first_a_page_at_a_time_with_filters(store: Store) {
    let ks = store.service();
    let mut ids = Vec::new();
    for i in 0..7 {
        let kind = if i % 3 == 0 {
            "KEY_KIND_PUBLISHABLE"
        } else {
            "KEY_KIND_SECRET"
        };
        let c = create(
            &ks,
            &alice(),
            json!({"kind": kind, "name": format!("k{i}")}),
        )
        .await;
        ids.push(c["key"]["id"].as_str().unwrap().to_owned());
        if i == 3 {
            // Creation times are whole seconds: let some keys be clearly newer than others.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
    }
    ok(&ks
        .call("revoke-key", &alice(), &json!({"id": ids[1]}).to_string())
        .await);

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = ks
            .call(
                "list-keys",
                &alice(),
                &json!({"pageSize": 3, "pageToken": token}).to_string(),
            )
            .await;
        let body = ok(&page).clone();
        pages += 1;
        for k in body["keys"].as_array().unwrap() {
            seen.push((
                k["createTime"].as_str().unwrap().to_owned(),
                k["id"].as_str().unwrap().to_owned(),
            ));
        }
        token = body
            .get("nextPageToken")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if token.is_empty() {
            break;
        }
        assert!(pages < 10, "pages end");
    }
    assert!(pages >= 3, "7 keys in pages of 3");
    assert_eq!(seen.len(), 7, "every key once: {seen:?}");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    assert_eq!(
        seen.iter().map(|s| &s.1).collect::<BTreeSet<_>>(),
        ids.iter().collect::<BTreeSet<_>>()
    );
    // The last four were created after the pause: they come first.
    let first_four: BTreeSet<_> = seen[..3].iter().map(|s| s.1.clone()).collect();
    assert!(first_four.is_subset(&ids[4..].iter().cloned().collect()));

    let publishable = ok(&ks
        .call("list-keys", &alice(), r#"{"kind":"KEY_KIND_PUBLISHABLE"}"#)
        .await)
    .clone();
    let kinds: Vec<_> = publishable["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.len(), 3);
    assert!(kinds.iter().all(|k| k == "KEY_KIND_PUBLISHABLE"));
    let revoked = ok(&ks
        .call("list-keys", &alice(), r#"{"state":"KEY_STATE_REVOKED"}"#)
        .await)
    .clone();
    assert_eq!(revoked["keys"].as_array().unwrap().len(), 1);
    assert_eq!(revoked["keys"][0]["id"], ids[1]);
    let active = ok(&ks
        .call(
            "list-keys",
            &alice(),
            r#"{"state":"KEY_STATE_ACTIVE","kind":"KEY_KIND_SECRET","pageSize":100}"#,
        )
        .await)
    .clone();
    assert_eq!(active["keys"].as_array().unwrap().len(), 3);
    assert!(active.get("nextPageToken").is_none_or(|t| t == ""));
}

async fn a_caller_sees_only_its_own_tenants_keys(store: Store) {
    let ks = store.service();
    let bobs = create(
        &ks,
        &Who::user("globex", "bob"),
        json!({"kind": "KEY_KIND_SECRET", "name": "globex"}),
    )
    .await;
    let b_id = bobs["key"]["id"].as_str().unwrap().to_owned();
    let mine = create(
        &ks,
        &alice(),
        json!({"kind": "KEY_KIND_SECRET", "scopes": ["keys:manage"]}),
    )
    .await;
    let manager = Who::key("acme", mine["key"]["id"].as_str().unwrap(), "keys:manage");
    let before = store.backend.snapshot();

    for who in [alice(), manager.clone()] {
        let list = ok(&ks.call("list-keys", &who, "{}").await).clone();
        assert!(
            list["keys"]
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k["tenant"] == "acme"),
            "{list}"
        );
        for (method, body) in [
            ("get-key", json!({"id": b_id})),
            ("update-key", json!({"id": b_id, "name": "mine now"})),
            ("rotate-key", json!({"id": b_id})),
            ("revoke-key", json!({"id": b_id})),
        ] {
            let theirs = ks.call(method, &who, &body.to_string()).await;
            let mut missing_body = body.clone();
            missing_body["id"] = json!("key_doesnotexist0000");
            let missing = ks.call(method, &who, &missing_body.to_string()).await;
            assert_eq!(theirs.status, 404, "{method}: {}", theirs.text);
            assert_eq!(
                (theirs.status, &theirs.body["reason"]),
                (missing.status, &missing.body["reason"]),
                "another tenant's key looks exactly like a missing one"
            );
        }
    }
    assert_eq!(
        store.backend.snapshot(),
        before,
        "nothing of globex changed"
    );
    let still = ok(&ks
        .call(
            "get-key",
            &Who::user("globex", "bob"),
            &json!({"id": b_id}).to_string(),
        )
        .await)
    .clone();
    assert_eq!(still["key"]["state"], "KEY_STATE_ACTIVE");
}

async fn only_tenant_users_and_key_managers_may_call(store: Store) {
    let ks = store.service();
    let created = create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let before = store.backend.snapshot();
    let refused = [
        (Who::nobody(), 401),
        (
            Who(vec![
                ("x-tenant-id", "acme".into()),
                ("x-user-id", "alice".into()),
            ]),
            401,
        ),
        (
            Who(vec![
                ("x-auth-method", "publishable_key".into()),
                ("x-tenant-id", "acme".into()),
                ("x-user-id", "alice".into()),
                ("x-api-key-id", "key_pk".into()),
            ]),
            403,
        ),
        (
            Who::key("acme", "key_imp", "keys:manage users:impersonate")
                .with("x-user-id", "alice")
                .with("x-impersonated-by", "key_imp"),
            403,
        ),
        (
            Who(vec![
                ("x-auth-method", "jwt".into()),
                ("x-user-id", "newbie".into()),
            ]),
            403,
        ),
        (Who::key("acme", "key_plain", "threads:read"), 403),
    ];
    for (who, status) in refused {
        for (method, body) in [
            ("create-key", json!({"kind": "KEY_KIND_SECRET"})),
            ("list-keys", json!({})),
            ("get-key", json!({"id": id})),
            ("update-key", json!({"id": id, "name": "x"})),
            ("rotate-key", json!({"id": id})),
            ("revoke-key", json!({"id": id})),
        ] {
            let a = ks.call(method, &who, &body.to_string()).await;
            assert_eq!(a.status, status, "{method} by {who:?}: {}", a.text);
            assert!(!a.text.contains("\"keys\""), "no keys shown");
        }
    }
    assert_eq!(
        store.backend.snapshot(),
        before,
        "a refused caller wrote nothing"
    );
    let refusals = ks.audit();
    assert!(
        refusals
            .iter()
            .filter(|a| a["outcome"] == "forbidden")
            .count()
            >= 6 * 4,
        "refused changes are audited too"
    );
    // A key with keys:manage may; an unknown method is 404.
    let manager = Who::key("acme", "key_m", "keys:manage");
    ok(&ks.call("list-keys", &manager, "{}").await);
    assert_eq!(
        ks.call("delete-everything", &manager, "{}").await.status,
        404
    );
}

async fn a_key_cannot_mint_or_grant_a_scope_it_lacks(store: Store) {
    let ks = store.service();
    let manager = Who::key("acme", "key_m", "keys:manage threads:read");
    let created = create(
        &ks,
        &manager,
        json!({"kind": "KEY_KIND_SECRET", "scopes": ["threads:read"]}),
    )
    .await;
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(ks.wait_audit(1)[0]["actor"], "key:key_m");
    let before = store.backend.snapshot();

    let mint = ks
        .call(
            "create-key",
            &manager,
            &json!({"kind": "KEY_KIND_SECRET", "scopes": ["users:impersonate"]}).to_string(),
        )
        .await;
    assert_eq!(mint.status, 403, "{}", mint.text);
    assert_eq!(mint.body["reason"], "scope_escalation");
    let grant = ks
        .call(
            "update-key",
            &manager,
            &json!({"id": id, "scopes": {"values": ["threads:read", "users:impersonate"]}})
                .to_string(),
        )
        .await;
    assert_eq!(grant.status, 403, "{}", grant.text);
    assert_eq!(store.backend.snapshot(), before, "nothing written");

    // A user of the tenant may grant it.
    let by_user = ks
        .call(
            "update-key",
            &alice(),
            &json!({"id": id, "scopes": {"values": ["users:impersonate"]}}).to_string(),
        )
        .await;
    assert_eq!(ok(&by_user)["key"]["scopes"], json!(["users:impersonate"]));
}

async fn idempotent_retries_and_concurrent_creates(store: Store) {
    let ks = store.service();
    let body = json!({"kind": "KEY_KIND_SECRET", "name": "retried"}).to_string();
    let first = ks
        .call_with(
            "create-key",
            &alice(),
            &[("idempotency-key", "create-1")],
            &body,
        )
        .await;
    let first = ok(&first).clone();
    let retry = ks
        .call_with(
            "create-key",
            &alice(),
            &[("idempotency-key", "create-1")],
            &body,
        )
        .await;
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    let retry = ok(&retry).clone();
    assert_eq!(retry["key"]["id"], first["key"]["id"], "the same key");
    assert!(
        retry.get("secret").is_none_or(|s| s == ""),
        "a replay never shows the secret again: {retry}"
    );
    let other_body = ks
        .call_with(
            "create-key",
            &alice(),
            &[("idempotency-key", "create-1")],
            &json!({"kind": "KEY_KIND_PUBLISHABLE"}).to_string(),
        )
        .await;
    assert_eq!(other_body.status, 422, "{}", other_body.text);
    // The same Idempotency-Key in another tenant is another request.
    let other_tenant = ks
        .call_with(
            "create-key",
            &Who::user("globex", "bob"),
            &[("idempotency-key", "create-1")],
            &body,
        )
        .await;
    assert_ne!(ok(&other_tenant)["key"]["id"], first["key"]["id"]);

    let id = first["key"]["id"].as_str().unwrap();
    let rot = json!({"id": id, "gracePeriod": "60s"}).to_string();
    let r1 = ok(&ks
        .call_with(
            "rotate-key",
            &alice(),
            &[("idempotency-key", "rot-1")],
            &rot,
        )
        .await)
    .clone();
    let r2 = ok(&ks
        .call_with(
            "rotate-key",
            &alice(),
            &[("idempotency-key", "rot-1")],
            &rot,
        )
        .await)
    .clone();
    assert_eq!(r1["key"]["id"], r2["key"]["id"], "one rotation, not two");
    assert_eq!(r2["replaced"]["id"], id);
    assert!(r1["secret"].as_str().unwrap().starts_with("sk_"));
    assert!(r2.get("secret").is_none_or(|s| s == ""));
    let secrets_log = ks.log().join("\n");
    assert!(!secrets_log.contains(r1["secret"].as_str().unwrap()));

    // 20 concurrent creates: 20 distinct keys, none lost.
    let client = reqwest::Client::new();
    let url = ks.url("create-key");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let a = support::key_service::call(
                    &client,
                    &url,
                    &Who::user("initech", "peter"),
                    &[],
                    &json!({"kind": "KEY_KIND_SECRET", "name": format!("c{i}")}).to_string(),
                )
                .await;
                assert_eq!(a.status, 200, "{}", a.text);
                a.body["key"]["id"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let mut made = BTreeSet::new();
    for t in tasks {
        made.insert(t.await.unwrap());
    }
    assert_eq!(made.len(), 20);
    let listed = ok(&ks
        .call(
            "list-keys",
            &Who::user("initech", "peter"),
            r#"{"pageSize":100}"#,
        )
        .await)
    .clone();
    let listed: BTreeSet<String> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, made, "every concurrent create was kept");
}

async fn every_bad_input_is_a_400_naming_the_field_and_writes_nothing(store: Store) {
    let ks = store.service();
    let created = create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let before = store.backend.snapshot();
    let long = "n".repeat(129);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "colour": "red"}),
            "colour",
        ),
        (
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "rateLimit": "lots"}),
            "rateLimit",
        ),
        (
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "scopes": ["root"]}),
            "scopes",
        ),
        (
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "name": long}),
            "name",
        ),
        (
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "expireTime": "2020-01-01T00:00:00Z"}),
            "expireTime",
        ),
        ("create-key", json!({"kind": "KEY_KIND_MAGIC"}), "kind"),
        ("create-key", json!({}), "kind"),
        (
            "create-key",
            json!({"kind": "KEY_KIND_SECRET", "allowedOrigins": ["https://a.example"]}),
            "allowedOrigins",
        ),
        (
            "create-key",
            json!({"kind": "KEY_KIND_PUBLISHABLE", "jwtProvider": "nobody"}),
            "jwtProvider",
        ),
        ("list-keys", json!({"pageSize": 101}), "pageSize"),
        (
            "list-keys",
            json!({"pageToken": "not-a-token"}),
            "pageToken",
        ),
        (
            "list-keys",
            json!({"pageSize": 5, "sort": "oldest"}),
            "sort",
        ),
        ("get-key", json!({"id": ""}), "id"),
        (
            "update-key",
            json!({"id": id, "rateLimit": "100 per minute"}),
            "rateLimit",
        ),
        ("update-key", json!({"id": id, "name": long}), "name"),
        (
            "update-key",
            json!({"id": id, "scopes": {"values": ["root"]}}),
            "scopes.values",
        ),
        (
            "update-key",
            json!({"id": id, "expireTime": "2020-01-01T00:00:00Z"}),
            "expireTime",
        ),
        (
            "update-key",
            json!({"id": id, "tenant": "globex"}),
            "tenant",
        ),
        (
            "update-key",
            json!({"id": id, "kind": "KEY_KIND_PUBLISHABLE"}),
            "kind",
        ),
        (
            "rotate-key",
            json!({"id": id, "gracePeriod": "999999s"}),
            "gracePeriod",
        ),
        (
            "rotate-key",
            json!({"id": id, "gracePeriod": "soon"}),
            "gracePeriod",
        ),
        ("revoke-key", json!({"id": id, "reason": "x"}), "reason"),
    ];
    for (method, body, field) in cases {
        let a = ks.call(method, &alice(), &body.to_string()).await;
        assert_eq!(a.status, 400, "{method} {body}: {}", a.text);
        assert_eq!(a.field(), field, "{method} {body}: {}", a.text);
        assert_eq!(a.body["code"], "invalid_argument");
        assert!(
            a.body["message"].as_str().unwrap().contains(field),
            "the message names the field: {}",
            a.text
        );
    }
    let not_json = ks.call("create-key", &alice(), "{nope").await;
    assert_eq!((not_json.status, not_json.field()), (400, "body"));
    let bad_idem = ks
        .call_with(
            "create-key",
            &alice(),
            &[("idempotency-key", "has spaces in it")],
            &json!({"kind": "KEY_KIND_SECRET"}).to_string(),
        )
        .await;
    assert_eq!(
        (bad_idem.status, bad_idem.field()),
        (400, "Idempotency-Key")
    );
    assert_eq!(
        store.backend.snapshot(),
        before,
        "no bad input wrote anything"
    );
}

/// The tenant's active keys: 24 creates at once, half through each of two replicas of the
/// service sharing the store, against a bound of 5: exactly 5 succeed, the rest are refused with
/// `key_limit_reached`, never one key more; a refused create writes nothing. A revoked key frees
/// its place; a tenant at its bound can still rotate a key, but not rotate its way past it.
async fn the_active_key_limit_holds_under_concurrent_creates_on_two_replicas(store: Store) {
    const BOUND: usize = 5;
    let fields = "max_active_keys_per_tenant: 5, caller_rate_limit: 1000/1s";
    let one = KeyService::start_with(store.dir.path(), &store.backend, fields, &[], &[]);
    let two = KeyService::start_with(store.dir.path(), &store.backend, fields, &[], &[]);
    // Another tenant's keys count for that tenant only.
    create(
        &one,
        &Who::user("globex", "bob"),
        json!({"kind": "KEY_KIND_SECRET"}),
    )
    .await;

    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let url = if i % 2 == 0 {
                one.url("create-key")
            } else {
                two.url("create-key")
            };
            let client = client.clone();
            tokio::spawn(async move {
                support::key_service::call(
                    &client,
                    &url,
                    &alice(),
                    &[],
                    &json!({"kind": "KEY_KIND_SECRET", "name": format!("k{i}")}).to_string(),
                )
                .await
            })
        })
        .collect();
    let mut made = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            200 => made.push(a.body["key"]["id"].as_str().unwrap().to_owned()),
            400 => {
                assert_eq!(a.body["code"], "failed_precondition", "{}", a.text);
                at_bound(&a);
                assert!(
                    a.body["message"].as_str().unwrap().contains('5'),
                    "{}",
                    a.text
                );
            }
            other => panic!("{other}: {}", a.text),
        }
    }
    assert_eq!(made.len(), BOUND, "exactly the bound was created: {made:?}");
    let active = |ks: &KeyService| {
        let ks = ks.url("list-keys");
        async move {
            let a = support::key_service::call(
                &reqwest::Client::new(),
                &ks,
                &alice(),
                &[],
                r#"{"pageSize": 100, "state": "KEY_STATE_ACTIVE"}"#,
            )
            .await;
            ok(&a)["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["id"].as_str().unwrap().to_owned())
                .collect::<BTreeSet<_>>()
        }
    };
    assert_eq!(active(&one).await, made.iter().cloned().collect());

    // At the bound: refused, with or without an Idempotency-Key, and nothing written.
    let before = store.backend.snapshot();
    for headers in [vec![], vec![("idempotency-key", "one-more")]] {
        let a = one
            .call_with(
                "create-key",
                &alice(),
                &headers,
                r#"{"kind": "KEY_KIND_PUBLISHABLE", "jwtProvider": "endusers"}"#,
            )
            .await;
        at_bound(&a);
    }
    assert_eq!(
        store.backend.snapshot(),
        before,
        "a refused create wrote nothing"
    );

    // A rotation replaces a key: allowed at the bound, while the old key's grace period runs...
    let rotated = ok(&one
        .call(
            "rotate-key",
            &alice(),
            &json!({"id": made[0], "gracePeriod": "600s"}).to_string(),
        )
        .await)
    .clone();
    assert_eq!(active(&two).await.len(), BOUND + 1);
    // ... but neither the replaced key nor its successor can be rotated again past the bound.
    for id in [made[0].as_str(), rotated["key"]["id"].as_str().unwrap()] {
        let a = two
            .call("rotate-key", &alice(), &json!({"id": id}).to_string())
            .await;
        at_bound(&a);
    }
    // Revoking two keys frees one place (the replaced key is still active in its grace period).
    for id in [&made[0], &made[1]] {
        ok(&one
            .call("revoke-key", &alice(), &json!({"id": id}).to_string())
            .await);
    }
    create(&two, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let a = one
        .call("create-key", &alice(), r#"{"kind": "KEY_KIND_SECRET"}"#)
        .await;
    at_bound(&a);
    assert_eq!(active(&one).await.len(), BOUND);
    let m = one.metrics().await;
    assert!(
        m.get(
            "gybc_authz_key_service_requests_total",
            &[("method", "create-key"), ("outcome", "failed_precondition")]
        ) >= 1.0
    );
}

/// A key service over `store` whose tenants may hold two active keys.
fn bounded_to_two(store: &Store) -> KeyService {
    KeyService::start_with(
        store.dir.path(),
        &store.backend,
        "max_active_keys_per_tenant: 2",
        &[],
        &[],
    )
}

/// `secs` from now, as the API's timestamps are written.
fn in_secs(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(secs))
        .to_string()
}

/// Alice's update that takes key `id`'s expiry away (bringing it back if it had expired).
async fn bring_back(ks: &KeyService, id: &str) -> support::key_service::Answer {
    ks.call(
        "update-key",
        &alice(),
        &json!({"id": id, "clearExpireTime": true}).to_string(),
    )
    .await
}

/// An expired key frees its place; bringing it back (a new expiry) counts as taking one.
async fn expired_keys_free_their_place_and_come_back_only_within_the_bound(store: Store) {
    let ks = bounded_to_two(&store);
    let brief = create(
        &ks,
        &alice(),
        json!({"kind": "KEY_KIND_SECRET", "expireTime": in_secs(2)}),
    )
    .await;
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let a = ks
        .call("create-key", &alice(), r#"{"kind": "KEY_KIND_SECRET"}"#)
        .await;
    at_bound(&a);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let id = brief["key"]["id"].as_str().unwrap();
    at_bound(&bring_back(&ks, id).await);
    let a = ks
        .call("get-key", &alice(), &json!({"id": id}).to_string())
        .await;
    assert_eq!(
        ok(&a)["key"]["state"],
        "KEY_STATE_EXPIRED",
        "the refused update changed nothing"
    );
    // Other changes of an expired key are not bounded.
    ok(&ks
        .call(
            "update-key",
            &alice(),
            &json!({"id": id, "name": "old"}).to_string(),
        )
        .await);
}

/// The Redis ledger of a tenant's active keys mends itself: an entry for a key that is gone (a
/// revocation or create whose ledger write was lost) leaves when the bound would refuse, and a
/// ledger lost altogether is filled again from the tenant's records on its next create.
#[tokio::test(flavor = "multi_thread")]
async fn the_redis_ledger_drops_stale_entries_and_refills_from_the_records() {
    let store = Store::redis();
    let ks = bounded_to_two(&store);
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let redis = store._redis.as_ref().unwrap();
    let ledger = "gybc:tenant-active:acme";
    assert_eq!(
        redis.cli(&["HLEN", ledger]),
        "2",
        "the filled mark and one key"
    );
    // A key the records do not have (its create died before writing it).
    redis.cli(&["HSET", ledger, "key_ghost", "0:0"]);
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    assert_eq!(redis.cli(&["HEXISTS", ledger, "key_ghost"]), "0");
    let a = ks
        .call("create-key", &alice(), r#"{"kind": "KEY_KIND_SECRET"}"#)
        .await;
    at_bound(&a);
    // The ledger lost: refilled from the records, so the two keys still count.
    redis.cli(&["DEL", ledger]);
    let a = ks
        .call("create-key", &alice(), r#"{"kind": "KEY_KIND_SECRET"}"#)
        .await;
    at_bound(&a);
    assert_eq!(redis.cli(&["HLEN", ledger]), "3");
}

/// A tenant whose ledger was never filled (keys written before it existed) or was lost: an
/// update that brings an expired key back fills it first, so it is bounded like a create.
#[tokio::test(flavor = "multi_thread")]
async fn over_redis_bringing_a_key_back_is_bounded_even_before_the_ledger_is_filled() {
    let store = Store::redis();
    let ks = bounded_to_two(&store);
    let brief = create(
        &ks,
        &alice(),
        json!({"kind": "KEY_KIND_SECRET", "expireTime": in_secs(2)}),
    )
    .await;
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let redis = store._redis.as_ref().unwrap();
    let ledger = "gybc:tenant-active:acme";
    redis.cli(&["DEL", ledger]);
    let id = brief["key"]["id"].as_str().unwrap();
    at_bound(&bring_back(&ks, id).await);
    assert_eq!(
        redis.cli(&["HLEN", ledger]),
        "3",
        "filled from the records: the mark and the two active keys"
    );
    let a = ks
        .call("get-key", &alice(), &json!({"id": id}).to_string())
        .await;
    assert_eq!(ok(&a)["key"]["state"], "KEY_STATE_EXPIRED");
}

/// Each caller's calls are limited per replica (`key_service.caller_rate_limit`, here set through
/// its environment override): over it, 429 with `Retry-After`; another caller is not affected.
#[tokio::test(flavor = "multi_thread")]
async fn each_caller_is_rate_limited_and_told_when_to_retry() {
    let store = Store::file();
    let ks = KeyService::start_with(
        store.dir.path(),
        &store.backend,
        "",
        &[],
        &[("GYBC_AUTHZ__KEY_SERVICE__CALLER_RATE_LIMIT", "3/60s")],
    );
    for _ in 0..3 {
        ok(&ks.call("list-keys", &alice(), "{}").await);
    }
    let limited = ks.call("list-keys", &alice(), "{}").await;
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert_eq!(limited.body["code"], "resource_exhausted");
    assert_eq!(limited.body["reason"], "rate_limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=20).contains(&retry),
        "one call's share of 60 s: {retry}"
    );
    // Another user of the same tenant, and a key of it, have their own quota.
    ok(&ks
        .call("list-keys", &Who::user("acme", "carol"), "{}")
        .await);
    ok(&ks
        .call(
            "list-keys",
            &Who::key("acme", "key_manager", "keys:manage"),
            "{}",
        )
        .await);
    // A limited change is audited as such.
    let a = ks
        .call("create-key", &alice(), r#"{"kind": "KEY_KIND_SECRET"}"#)
        .await;
    assert_eq!(a.status, 429);
    let audit = ks.wait_audit(1);
    assert_eq!(audit.last().unwrap()["outcome"], "limited", "{audit:?}");
    let m = ks.metrics().await;
    assert_eq!(
        m.get(
            "gybc_authz_key_service_requests_total",
            &[("method", "list-keys"), ("outcome", "resource_exhausted")]
        ),
        1.0
    );
}

/// The `key_service` section runs the service: its fields from the file, the environment over
/// the file, the flags over both; a bad section stops it with every field named (exit 64).
#[tokio::test(flavor = "multi_thread")]
async fn the_key_service_section_configures_it_and_its_flags_override_it() {
    let store = Store::file();
    let ks = KeyService::start_with(
        store.dir.path(),
        &store.backend,
        "path_prefix: /api/v9/from-file, allowed_scopes: [keys:manage], max_body_bytes: 2048",
        &[
            "--path-prefix",
            "/api/v1/iam/api-keys",
            "--allowed-scope",
            "threads:read",
        ],
        &[("GYBC_AUTHZ__KEY_SERVICE__MAX_BODY_BYTES", "1024")],
    );
    // The flag's prefix, not the file's.
    let a = ks
        .call(
            "create-key",
            &alice(),
            r#"{"kind": "KEY_KIND_SECRET", "scopes": ["threads:read"]}"#,
        )
        .await;
    ok(&a);
    let a = ks
        .call(
            "create-key",
            &alice(),
            r#"{"kind": "KEY_KIND_SECRET", "scopes": ["keys:manage"]}"#,
        )
        .await;
    assert_eq!(
        (a.status, a.field()),
        (400, "scopes"),
        "the flag's scopes replace the file's"
    );
    // The environment's body limit, not the file's.
    let name = "x".repeat(1100);
    let a = ks
        .call(
            "create-key",
            &alice(),
            &json!({"kind": "KEY_KIND_SECRET", "name": name}).to_string(),
        )
        .await;
    assert_eq!(a.status, 413, "{}", a.text);
    assert_eq!(a.body["reason"], "body_too_large");
    assert!(
        a.body["message"].as_str().unwrap().contains("1024"),
        "{}",
        a.text
    );

    let bad = KeyService::write_config(
        store.dir.path(),
        &store.backend,
        "max_body_bytes: 10, max_active_keys_per_tenant: 0, path_prefix: nope",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .args(["key-service", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "key_service.max_body_bytes",
        "key_service.max_active_keys_per_tenant",
        "key_service.path_prefix",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
}

/// The probes on the admin port, with a real Redis: live throughout; ready while Redis answers,
/// not ready (and requests a 503 JSON error, counted) while it is down, ready again when it
/// returns, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis_down_and_back() {
    let mut store = Store::redis();
    let ks = store.service();
    ks.wait_readyz(200, Duration::from_secs(5)).await;
    assert_eq!(ks.admin("/healthz").await, (200, "ok\n".to_owned()));
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    assert_eq!(
        ks.metrics()
            .await
            .get("gybc_authz_key_service_store_up", &[]),
        1.0
    );

    store._redis.as_mut().unwrap().kill();
    ks.wait_readyz(503, Duration::from_secs(10)).await;
    assert_eq!(
        ks.admin("/healthz").await.0,
        200,
        "alive while Redis is down"
    );
    let a = ks
        .call("create-key", &alice(), r#"{"kind": "KEY_KIND_SECRET"}"#)
        .await;
    assert_eq!(a.status, 503, "{}", a.text);
    assert_eq!(
        (a.body["code"].as_str(), a.body["reason"].as_str()),
        (Some("unavailable"), Some("store_unavailable"))
    );
    let m = ks.metrics().await;
    assert_eq!(m.get("gybc_authz_key_service_store_up", &[]), 0.0);
    assert!(
        m.get(
            "gybc_authz_key_service_store_errors_total",
            &[("kind", "unavailable")]
        ) >= 1.0
    );

    store._redis.as_mut().unwrap().restart();
    ks.wait_readyz(200, Duration::from_secs(15)).await;
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    let log = ks.log().join("\n");
    assert!(log.contains("Key store unreachable: not ready."), "{log}");
    assert!(log.contains("Key store reachable: ready."), "{log}");
}

/// `/metrics` on the admin port moves with traffic: requests by method and outcome, the latency
/// histogram, by exactly the requests made; only bounded labels (no tenant, user or key id).
#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_traffic() {
    let store = Store::file();
    let ks = store.service();
    let before = ks.metrics().await;
    let count = |m: &support::Metrics, method: &str, outcome: &str| {
        m.get(
            "gybc_authz_key_service_requests_total",
            &[("method", method), ("outcome", outcome)],
        )
    };
    assert_eq!(
        count(&before, "create-key", "ok"),
        0.0,
        "the series exist from the start"
    );
    assert!(
        before.0.contains(
            r#"gybc_authz_key_service_requests_total{method="create-key",outcome="ok"} 0"#
        )
    );
    let made = create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    create(&ks, &alice(), json!({"kind": "KEY_KIND_SECRET"})).await;
    ks.call("get-key", &alice(), r#"{"id": "key_missing"}"#)
        .await;
    ks.call("list-keys", &Who::nobody(), "{}").await;
    ks.call("no-such-method", &alice(), "{}").await;
    let after = ks.metrics().await;
    for (method, outcome, n) in [
        ("create-key", "ok", 2.0),
        ("get-key", "not_found", 1.0),
        ("list-keys", "unauthenticated", 1.0),
        ("unknown", "not_found", 1.0),
    ] {
        assert_eq!(
            count(&after, method, outcome) - count(&before, method, outcome),
            n,
            "{method} {outcome}"
        );
    }
    assert_eq!(
        after.get(
            "gybc_authz_key_service_request_duration_seconds_count",
            &[("method", "create-key")]
        ),
        2.0
    );
    let text = &after.0;
    for secret in ["acme", "alice", made["key"]["id"].as_str().unwrap()] {
        assert!(!text.contains(secret), "{secret} in /metrics");
    }
    assert_eq!(after.get("gybc_authz_build_info", &[]), 1.0);
}

/// `serve --dev` prints one `create-key` curl command; run as printed, it makes a key that the
/// dev data path allows at once.
#[test]
fn dev_mode_prints_a_create_key_command_that_works() {
    dev_mode_create_key(&[], "/api/v1/iam/api-keys/create-key", "x-tenant-id");
}

/// The printed command follows the configured key service path and identity header names.
#[test]
fn dev_mode_create_key_command_follows_the_configured_path_and_headers() {
    dev_mode_create_key(
        &[
            ("GYBC_AUTHZ__KEY_SERVICE__PATH_PREFIX", "/iam/keys"),
            ("GYBC_AUTHZ__HEADERS__TENANT_ID", "x-gybc-tenant"),
            ("GYBC_AUTHZ__HEADERS__USER_ID", "x-gybc-user"),
            ("GYBC_AUTHZ__HEADERS__AUTH_METHOD", "x-gybc-auth"),
        ],
        "/iam/keys/create-key",
        "x-gybc-tenant",
    );
}

fn dev_mode_create_key(env: &[(&str, &str)], path: &str, tenant_header: &str) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .args(["serve", "--dev"])
        .env("GYBC_AUTHZ__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("GYBC_AUTHZ__SERVER__HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let mut curl = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.trim_start().starts_with("curl ") {
            curl = Some(line.trim().to_owned());
            break;
        }
    }
    let curl = curl.unwrap_or_else(|| panic!("no curl command in the banner:\n{banner}"));
    assert!(curl.contains(path), "{curl}");
    let out = Command::new("sh").args(["-c", &curl]).output().unwrap();
    let created: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`{curl}` printed no JSON ({e}): {out:?}"));
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("sk_"), "{created}");
    assert_eq!(created["key"]["tenant"], "dev-tenant");

    let grpc = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("gRPC ext_authz"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no gRPC address in the banner:\n{banner}"));
    let check = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .args([
            "check",
            "--addr",
            grpc,
            "-H",
            &format!("x-api-key: {secret}"),
        ])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let decision: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(decision["allowed"], true, "{decision}");
    assert_eq!(decision["upstream_headers"][tenant_header], "dev-tenant");
    assert_eq!(
        decision["upstream_headers"]["x-api-key-id"],
        created["key"]["id"]
    );
}
