//! What only the module mode has, through the real Envoy 1.40 with the engine loaded into it: a
//! panic inside the engine is one 503 and Envoy keeps serving; a bad config fails Envoy's config
//! load with the field paths `check-config` prints; nothing is allowed before the signing keys
//! have loaded; the engine's metric families on Envoy's `/stats/prometheus`; the daemon's decision
//! lines in Envoy's log; and the shipped `deploy/envoy/envoy-module.yaml` is the sidecar config
//! with the module in ext_authz's place. The decision table, spoofing, per-route settings and
//! Redis run in both modes in `envoy_e2e.rs`, `envoy_routes.rs` and `envoy_redis.rs`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gybc_authz_engine::clock::Clock;
use support::envoy::*;
use support::*;

/// `envoy --mode validate` on `cfg`, with the module's test build on the search path; its output.
fn validate(cfg: &EnvoyConfig) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, cfg.to_yaml()).unwrap();
    let out = Command::new(envoy_bin())
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", test_module_dir())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_panic_inside_the_engine_answers_503_and_envoy_keeps_serving() {
    let s = Stack::start(Mode::Module).await;
    let key = s.env.keys.secret.clone();
    // The first panics while the worker decides inline; the second after the decision has
    // waited once, on the engine's runtime, and comes back to the worker through the scheduler.
    for path in ["/__gybc_test/panic", "/__gybc_test/panic-after-io"] {
        let r = s.post(path, &[("x-api-key", &key)]).await;
        r.denied(503, "unavailable");
        assert!(r.header("retry-after").is_some(), "{r:?}");
    }
    // Envoy and the engine both still serve.
    s.post(API_PATH, &[("x-api-key", &key)]).await.allowed();
    wait_until("both panics counted", Duration::from_secs(10), async || {
        s.metric("gybc_authz_panics_total", &[]).await == 2.0
    })
    .await;
    assert!(
        s.envoy
            .log()
            .contains("test hook: a panic inside the engine"),
        "the panic's message is in Envoy's log"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_bad_config_fails_envoys_config_load_with_check_configs_field_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gybc-authz.yaml");
    std::fs::write(
        &file,
        "jwt: { leeway_secs: 99999 }\nlimits: { max_headers: 1 }\n",
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let check = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(check.contains("jwt.leeway_secs") && check.contains("limits.max_headers"));

    // By path: the same lines, word for word.
    let (ok, out) = validate(&EnvoyConfig::shipped().into_module(&file));
    assert!(!ok, "Envoy accepted a bad config:\n{out}");
    for line in check.lines().filter(|l| !l.trim().is_empty()) {
        assert!(out.contains(line.trim()), "`{line}` missing from:\n{out}");
    }
    // Inline YAML: the same field paths.
    let mut inline = EnvoyConfig::shipped().into_module(&file);
    let filters = inline.ingress_hcm()["http_filters"]
        .as_sequence_mut()
        .unwrap();
    let module = filters
        .iter_mut()
        .find(|f| f["name"].as_str() == Some(MODULE_FILTER))
        .unwrap();
    module["typed_config"]["filter_config"]["value"] = "jwt: { leeway_secs: 99999 }\n".into();
    let (ok, out) = validate(&inline);
    assert!(!ok && out.contains("jwt.leeway_secs"), "{out}");
    // And a good one loads.
    std::fs::write(&file, "jwt: { leeway_secs: 30 }\n").unwrap();
    let (ok, out) = validate(&EnvoyConfig::shipped().into_module(&file));
    assert!(ok, "{out}");
}

#[tokio::test]
async fn before_the_signing_keys_load_every_request_is_503_never_an_allow() {
    let s = Stack::start(Mode::Module).await;
    // A second Envoy whose engine starts while the dashboard's key endpoint is down.
    s.env.dashboard_keys.set_failing(true);
    let path = s.env.dir.path().join("gybc-authz.yaml");
    let cfg = EnvoyConfig::shipped()
        .on_loopback(s.env.daemon.as_ref().unwrap().grpc_addr, s.upstream.addr);
    let cold = Envoy::start_module(&cfg.into_module(&path), s.env.clock.now_nanos()).await;
    let key = s.env.keys.secret.clone();
    let send = async |envoy: &Envoy| {
        send(
            &s.http,
            envoy,
            &s.upstream,
            "POST",
            API_PATH,
            &[("x-api-key", &key)],
        )
        .await
    };
    // An API key needs no signing key, but the engine is not ready until all have loaded.
    for _ in 0..3 {
        send(&cold).await.denied(503, "unavailable");
    }
    s.env.dashboard_keys.set_failing(false);
    wait_until(
        "the cold engine serves",
        Duration::from_secs(20),
        async || send(&cold).await.status == 200,
    )
    .await;
    send(&cold).await.allowed();
    drop(cold);
    s.stop().await;
}

#[tokio::test]
async fn the_engines_metric_families_are_envoy_stats_and_its_decision_lines_envoys_log() {
    let s = Stack::start(Mode::Module).await;
    let key = s.env.keys.secret.clone();
    for _ in 0..3 {
        s.post(API_PATH, &[("x-api-key", &key)]).await.allowed();
    }
    s.post(API_PATH, &[])
        .await
        .denied(401, "missing_credentials");
    let allowed = [
        ("method", "api_key"),
        ("outcome", "allow"),
        ("reason", "ok"),
    ];
    wait_until("allows counted", Duration::from_secs(10), async || {
        s.metric("gybc_authz_decisions_total", &allowed).await == 3.0
    })
    .await;

    // Every family the daemon serves is on Envoy's page too, behind Envoy's prefix; the check
    // latency is Envoy's own histogram, in microseconds.
    // (Histograms reach Envoy's page at its next stats flush, within about 5 s.)
    let daemon = scrape(&s.env).await.names();
    let missing = async || {
        let envoy = s.envoy.stats().await.names();
        daemon
            .iter()
            .filter(|n| n.starts_with("gybc_authz_"))
            .map(
                |family| match family.strip_prefix("gybc_authz_check_duration_seconds") {
                    Some(part) => format!("envoy_gybc_authz_check_duration_microseconds{part}"),
                    None => format!("envoy_{family}"),
                },
            )
            .filter(|want| !envoy.contains(want))
            .collect::<Vec<_>>()
    };
    let mut left = Vec::new();
    for _ in 0..30 {
        s.post(API_PATH, &[]).await;
        left = missing().await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(left.is_empty(), "missing from Envoy's stats: {left:?}");

    // The daemon's decision lines, in Envoy's log, without the key.
    let log = s.envoy.log();
    let decisions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gybc_authz::decision"))
        .collect();
    assert!(
        decisions.iter().any(|l| l.contains("\"outcome\":\"allow\"")
            && l.contains("\"key_id\":\"key_secret\"")),
        "{log}"
    );
    assert!(
        decisions
            .iter()
            .any(|l| l.contains("\"reason\":\"missing_credentials\"")),
        "{log}"
    );
    assert!(!log.contains(&key), "a key in Envoy's log");
    s.stop().await;
}

#[tokio::test]
async fn the_shipped_module_config_is_the_sidecar_config_with_the_module_in_place() {
    let shipped = EnvoyConfig::load(&deploy_envoy_path("envoy-module.yaml"));
    let derived = EnvoyConfig::shipped().into_module(Path::new("/etc/gybc-authz/config.yaml"));
    assert_eq!(
        shipped.to_yaml(),
        derived.to_yaml(),
        "deploy/envoy/envoy-module.yaml drifted from deploy/envoy/envoy.yaml"
    );
}
