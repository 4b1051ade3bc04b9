//! The `warden` command line.
use std::{ffi::OsString, io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use warden::{
    capture, cgroup,
    policy::Policy,
    preflight,
    run::{self, RunOptions},
};

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Policy and audit on the data path of LLM-agent apps"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a program with all its outbound connections going through Warden.
    Run {
        /// Policy file (YAML); the embedded default audits everything, denies nothing and masks payment data, SSNs and secrets in query results.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Where the Parquet audit goes.
        #[arg(long)]
        audit_dir: Option<PathBuf>,
        /// Run the program as this user, as it would run in production.
        #[arg(long)]
        user: Option<String>,
        /// Port of the agent's loopback listeners; 0 picks a free one.
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
        /// Seconds that open connections may take to finish after the program exits.
        #[arg(long, default_value_t = 5)]
        grace: u64,
        /// The agent's state directory (its CA is in `<dir>/ca`).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// A CA (PEM) the agent trusts for its own TLS to servers, besides the system's roots. Repeatable.
        #[arg(long)]
        upstream_ca: Vec<PathBuf>,
        /// Relay TLS as opaque bytes instead of ending it with the agent's CA.
        #[arg(long)]
        no_tls_intercept: bool,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The agent's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Release cgroups left failing closed by agents that died.
    Cleanup {
        /// Also kill the processes still in those cgroups.
        #[arg(long)]
        kill: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM), making the CA first if there is none,
    /// e.g. to add it to a host's trust store.
    Export {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

const DEFAULT_STATE_DIR: &str = "/var/lib/warden";

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file; errors name the line and what to write instead.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run {
            policy,
            audit_dir,
            user,
            listen_port,
            grace,
            state_dir,
            upstream_ca,
            no_tls_intercept,
            command,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(&anyhow::anyhow!("starting the runtime: {e}")),
            };
            let opts = RunOptions {
                policy,
                audit_dir,
                user,
                listen_port,
                grace: Duration::from_secs(grace),
                command,
                state_dir,
                upstream_ca,
                intercept_tls: !no_tls_intercept,
            };
            match runtime.block_on(run::run(opts)) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    let code = e
                        .downcast_ref::<run::SpawnError>()
                        .map_or(run::EXIT_WARDEN_FAILED, |s| s.code);
                    eprintln!("warden: {e:#}");
                    ExitCode::from(code as u8)
                }
            }
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => match Policy::load(&file) {
            Ok(policy) => {
                println!("{}: ok ({})", file.display(), policy.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Ca {
            command: CaCommand::Export { state_dir },
        } => match warden::tls::Authority::load_or_create(&state_dir.join("ca")) {
            Ok(ca) => {
                print!("{}", ca.ca_pem());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.into()),
        },
        Command::Cleanup { kill } => match cleanup(kill) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("warden: {e:#}");
    ExitCode::from(run::EXIT_WARDEN_FAILED as u8)
}

/// A dead `warden run` agent left its programs pinned (so its cgroup fails
/// closed) and its cgroup in place. Release both once nothing runs there.
fn cleanup(kill: bool) -> anyhow::Result<()> {
    let host = preflight::check()?;
    let stale = capture::stale_pin_dirs(&host.bpffs);
    if stale.is_empty() {
        println!("nothing to clean up");
    }
    for (pins, pid) in stale {
        let cg = host.cgroup_root.join("warden").join(format!("run-{pid}"));
        let pids = cgroup::pids_in(&cg);
        if !pids.is_empty() && !kill {
            println!(
                "agent {pid}: cgroup {} still runs {pids:?}; it stays failing closed. Stop them, or pass --kill",
                cg.display()
            );
            continue;
        }
        if cg.exists() {
            cgroup::kill_all(&cg);
            cgroup::remove_when_empty(&cg, Duration::from_secs(5))?;
        }
        capture::remove_pins(&pins)?;
        println!("agent {pid}: released {} and its programs", cg.display());
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warden=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
