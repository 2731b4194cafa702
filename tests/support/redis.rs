//! Real `redis-server` processes on ephemeral loopback ports: single nodes that can be killed and
//! restarted on the same port, and a local 3-node Redis Cluster. Missing binaries fail loudly.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use gybc_authz_engine::proto::v1::KeyEventType;
use gybc_authz_engine::redis_conn::Names;
use gybc_authz_engine::store::KeyRecord;
use gybc_authz_engine::store::redis::{encode_event, encode_record};

use super::EnvOptions;

const INSTALL_HINT: &str = "redis-server / redis-cli not found: install them with `apt-get install redis-server redis-tools` (./scripts/test.sh does)";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
}

fn wait_for_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(out) = redis_cli(port, &["PING"])
            && String::from_utf8_lossy(&out.stdout).contains("PONG")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer PING within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `redis-server`, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
    /// TLS only (`--port 0 --tls-port <port>`), with the certificates of tests/fixtures/redis-tls.
    tls: bool,
}

/// tests/fixtures/redis-tls: a test CA and a server certificate for 127.0.0.1.
pub fn tls_fixture(file: &str) -> String {
    format!(
        "{}/tests/fixtures/redis-tls/{file}",
        env!("CARGO_MANIFEST_DIR")
    )
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            tls: false,
        };
        s.spawn();
        s
    }

    /// A TLS-only server: clients must use `rediss://` and trust the fixture CA.
    pub fn start_tls() -> Self {
        let mut s = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: Vec::new(),
            child: None,
            tls: true,
        };
        s.spawn();
        s
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        if self.tls {
            let port = self.port.to_string();
            let (cert, key, ca) = (
                tls_fixture("server.crt"),
                tls_fixture("server.key"),
                tls_fixture("ca.crt"),
            );
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args([
                    "--tls-cert-file",
                    &cert,
                    "--tls-key-file",
                    &key,
                    "--tls-ca-cert-file",
                    &ca,
                    "--tls-auth-clients",
                    "no",
                ])
                .args(["--dir", self.dir.path().to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = Command::new("redis-cli")
                    .args([
                        "--tls",
                        "--cacert",
                        &ca,
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port,
                        "PING",
                    ])
                    .output();
                if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG")) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "TLS redis-server did not answer PING"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        self.child = Some(child);
        wait_for_ping(self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no goodbye to the clients, as a crash or a network cut would look.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = redis_cli(self.port, args).unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `redis-cli -x <args>`: the last argument read from stdin, byte for byte.
    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-x"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local Redis Cluster of `n` masters, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not reach state ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// `redis-cli -c` against the first node: follows MOVED redirects.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[0].port.to_string(),
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

// === what the key service does ===

/// Daemon options for a Redis key store and the Redis rate limiter on `urls`.
pub fn redis_yaml(urls: &[String], cluster: bool, failure_mode: &str) -> EnvOptions {
    let urls = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    EnvOptions {
        key_store_yaml: Some("key_store: { type: redis }".into()),
        extra_yaml: format!(
            "redis: {{ urls: [{urls}], cluster: {cluster}, timeout_ms: 200, connect_timeout_ms: 300 }}\nrate_limit: {{ backend: redis, failure_mode: {failure_mode} }}\n"
        ),
        ..Default::default()
    }
}

pub async fn seed(url: &str, records: &[KeyRecord]) {
    let mut c = ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let names = Names::new("gybc");
    for r in records {
        let _: () = c.set(names.key(&r.hash), encode_record(r)).await.unwrap();
    }
}

pub async fn seed_cluster(urls: &[String], records: &[KeyRecord]) {
    let client = ::redis::cluster::ClusterClient::new(urls.to_vec()).unwrap();
    let mut c = client.get_async_connection().await.unwrap();
    let names = Names::new("gybc");
    for r in records {
        let _: () = c.set(names.key(&r.hash), encode_record(r)).await.unwrap();
    }
}

/// What the key service does to revoke: write the revoked record, then publish the event.
pub async fn revoke(url: &str, record: &KeyRecord) {
    let mut revoked = record.clone();
    revoked.status = gybc_authz_engine::store::KeyStatus::Revoked;
    seed(url, &[revoked]).await;
    let mut c = ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = c
        .publish(
            Names::new("gybc").events_channel(),
            encode_event(&record.hash, KeyEventType::Revoked),
        )
        .await
        .unwrap();
}
