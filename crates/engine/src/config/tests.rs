use std::collections::BTreeMap;

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn paths(err: ConfigError) -> Vec<String> {
    err.errors().iter().map(|e| e.path.clone()).collect()
}

const PROVIDER: &str = "jwt:\n  providers:\n    - name: dashboard\n      project_id: gybc-prod\n";

#[test]
fn empty_file_means_defaults() {
    let c = Config::from_yaml("", &env(&[])).unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
    assert_eq!(c.policy.tenantless_paths, vec![DEFAULT_TENANTLESS_PATH]);
    assert_eq!(c.rate_limit.default.to_string(), "100/60s");
    assert_eq!(c.key_store, KeyStoreConfig::None);
    assert_eq!(c.headers.tenant_id, "x-tenant-id");
    assert!(!c.policy.forward_api_key);
}

#[test]
fn provider_defaults_to_google_keys_and_tenant_id() {
    let c = Config::from_yaml(PROVIDER, &env(&[])).unwrap();
    let p = &c.jwt.providers[0];
    assert_eq!(p.tenant_claim, "tenant_id");
    assert_eq!(
        p.keys,
        KeySourceConfig::Url {
            url: GOOGLE_FIREBASE_KEYS_URL.into()
        }
    );
    assert_eq!(c.default_provider_name(), Some("dashboard"));
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let err = Config::from_yaml("server:\n  grpc_adr: 1.2.3.4:5\n", &env(&[])).unwrap_err();
    assert_eq!(paths(err), vec!["server.grpc_adr"]);
    let err = Config::from_yaml(&format!("{PROVIDER}      colour: red\n"), &env(&[])).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("jwt.providers[0]") && text.contains("colour"),
        "{text}"
    );
    let err = Config::from_yaml("rate_limit:\n  default: lots\n", &env(&[])).unwrap_err();
    assert!(err.to_string().contains("rate_limit.default"), "{err}");
}

#[test]
fn validate_reports_every_error() {
    let yaml = r#"
jwt:
  default_provider: nobody
  leeway_secs: 9999
  providers:
    - name: a
      project_id: ""
    - name: a
      project_id: p
      keys: { type: url, url: "ftp://x" }
key_store: { type: file, path: "", reload_interval_ms: 0 }
key_cache: { ttl_secs: 60, max_stale_secs: 10 }
policy:
  tenantless_paths: ["/api/v1/orgs/create", "/a//b", "/a/../b", "no-slash", "/a?x=1", "/a%2Fb"]
headers: { tenant_id: X-Tenant, user_id: x-api-key, scopes: x-auth-method }
log: { level: "[[" }
"#;
    let got = paths(Config::from_yaml(yaml, &env(&[])).unwrap_err());
    let want = [
        "jwt.providers[0].project_id",
        "jwt.providers[1].name",
        "jwt.providers[1].keys.url",
        "jwt.default_provider",
        "jwt.leeway_secs",
        "key_store.path",
        "key_store.reload_interval_ms",
        "key_cache.max_stale_secs",
        "policy.tenantless_paths[1]",
        "policy.tenantless_paths[2]",
        "policy.tenantless_paths[3]",
        "policy.tenantless_paths[4]",
        "policy.tenantless_paths[5]",
        "headers.tenant_id",
        "headers.user_id",
        "headers.scopes",
        "log.level",
    ];
    for w in want {
        assert!(got.contains(&w.to_string()), "{w} missing from {got:?}");
    }
    assert_eq!(got.len(), want.len(), "{got:?}");
}

