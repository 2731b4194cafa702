//! Real `redis-server` processes on ephemeral loopback ports: single nodes that can be killed and
//! restarted on the same port, local Redis Clusters (with or without replicas), and a Sentinel
//! setup (a primary, a replica and three real `redis-sentinel`s). Missing binaries fail loudly.

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
const SENTINEL_HINT: &str = "redis-sentinel not found: install it with `apt-get install redis-sentinel` (./scripts/test.sh does)";

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

/// One node of `CLUSTER NODES`: its port, flags (`master`, `slave`, `fail`, …) and slot ranges.
struct NodeLine {
    port: u16,
    flags: String,
    ranges: Vec<(u16, u16)>,
}

/// A local Redis Cluster: `n` primaries without replicas (`start`), or shards of a primary and
/// its replicas (`start_with_replicas`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        Self::start_with_replicas(n, 0, 2000)
    }

    /// `primaries` shards of one primary and `replicas` replicas each; a node that does not
    /// answer for `node_timeout_ms` is failed over.
    pub fn start_with_replicas(primaries: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
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
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not reach state ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let cluster = Self { nodes };
        // Every replica known to every node and in sync: a failover needs both.
        for (i, node) in cluster.nodes.iter().enumerate() {
            if cluster.is_replica(i) {
                while !node
                    .cli(&["INFO", "replication"])
                    .contains("master_link_status:up")
                {
                    assert!(Instant::now() < deadline, "replica {i} did not sync");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        cluster
    }

    /// `CLUSTER NODES` as one node sees it.
    fn layout(&self, asking: usize) -> Vec<NodeLine> {
        self.nodes[asking]
            .cli(&["CLUSTER", "NODES"])
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let ranges = f
                    .iter()
                    .skip(8)
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| match r.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                Some(NodeLine {
                    port,
                    flags: f.get(2)?.to_string(),
                    ranges,
                })
            })
            .collect()
    }

    fn is_replica(&self, i: usize) -> bool {
        self.nodes[i].cli(&["ROLE"]).starts_with("slave")
    }

    /// The node that is the primary of `slot` now, asked of node `asking` (a live one).
    pub fn primary_of(&self, slot: u16, asking: usize) -> Option<usize> {
        let port = self
            .layout(asking)
            .into_iter()
            .find(|n| {
                n.flags.contains("master")
                    && !n.flags.contains("fail")
                    && n.ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })?
            .port;
        self.nodes.iter().position(|n| n.port == port)
    }

    /// The slot of a key name.
    pub fn slot(&self, name: &str) -> u16 {
        self.nodes
            .iter()
            .find_map(|n| n.cli(&["CLUSTER", "KEYSLOT", name]).parse().ok())
            .expect("a node answers CLUSTER KEYSLOT")
    }

    /// Node `i`'s own `ROLE` (`master` / `slave`) and, for a replica, whether it is in sync.
    pub fn role(&self, i: usize) -> (String, bool) {
        let role = self.nodes[i].cli(&["ROLE"]);
        let synced = self.nodes[i]
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up");
        (role.lines().next().unwrap_or("").to_owned(), synced)
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// `redis-cli -c` against the first node: follows MOVED redirects.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_via(0, args)
    }

    /// `redis-cli -c` against node `i`.
    pub fn cli_via(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[i].port.to_string(),
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

// === Sentinel ===

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "gybc-primary";

/// One `redis-sentinel`, stopped on drop.
pub struct Sentinel {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Sentinel {
    fn start(primary_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        // Low timeouts, so a failover takes seconds: down after 1 s without an answer.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 6000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{SENTINEL_HINT} ({e})"));
        wait_for_ping(port);
        Self {
            port,
            _dir: dir,
            child,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = redis_cli(self.port, args).unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `SENTINEL MASTER`'s fields.
    fn master_info(&self) -> std::collections::BTreeMap<String, String> {
        let lines: Vec<String> = self
            .cli(&["SENTINEL", "MASTER", MASTER_NAME])
            .lines()
            .map(str::to_owned)
            .collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A primary (`nodes[0]` at first), its replica (`nodes[1]`) and three sentinels watching them,
/// quorum two, all real processes.
pub struct SentinelSet {
    pub nodes: Vec<RedisServer>,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica_of = primary.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &replica_of]);
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(primary.port)).collect();
        let set = Self {
            nodes: vec![primary, replica],
            sentinels,
        };
        // Each sentinel must know the replica (to promote it) and the other two (to agree), and
        // the replica must be in sync, before a failover can work.
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in &set.sentinels {
            loop {
                let m = s.master_info();
                let n = |k: &str| m.get(k).map(String::as_str).unwrap_or("0").to_owned();
                if n("num-slaves") == "1" && n("num-other-sentinels") == "2" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinel {} never saw the replica and its peers: {m:?}",
                    s.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        set.wait_replica_synced(1, Duration::from_secs(20));
        set
    }

    /// The sentinels' URLs, for `redis.sentinel.urls`.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::url).collect()
    }

    /// The port of the primary the first sentinel that answers names.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let out = s.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]);
            out.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// The index of the node the sentinels name as the primary.
    pub fn primary(&self) -> usize {
        let port = self.primary_port().expect("a sentinel names a primary");
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }

    /// Waits until node `i` is a replica with its link to a primary up.
    pub fn wait_replica_synced(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let info = self.nodes[i].cli(&["INFO", "replication"]);
            if info.contains("role:slave") && info.contains("master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} is not a synced replica after {within:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// === what the key service does ===

/// Daemon options for a Redis key store and the Redis rate limiter on `urls`.
pub fn redis_yaml(urls: &[String], cluster: bool, failure_mode: &str) -> EnvOptions {
    let urls = yaml_list(urls);
    EnvOptions {
        key_store_yaml: Some("key_store: { type: redis }".into()),
        extra_yaml: format!(
            "redis: {{ urls: [{urls}], cluster: {cluster}, timeout_ms: 200, connect_timeout_ms: 300 }}\nrate_limit: {{ backend: redis, failure_mode: {failure_mode} }}\n"
        ),
        ..Default::default()
    }
}

/// URLs as the items of a YAML flow list: `"redis://a", "redis://b"`.
pub fn yaml_list(urls: &[String]) -> String {
    urls.iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ")
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
