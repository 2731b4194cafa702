//! The project's own protobuf messages (proto/), compiled at build time.

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/gybc.authz.v1.rs"));
}
