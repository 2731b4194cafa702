//! Compiles the key service's API (proto/gybc/authz/v1/key_service.proto) with a pure-Rust
//! protobuf compiler: prost messages, and pbjson's protojson for them (lowerCamelCase names,
//! int64 as strings, RFC 3339 timestamps in UTC with `Z`, enum names; unknown fields refused,
//! pbjson's default).

/// `google.protobuf.Timestamp` with protojson's canonical `Z` form (src/keyservice/proto.rs).
const TIMESTAMP: &str = "crate::keyservice::proto::Timestamp";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    pack_relative_relocations();
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

/// The daemon's relative relocations packed (`DT_RELR`, glibc ≥ 2.36, GNU ld ≥ 2.38): the loader
/// reads each of them at start-up, 24 bytes apiece unpacked (about 550 kB for this binary, all
/// resident from then on), a few kB packed. Only the daemon's own binaries: the Envoy module is
/// loaded by Envoy's glibc, which may be older. The linker adds a `GLIBC_ABI_DT_RELR` version
/// dependency, so an older glibc refuses the binary at once rather than misloading it. Only for
/// a native build whose glibc knows `DT_RELR` (the image, `deploy/docker/Dockerfile`, builds and
/// runs on Debian 12, glibc 2.36); `GYBC_AUTHZ_NO_RELR=1` builds without it, for a binary to run
/// on an older glibc than the one it was built on.
fn pack_relative_relocations() {
    println!("cargo:rerun-if-env-changed=GYBC_AUTHZ_NO_RELR");
    let target = std::env::var("TARGET").unwrap_or_default();
    let native = std::env::var("HOST").is_ok_and(|h| h == target);
    let off = std::env::var_os("GYBC_AUTHZ_NO_RELR").is_some_and(|v| !v.is_empty() && v != "0");
    if !native || off || !target.ends_with("-linux-gnu") {
        return;
    }
    let arch = target.split('-').next().unwrap_or_default();
    let libc = [
        format!("/lib/{arch}-linux-gnu/libc.so.6"),
        format!("/usr/lib/{arch}-linux-gnu/libc.so.6"),
        "/lib64/libc.so.6".to_owned(),
        "/usr/lib64/libc.so.6".to_owned(),
    ];
    let knows_relr = libc
        .iter()
        .any(|p| std::fs::read(p).is_ok_and(|b| b.windows(17).any(|w| w == b"GLIBC_ABI_DT_RELR")));
    if knows_relr {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
