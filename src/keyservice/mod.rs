//! `gybc-authz key-service`: the tenants' API for their own keys, `POST
//! /api/v1/iam/api-keys/<method>` with protojson bodies (`proto`), served behind Envoy with
//! gybc-authz in front. It authenticates nobody: `caller` reads the identity headers gybc-authz
//! set and decides who may manage keys; `validate` checks each request before anything is
//! written; `http` is the door and its method table; every change goes through the engine's
//! `store::admin`, the same code as the `keys` CLI; `audit` writes one line per change.

pub mod audit;
pub mod caller;
pub mod http;
pub mod proto;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use gybc_authz_engine::config::HeaderNames;
use gybc_authz_engine::store::admin::AdminStore;

/// Where the API lives, as every platform service: `/api/v1/<domain>/<service>`.
pub const DEFAULT_PATH_PREFIX: &str = "/api/v1/iam/api-keys";

/// What the service needs, built once by the command (or a test).
pub struct Service {
    pub store: AdminStore,
    pub policy: validate::Policy,
    /// The identity headers' names, as gybc-authz in front of it sets them.
    pub headers: HeaderNames,
    pub path_prefix: String,
}

/// A running key service: its address, and a handle that stops it.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting, finishes the requests in flight.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

/// Binds `listen` and serves until `shutdown`.
pub async fn start(service: Service, listen: SocketAddr) -> std::io::Result<Running> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = http::router(Arc::new(service));
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    Ok(Running {
        addr,
        shutdown: tx,
        task,
    })
}