#[test]
fn environment_overrides_fields_with_their_types() {
    let c = Config::from_yaml(
        PROVIDER,
        &env(&[
            ("GYBC_AUTHZ__SERVER__GRPC_ADDR", "0.0.0.0:9000"),
            ("GYBC_AUTHZ__JWT__LEEWAY_SECS", "5"),
            ("GYBC_AUTHZ__POLICY__FORWARD_API_KEY", "true"),
            ("GYBC_AUTHZ__POLICY__TENANTLESS_PATHS", "[/a, /b]"),
            ("GYBC_AUTHZ__RATE_LIMIT__DEFAULT", "10/1s"),
            ("GYBC_AUTHZ__KEY_STORE__TYPE", "file"),
            ("GYBC_AUTHZ__KEY_STORE__PATH", "/etc/keys.yaml"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), "0.0.0.0:9000");
    assert_eq!(c.jwt.leeway_secs, 5);
    assert!(c.policy.forward_api_key);
    assert_eq!(c.policy.tenantless_paths, vec!["/a", "/b"]);
    assert_eq!(c.rate_limit.default.requests, 10);
    assert_eq!(
        c.key_store,
        KeyStoreConfig::File {
            path: "/etc/keys.yaml".into(),
            reload_interval_ms: DEFAULT_FILE_RELOAD_MS
        }
    );
    assert_eq!(c.jwt.providers.len(), 1, "the file's providers are kept");
}

#[test]
fn bad_overrides_are_errors_naming_the_variable_or_field() {
    let err = Config::from_yaml("", &env(&[("GYBC_AUTHZ__SERVER__NOPE", "1")])).unwrap_err();
    assert!(err.to_string().contains("server"), "{err}");
    let err = Config::from_yaml("", &env(&[("GYBC_AUTHZ__SERVER____X", "1")])).unwrap_err();
    assert!(err.to_string().contains("GYBC_AUTHZ__SERVER____X"), "{err}");
    let err = Config::from_yaml("", &env(&[("GYBC_AUTHZ__JWT__LEEWAY_SECS", "soon")])).unwrap_err();
    assert!(err.to_string().contains("jwt.leeway_secs"), "{err}");
}

#[test]
fn loading_a_missing_file_says_which() {
    let err = Config::load(Path::new("/nonexistent/gybc.yaml"), &env(&[])).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/gybc.yaml"));
}

#[test]
fn redis_section_is_required_by_its_users_and_checked() {
    let err = Config::from_yaml("key_store: { type: redis }\n", &env(&[])).unwrap_err();
    assert_eq!(paths(err), vec!["redis"]);
    let err = Config::from_yaml("rate_limit: { backend: redis }\n", &env(&[])).unwrap_err();
    assert_eq!(paths(err), vec!["redis"]);

    let yaml = r#"
redis:
  urls: ["redis://user:hunter2@r:6379", "http://r", "redis://r2"]
  password_file: /x
  password_env: Y
  key_prefix: ""
  timeout_ms: 0
"#;
    let got = paths(Config::from_yaml(yaml, &env(&[])).unwrap_err());
    for want in [
        "redis.urls",
        "redis.urls[0]",
        "redis.urls[1]",
        "redis.password_env",
        "redis.key_prefix",
        "redis.timeout_ms",
    ] {
        assert!(
            got.contains(&want.to_string()),
            "{want} missing from {got:?}"
        );
    }
    let err = Config::from_yaml("redis: { urls: [\"redis://u:p@r\"] }\n", &env(&[])).unwrap_err();
    assert!(
        !err.to_string().contains(":p@"),
        "the error names the field, not the password: {err}"
    );
}

#[test]
fn redis_password_comes_from_a_file_or_the_environment_and_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let yaml = format!(
        "redis: {{ urls: [\"rediss://r:6380\"], password_file: \"{}\" }}\nkey_store: {{ type: redis }}\nrate_limit: {{ backend: redis, failure_mode: fail_closed }}\n",
        pw.display()
    );
    let c = Config::from_yaml(&yaml, &env(&[])).unwrap();
    let r = c.redis.as_ref().unwrap();
    assert_eq!(r.password.as_ref().unwrap().expose(), "s3cret");
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "Debug never shows the password"
    );
    assert_eq!(c.rate_limit.failure_mode, FailureMode::FailClosed);

    let yaml = "redis: { urls: [\"redis://r\"], password_env: REDIS_PW }\n";
    let c = Config::from_yaml(yaml, &env(&[("REDIS_PW", "from-env")])).unwrap();
    assert_eq!(c.redis.unwrap().password.unwrap().expose(), "from-env");
    let err = Config::from_yaml(yaml, &env(&[])).unwrap_err();
    assert_eq!(paths(err), vec!["redis.password_env"]);
    let err = Config::from_yaml(
        "redis: { urls: [\"redis://r\"], password_file: /nonexistent/pw }\n",
        &env(&[]),
    )
    .unwrap_err();
    assert_eq!(paths(err), vec!["redis.password_file"]);
}

