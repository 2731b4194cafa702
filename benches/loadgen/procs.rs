//! The processes under test: the daemon, the no-op floor and redis-server, started and stopped.

use super::*;

/// A child process, killed (by its own pid) when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) name: String,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A plain HTTP/1.1 GET: status and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Res<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub(crate) struct Daemon {
    pub(crate) proc: Proc,
    pub(crate) grpc: SocketAddr,
    /// From spawn to `/readyz` answering 200.
    pub(crate) ready_after: Duration,
}

/// Starts `gybc-authz serve --config` with stderr to `log`; waits for `Listening.` then `/readyz`.
pub(crate) fn start_daemon(bin: &Path, config: &Path, log: &Path) -> Res<Daemon> {
    start_daemon_wrapped(&[], bin, config, log)
}

/// `start_daemon` under a wrapper command (`valgrind --tool=callgrind …`).
pub(crate) fn start_daemon_wrapped(
    wrapper: &[String],
    bin: &Path,
    config: &Path,
    log: &Path,
) -> Res<Daemon> {
    let started = Instant::now();
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = cmd
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut proc = Proc {
        child,
        name: "gybc-authz".into(),
    };
    let limit = Duration::from_secs(600);
    let (grpc, http) = loop {
        if let Some(addrs) = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "Listening.")
            .and_then(|v| {
                Some((
                    v["grpc_addr"].as_str()?.parse::<SocketAddr>().ok()?,
                    v["http_addr"].as_str()?.parse::<SocketAddr>().ok()?,
                ))
            })
        {
            break addrs;
        }
        if proc.exited() || started.elapsed() > limit {
            return Err(format!("{} did not start:\n{}", proc.name, tail(log)).into());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    loop {
        if matches!(http_get(http, "/readyz"), Ok((200, _))) {
            break;
        }
        if proc.exited() || started.elapsed() > limit {
            return Err(format!("gybc-authz never became ready:\n{}", tail(log)).into());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Daemon {
        ready_after: started.elapsed(),
        proc,
        grpc,
    })
}

/// The floor server: this same binary, `noop` subcommand, in its own process.
pub(crate) fn start_noop() -> Res<(Proc, SocketAddr)> {
    start_noop_wrapped(&[], false)
}

pub(crate) fn start_noop_wrapped(
    wrapper: &[String],
    gybc_headers: bool,
) -> Res<(Proc, SocketAddr)> {
    let exe = std::env::current_exe()?;
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["noop", "--addr", "127.0.0.1:0"]);
    if gybc_headers {
        cmd.arg("--gybc-headers");
    }
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| format!("noop server said {line:?}"))?
        .parse()?;
    Ok((
        Proc {
            child,
            name: "noop".into(),
        },
        addr,
    ))
}

pub(crate) fn start_redis(dir: &Path) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server (apt-get install redis-server): {e}"))?;
    let proc = Proc {
        child,
        name: "redis-server".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return Ok((proc, port));
            }
        }
        if Instant::now() > deadline {
            return Err("redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the named keys and the first `n` keys of the deterministic set into the Redis on
/// `port`, as the key service would (`KeyRecord` protobufs under `gybc:key:<hex sha256>`).
pub(crate) async fn seed_redis(port: u16, fx: &Fixtures, n: u64) -> Res<()> {
    use gybc_authz_engine::store::{KeyRecord, KeyStatus};
    let names = gybc_authz_engine::redis_conn::Names::new("gybc");
    let record = |id: String, key: &str, kind: KeyKind, limit: &str| KeyRecord {
        id,
        hash: KeyHash::of(key),
        kind,
        tenant: TENANT.into(),
        scopes: vec![],
        rate_limit: Some(limit.parse().expect("valid limit")),
        status: KeyStatus::Active,
        expires_at: None,
        name: None,
        created_at: None,
        allowed_origins: vec![],
        jwt_provider: None,
        identity_platform_tenant: None,
    };
    let mut conn = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    let named = [
        record(
            "key_secret".into(),
            &fx.secret_key,
            KeyKind::Secret,
            HIGH_LIMIT,
        ),
        record(
            "key_app".into(),
            &fx.publishable_key,
            KeyKind::Publishable,
            HIGH_LIMIT,
        ),
        record(
            "key_limited".into(),
            &fx.limited_key,
            KeyKind::Secret,
            "1/30d",
        ),
    ];
    let mut pipe = ::redis::pipe();
    for r in &named {
        pipe.set(names.key(&r.hash), encode_record(r)).ignore();
    }
    for i in 0..n {
        let r = record(
            format!("ks{i}"),
            &keyset_key(fx.key_seed, i),
            KeyKind::Secret,
            HIGH_LIMIT,
        );
        pipe.set(names.key(&r.hash), encode_record(&r)).ignore();
        if i % 5_000 == 4_999 || i + 1 == n {
            pipe.query_async::<()>(&mut conn).await?;
            pipe = ::redis::pipe();
        }
    }
    if n == 0 {
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}
