//! `gybc-authz serve --dev` on a fresh machine: the binary itself, with nothing else running. The
//! credentials it prints must get an allow, and so must the commands it prints, exactly as printed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Dev {
    child: Child,
    banner: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev() -> Dev {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .args(["serve", "--dev"])
        .env("GYBC_AUTHZ__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("GYBC_AUTHZ__SERVER__HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gybc-authz binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.contains("-H 'x-api-key: pk_") {
            break;
        }
        assert!(Instant::now() < deadline, "no banner within 30 s: {banner}");
    }
    Dev { child, banner }
}

fn field<'a>(banner: &'a str, label: &str) -> &'a str {
    banner
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{label} missing from banner:\n{banner}"))
}

/// Splits a printed shell command line into arguments (single quotes only, as the banner uses).
fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

#[tokio::test]
async fn dev_mode_credentials_get_allowed() {
    let dev = start_dev();
    let b = &dev.banner;
    let grpc = field(b, "gRPC ext_authz");
    let sk = field(b, "secret key");
    let pk = field(b, "publishable key");
    let jwt = field(b, "user JWT");
    assert!(
        sk.starts_with("sk_") && pk.starts_with("pk_") && jwt.split('.').count() == 3,
        "{b}"
    );

    let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let check = |headers: Vec<(&str, &str)>| {
        let h: Vec<(String, String)> = headers
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        gybc_authz::cli::check::check_request(
            "POST",
            "/api/v1/llm/gateway/list-threads",
            "localhost",
            &h,
        )
    };
    let auth = format!("Bearer {jwt}");
    let cases = [
        (check(vec![("x-api-key", sk)]), "api_key", None),
        (
            check(vec![("x-api-key", sk), ("x-on-behalf-of", "user_123")]),
            "api_key",
            Some("user_123"),
        ),
        (
            check(vec![("authorization", &auth)]),
            "jwt",
            Some("dev-user"),
        ),
        (
            check(vec![("x-api-key", pk), ("authorization", &auth)]),
            "publishable_key",
            Some("dev-user"),
        ),
    ];
    for (req, method, user) in cases {
        let resp = client.check(req).await.unwrap().into_inner();
        let described = gybc_authz::cli::check::describe(&resp);
        assert_eq!(described["allowed"], true, "{described}");
        let up = &described["upstream_headers"];
        assert_eq!(up["x-auth-method"], method);
        assert_eq!(up["x-tenant-id"], "dev-tenant");
        assert_eq!(up["x-user-id"].as_str(), user);
    }

    // The printed commands work as printed.
    let commands: Vec<&str> = b
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(" check --addr "))
        .collect();
    assert_eq!(commands.len(), 4, "{b}");
    for line in commands {
        let words = shell_words(line);
        let out = Command::new(&words[0]).args(&words[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "`{line}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["allowed"], true);
    }
}

#[test]
fn sigterm_drains_and_exits_cleanly_without_logging_credentials() {
    let mut dev = start_dev();
    let sk = field(&dev.banner, "secret key").to_owned();
    let jwt = field(&dev.banner, "user JWT").to_owned();
    let pid = dev.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = dev.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    let mut logs = String::new();
    std::io::Read::read_to_string(dev.child.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("Shutting down"), "{logs}");
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string());
    }
    assert!(
        !logs.contains(&sk) && !logs.contains(&jwt),
        "credentials must never be logged"
    );
}
