//! The engine's own tokio runtime: one per Envoy process, shared by every worker and every filter
//! config (a config reload starts a new engine on the same runtime). Envoy's workers are not
//! tokio threads, so all I/O (Redis, key fetches, the key file watcher) runs here.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

/// I/O threads: the engine's work there is waiting on sockets, not computing.
const WORKER_THREADS: usize = 2;

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

pub fn get() -> Result<&'static Runtime, String> {
    RUNTIME
        .get_or_init(|| {
            Builder::new_multi_thread()
                .worker_threads(WORKER_THREADS)
                .thread_name("gybc-authz")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the engine's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}
