//! A real headless Chromium (Debian's `chromium` and `chromium-driver`), driven by Selenium
//! through `tests/support/browser.py` (the `.venv` ./scripts/test.sh creates), and a static file
//! server for the pages it opens, on an origin of its own. Without Chromium, its driver or
//! Selenium, a test fails with how to install them; none is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Mutex;

/// Where Debian's packages put them.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL_HINT: &str = "install Debian's `chromium` and `chromium-driver` (apt-get install \
     chromium chromium-driver; ./scripts/test.sh does) and Selenium into .venv \
     (`.venv/bin/pip install -r tests/requirements.txt`)";

/// Headless Chromium with a fresh profile, in its own process group (killed on drop).
pub struct Browser {
    io: Mutex<(ChildStdin, Lines<BufReader<ChildStdout>>)>,
    child: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium through chromedriver; panics with an install hint when any part is missing.
    pub async fn start() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join(".venv/bin/python");
        for needed in [Path::new(CHROMIUM), Path::new(CHROMEDRIVER), &python] {
            assert!(
                needed.is_file(),
                "the browser tests need {}: {INSTALL_HINT}",
                needed.display()
            );
        }
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(&python)
            .arg(root.join("tests/support/browser.py"))
            .args(["--chromium", CHROMIUM, "--chromedriver", CHROMEDRIVER])
            .arg("--user-data-dir")
            .arg(profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own group, so chromedriver and Chromium go with it on drop.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let browser = Self {
            io: Mutex::new((stdin, stdout)),
            child,
            _profile: profile,
        };
        if let Err(e) = browser.read().await {
            panic!("Chromium did not start: {e}\n{INSTALL_HINT}");
        }
        browser
    }

    async fn read(&self) -> Result<Value, String> {
        let mut io = self.io.lock().await;
        Self::answer(&mut io.1).await
    }

    async fn answer(lines: &mut Lines<BufReader<ChildStdout>>) -> Result<Value, String> {
        let line = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the browser driver exited (its errors are above)")?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        match v.get("error") {
            Some(e) => Err(e.as_str().unwrap_or_default().to_owned()),
            None => Ok(v["ok"].clone()),
        }
    }

    async fn call(&self, command: Value) -> Result<Value, String> {
        let mut io = self.io.lock().await;
        let mut line = command.to_string();
        line.push('\n');
        io.0.write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        io.0.flush().await.map_err(|e| e.to_string())?;
        Self::answer(&mut io.1).await
    }

    /// Loads a page and waits for it.
    pub async fn get(&self, url: &str) {
        self.call(json!({ "get": url }))
            .await
            .unwrap_or_else(|e| panic!("loading {url}: {e}"));
    }

    /// Runs `script` in the page as Selenium's `execute_async_script`: it ends by calling its
    /// last argument (`arguments[arguments.length - 1]`) with the result.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        self.call(json!({ "run": script, "args": args }))
            .await
            .unwrap_or_else(|e| panic!("running a script in the page: {e}\n{script}"))
    }

    /// Saves a PNG of the page.
    pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
        self.call(json!({ "screenshot": path.display().to_string() }))
            .await
            .map(drop)
    }

    /// Runs `checks`; if they panic, saves a screenshot as `target/browser-screenshots/<name>.png`
    /// for the reader of the test log, then fails with the panic.
    pub async fn checked<T>(&self, name: &str, checks: impl Future<Output = T>) -> T {
        use futures_util::FutureExt as _;
        match std::panic::AssertUnwindSafe(checks).catch_unwind().await {
            Ok(v) => v,
            Err(panic) => {
                let path = screenshot_dir().join(format!("{name}.png"));
                match self.screenshot(&path).await {
                    Ok(()) => eprintln!("screenshot of the page: {}", path.display()),
                    Err(e) => eprintln!("no screenshot ({e})"),
                }
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Closes the browser.
    pub async fn quit(mut self) {
        let _ = self.call(json!({ "quit": true })).await;
        let _ = self.child.wait().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the driver script, chromedriver and Chromium's processes.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `target/browser-screenshots/`, created.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let dir = target.join("browser-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// === the page's own origin ===

/// The files of one directory over HTTP on 127.0.0.1:0: the origin a page is served from.
pub struct StaticSite {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl StaticSite {
    pub async fn start(dir: &Path) -> Self {
        let app = Router::new()
            .route("/", axum::routing::get(index))
            .route("/{file}", axum::routing::get(file))
            .with_state(dir.to_owned());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, task }
    }

    /// The site's origin, as a browser serialises it.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StaticSite {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn index(dir: State<PathBuf>) -> axum::response::Response {
    file(dir, UrlPath("index.html".into())).await
}

async fn file(
    State(dir): State<PathBuf>,
    UrlPath(name): UrlPath<String>,
) -> axum::response::Response {
    let kind = match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    // One path segment (the route allows no `/`), and no `..`.
    if name.starts_with('.') {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(dir.join(&name)).await {
        Ok(body) => ([(header::CONTENT_TYPE, kind)], body).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
