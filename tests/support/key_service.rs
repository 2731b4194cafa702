//! The real `gybc-authz key-service` process on ephemeral loopback ports (the API and its admin
//! port), over a key file or a real Redis, with its log captured; requests with the identity
//! headers gybc-authz would set; its `/readyz` and `/metrics`; and a snapshot of a store to prove
//! that a refused request wrote nothing.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PREFIX: &str = "/api/v1/iam/api-keys";

/// Where the keys live: a key file, or a Redis URL.
#[derive(Clone, Debug)]
pub enum Backend {
    File(PathBuf),
    Redis(String),
}

impl Backend {
    /// The `key_store` (and `redis`) lines of a config for this backend.
    pub fn yaml(&self) -> String {
        match self {
            Backend::File(p) => format!(
                "key_store: {{ type: file, path: \"{}\", reload_interval_ms: 50 }}\n",
                p.display()
            ),
            Backend::Redis(url) => {
                format!("key_store: {{ type: redis }}\nredis: {{ urls: [\"{url}\"] }}\n")
            }
        }
    }

    /// Everything the store holds, in a comparable form: the key file's (and idempotency file's)
    /// bytes, or every Redis name with its value.
    pub fn snapshot(&self) -> String {
        match self {
            Backend::File(p) => {
                let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
                let mut idem = p.as_os_str().to_owned();
                idem.push(".idempotency.json");
                format!("{}\n--\n{}", read(p), read(Path::new(&idem)))
            }
            Backend::Redis(url) => {
                let client = ::redis::Client::open(url.as_str()).unwrap();
                let mut c = client.get_connection().unwrap();
                let mut names: Vec<String> = ::redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
                names.sort();
                let mut out = String::new();
                for n in names {
                    let kind: String = ::redis::cmd("TYPE").arg(&n).query(&mut c).unwrap();
                    let value = match kind.as_str() {
                        "string" => {
                            let v: Vec<u8> = ::redis::cmd("GET").arg(&n).query(&mut c).unwrap();
                            hex::encode(v)
                        }
                        "hash" => {
                            let mut v: Vec<String> =
                                ::redis::cmd("HGETALL").arg(&n).query(&mut c).unwrap();
                            v.sort();
                            v.join(",")
                        }
                        "zset" => {
                            let v: Vec<String> = ::redis::cmd("ZRANGE")
                                .arg(&n)
                                .arg(0)
                                .arg(-1)
                                .arg("WITHSCORES")
                                .query(&mut c)
                                .unwrap();
                            v.join(",")
                        }
                        other => other.to_owned(),
                    };
                    out.push_str(&format!("{n}={value}\n"));
                }
                out
            }
        }
    }
}

/// A running key service; killed on drop.
pub struct KeyService {
    pub addr: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub config: PathBuf,
}

