//! Project tasks: `cargo xtask setup | build | package | test | bench | demo | fuzz`.
//!
//! Every task installs what it needs first (idempotently), so that each one
//! works on a fresh machine; a failing step says which step and what to do.
mod bench;
mod bench_http;
mod fuzz;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Warden's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain, packages and Python environment the build and tests need.
    Setup,
    /// Build the eBPF programs and target/release/warden.
    Build,
    /// Build the Debian package of the host install into target/debian/ (docs/install.md).
    Package,
    /// Lints, unit tests, the end-to-end tests (root and real eBPF), then each fuzz target briefly.
    Test {
        /// Only the end-to-end tests whose names match (pytest -k).
        #[arg(short = 'k')]
        filter: Option<String>,
    },
    /// Direct path versus through the agent: latency and throughput, as ratios.
    Bench(bench::BenchArgs),
    /// Run the demo: a LangChain app under `warden run`, then its audit.
    Demo,
    /// Fuzz the decoders (cargo-fuzz, nightly) from the seed corpus of real sessions.
    Fuzz(fuzz::FuzzArgs),
    /// Internal: the benchmark's client, run inside the managed cgroup.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
    /// Internal: the HTTPS benchmark's client, run inside the managed cgroup.
    #[command(hide = true)]
    BenchHttpClient(bench_http::ClientArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::all().map(|_| ()),
        Task::Build => {
            setup::toolchain()?;
            build_release()
        }
        Task::Package => {
            setup::toolchain()?;
            build_release()?;
            let deb = package()?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Test { filter } => test(filter),
        Task::Bench(args) => {
            let env = setup::all()?;
            build_release()?;
            bench::run(&args)?;
            step(
                "PostgreSQL benchmark (pgbench)",
                Command::new(env.python())
                    .arg("tests/bench/pgbench_ratio.py")
                    .env("WARDEN_BIN", warden_bin()),
            )?;
            step(
                "SSH benchmark (paramiko, sshd)",
                Command::new(env.python())
                    .arg("tests/bench/ssh_ratio.py")
                    .env("WARDEN_BIN", warden_bin()),
            )
        }
        Task::Demo => demo(),
        Task::Fuzz(args) => fuzz::main(&args),
        Task::BenchClient(args) => bench::client(&args),
        Task::BenchHttpClient(args) => bench_http::client(&args),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: CARGO_TARGET_DIR when set (CI keeps it
/// outside the clone), the workspace's target/ otherwise.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

pub fn warden_bin() -> PathBuf {
    target_dir().join("release/warden")
}

/// Run a command from the workspace root; fail with the step's name.
pub fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("==> {what}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build_release() -> anyhow::Result<()> {
    step(
        "build warden (release)",
        Command::new("cargo").args(["build", "--release", "-p", "warden", "-p", "xtask"]),
    )
}

/// The Debian package (agent/Cargo.toml's `[package.metadata.deb]`) of the
/// release build that `build_release` just made; returns the .deb's path.
fn package() -> anyhow::Result<PathBuf> {
    setup::cargo_deb()?;
    eprintln!("==> Debian package (cargo deb)");
    // --strip: the release profile keeps debug info, which cargo-deb would
    // otherwise ship (a binary of about 900 MB instead of a few dozen).
    let out = Command::new("cargo")
        .args(["deb", "-p", "warden", "--no-build", "--strip", "--output"])
        .arg(target_dir().join("debian"))
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("Debian package: could not start `cargo deb`")?;
    if !out.status.success() {
        bail!("Debian package: cargo deb failed ({})", out.status);
    }
    // cargo-deb prints the path of the package it wrote as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no .deb file in its output: {stdout}"))?;
    if !deb.is_file() {
        bail!("cargo deb reported {}, which does not exist", deb.display());
    }
    Ok(deb)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn test(filter: Option<String>) -> anyhow::Result<()> {
    let env = setup::all()?;
    step(
        "format check",
        Command::new("cargo").args(["fmt", "--all", "--check"]),
    )?;
    step(
        "clippy",
        Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "unit tests",
        Command::new("cargo").args(["test", "--workspace"]),
    )?;
    build_release()?;
    let deb = package()?;

    end_to_end(&env, &deb, filter)?;
    fuzz::run(fuzz::TARGETS, fuzz::TEST_SECONDS, fuzz::Corpus::Fresh)
}

fn end_to_end(env: &setup::PythonEnv, deb: &Path, filter: Option<String>) -> anyhow::Result<()> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !is_root() {
        if in_ci {
            bail!("the end-to-end tests need root and real eBPF, and CI=true: run CI as root");
        }
        eprintln!(
            "\n!!! SKIPPED: the end-to-end tests need root (eBPF, cgroups); run `sudo -E cargo xtask test`.\n"
        );
        return Ok(());
    }
    let mut pytest = Command::new(env.python());
    pytest
        .args(["-m", "pytest", "tests/e2e", "-v", "-rA", "--durations=10"])
        .env("WARDEN_BIN", warden_bin())
        .env("WARDEN_DEB", deb);
    if let Some(k) = filter {
        pytest.args(["-k", &k]);
    }
    step("end-to-end tests", &mut pytest)
}

fn demo() -> anyhow::Result<()> {
    let env = setup::all()?;
    build_release()?;
    if !is_root() {
        bail!("the demo loads eBPF programs: run it as root (`sudo -E cargo xtask demo`)");
    }
    step(
        "demo",
        Command::new(env.python())
            .arg("tests/demo/run_demo.py")
            .env("WARDEN_BIN", warden_bin()),
    )
}
