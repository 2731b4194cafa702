//! `gybc-authz key-service`: serves the tenants' key API over the store the config names
//! (`key_store`, and `redis` for a Redis store), behind Envoy with gybc-authz in front, as the
//! config's `key_service` section says; its flags override that section's fields.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use gybc_authz_engine::config::{Config, ProcessEnv, is_path_prefix, is_scope};
use gybc_authz_engine::store::admin::AdminStore;
use gybc_authz_engine::telemetry;

use crate::keyservice::{self, Service};

/// A config that does not load, or flags it refuses (EX_USAGE, as `serve`).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Args)]
pub struct KeyServiceArgs {
    /// The daemon's config file: its `key_service` section configures this service, its
    /// `key_store` (and `redis`) section says where keys live, its `headers` the identity
    /// headers' names, its `jwt.providers` the providers a `pk_` may name.
    #[arg(long, short, default_value = "/etc/gybc-authz/config.yaml")]
    config: PathBuf,
    /// Overrides `key_service.listen_addr` (default `127.0.0.1:8090`). Keep it on loopback: only
    /// the Envoy in front of it (same pod) may reach it, since it trusts the identity headers.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `key_service.allowed_scopes`: a scope keys may be given; repeatable.
    #[arg(long = "allowed-scope")]
    allowed_scopes: Vec<String>,
    /// Overrides `key_service.path_prefix`: where the API's methods live.
    #[arg(long)]
    path_prefix: Option<String>,
}

/// Serves until `stop` completes (the command passes SIGTERM or Ctrl-C).
pub async fn run(args: KeyServiceArgs, stop: impl std::future::Future<Output = ()>) -> ExitCode {
    let cfg = match Config::load(&args.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{}: {e}", args.config.display());
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    telemetry::init(&cfg.log);
    let mut ks = cfg.key_service.clone();
    if let Some(listen) = args.listen {
        ks.listen_addr = listen;
    }
    if !args.allowed_scopes.is_empty() {
        ks.allowed_scopes = args.allowed_scopes;
    }
    if let Some(prefix) = args.path_prefix {
        ks.path_prefix = prefix;
    }
    // The flags pass the checks their config fields do.
    if !is_path_prefix(&ks.path_prefix) || !ks.allowed_scopes.iter().all(|s| is_scope(s)) {
        eprintln!(
            "--path-prefix must start with `/`, not end with one and hold plain segments; each --allowed-scope must be 1 to 128 visible ASCII characters without spaces or commas"
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    // Redis may be down now: the service starts anyway and is not ready until it answers.
    let store = match AdminStore::open(&cfg).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot open the key store.");
            return ExitCode::from(e.exit_code());
        }
    };
    let providers = cfg.jwt.providers.iter().map(|p| p.name.clone()).collect();
    let service = Service::new(store, ks, cfg.headers.clone(), providers);
    let (listen, admin) = (service.config.listen_addr, service.config.admin_addr);
    let running = match keyservice::start(service).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, %listen, %admin, "Cannot listen.");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %running.addr, admin_addr = %running.admin_addr, "Key service listening.");
    stop.await;
    tracing::info!("Shutting down the key service.");
    running.shutdown().await;
    ExitCode::SUCCESS
}
