//! `cargo xtask setup`: what a fresh machine lacks for the build and tests,
//! installed idempotently. Each step checks first and only then installs.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{root, step};

/// Debian packages the tests use as real peers (the JRE runs Spark, one of
/// the audit's readers the tests check).
const DEB_PACKAGES: &[&str] = &[
    "curl",
    "openssl",
    "postgresql",
    "nginx",
    "openjdk-17-jre-headless",
    // The reviewer page's browser test (tests/e2e/test_review_page.py):
    // headless Chromium and its WebDriver, /usr/bin/chromium and
    // /usr/bin/chromedriver, so that selenium never downloads a browser.
    "chromium",
    "chromium-driver",
    // The pooler the PostgreSQL benchmark compares the agent with.
    "pgbouncer",
    // The SSH peer (tests/peers/sshd.py): /usr/sbin/sshd with a config and
    // host keys of its own (never the system's), and the ssh client.
    "openssh-server",
    "openssh-client",
];

pub struct PythonEnv {
    dir: PathBuf,
}

impl PythonEnv {
    pub fn python(&self) -> PathBuf {
        self.dir.join("bin/python")
    }
}

/// The cargo-fuzz that builds and runs the fuzz targets (`cargo xtask fuzz`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn all() -> anyhow::Result<PythonEnv> {
    toolchain()?;
    cargo_fuzz()?;
    debian_packages()?;
    python_env()
}

/// What the fuzz targets need: nightly and cargo-fuzz.
pub fn fuzz_tools() -> anyhow::Result<()> {
    nightly()?;
    cargo_fuzz()
}

fn nightly() -> anyhow::Result<()> {
    if output("rustup", &["--version"]).is_err() {
        bail!(
            "rustup is not installed: install it from https://rustup.rs, then run `cargo xtask setup` again"
        );
    }
    if output("rustc", &["+nightly", "--version"]).is_err() {
        step(
            "install the nightly toolchain",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    Ok(())
}

/// cargo-fuzz at the pinned version (installed if missing or another).
fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = output("cargo", &["fuzz", "--version"]).unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    step(
        &format!("install cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)"),
        Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--force",
            "--version",
            &format!("={CARGO_FUZZ_VERSION}"),
        ]),
    )
}

/// The cargo-deb that `cargo xtask package` makes the Debian package with.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// cargo-deb at the pinned version (installed if missing or another).
pub fn cargo_deb() -> anyhow::Result<()> {
    let installed = output("cargo", &["deb", "--version"]).unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(CARGO_DEB_VERSION) {
        return Ok(());
    }
    step(
        &format!("install cargo-deb {CARGO_DEB_VERSION} (about a minute)"),
        Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--locked",
            "--force",
            "--version",
            &format!("={CARGO_DEB_VERSION}"),
        ]),
    )
}

/// Nightly's rust-src (for -Z build-std) and a bpf-linker built against the
/// LLVM that nightly rustc ships, so that both agree on the bitcode.
pub fn toolchain() -> anyhow::Result<()> {
    nightly()?;
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        step(
            "add rust-src to nightly",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }
    bpf_linker(&sysroot)
}

fn bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let llvm_lib = fs::read_dir(sysroot.join("lib"))
        .context("reading nightly's sysroot")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .context(
            "nightly ships no libLLVM shared library; bpf-linker cannot be built against it",
        )?;
    let stamp = cache_dir().join("bpf-linker.llvm");
    let linker_runs = output("bpf-linker", &["--version"]).is_ok();
    if linker_runs && fs::read_to_string(&stamp).is_ok_and(|s| s == llvm_lib) {
        return Ok(());
    }
    let verbose = output("rustc", &["+nightly", "-vV"])?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` names no LLVM version")?
        .to_string();
    // bpf-linker links against <prefix>/lib/libLLVM.so: point that at rustc's own.
    let prefix = cache_dir().join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so", llvm_lib.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&llvm_lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    step(
        &format!("build bpf-linker against nightly's LLVM {major} (about a minute)"),
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp, &llvm_lib)?;
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .map_or(true, |s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    step(
        &format!("install Debian packages {missing:?}"),
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// A virtual environment outside the clone, keyed by the requirements, so
/// that a new clone on the same machine reuses it.
fn python_env() -> anyhow::Result<PythonEnv> {
    let requirements = root().join("tests/requirements.txt");
    let text = fs::read(&requirements).context("reading tests/requirements.txt")?;
    let dir = cache_dir().join(format!("venv-{:016x}", fnv1a(&text)));
    let env = PythonEnv { dir };
    let done = env.dir.join(".complete");
    if done.exists() {
        return Ok(env);
    }
    let _ = fs::remove_dir_all(&env.dir);
    step(
        "create the Python environment",
        Command::new("python3").args(["-m", "venv"]).arg(&env.dir),
    )?;
    step(
        "install the Python test peers (tests/requirements.txt)",
        Command::new(env.python())
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
    )?;
    fs::write(&done, "")?;
    Ok(env)
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = base.join("warden-dev");
    let _ = fs::create_dir_all(&dir);
    dir
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
