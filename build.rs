//! Compiles proto/ (the key record the platform's key service writes) with a pure-Rust compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/gybc/authz/v1/keys.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
