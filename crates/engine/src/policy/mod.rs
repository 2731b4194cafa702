//! Authorization rules as pure functions over plain data, each with its table of cases.

pub mod impersonation;
pub mod origin;
pub mod secret_key;
pub mod tenant;
