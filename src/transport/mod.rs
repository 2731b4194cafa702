//! The daemon's doors over the engine. Each reads a request into a `RequestContext`, asks the
//! engine, and writes the `Answer` out; none holds decision logic.

pub mod grpc;
pub mod http_authz;
