//! The HTTP authorization mode: the same decisions as the gRPC service over plain HTTP, first
//! directly (as Envoy's `http_service` or Traefik would ask), then through a real nginx with
//! `auth_request` carrying the identity upstream.

mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::any;
use support::*;

async fn http_env(source: &str) -> TestEnv {
    http_env_with(source, "").await
}

/// `extra`: more `server.http_authz` fields, as `, name: value` YAML flow pairs.
async fn http_env_with(source: &str, extra: &str) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        http_authz_yaml: Some(format!(
            "{{ addr: \"127.0.0.1:0\", source: {source}, path_prefix: \"/authz\"{extra} }}"
        )),
        ..Default::default()
    })
    .await
}

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

async fn ask(env: &TestEnv, path: &str, headers: &[(&str, &str)]) -> Answer {
    let addr = env
        .daemon
        .as_ref()
        .unwrap()
        .http_authz_addr
        .expect("HTTP mode is on");
    let mut req = reqwest::Client::new().get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: resp.text().await.unwrap(),
    }
}

#[tokio::test]
async fn direct_requests_get_the_same_decisions() {
    let env = http_env("direct").await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));

    let a = ask(
        &env,
        &format!("/authz{API_PATH}"),
        &[("authorization", &jwt), ("x-tenant-id", "spoofed")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-tenant-id"], TENANT);
    assert_eq!(a.headers["x-user-id"], "u1");
    assert_eq!(a.headers["x-auth-method"], "jwt");
    assert_eq!(
        a.headers["x-api-key-id"], "",
        "unset identity headers are sent empty"
    );
    assert!(a.body.is_empty());

    let a = ask(
        &env,
        &format!("/authz{API_PATH}"),
        &[("x-api-key", &env.keys.secret)],
    )
    .await;
    assert_eq!(
        (
            a.status,
            a.headers["x-ratelimit-limit"].as_str(),
            a.headers["x-ratelimit-remaining"].as_str()
        ),
        (200, "5", "4")
    );

    let d = ask(&env, &format!("/authz{API_PATH}"), &[]).await;
    assert_eq!(d.status, 401);
    assert_eq!(d.headers["content-type"], "application/json");
    assert_eq!(d.headers["www-authenticate"], "Bearer realm=\"gybc\"");
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["reason"], "missing_credentials");
    assert_eq!(d.headers["x-authz-reason"], "missing_credentials");

    // The path decides tenantless routes: the prefix is stripped, nothing else.
    let no_tenant = format!("Bearer {}", env.user_token("u2", None));
    assert_eq!(
        ask(
            &env,
            &format!("/authz{ORG_CREATE}"),
            &[("authorization", &no_tenant)]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        ask(
            &env,
            &format!("/authz{API_PATH}"),
            &[("authorization", &no_tenant)]
        )
        .await
        .status,
        403
    );
    // Duplicated credential headers are seen as such.
    let dup = reqwest::Client::new()
        .get(format!(
            "http://{}/authz{API_PATH}",
            env.daemon.as_ref().unwrap().http_authz_addr.unwrap()
        ))
        .header("x-api-key", &env.keys.secret)
        .header("x-api-key", &env.keys.impersonator)
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status().as_u16(), 400);
    env.stop().await;
}

