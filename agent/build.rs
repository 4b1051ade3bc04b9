//! Builds the kernel programs (agent-ebpf) so that the `warden` binary embeds
//! them: one file is all a host needs. Needs what `cargo xtask setup`
//! installs: a nightly toolchain with rust-src, and bpf-linker.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../agent-ebpf").canonicalize()?;
    let common_dir = manifest.join("../agent-common").canonicalize()?;
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "-Z",
            "build-std=core",
        ])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir)
        // BTF lets the loader relocate against this kernel's types.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // Variables cargo sets for build scripts would point the nested build at
    // the stable toolchain.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .context("could not start `rustup run nightly cargo`: is rustup installed?")?;
    if !status.success() {
        bail!(
            "building the eBPF programs failed ({status}); run `cargo xtask setup` to install what they need"
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/warden-ebpf");
    std::fs::copy(&object, out_dir.join("warden-ebpf.o"))
        .with_context(|| format!("the eBPF build did not produce {}", object.display()))?;
    Ok(())
}