#[test]
fn header_count_cap_has_a_floor() {
    let c = Config::from_yaml("", &env(&[])).unwrap();
    assert_eq!(c.limits.max_headers, DEFAULT_MAX_HEADERS);
    let c = Config::from_yaml("limits: { max_headers: 16 }\n", &env(&[])).unwrap();
    assert_eq!(c.limits.max_headers, 16);
    let err = Config::from_yaml("limits: { max_headers: 15 }\n", &env(&[])).unwrap_err();
    assert_eq!(paths(err), vec!["limits.max_headers"]);
    let c = Config::from_yaml("", &env(&[("GYBC_AUTHZ__LIMITS__MAX_HEADERS", "64")])).unwrap();
    assert_eq!(c.limits.max_headers, 64);
}

#[test]
fn http_mode_reads_one_named_header_for_method_and_path() {
    let c = Config::from_yaml(
        "server: { http_authz: { addr: \"127.0.0.1:9191\" } }\n",
        &env(&[]),
    )
    .unwrap();
    let h = c.server.http_authz.unwrap();
    assert_eq!(
        (h.method_header.as_str(), h.uri_header.as_str()),
        (
            DEFAULT_HTTP_AUTHZ_METHOD_HEADER,
            DEFAULT_HTTP_AUTHZ_URI_HEADER
        )
    );
    let err = Config::from_yaml(
        "server: { http_authz: { addr: \"127.0.0.1:9191\", method_header: \"\", uri_header: X-Original-URI } }\n",
        &env(&[]),
    )
    .unwrap_err();
    assert_eq!(
        paths(err),
        vec![
            "server.http_authz.method_header",
            "server.http_authz.uri_header"
        ]
    );
}

#[test]
fn redis_sentinel_names_the_primary_with_credentials_of_its_own() {
    let yaml = r#"
redis:
  sentinel:
    master_name: gybc
    urls: ["redis://s1:26379", "redis://s2:26379", "redis://s3:26379"]
    username: watcher
    password_env: SENTINEL_PW
  username: app
  password_env: REDIS_PW
key_store: { type: redis }
"#;
    let c = Config::from_yaml(
        yaml,
        &env(&[("SENTINEL_PW", "s-secret"), ("REDIS_PW", "r-secret")]),
    )
    .unwrap();
    let r = c.redis.as_ref().unwrap();
    let s = r.sentinel.as_ref().unwrap();
    assert_eq!(s.master_name, "gybc");
    assert_eq!(s.urls.len(), 3);
    assert_eq!(s.username.as_deref(), Some("watcher"));
    assert_eq!(s.password.as_ref().unwrap().expose(), "s-secret");
    assert!(!s.data_nodes_tls);
    assert!(r.urls.is_empty());
    assert_eq!(r.password.as_ref().unwrap().expose(), "r-secret");
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("s-secret") && !debug.contains("r-secret"),
        "Debug never shows a password"
    );
    let err = Config::from_yaml(yaml, &env(&[("REDIS_PW", "r-secret")])).unwrap_err();
    assert_eq!(paths(err), vec!["redis.sentinel.password_env"]);

    // The whole section from the environment, as a Helm chart or a container sets it.
    let c = Config::from_yaml(
        "key_store: { type: redis }\n",
        &env(&[
            ("GYBC_AUTHZ__REDIS__SENTINEL__MASTER_NAME", "mymaster"),
            (
                "GYBC_AUTHZ__REDIS__SENTINEL__URLS",
                "[redis://a:26379, redis://b:26379]",
            ),
            ("GYBC_AUTHZ__REDIS__SENTINEL__DATA_NODES_TLS", "true"),
        ]),
    )
    .unwrap();
    let s = c.redis.unwrap().sentinel.unwrap();
    assert_eq!(s.master_name, "mymaster");
    assert_eq!(s.urls, ["redis://a:26379", "redis://b:26379"]);
    assert!(s.data_nodes_tls);
}

