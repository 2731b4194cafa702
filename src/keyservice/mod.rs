//! `gybc-authz key-service`: the tenants' API for their own keys.

pub mod proto;
