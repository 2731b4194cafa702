//! Commands besides `serve`: `check` (one Check as Envoy would send it), `keys` (key
//! management against the configured store) and `key-service` (the tenants' key API).

pub mod check;
pub mod key_service;
pub mod keys;
