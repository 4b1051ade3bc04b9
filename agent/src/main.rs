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
        /// A unix socket, or a directory of them, the program must not reach (the agent sees TCP only); PostgreSQL's usual ones are always hidden. Repeatable.
        #[arg(long)]
        hide_path: Vec<PathBuf>,
        /// The control API's unix socket (root only), served when the policy has `approvals:`.
        #[arg(long, env = "WARDEN_CONTROL_SOCKET", default_value = warden::approvals::control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
        /// Serve the reviewers' web page (HTTPS with the agent's CA) on this loopback address, e.g. 127.0.0.1:9443.
        #[arg(long)]
        review_listen: Option<std::net::SocketAddr>,
        /// Also serve the control API over HTTPS (the agent's CA) on this loopback address; every call there needs a reviewer's ID token.
        #[arg(long)]
        control_listen: Option<std::net::SocketAddr>,
        /// Serve Prometheus metrics (text format, GET /metrics) on this loopback address, e.g. 127.0.0.1:9464.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Start an agent of this run's own even when a `warden daemon` answers on the control socket.
        #[arg(long)]
        standalone: bool,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// The host daemon: protect the systemd units, cgroups and pods that
    /// /etc/warden/warden.yaml selects, until SIGTERM (docs/daemon.md).
    Daemon {
        /// The daemon's configuration (YAML).
        #[arg(long, env = "WARDEN_CONFIG", default_value = warden::daemon::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Check the configuration and the policy it names, then exit.
        #[arg(long)]
        check: bool,
    },
    /// What the running daemon manages, and what is wrong.
    Status {
        /// The daemon's control socket.
        #[arg(long, env = "WARDEN_CONTROL_SOCKET", default_value = warden::approvals::control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the JSON the control API answers.
        #[arg(long)]
        json: bool,
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
    /// The SSH host keys the agent shows clients.
    Ssh {
        #[command(subcommand)]
        command: SshCommand,
    },
    /// The audit tables: SQL over them, follow them, replay a session.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Requests held for approval: list them, show one, approve or reject it as a reviewer
    /// signed in with the identity provider (docs/approvals.md).
    Approvals {
        /// The agent's control socket.
        #[arg(long, global = true, env = "WARDEN_CONTROL_SOCKET", default_value = warden::approvals::control::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Release cgroups left failing closed by agents that died.
    Cleanup {
        /// Also kill the processes still in those cgroups.
        #[arg(long)]
        kill: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Run SQL (DataFusion) over the audit's `connections`, `requests`, `approvals` and `events` tables (docs/audit.md), e.g.
    /// "SELECT protocol, decision, count(*) FROM connections GROUP BY ALL".
    Sql {
        #[command(flatten)]
        dir: AuditDirArg,
        /// How to print the rows: aligned text, CSV with a header, or one JSON object per line.
        #[arg(long, value_enum, default_value = "table")]
        format: SqlFormat,
        /// One SQL statement; `DESCRIBE requests` lists a table's columns.
        sql: String,
    },
    /// Print the rows of the audit files that appear from now on (all of them with --from-start),
    /// until Ctrl-C.
    Tail {
        #[command(flatten)]
        dir: AuditDirArg,
        #[arg(long, value_enum, default_value = "requests")]
        table: TableArg,
        /// One JSON object per row and line, or a text table per file.
        #[arg(long, value_enum, default_value = "json")]
        format: TailFormat,
        /// Print the files already there first.
        #[arg(long)]
        from_start: bool,
    },
    /// Write to Parquet the rows that agents which died left in their journals (an agent
    /// starting on the directory does it too).
    Recover {
        #[command(flatten)]
        dir: AuditDirArg,
    },
    /// Replay a session: its connection, then its requests in order, with timings and decisions.
    Replay {
        #[command(flatten)]
        dir: AuditDirArg,
        /// The session id (`session_id`), or a prefix of it that names one session.
        session_id: String,
    },
}

#[derive(clap::Args)]
struct AuditDirArg {
    /// The audit directory (the one the agent or `warden run --audit-dir` writes to).
    #[arg(long, env = "WARDEN_AUDIT_DIR", default_value_os_t = warden::audit::AuditConfig::default().dir)]
    audit_dir: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SqlFormat {
    Table,
    Csv,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TailFormat {
    Json,
    Table,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TableArg {
    Requests,
    Connections,
    Approvals,
    Events,
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// The requests waiting, oldest first.
    List {
        /// Print the JSON the control API answers.
        #[arg(long)]
        json: bool,
    },
    /// One request with everything a reviewer needs: who, which process, where, the full
    /// statement or request, the rule, the LLM exchange that proposed it.
    Show { id: String },
    /// Approve a request; with the rule's quorum reached, it runs.
    Approve {
        id: String,
        #[command(flatten)]
        token: TokenArg,
    },
    /// Reject a request; the requester gets the reason.
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        token: TokenArg,
    },
}

#[derive(clap::Args)]
struct TokenArg {
    /// A file holding your OIDC ID token (from signing in with the identity provider).
    #[arg(long, conflicts_with = "id_token")]
    id_token_file: Option<PathBuf>,
    /// Your OIDC ID token; prefer --id-token-file or the variable, which stay out of `ps`.
    #[arg(long, env = "WARDEN_ID_TOKEN", hide_env_values = true)]
    id_token: Option<String>,
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

#[derive(Subcommand)]
enum SshCommand {
    /// Print known_hosts lines for the SSH targets a policy gives a credential
    /// (the keys the agent shows for them), to append to
    /// /etc/ssh/ssh_known_hosts on a host install (docs/ssh.md).
    KnownHosts {
        /// Policy file; without one, the embedded default (no SSH targets).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

const DEFAULT_STATE_DIR: &str = "/var/lib/warden";

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file; errors name the line and what to write instead.
    Check { file: PathBuf },
    /// Make the running daemon reread its policy file; a bad file is refused
    /// with its line number and the policy in force stays.
    Reload {
        /// The daemon's control socket.
        #[arg(long, env = "WARDEN_CONTROL_SOCKET", default_value = warden::approvals::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
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
            hide_path,
            control_socket,
            review_listen,
            control_listen,
            metrics_listen,
            standalone,
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
                hide_paths: hide_path,
                control_socket,
                review_listen,
                control_listen,
                standalone,
                metrics_listen,
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
        Command::Policy {
            command: PolicyCommand::Reload { socket },
        } => match control_call(&socket, http::Method::POST, "/v1/policy/reload") {
            Ok(answer) => {
                println!(
                    "policy reloaded: {}",
                    answer["policy"].as_str().unwrap_or("")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warden: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Daemon { config, check } => daemon(&config, check),
        Command::Status { socket, json } => {
            match control_call(&socket, http::Method::GET, "/v1/status") {
                Ok(answer) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&answer).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(answer) => match serde_json::from_value::<warden::agent::Status>(answer) {
                    Ok(status) => {
                        print!("{}", status_text(&status));
                        if status.problems.is_empty() {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(1)
                        }
                    }
                    Err(e) => fail(&anyhow::anyhow!(
                        "the daemon answered in a form this warden does not read ({e}); is it another version? try --json"
                    )),
                },
                Err(e) => {
                    eprintln!("warden: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Ca {
            command: CaCommand::Export { state_dir },
        } => match warden::tls::Authority::load_or_create(&state_dir.join("ca")) {
            Ok(ca) => {
                print!("{}", ca.ca_pem());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.into()),
        },
        Command::Ssh {
            command: SshCommand::KnownHosts { policy, state_dir },
        } => {
            let policy =
                match policy.map_or_else(|| Ok(Policy::embedded_default()), |p| Policy::load(&p)) {
                    Ok(policy) => policy,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                };
            match warden::proxy::ssh::HostKeys::load_or_create(&state_dir.join("ssh")) {
                Ok(keys) => {
                    print!("{}", keys.known_hosts(policy.ssh_logins()));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.into()),
            }
        }
        Command::Audit { command } => audit(command),
        Command::Approvals { socket, command } => approvals(socket, command),
        Command::Cleanup { kill } => match cleanup(kill) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

/// `warden daemon`: exit 0 on a clean stop, 125 when it could not start.
fn daemon(config: &std::path::Path, check: bool) -> ExitCode {
    if check {
        return match warden::daemon::check(config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warden: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("starting the runtime: {e}")),
    };
    match runtime.block_on(warden::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// One call to the control socket; an answer that is not a success is the
/// agent's reason as an error.
fn control_call(
    socket: &std::path::Path,
    method: http::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = warden::approvals::control::Client::new(socket.to_path_buf());
    runtime.block_on(client.call_ok(method, path, None, None))
}

/// `warden status` for people: what is attached where, then what is wrong.
fn status_text(status: &warden::agent::Status) -> String {
    let mut out = format!(
        "warden {} (pid {}), up since {}, listening on {}\n\
         policy: {} ({}), loaded {}\n\
         when stopped: managed cgroups {}\n\
         audit: {} ({}{})\n",
        status.version,
        status.pid,
        status.started.format("%Y-%m-%d %H:%M:%S UTC"),
        status.listener,
        status
            .policy
            .source
            .as_ref()
            .map_or("embedded default".to_string(), |p| p.display().to_string()),
        status.policy.summary,
        status.policy.loaded.format("%Y-%m-%d %H:%M:%S UTC"),
        if status.fail_closed {
            "fail closed"
        } else {
            "fail open"
        },
        status.audit_dir.display(),
        if status.audit_writable {
            "writable"
        } else {
            "NOT writable"
        },
        match status.audit_rows_dropped {
            0 => String::new(),
            n => format!(", {n} rows dropped"),
        },
    );
    if !status.ready {
        out.push_str("starting: still attaching to the cgroups selected at start\n");
    }
    if let Some(n) = status.approvals_pending {
        out.push_str(&format!("approvals pending: {n}\n"));
    }
    if status.attached.is_empty() {
        out.push_str("managed cgroups: none\n");
    } else {
        out.push_str(&format!("managed cgroups: {}\n", status.attached.len()));
        for a in &status.attached {
            out.push_str(&format!(
                "  {}  since {}\n    {}\n",
                a.cgroup.display(),
                a.since.format("%H:%M:%S"),
                a.reason
            ));
            for netns in &a.netns {
                out.push_str(&format!("    listening in its network namespace {netns}\n"));
            }
        }
    }
    if !status.budgets.is_empty() {
        out.push_str("LLM token budgets (today, UTC):\n");
    }
    for b in &status.budgets {
        out.push_str(&format!(
            "  {}: {} of {} tokens{}{}{}\n",
            b.workload,
            b.spent_today,
            b.tokens_per_day,
            b.providers
                .as_ref()
                .map(|p| format!(" ({})", p.join(", ")))
                .unwrap_or_default(),
            if b.spent_today >= b.tokens_per_day {
                ": spent, calls refused until midnight UTC"
            } else {
                ""
            },
            if b.earlier_calls_counted {
                ""
            } else {
                " (calls from before the agent started are read from the audit at the next call)"
            },
        ));
    }
    for problem in &status.problems {
        out.push_str(&format!("problem: {problem}\n"));
    }
    out
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("warden: {e:#}");
    ExitCode::from(run::EXIT_WARDEN_FAILED as u8)
}

/// `warden approvals ...`: exit code 1 on any refusal, with the agent's
/// reason on stderr.
fn approvals(socket: PathBuf, command: ApprovalsCommand) -> ExitCode {
    use warden::approvals::control::Client;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::anyhow!("starting the runtime: {e}")),
    };
    let client = Client::new(socket);
    let result = runtime.block_on(async {
        let token = |arg: &TokenArg| -> anyhow::Result<String> {
            match (&arg.id_token_file, &arg.id_token) {
                (Some(file), _) => std::fs::read_to_string(file)
                    .map(|t| t.trim().to_string())
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display())),
                (None, Some(token)) => Ok(token.clone()),
                (None, None) => anyhow::bail!(
                    "a reviewer signs in: pass --id-token-file FILE (or set WARDEN_ID_TOKEN) with your OIDC ID token"
                ),
            }
        };
        let (method, path, token, body) = match &command {
            ApprovalsCommand::List { .. } => (http::Method::GET, "/v1/approvals".to_string(), None, None),
            ApprovalsCommand::Show { id } => (http::Method::GET, format!("/v1/approvals/{id}"), None, None),
            ApprovalsCommand::Approve { id, token: t } => {
                (http::Method::POST, format!("/v1/approvals/{id}/approve"), Some(token(t)?), None)
            }
            ApprovalsCommand::Reject { id, reason, token: t } => (
                http::Method::POST,
                format!("/v1/approvals/{id}/reject"),
                Some(token(t)?),
                Some(serde_json::json!({ "reason": reason })),
            ),
        };
        client.call_ok(method, &path, token.as_deref(), body).await
    });
    match result {
        Ok(answer) => {
            print!("{}", approvals_text(&command, &answer));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warden: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What `warden approvals` prints: a line per request for `list`, the whole
/// request for `show`, the outcome for `approve` and `reject`.
fn approvals_text(command: &ApprovalsCommand, answer: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    match command {
        ApprovalsCommand::List { json: true } | ApprovalsCommand::Show { .. } => {
            format!(
                "{}\n",
                serde_json::to_string_pretty(answer).unwrap_or_default()
            )
        }
        ApprovalsCommand::List { json: false } => {
            let items = answer.as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                return "no request waits for approval\n".to_string();
            }
            let mut out = String::new();
            for p in items {
                let requester = &p["requester"];
                let who = requester["workload"]
                    .as_str()
                    .or(requester["exe"].as_str())
                    .unwrap_or("?");
                let mut request = s(&p, "request").replace('\n', " ");
                if request.chars().count() > 80 {
                    request = request.chars().take(79).collect::<String>() + "…";
                }
                out.push_str(&format!(
                    "{}  {}  {} -> {}  rule {}  {}/{} approvals  expires {}\n    {}\n",
                    s(&p, "id"),
                    s(&p, "protocol"),
                    who,
                    s(&p, "destination"),
                    s(&p, "rule"),
                    p["approved_by"].as_array().map_or(0, |a| a.len()),
                    p["quorum"].as_u64().unwrap_or(1),
                    s(&p, "expires_at"),
                    request
                ));
            }
            out
        }
        ApprovalsCommand::Approve { id, .. } => match s(answer, "state").as_str() {
            "released" => format!("approved: request {id} runs now\n"),
            _ => format!(
                "approved: request {id} has {} of {} approvals and waits for more\n",
                answer["approvals"].as_u64().unwrap_or(0),
                answer["quorum"].as_u64().unwrap_or(0)
            ),
        },
        ApprovalsCommand::Reject { id, .. } => format!("rejected: request {id} will not run\n"),
    }
}

/// `warden audit ...`: exit code 1 on any error (bad SQL included), with
/// the reason on stderr; a reader that goes away (`| head`) is no error.
fn audit(command: AuditCommand) -> ExitCode {
    use warden::audit::{
        query::{AuditQuery, AuditTable, Format, TailOptions, tail},
        replay::replay,
    };
    if let AuditCommand::Recover { dir } = &command {
        return match warden::audit::recover(&dir.audit_dir) {
            Ok(done) => {
                println!(
                    "recovered {} rows from {} journals under {}",
                    done.rows,
                    done.journals,
                    dir.audit_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warden: audit recover: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warden: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let (what, result) = runtime.block_on(async {
        match command {
            AuditCommand::Sql { dir, format, sql } => {
                let format = match format {
                    SqlFormat::Table => Format::Table,
                    SqlFormat::Csv => Format::Csv,
                    SqlFormat::Json => Format::Json,
                };
                let result = match AuditQuery::open(&dir.audit_dir) {
                    Ok(query) => query.print(&sql, format, &mut stdout).await.map(drop),
                    Err(e) => Err(e),
                };
                ("sql", result)
            }
            AuditCommand::Tail {
                dir,
                table,
                format,
                from_start,
            } => {
                let options = TailOptions {
                    table: match table {
                        TableArg::Requests => AuditTable::Requests,
                        TableArg::Connections => AuditTable::Connections,
                        TableArg::Approvals => AuditTable::Approvals,
                        TableArg::Events => AuditTable::Events,
                    },
                    format: match format {
                        TailFormat::Json => Format::Json,
                        TailFormat::Table => Format::Table,
                    },
                    from_start,
                    poll: TailOptions::DEFAULT_POLL,
                };
                let result = tail(&dir.audit_dir, &options, &mut stdout, stop_signal()).await;
                ("tail", result)
            }
            AuditCommand::Recover { .. } => unreachable!("handled before the runtime starts"),
            AuditCommand::Replay { dir, session_id } => {
                let result = match AuditQuery::open(&dir.audit_dir) {
                    Ok(query) => replay(&query, &session_id, &mut stdout).await,
                    Err(e) => Err(e),
                };
                ("replay", result)
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warden: audit {what}: {e}");
            ExitCode::from(1)
        }
    }
}

/// Completes at Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A dead `warden run` agent left its programs pinned (so its cgroup fails
/// closed) and its cgroup in place. Release both once nothing runs there.
fn cleanup(kill: bool) -> anyhow::Result<()> {
    let host = preflight::check(preflight::Role::Daemon)?;
    let stale = capture::stale_pin_dirs(&host.bpffs);
    if stale.is_empty() {
        println!("nothing to clean up");
    }
    for (pins, pid) in stale {
        let is_daemon = pins
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(capture::DAEMON_PIN_PREFIX));
        if is_daemon {
            // A daemon's services are not its own: they keep running.
            capture::remove_pins(&pins)?;
            println!(
                "daemon {pid}: released the programs it left on the cgroups it managed; their new connections now go direct"
            );
            continue;
        }
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