#[test]
fn redis_sentinel_is_checked_with_every_error_named() {
    let yaml = r#"
redis:
  urls: ["redis://r:6379"]
  cluster: true
  tls_ca_file: /ca.pem
  sentinel:
    master_name: "my master"
    urls: ["redis://:pw@s1:26379", "http://s2"]
    tls_ca_file: /ca.pem
    password_file: /pw
    password_env: PW
"#;
    let got = paths(Config::from_yaml(yaml, &env(&[])).unwrap_err());
    assert_eq!(
        got,
        [
            "redis.urls",
            "redis.cluster",
            "redis.sentinel.master_name",
            "redis.sentinel.urls[0]",
            "redis.sentinel.urls[1]",
            "redis.sentinel.tls_ca_file",
            "redis.sentinel.password_env",
            "redis.tls_ca_file",
        ]
    );
    let err = Config::from_yaml(
        "redis: { sentinel: { master_name: m, urls: [] } }\n",
        &env(&[]),
    )
    .unwrap_err();
    assert_eq!(paths(err), ["redis.sentinel.urls"]);
    let err = Config::from_yaml(
        "redis: { sentinel: { urls: [\"redis://s\"] } }\n",
        &env(&[]),
    )
    .unwrap_err();
    assert_eq!(paths(err), ["redis.sentinel"], "master_name is required");
    let err = Config::from_yaml("redis: { cluster: false }\n", &env(&[])).unwrap_err();
    assert_eq!(
        paths(err),
        ["redis.urls"],
        "a node, a cluster or the sentinels"
    );
    // A CA for the data nodes is fine once they speak TLS.
    Config::from_yaml(
        "redis: { tls_ca_file: /ca.pem, sentinel: { master_name: m, urls: [\"rediss://s:26380\"], tls_ca_file: /ca.pem, data_nodes_tls: true } }\n",
        &env(&[]),
    )
    .unwrap();
}

#[test]
fn redis_breaker_defaults_and_bounds() {
    let c = Config::from_yaml("redis: { urls: [\"redis://r:6379\"] }\n", &env(&[])).unwrap();
    let b = &c.redis.unwrap().breaker;
    assert_eq!(b, &BreakerConfig::default());
    assert_eq!(
        (b.failures, b.probe_interval_ms, b.max_probe_interval_ms),
        (3, 200, 500)
    );

    let yaml = "redis:\n  urls: [\"redis://r:6379\"]\n  breaker: { failures: 0, probe_interval_ms: 5, max_probe_interval_ms: 1 }\n";
    assert_eq!(
        paths(Config::from_yaml(yaml, &env(&[])).unwrap_err()),
        [
            "redis.breaker.failures",
            "redis.breaker.probe_interval_ms",
            "redis.breaker.max_probe_interval_ms"
        ]
    );
    let yaml = "redis:\n  urls: [\"redis://r:6379\"]\n  breaker: { failures: 101 }\n";
    assert_eq!(
        paths(Config::from_yaml(yaml, &env(&[])).unwrap_err()),
        ["redis.breaker.failures"]
    );
    let yaml = "redis:\n  urls: [\"redis://r:6379\"]\n  breaker: { failure: 3 }\n";
    assert_eq!(
        paths(Config::from_yaml(yaml, &env(&[])).unwrap_err()),
        ["redis.breaker.failure"]
    );
    // Overridable like every field.
    let c = Config::from_yaml(
        "redis: { urls: [\"redis://r:6379\"] }\n",
        &env(&[("GYBC_AUTHZ__REDIS__BREAKER__FAILURES", "5")]),
    )
    .unwrap();
    assert_eq!(c.redis.unwrap().breaker.failures, 5);
}

#[test]
fn deny_lines_per_sec_defaults_to_100_and_is_at_least_1() {
    let c = Config::from_yaml("", &env(&[])).unwrap();
    assert_eq!(c.log.deny_lines_per_sec, DEFAULT_DENY_LINES_PER_SEC);
    assert_eq!(c.log.deny_lines_per_sec, 100);
    let err = Config::from_yaml("log: { deny_lines_per_sec: 0 }\n", &env(&[])).unwrap_err();
    assert_eq!(paths(err), ["log.deny_lines_per_sec"]);
    let err = Config::from_yaml("log: { deny_lines_per_sec: -1 }\n", &env(&[])).unwrap_err();
    assert_eq!(paths(err), ["log.deny_lines_per_sec"]);
}

