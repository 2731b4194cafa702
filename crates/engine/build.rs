//! Compiles ../../proto/ (the key record the platform's key service writes) with a pure-Rust compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The commit goes into the build_info metric; a build outside git says "unknown".
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=GYBC_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");

    // proto/ stays at the top of the repository: it is an interface the key service shares.
    let files = ["../../proto/gybc/authz/v1/keys.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["../../proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