/// The identity headers gybc-authz sets, as a caller of the key service has them.
#[derive(Clone, Debug, Default)]
pub struct Who(pub Vec<(&'static str, String)>);

impl Who {
    /// A user of `tenant`, signed in with a JWT.
    pub fn user(tenant: &str, user: &str) -> Self {
        Who(vec![
            ("x-auth-method", "jwt".into()),
            ("x-tenant-id", tenant.into()),
            ("x-user-id", user.into()),
        ])
    }

    /// A secret key of `tenant` with these scopes.
    pub fn key(tenant: &str, key_id: &str, scopes: &str) -> Self {
        Who(vec![
            ("x-auth-method", "api_key".into()),
            ("x-tenant-id", tenant.into()),
            ("x-api-key-id", key_id.into()),
            ("x-scopes", scopes.into()),
        ])
    }

    /// No identity headers at all: a request that did not come through gybc-authz.
    pub fn nobody() -> Self {
        Who(vec![])
    }

    pub fn with(mut self, name: &'static str, value: &str) -> Self {
        self.0.push((name, value.into()));
        self
    }
}

/// An answer: status, headers and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// The field a 400 names.
    pub fn field(&self) -> &str {
        self.body["field"].as_str().unwrap_or("")
    }
}

impl KeyService {
    /// Writes a config for `backend` in `dir` and starts the service.
    pub fn start(dir: &Path, backend: &Backend, extra_args: &[&str]) -> Self {
        Self::start_with(dir, backend, "", extra_args, &[])
    }

    /// The same with `key_service` fields (a YAML flow mapping's entries, e.g.
    /// `max_active_keys_per_tenant: 3`), flags and environment variables of its own.
    pub fn start_with(
        dir: &Path,
        backend: &Backend,
        key_service: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let config = Self::write_config(dir, backend, key_service);
        Self::start_with_config(&config, extra_args, env)
    }

    /// The config `start_with` runs: the store, a JWT provider, and the `key_service` section
    /// with its admin port on a free loopback port.
    pub fn write_config(dir: &Path, backend: &Backend, key_service: &str) -> PathBuf {
        let config = dir.join("key-service.yaml");
        let sep = if key_service.is_empty() { "" } else { ", " };
        std::fs::write(
            &config,
            format!(
                "{}jwt:\n  providers:\n    - {{ name: endusers, project_id: {} }}\nkey_service: {{ admin_addr: \"127.0.0.1:0\"{sep}{key_service} }}\n",
                backend.yaml(),
                super::APP_PROJECT
            ),
        )
        .unwrap();
        config
    }

    pub fn start_with_config(config: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
            .args(["key-service", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .args(extra_args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("Key service listening") {
                        let v: Value = serde_json::from_str(&line).unwrap_or_default();
                        let addr = |f: &str| v[f].as_str().unwrap_or_default().to_owned();
                        let _ = tx.send((addr("addr"), addr("admin_addr")));
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let (addr, admin_addr) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "the key service did not start: {}",
                    log.lock().unwrap().join("\n")
                )
            });
        KeyService {
            addr: addr.parse().expect("an address"),
            admin_addr: admin_addr.parse().expect("an admin address"),
            child,
            log,
            config: config.to_owned(),
        }
    }

    pub fn url(&self, method: &str) -> String {
        format!("http://{}{PREFIX}/{method}", self.addr)
    }

    pub async fn call(&self, method: &str, who: &Who, body: &str) -> Answer {
        self.call_with(method, who, &[], body).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        who: &Who,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        call(
            &reqwest::Client::new(),
            &self.url(method),
            who,
            headers,
            body,
        )
        .await
    }

    /// `GET <path>` on the admin port: status and body.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}{path}", self.admin_addr))
            .await
            .expect("the admin port answers");
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// The admin port's `/metrics`.
    pub async fn metrics(&self) -> super::Metrics {
        let (status, text) = self.admin("/metrics").await;
        assert_eq!(status, 200, "{text}");
        super::Metrics(text)
    }

    /// Polls `/readyz` until it answers `status`.
    pub async fn wait_readyz(&self, status: u16, within: Duration) {
        super::wait_until(
            &format!("the key service's /readyz answers {status}"),
            within,
            async || self.admin("/readyz").await.0 == status,
        )
        .await;
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The audit lines so far, parsed.
    pub fn audit(&self) -> Vec<Value> {
        self.log()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["audit"] == true)
            .collect()
    }

    /// Waits until `n` audit lines were written (they are written before the answer is sent, but
    /// read from the pipe by another thread).
    pub fn wait_audit(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let a = self.audit();
            if a.len() >= n || Instant::now() > deadline {
                return a;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KeyService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One POST with `who`'s identity headers and any others.
pub async fn call(
    client: &reqwest::Client,
    url: &str,
    who: &Who,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in &who.0 {
        req = req.header(*k, v);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("the key service answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

/// Every metric family the key service's `/metrics` has (its registry gives every family a
/// series from the start).
pub fn families() -> std::collections::BTreeSet<String> {
    use gybc_authz::keyservice::{http::Method, metrics::Metrics};
    super::Metrics(Metrics::new(&Method::ALL.map(Method::name)).render()).names()
}

/// A usage bucket or total as either reader writes it: the key service's protojson (int64 as
/// strings, `rateLimited`) or the CLI's JSON (numbers, `rate_limited`); `rate_limited` names
/// the field.
pub fn usage_counts(v: &Value, rate_limited: &str) -> gybc_authz_engine::usage::Counts {
    let n = |f: &str| match &v[f] {
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_u64().unwrap(),
        Value::Null => 0,
        other => panic!("{f} is {other}"),
    };
    gybc_authz_engine::usage::Counts {
        allowed: n("allowed"),
        rate_limited: n(rate_limited),
        denied: n("denied"),
    }
}
