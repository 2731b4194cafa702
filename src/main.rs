//! The `gybc-authz` command: `serve`, `check-config`, `cors-policy`, `check` (a one-shot
//! ext_authz client), `keys` and `key-service`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gybc_authz::app::{self, Options};
use gybc_authz::{cli, dev, keyservice};
use gybc_authz_engine::KeySource;
use gybc_authz_engine::config::{Config, ProcessEnv};
use gybc_authz_engine::store::admin::{AdminStore, MemoryAdmin};
use gybc_authz_engine::telemetry;

/// Exit code for a configuration that does not load (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "gybc-authz",
    version,
    about = "Envoy ext_authz sidecar for the GYBC API platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve ext_authz over gRPC, with /healthz and /readyz over HTTP.
    Serve {
        /// YAML config file (fields may be overridden by GYBC_AUTHZ__SECTION__FIELD variables).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Dev mode: mint a signing key, demo API keys and a user JWT, print them once, serve.
        #[arg(long)]
        dev: bool,
    },
    /// Manage API keys in the configured store: create, list, show, revoke, rotate.
    Keys(cli::keys::KeysArgs),
    /// Serve the tenants' key API (create, list, get, update, rotate, revoke) behind Envoy with
    /// gybc-authz in front; it trusts the identity headers gybc-authz sets.
    KeyService(cli::key_service::KeyServiceArgs),
    /// Load and validate a config file; print every problem with its field path.
    CheckConfig { file: PathBuf },
    /// Print Envoy's CORS policy for this config (JSON, valid YAML): the request headers a
    /// preflight allows and the response headers a page may read, as deploy/envoy/*.yaml
    /// carry them (docs/browsers.md).
    CorsPolicy {
        /// YAML config file (with GYBC_AUTHZ__SECTION__FIELD overrides); the defaults without.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Send one Check as Envoy would and print the decision as JSON (exit 0 allow, 1 deny).
    Check {
        /// gRPC address of the daemon.
        #[arg(long, default_value = gybc_authz_engine::config::DEFAULT_GRPC_ADDR)]
        addr: String,
        #[arg(long, default_value = "POST")]
        method: String,
        #[arg(long, default_value = "/api/v1/llm/gateway/list-threads")]
        path: String,
        #[arg(long, default_value = "localhost")]
        host: String,
        /// A request header, `Name: value`; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Serve { config, dev } => serve(config, dev).await,
            Command::Keys(args) => cli::keys::run(args).await,
            Command::KeyService(args) => cli::key_service::run(args, wait_for_signal()).await,
            Command::CheckConfig { file } => match Config::load(&file, &ProcessEnv) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("{}: {e}", file.display());
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
            },
            Command::CorsPolicy { config } => match load_config(config.as_deref()) {
                Ok(cfg) => {
                    let policy = gybc_authz_engine::browser::envoy_cors_policy(&cfg);
                    println!("{policy:#}");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
            Command::Check {
                addr,
                method,
                path,
                host,
                headers,
            } => check(&addr, &method, &path, &host, &headers).await,
        }
    })
}

/// The config file with the environment's overrides (the defaults without a file); on an error,
/// printed with its field paths, the exit code to end with.
fn load_config(config: Option<&Path>) -> Result<Config, ExitCode> {
    let loaded = match config {
        Some(path) => Config::load(path, &ProcessEnv),
        None => Config::from_yaml("", &ProcessEnv),
    };
    loaded.map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

async fn serve(config: Option<PathBuf>, dev_mode: bool) -> ExitCode {
    let mut cfg = match load_config(config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    telemetry::init(&cfg.log);

    let mut opts = Options::default();
    let mut credentials = None;
    let mut dev_keys = None;
    if dev_mode {
        match dev::setup(&mut cfg) {
            Ok(setup) => {
                dev_keys = Some(AdminStore::Memory(Box::new(MemoryAdmin::new(
                    setup.store.clone(),
                    setup.records,
                ))));
                opts.store = Some(KeySource::Memory(setup.store));
                opts.dev_jwks = Some(setup.jwks_json);
                credentials = Some(setup.credentials);
            }
            Err(e) => {
                tracing::error!(error = %e, "Dev mode setup failed.");
                return ExitCode::FAILURE;
            }
        }
    } else if cfg.jwt.providers.is_empty() {
        tracing::warn!("No JWT provider configured: bearer tokens are refused.");
    }

    let key_service = match dev_keys {
        Some(store) => match dev_key_service(&cfg, store).await {
            Ok(ks) => Some(ks),
            Err(e) => {
                tracing::error!(error = %e, "Cannot start the dev key service.");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // The banner names the key service's path and headers as configured; start takes the config.
    let banner_cfg = credentials.as_ref().map(|_| cfg.clone());
    let running = match app::start(cfg, opts).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start.");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(c), Some(ks), Some(bc)) = (&credentials, &key_service, &banner_cfg) {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "gybc-authz".into());
        print!(
            "{}",
            dev::banner(c, &exe, running.grpc_addr, running.http_addr, ks.addr, bc)
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    wait_for_signal().await;
    tracing::info!("Shutting down: draining in-flight checks.");
    running.shutdown().await;
    if let Some(ks) = key_service {
        ks.shutdown().await;
    }
    ExitCode::SUCCESS
}

/// Dev mode's key service: on loopback, over the dev keys in memory, so a key it creates works
/// on the dev data path at once. The config's `key_service` section applies, on free ports.
async fn dev_key_service(cfg: &Config, store: AdminStore) -> std::io::Result<keyservice::Running> {
    let mut ks = cfg.key_service.clone();
    ks.listen_addr = ([127, 0, 0, 1], 0).into();
    ks.admin_addr = ([127, 0, 0, 1], 0).into();
    let providers = cfg.jwt.providers.iter().map(|p| p.name.clone()).collect();
    keyservice::start(keyservice::Service::new(
        store,
        ks,
        cfg.headers.clone(),
        providers,
    ))
    .await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn check(addr: &str, method: &str, path: &str, host: &str, headers: &[String]) -> ExitCode {
    let mut parsed = Vec::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            eprintln!("header `{h}` is not `Name: value`");
            return ExitCode::from(2);
        };
        parsed.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    match cli::check::run(addr, cli::check::check_request(method, path, host, &parsed)).await {
        Ok(resp) => {
            let out = cli::check::describe(&resp);
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            if out["allowed"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