#[tokio::test]
async fn forwarded_requests_take_method_and_path_from_the_proxy_headers() {
    let env = http_env("forwarded").await;
    let no_tenant = format!("Bearer {}", env.user_token("u2", None));
    for v in [format!("{ORG_CREATE}?a=1"), ORG_CREATE.to_owned()] {
        let a = ask(
            &env,
            "/auth",
            &[("authorization", &no_tenant), ("x-forwarded-uri", &v)],
        )
        .await;
        assert_eq!(a.status, 200, "x-forwarded-uri: {v}");
    }
    assert_eq!(
        ask(
            &env,
            "/auth",
            &[("authorization", &no_tenant), ("x-forwarded-uri", API_PATH)]
        )
        .await
        .status,
        403
    );
    // Only the configured header is read: another name is not a fallback (finding F1).
    let a = ask(
        &env,
        "/auth",
        &[
            ("authorization", &no_tenant),
            ("x-original-uri", ORG_CREATE),
        ],
    )
    .await;
    assert_eq!(
        (a.status, a.headers["x-authz-reason"].as_str()),
        (403, "tenant_required")
    );
    let d = ask(&env, "/auth", &[("x-api-key", &env.keys.limited)]).await;
    assert_eq!(d.status, 200);
    ask(&env, "/auth", &[("x-api-key", &env.keys.limited)]).await;
    let d = ask(&env, "/auth", &[("x-api-key", &env.keys.limited)]).await;
    assert_eq!(
        (
            d.status,
            d.headers["retry-after"].as_str(),
            d.headers["x-authz-status"].as_str()
        ),
        (429, "30", "429")
    );
    env.stop().await;

    // nginx configs that send X-Original-URI name it, and then only it is read.
    let env = http_env_with(
        "forwarded",
        ", method_header: x-original-method, uri_header: x-original-uri",
    )
    .await;
    let no_tenant = format!("Bearer {}", env.user_token("u2", None));
    let with = |h: &'static str, v: &'static str| {
        [("authorization", no_tenant.clone()), (h, v.to_owned())]
    };
    for (h, v, status) in [
        ("x-original-uri", ORG_CREATE, 200),
        ("x-original-uri", API_PATH, 403),
        ("x-forwarded-uri", ORG_CREATE, 403),
    ] {
        let headers = with(h, v);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            ask(&env, "/auth", &headers).await.status,
            status,
            "{h}: {v}"
        );
    }
    env.stop().await;
}

// === through nginx ===

/// The upstream: answers with the request headers it received, as JSON.
async fn echo_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let app = Router::new().fallback(any(|h: HeaderMap| async move {
        let m: BTreeMap<String, String> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        axum::Json(m)
    }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() }),
    )
}

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> String {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nginx not found: install it with `apt-get install nginx` (./scripts/test.sh does)");
}

/// nginx with the configuration documented in docs/proxies.md, rendered with test ports.
fn start_nginx(authz: std::net::SocketAddr, upstream: std::net::SocketAddr) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nginx/gybc-authz.conf"
    ))
    .unwrap();
    let server = doc
        .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
        .replace("127.0.0.1:9191", &authz.to_string())
        .replace("127.0.0.1:3000", &upstream.to_string());
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{server}\n}}\n"
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx_binary())
        .args([
            "-p",
            &d.to_string(),
            "-c",
            conf_path.to_str().unwrap(),
            "-e",
            &format!("{d}/error.log"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nginx starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not listen: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        child,
        port,
        _dir: dir,
    }
}

struct Client {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

async fn via_nginx(n: &Nginx, path: &str, headers: &[(&str, &str)]) -> Client {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}{path}", n.port))
        .body("{}");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    Client {
        status,
        headers,
        body: resp.text().await.unwrap(),
    }
}

fn upstream_saw(c: &Client) -> BTreeMap<String, String> {
    assert_eq!(c.status, 200, "expected the upstream's answer: {}", c.body);
    serde_json::from_str(&c.body).unwrap()
}

fn reason(c: &Client) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&c.body).unwrap_or_else(|e| panic!("{e}: {}", c.body));
    v["reason"].as_str().unwrap().to_owned()
}

const SPOOFS: [(&str, &str); 6] = [
    ("x-tenant-id", "spoofed"),
    ("x-user-id", "spoofed"),
    ("x-auth-method", "spoofed"),
    ("x-api-key-id", "spoofed"),
    ("x-scopes", "spoofed"),
    ("x-impersonated-by", "spoofed"),
];

