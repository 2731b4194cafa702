//! `gybc-authz key-service`: serves the tenants' key API over the store the config names
//! (`key_store`, and `redis` for a Redis store), behind Envoy with gybc-authz in front.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use gybc_authz_engine::config::{Config, ProcessEnv};
use gybc_authz_engine::store::admin::AdminStore;
use gybc_authz_engine::telemetry;

use crate::keyservice::{self, DEFAULT_PATH_PREFIX, Service, validate};

#[derive(Args)]
pub struct KeyServiceArgs {
    /// The daemon's config file: its `key_store` (and `redis`) section says where keys live, its
    /// `headers` the identity headers' names, its `jwt.providers` the providers a `pk_` may name.
    #[arg(long, short, default_value = "/etc/gybc-authz/config.yaml")]
    config: PathBuf,
    /// Address to listen on. The default is loopback: only the Envoy in front of it (same pod)
    /// can reach it, since the service trusts the identity headers it receives.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// A scope keys may be given; repeatable. Default: `keys:manage` and `users:impersonate`.
    #[arg(long = "allowed-scope")]
    allowed_scopes: Vec<String>,
    /// Where the API's methods live.
    #[arg(long, default_value = DEFAULT_PATH_PREFIX)]
    path_prefix: String,
}

/// Serves until `stop` completes (the command passes SIGTERM or Ctrl-C).
pub async fn run(args: KeyServiceArgs, stop: impl std::future::Future<Output = ()>) -> ExitCode {
    let cfg = match Config::load(&args.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{}: {e}", args.config.display());
            return ExitCode::from(64);
        }
    };
    telemetry::init(&cfg.log);
    let store = match AdminStore::from_config(&cfg).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot open the key store.");
            return ExitCode::from(e.exit_code());
        }
    };
    let allowed_scopes = if args.allowed_scopes.is_empty() {
        validate::DEFAULT_ALLOWED_SCOPES.map(str::to_owned).to_vec()
    } else {
        args.allowed_scopes
    };
    let service = Service {
        store,
        policy: validate::Policy {
            allowed_scopes,
            jwt_providers: cfg.jwt.providers.iter().map(|p| p.name.clone()).collect(),
        },
        headers: cfg.headers.clone(),
        path_prefix: args.path_prefix,
    };
    let running = match keyservice::start(service, args.listen).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, listen = %args.listen, "Cannot listen.");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %running.addr, "Key service listening.");
    stop.await;
    tracing::info!("Shutting down the key service.");
    running.shutdown().await;
    ExitCode::SUCCESS
}