#[test]
fn tracing_export_is_off_by_default_and_fills_in_its_defaults() {
    assert_eq!(
        Config::from_yaml("", &env(&[])).unwrap().tracing_export,
        None
    );
    let c = Config::from_yaml(
        "tracing_export: { otlp_endpoint: \"http://otel-collector:4317\" }\n",
        &env(&[]),
    )
    .unwrap();
    assert_eq!(
        c.tracing_export,
        Some(TracingExportConfig {
            otlp_endpoint: "http://otel-collector:4317".into(),
            protocol: OtlpProtocol::Grpc,
            sample_ratio: DEFAULT_TRACE_SAMPLE_RATIO,
            service_name: DEFAULT_TRACE_SERVICE_NAME.into(),
            max_queue_spans: DEFAULT_TRACE_MAX_QUEUE_SPANS,
            max_batch_spans: DEFAULT_TRACE_MAX_BATCH_SPANS,
            batch_interval_ms: DEFAULT_TRACE_BATCH_INTERVAL_MS,
            export_timeout_ms: DEFAULT_TRACE_EXPORT_TIMEOUT_MS,
        })
    );
    // The environment can switch it on, as the chart does.
    let c = Config::from_yaml(
        "",
        &env(&[
            (
                "GYBC_AUTHZ__TRACING_EXPORT__OTLP_ENDPOINT",
                "https://otlp.example:4318",
            ),
            ("GYBC_AUTHZ__TRACING_EXPORT__PROTOCOL", "http"),
            ("GYBC_AUTHZ__TRACING_EXPORT__SAMPLE_RATIO", "0.25"),
        ]),
    )
    .unwrap();
    let t = c.tracing_export.unwrap();
    assert_eq!((t.protocol, t.sample_ratio), (OtlpProtocol::Http, 0.25));
}

#[test]
fn tracing_export_fields_are_checked_with_their_paths() {
    let err = Config::from_yaml("tracing_export: { protocol: grpc }\n", &env(&[])).unwrap_err();
    assert!(err.to_string().contains("otlp_endpoint"), "{err}");
    let err = Config::from_yaml(
        "tracing_export: { otlp_endpoint: \"http://c:4317\", protocol: thrift }\n",
        &env(&[]),
    )
    .unwrap_err();
    assert_eq!(paths(err), vec!["tracing_export.protocol"]);

    let yaml = r#"
tracing_export:
  otlp_endpoint: "http://user:secret@collector:4317/v1/traces"
  sample_ratio: 1.5
  service_name: ""
  max_queue_spans: 0
  max_batch_spans: 10
  batch_interval_ms: 0
  export_timeout_ms: 600000
"#;
    let err = Config::from_yaml(yaml, &env(&[])).unwrap_err();
    assert_eq!(
        paths(err),
        [
            "tracing_export.otlp_endpoint",
            "tracing_export.sample_ratio",
            "tracing_export.service_name",
            "tracing_export.max_queue_spans",
            "tracing_export.max_batch_spans",
            "tracing_export.batch_interval_ms",
            "tracing_export.export_timeout_ms",
        ]
    );

    for (endpoint, protocol, ok) in [
        ("http://collector:4317", "grpc", true),
        ("https://collector:4317/", "grpc", true),
        ("http://collector:4318", "http", true),
        ("https://otlp.example/custom/v1/traces", "http", true),
        ("http://collector:4317/v1/traces", "grpc", false),
        ("collector:4317", "grpc", false),
        ("grpc://collector:4317", "grpc", false),
        ("http://:4317", "grpc", false),
        ("http://collector:4318/v1/traces?key=1", "http", false),
        ("http://user:pw@collector:4318", "http", false),
        ("not a url", "http", false),
    ] {
        let yaml =
            format!("tracing_export: {{ otlp_endpoint: \"{endpoint}\", protocol: {protocol} }}\n");
        let result = Config::from_yaml(&yaml, &env(&[]));
        assert_eq!(result.is_ok(), ok, "{endpoint} ({protocol}): {result:?}");
        if let Err(e) = result {
            assert_eq!(paths(e), ["tracing_export.otlp_endpoint"], "{endpoint}");
        }
    }
}
