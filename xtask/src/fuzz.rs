//! `cargo xtask fuzz`: the libFuzzer targets of `agent-protocols/fuzz`
//! (cargo-fuzz, nightly), each for a while, from the seed corpus of real
//! sessions in `agent-protocols/fuzz/corpus/<target>/`.
//!
//! The seed corpus stays as committed: libFuzzer writes the inputs it finds
//! to the first corpus directory it is given, so each run gets a work
//! directory outside the clone first and the seeds second. `cargo xtask
//! fuzz` keeps its work directories (`~/.cache/warden-dev/fuzz-corpus/<target>`)
//! so that runs build on each other; `cargo xtask test` starts from the seeds
//! alone each time, as libFuzzer first runs every input it is given, and a
//! grown corpus would eat a short run. Builds go to their own target
//! directory (`~/.cache/warden-dev/fuzz-target`): sanitizer and coverage
//! flags would otherwise invalidate the main build's cache.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{root, setup};

/// The fuzz targets, as `agent-protocols/fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &["postgres_frontend", "postgres_backend", "sse", "llm_json"];

/// Seconds per target for `cargo xtask fuzz`.
pub const DEFAULT_SECONDS: u64 = 30;
/// Seconds per target at the end of `cargo xtask test`.
pub const TEST_SECONDS: u64 = 15;

/// One input taking longer than this is a failure (libFuzzer's `-timeout`).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Only this target (default: all of them, one after the other).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
    /// How long to fuzz each target.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    seconds: u64,
}

pub fn main(args: &FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    run(&targets, args.seconds, Corpus::Kept)
}

/// Where the inputs libFuzzer finds go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Corpus {
    /// Kept between runs, which start from them.
    Kept,
    /// Emptied before each run: a run starts from the seeds alone.
    Fresh,
}

fn fuzz_dir() -> PathBuf {
    root().join("agent-protocols/fuzz")
}

/// Builds the targets, then fuzzes each for `seconds`; fails if any target
/// found a crash, a timeout or an out-of-memory (after running the others).
pub fn run(targets: &[&str], seconds: u64, corpus: Corpus) -> anyhow::Result<()> {
    setup::fuzz_tools()?;
    let target_dir = setup::cache_dir().join("fuzz-target");
    let started = std::time::Instant::now();
    crate::step(
        "build the fuzz targets (cargo +nightly fuzz build)",
        cargo_fuzz("build").arg("--target-dir").arg(&target_dir),
    )?;
    eprintln!(
        "    fuzz build: {:.0} s (a cold build takes about 5 minutes)",
        started.elapsed().as_secs_f64()
    );

    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for target in targets {
        let work = match corpus {
            Corpus::Kept => setup::cache_dir().join("fuzz-corpus").join(target),
            Corpus::Fresh => {
                let dir = setup::cache_dir().join("fuzz-corpus-fresh").join(target);
                let _ = std::fs::remove_dir_all(&dir);
                dir
            }
        };
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let seeds = fuzz_dir().join("corpus").join(target);
        let mut cmd = cargo_fuzz("run");
        cmd.arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg("-print_final_stats=1");
        if corpus == Corpus::Fresh {
            // The test run mutates the same way each time, so that a failure
            // in CI is the code's, found again by running it again.
            cmd.arg("-seed=1");
        }
        eprintln!("==> fuzz {target} for {seconds} s");
        match fuzz_one(&mut cmd) {
            Ok(stats) => summary.push(format!("{target}: {stats}")),
            Err(e) => {
                eprintln!("!!! fuzz {target}: {e:#}");
                summary.push(format!("{target}: FAILED"));
                failed.push(*target);
            }
        }
    }
    eprintln!("==> fuzzing summary");
    for line in &summary {
        eprintln!("    {line}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (the input is under agent-protocols/fuzz/artifacts/<target>/; \
             see \"Fuzzing\" in docs/development.md)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", subcommand, "--fuzz-dir"])
        .arg(fuzz_dir())
        // Set when xtask runs under `cargo run`; the fuzz build picks its
        // own toolchain and target directory.
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(root());
    cmd
}

/// Runs one target, passing its output on; the run's figures from
/// libFuzzer's final stats.
fn fuzz_one(cmd: &mut Command) -> anyhow::Result<String> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (mut runs, mut per_second, mut seconds) = (None, None, None);
    for line in BufReader::new(stderr).split(b'\n') {
        let line = line.context("reading the fuzzer's output")?;
        let line = String::from_utf8_lossy(&line);
        let stat = |name: &str| {
            line.strip_prefix(name)
                .map(|v| v.trim_start_matches(':').trim().to_string())
        };
        runs = runs.or_else(|| stat("stat::number_of_executed_units"));
        per_second = per_second.or_else(|| stat("stat::average_exec_per_sec"));
        if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 293344 runs in 21 second(s)"
            seconds = rest.split(" in ").nth(1).map(|s| s.to_string());
        }
        eprintln!("{line}");
    }
    let status = child.wait().context("waiting for the fuzzer")?;
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok(format!(
        "{} runs in {}, {} exec/s",
        runs.as_deref().unwrap_or("?"),
        seconds.as_deref().unwrap_or("?"),
        per_second.as_deref().unwrap_or("?"),
    ))
}
