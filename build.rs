//! Compiles the key service's API (proto/gybc/authz/v1/key_service.proto) with a pure-Rust
//! protobuf compiler: prost messages, and pbjson's protojson for them (lowerCamelCase names,
//! int64 as strings, RFC 3339 timestamps in UTC with `Z`, enum names; unknown fields refused,
//! pbjson's default).

/// `google.protobuf.Timestamp` with protojson's canonical `Z` form (src/keyservice/proto.rs).
const TIMESTAMP: &str = "crate::keyservice::proto::Timestamp";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/gybc/authz/v1/key_service.proto"];
    println!("cargo:rerun-if-changed=proto/gybc/authz/v1/key_service.proto");
    println!("cargo:rerun-if-changed=proto/gybc/authz/v1/keys.proto");
    let descriptors = protox::compile(files, ["proto"])?;
    let bytes = prost::Message::encode_to_vec(&descriptors);
    prost_build::Config::new()
        // Prost's own well-known types make way for pbjson's (same messages, plus protojson).
        .compile_well_known_types()
        // The well-known types with their protojson forms (Duration "3600s"); Timestamp is the
        // crate's own, which writes protojson's `Z` form (pbjson-types writes `+00:00`).
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(".google.protobuf.Timestamp", TIMESTAMP)
        .compile_fds(descriptors)?;
    let out = std::env::var("OUT_DIR")?;
    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .out_dir(out)
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(".google.protobuf.Timestamp", TIMESTAMP)
        .build(&[".gybc.authz.v1"])?;
    Ok(())
}
