//! Commands besides `serve`: `check` (one Check as Envoy would send it) and `keys` (key
//! management against the configured store).

pub mod check;
pub mod keys;
