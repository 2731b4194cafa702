//! Link settings of the daemon binary.

fn main() {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    // Relative relocations packed (DT_RELR; glibc 2.36, binutils 2.38): a position-independent
    // binary otherwise carries a 650 kB relocation table that the loader reads at every start,
    // and those pages stay in the resident set of every pod. Packed, the table is a few kB. The
    // binary stays position-independent, so ASLR is unchanged.
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