#[tokio::test]
async fn nginx_auth_request_carries_the_decisions() {
    let env = http_env("forwarded").await;
    let (up, _task) = echo_upstream().await;
    let nginx = start_nginx(env.daemon.as_ref().unwrap().http_authz_addr.unwrap(), up);
    let jwt = format!("Bearer {}", env.user_token("user_abc", Some(TENANT)));
    let spoofed = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        SPOOFS
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .chain(extra.iter().cloned())
            .collect()
    };
    let send = async |h: Vec<(&'static str, String)>, path: &str| {
        let hr: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        via_nginx(&nginx, path, &hr).await
    };

    // JWT: identity from the token, every spoofed header replaced or removed.
    let saw = upstream_saw(&send(spoofed(&[("authorization", jwt.clone())]), API_PATH).await);
    assert_eq!(saw["x-tenant-id"], TENANT);
    assert_eq!(saw["x-user-id"], "user_abc");
    assert_eq!(saw["x-auth-method"], "jwt");
    for k in ["x-api-key-id", "x-scopes", "x-impersonated-by"] {
        assert!(
            !saw.contains_key(k),
            "{k} must not reach the upstream: {saw:?}"
        );
    }

    // Secret key impersonating: the consumed headers never reach the upstream.
    let c = send(
        spoofed(&[
            ("x-api-key", env.keys.impersonator.clone()),
            ("x-on-behalf-of", "user_9".into()),
        ]),
        API_PATH,
    )
    .await;
    assert_eq!(
        c.headers["x-ratelimit-limit"], "100",
        "rate-limit headers reach the client"
    );
    let saw = upstream_saw(&c);
    assert_eq!(saw["x-user-id"], "user_9");
    assert_eq!(saw["x-impersonated-by"], "key_impersonator");
    assert_eq!(saw["x-api-key-id"], "key_impersonator");
    assert!(
        !saw.contains_key("x-api-key") && !saw.contains_key("x-on-behalf-of"),
        "{saw:?}"
    );

    // Secret key, no user: the spoofed x-user-id is gone.
    let saw =
        upstream_saw(&send(spoofed(&[("x-api-key", env.keys.secret.clone())]), API_PATH).await);
    assert!(
        !saw.contains_key("x-user-id") && saw["x-tenant-id"] == TENANT,
        "{saw:?}"
    );

    // Denials, with their statuses, JSON bodies and headers.
    let c = via_nginx(&nginx, API_PATH, &[]).await;
    assert_eq!(
        (c.status, reason(&c).as_str()),
        (401, "missing_credentials")
    );
    assert_eq!(c.headers["content-type"], "application/json");
    let c = via_nginx(&nginx, API_PATH, &[("authorization", "Bearer a.b.c")]).await;
    assert_eq!((c.status, reason(&c).as_str()), (401, "invalid_token"));
    assert!(c.headers["www-authenticate"].contains("invalid_token"));
    let no_tenant = format!("Bearer {}", env.user_token("u2", None));
    let c = via_nginx(&nginx, API_PATH, &[("authorization", &no_tenant)]).await;
    assert_eq!((c.status, reason(&c).as_str()), (403, "tenant_required"));
    let saw = upstream_saw(
        &via_nginx(
            &nginx,
            ORG_CREATE,
            &[("authorization", &no_tenant), ("x-tenant-id", "spoofed")],
        )
        .await,
    );
    assert!(!saw.contains_key("x-tenant-id"), "{saw:?}");
    let c = via_nginx(
        &nginx,
        API_PATH,
        &[("x-api-key", &env.keys.secret), ("authorization", &jwt)],
    )
    .await;
    assert_eq!(
        (c.status, reason(&c).as_str()),
        (400, "ambiguous_credentials")
    );
    for _ in 0..2 {
        upstream_saw(&via_nginx(&nginx, API_PATH, &[("x-api-key", &env.keys.limited)]).await);
    }
    let c = via_nginx(&nginx, API_PATH, &[("x-api-key", &env.keys.limited)]).await;
    assert_eq!((c.status, reason(&c).as_str()), (429, "rate_limited"));
    assert_eq!(c.headers["retry-after"], "30");
    assert_eq!(c.headers["x-ratelimit-remaining"], "0");
    env.stop().await;
}

/// Finding F1 (docs/security.md): a client's own `X-Forwarded-Uri` or `X-Original-URI` must not
/// decide the path behind nginx, or a user without a tenant passes the tenantless-path rule on any
/// path.
#[tokio::test]
async fn a_client_cannot_choose_the_path_behind_nginx() {
    let env = http_env("forwarded").await;
    let (up, _task) = echo_upstream().await;
    let nginx = start_nginx(env.daemon.as_ref().unwrap().http_authz_addr.unwrap(), up);
    let no_tenant = format!("Bearer {}", env.user_token("u2", None));
    for spoof in ["x-forwarded-uri", "x-original-uri"] {
        let c = via_nginx(
            &nginx,
            API_PATH,
            &[("authorization", &no_tenant), (spoof, ORG_CREATE)],
        )
        .await;
        assert_eq!(
            c.status, 403,
            "{spoof} chose the path: the upstream saw {}",
            c.body
        );
        assert_eq!(reason(&c), "tenant_required");
    }
    env.stop().await;
}
