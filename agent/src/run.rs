//! `warden run`: one program, and everything it starts, in a fresh cgroup
//! whose outbound connections all go through the agent.
use std::{
    ffi::{CString, OsString},
    fs,
    os::unix::fs::PermissionsExt,
    os::{fd::AsRawFd, unix::process::ExitStatusExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};

use http::Method;

use crate::{
    agent::{self, Agent, AgentOptions, Detach},
    approvals::control::Client,
    capture,
    cgroup::ManagedCgroup,
    preflight,
    proxy::ssh::HostKeys,
    tls::{self},
};

/// Where SSH clients look for host keys system-wide; `warden run` adds the
/// agent's keys there, in the program's own view of the file system.
const SYSTEM_SSH_DIR: &str = "/etc/ssh";
/// The variable that names the known_hosts file with the agent's keys, for
/// programs that load one explicitly (paramiko's `load_host_keys`).
const KNOWN_HOSTS_VARIABLE: &str = "WARDEN_SSH_KNOWN_HOSTS";

pub struct RunOptions {
    pub policy: Option<PathBuf>,
    pub audit_dir: Option<PathBuf>,
    pub user: Option<String>,
    pub listen_port: u16,
    /// How long open connections may finish after the program exits.
    pub grace: Duration,
    pub command: Vec<OsString>,
    /// The agent's state: its CA lives in `<state_dir>/ca`.
    pub state_dir: PathBuf,
    /// Extra CAs the agent trusts for its own upstream TLS.
    pub upstream_ca: Vec<PathBuf>,
    /// End the program's TLS with the agent's CA (on by default).
    pub intercept_tls: bool,
    /// Unix sockets and socket directories the program must not reach,
    /// besides PostgreSQL's usual ones ([`UNIX_SOCKETS_HIDDEN`]).
    pub hide_paths: Vec<PathBuf>,
    /// The control API's socket (served when the policy has `approvals:`).
    pub control_socket: PathBuf,
    /// Where the reviewers' web page listens, if anywhere.
    pub review_listen: Option<std::net::SocketAddr>,
    /// Where the control API also listens with TLS, if anywhere.
    pub control_listen: Option<std::net::SocketAddr>,
    /// Start an agent of the run's own even when a daemon runs.
    pub standalone: bool,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where PostgreSQL's unix sockets usually are. The TCP hooks do not see
/// unix sockets, so a program that reached the server through one would go
/// around the agent: `warden run` covers these in the program's own mount
/// namespace (directories with an empty tmpfs, sockets with /dev/null).
const UNIX_SOCKETS_HIDDEN: [&str; 2] = ["/run/postgresql", "/var/run/postgresql"];
/// And the sockets a server with the default `unix_socket_directories`
/// of some builds makes: `/tmp/.s.PGSQL.<port>`.
const UNIX_SOCKET_PREFIX_IN_TMP: &str = ".s.PGSQL.";

/// The variables through which Python (ssl, requests, httpx), curl and Node
/// find the CA bundle that makes the child trust the agent.
const TRUST_VARIABLES: [&str; 5] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    // libpq (psql, psycopg, asyncpg...): verify-ca and verify-full read it.
    "PGSSLROOTCERT",
];

/// Exit code when Warden itself failed before the program ran (as env and docker do).
pub const EXIT_WARDEN_FAILED: i32 = 125;
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
pub const EXIT_NOT_FOUND: i32 = 127;

/// Runs the program to its end and returns the exit code to leave with.
pub async fn run(opts: RunOptions) -> anyhow::Result<i32> {
    let host = preflight::check(preflight::Role::Run)?;
    let mut daemon = DaemonLink::find(&opts.control_socket).await;
    if opts.standalone {
        if let Some(link) = daemon.take() {
            link.refuse_if_managing_this_process(&host.cgroup_root)
                .await?;
        }
    } else if daemon.is_some() {
        tracing::info!(socket = %opts.control_socket.display(), "a warden daemon protects this run");
        refuse_agent_flags(&opts)?;
    }
    let target = match &opts.user {
        Some(name) => Some(TargetUser::lookup(name)?),
        None => {
            tracing::warn!(
                "the program runs as root: a root process can leave its cgroup and unload Warden's programs; \
                 pass --user NAME to run it as it would run in production"
            );
            None
        }
    };
    // The agent lifts its descriptor limit; the program keeps the one it was given.
    let fd_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let me = std::process::id();
    let (protection, trust) = match daemon {
        Some(link) => {
            let trust = link.trust().await?;
            (Protection::Daemon(link), trust)
        }
        None => {
            let (agent, trust) = start_agent(&opts, &host, me).await?;
            (Protection::Embedded(agent), trust)
        }
    };

    // The child trusts the agent's CA through a bundle of its own, beside
    // the system's roots, and its SSH host keys; they go when the run ends.
    let run_dir = std::env::temp_dir().join(format!("warden-run-{me}"));
    let prepared = async {
        let mut child_env = Vec::new();
        let mut mounts = Vec::new();
        if trust.ca_pem.is_some() || !trust.known_hosts.is_empty() {
            fs::create_dir_all(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
            fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o755))?;
        }
        if let Some(pem) = &trust.ca_pem {
            let bundle = run_dir.join("ca-bundle.pem");
            tls::write_trust_bundle(pem, &bundle)?;
            child_env.extend(TRUST_VARIABLES.iter().map(|v| (*v, bundle.clone())));
        }
        if !trust.known_hosts.is_empty() {
            let home = target
                .as_ref()
                .map(|u| u.home.clone())
                .or_else(|| std::env::var_os("HOME").map(PathBuf::from));
            let (trusted, ssh_mounts) =
                ssh_known_hosts(&run_dir, &trust.known_hosts, home.as_deref())?;
            child_env.push((KNOWN_HOSTS_VARIABLE, trusted));
            mounts.extend(ssh_mounts);
        }
        let mut hide_paths = opts.hide_paths.clone();
        if trust.hide_control_socket {
            hide_paths.push(opts.control_socket.clone());
        }
        mounts.splice(0..0, out_of_reach(&hide_paths)?);
        let cgroup = ManagedCgroup::create(&host.cgroup_root, &format!("run-{me}"))?;
        anyhow::Ok((cgroup, child_env, mounts))
    }
    .await;
    let (cgroup, child_env, mounts) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            protection.finish(None, opts.grace).await?;
            let _ = fs::remove_dir_all(&run_dir);
            return Err(e);
        }
    };

    let outcome = async {
        protection.attach(cgroup.path(), &opts.command).await?;
        let mut child = spawn(
            &opts.command,
            &cgroup,
            target.as_ref(),
            &child_env,
            &trust.hidden_env,
            fd_limit,
            mounts,
        )?;
        supervise(&mut child).await
    }
    .await;

    // Whatever the program left behind in its cgroup goes with it, before
    // the programs detach, so that nothing runs on unprotected.
    let leftovers = cgroup.pids();
    if !leftovers.is_empty() {
        tracing::info!(
            count = leftovers.len(),
            "stopping processes the program left running"
        );
    }
    let path = cgroup.path().to_path_buf();
    let removed = cgroup.kill_and_remove(Duration::from_secs(5));
    protection.finish(Some(&path), opts.grace).await?;
    let _ = fs::remove_dir_all(&run_dir);
    removed?;
    outcome
}

/// What the program needs to talk through the agent that protects it.
struct Trust {
    ca_pem: Option<String>,
    known_hosts: String,
    /// Variables of ours that hold a real credential: not passed on.
    hidden_env: Vec<OsString>,
    /// The control socket is the agent's: the program must not reach it.
    hide_control_socket: bool,
}

/// Who protects the program: an agent of its own, or the host's daemon.
enum Protection {
    Embedded(Agent),
    Daemon(DaemonLink),
}

impl Protection {
    async fn attach(&self, cgroup: &Path, command: &[OsString]) -> anyhow::Result<()> {
        match self {
            Protection::Embedded(agent) => agent.attach(cgroup),
            Protection::Daemon(link) => link.attach(cgroup, command).await,
        }
    }

    /// The embedded agent stops (its audit flushed); the daemon is told the
    /// program's cgroup is gone.
    async fn finish(self, cgroup: Option<&Path>, grace: Duration) -> anyhow::Result<()> {
        match self {
            Protection::Embedded(agent) => {
                let report = agent.stop(grace, Detach::All).await?;
                tracing::info!(rows = report.rows_written, "audit flushed");
            }
            Protection::Daemon(link) => {
                if let Some(cgroup) = cgroup {
                    link.release(cgroup).await?;
                }
            }
        }
        Ok(())
    }
}

/// An agent of the run's own, with the policy and state its flags give.
async fn start_agent(
    opts: &RunOptions,
    host: &preflight::Host,
    me: u32,
) -> anyhow::Result<(Agent, Trust)> {
    let policy = agent::load_policy(opts.policy.as_deref())?;
    let stale = capture::stale_pin_dirs(&host.bpffs);
    if !stale.is_empty() {
        tracing::warn!(
            count = stale.len(),
            "agents that died left their cgroups failing closed; `warden cleanup` lists and releases them"
        );
    }
    let audit = agent::audit_config(opts.audit_dir.clone(), &policy);
    let interceptor = agent::interceptor(opts.intercept_tls, &opts.state_dir, &opts.upstream_ca)?;
    let ssh_keys = Arc::new(HostKeys::load_or_create(&opts.state_dir.join("ssh"))?);
    let trust = Trust {
        ca_pem: interceptor
            .as_ref()
            .map(|i| i.authority().ca_pem().to_string()),
        known_hosts: if policy.ssh_logins().next().is_some() {
            ssh_keys.known_hosts(policy.ssh_logins())
        } else {
            String::new()
        },
        // The real keys stay with the agent: a variable that holds one
        // (the policy's `api_key_env`, or any copy) is not passed on.
        hidden_env: std::env::vars_os()
            .filter(|(_, value)| {
                policy
                    .credential_secrets()
                    .any(|s| value.as_encoded_bytes() == s.as_bytes())
            })
            .map(|(name, _)| name)
            .collect(),
        // The program never reaches the control API: it could read what waits.
        hide_control_socket: policy.approvals().is_some(),
    };
    let agent = Agent::start(AgentOptions {
        listen_port: opts.listen_port,
        policy,
        policy_source: opts.policy.clone(),
        audit,
        pin_dir: Some(host.bpffs.join("warden").join(format!("agent-{me}"))),
        tls: interceptor,
        upstream_ca: opts.upstream_ca.clone(),
        control_socket: opts.control_socket.clone(),
        serve_control: false,
        review_listen: opts.review_listen,
        control_listen: opts.control_listen,
        ssh_host_keys: Some(ssh_keys),
        metrics_listen: opts.metrics_listen,
    })
    .await?;
    Ok((agent, trust))
}

/// With a daemon on the host, its policy, audit and CA apply to `warden
/// run` too: flags that would set up an agent of the run's own are
/// refused rather than silently ignored.
fn refuse_agent_flags(opts: &RunOptions) -> anyhow::Result<()> {
    let given = [
        ("--policy", opts.policy.is_some()),
        ("--audit-dir", opts.audit_dir.is_some()),
        ("--listen-port", opts.listen_port != 0),
        ("--upstream-ca", !opts.upstream_ca.is_empty()),
        ("--no-tls-intercept", !opts.intercept_tls),
        ("--review-listen", opts.review_listen.is_some()),
        ("--control-listen", opts.control_listen.is_some()),
        ("--metrics-listen", opts.metrics_listen.is_some()),
    ];
    let set: Vec<&str> = given
        .iter()
        .filter(|(_, on)| *on)
        .map(|(f, _)| *f)
        .collect();
    if set.is_empty() {
        return Ok(());
    }
    bail!(
        "a warden daemon serves {} on this host, and its policy, audit and CA apply to `warden run` too, \
         so {} would be ignored: drop {}, or pass --standalone to run an agent of this run's own",
        opts.control_socket.display(),
        set.join(", "),
        if set.len() == 1 { "it" } else { "them" }
    )
}

/// The host's daemon, over its control socket.
struct DaemonLink {
    client: Client,
}

impl DaemonLink {
    /// The daemon, when one answers on `socket`.
    async fn find(socket: &Path) -> Option<DaemonLink> {
        if !socket.exists() {
            return None;
        }
        let client = Client::new(socket.to_path_buf());
        match client.call(Method::GET, "/v1/status", None, None).await {
            Ok((status, _)) if status.is_success() => Some(DaemonLink { client }),
            _ => None,
        }
    }

    /// A standalone run inside a cgroup the daemon manages would have its
    /// own agent's connections sent through the daemon as well: refused.
    async fn refuse_if_managing_this_process(&self, cgroup_root: &Path) -> anyhow::Result<()> {
        let Some(own) = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| crate::identity::unified_cgroup_path(&text))
        else {
            return Ok(());
        };
        let own = cgroup_root.join(own.trim_start_matches('/'));
        let status = self.call(Method::GET, "/v1/status", None).await?;
        let managing = status["attached"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["cgroup"].as_str().is_some_and(|c| own.starts_with(c)));
        if let Some(attached) = managing {
            anyhow::bail!(
                "--standalone: this process is in {}, which the warden daemon manages ({}), so the \
                 run's own agent would send its connections through the daemon too; drop \
                 --standalone to have the daemon protect the program, or start it outside that cgroup",
                own.display(),
                attached["reason"].as_str().unwrap_or("no reason given"),
            );
        }
        Ok(())
    }

    async fn trust(&self) -> anyhow::Result<Trust> {
        let answer = self.call(Method::GET, "/v1/trust", None).await?;
        Ok(Trust {
            ca_pem: answer["ca_pem"].as_str().map(str::to_string),
            known_hosts: answer["ssh_known_hosts"].as_str().unwrap_or("").to_string(),
            // The daemon's credentials are in its own environment and files.
            hidden_env: Vec::new(),
            hide_control_socket: true,
        })
    }

    async fn attach(&self, cgroup: &Path, command: &[OsString]) -> anyhow::Result<()> {
        let command: Vec<String> = command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let reason = format!(
            "warden run -- {} (pid {})",
            command.join(" "),
            std::process::id()
        );
        let body = serde_json::json!({ "cgroup": cgroup, "reason": reason });
        self.call(Method::POST, "/v1/runs", Some(body)).await?;
        Ok(())
    }

    async fn release(&self, cgroup: &Path) -> anyhow::Result<()> {
        let body = serde_json::json!({ "cgroup": cgroup });
        self.call(Method::POST, "/v1/runs/release", Some(body))
            .await?;
        Ok(())
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        self.client
            .call_ok(method, path, None, body)
            .await
            .context("the warden daemon")
    }
}

/// Forward termination signals and wait; returns the exit code.
async fn supervise(child: &mut tokio::process::Child) -> anyhow::Result<i32> {
    let pid = child
        .id()
        .context("the program exited before it could be supervised")? as i32;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    loop {
        let sig = tokio::select! {
            status = child.wait() => {
                let status = status?;
                return Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            }
            _ = int.recv() => nix::sys::signal::SIGINT,
            _ = term.recv() => nix::sys::signal::SIGTERM,
            _ = hup.recv() => nix::sys::signal::SIGHUP,
            _ = quit.recv() => nix::sys::signal::SIGQUIT,
        };
        // A key press on the terminal already reached the program, which
        // shares our foreground process group: do not deliver it twice.
        let from_terminal = matches!(sig, nix::sys::signal::SIGINT | nix::sys::signal::SIGQUIT)
            && in_terminal_foreground();
        if !from_terminal {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    nix::unistd::tcgetpgrp(&stdin).is_ok_and(|fg| fg == nix::unistd::getpgrp())
}

/// The user a program runs as with --user.
struct TargetUser {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    home: PathBuf,
}

impl TargetUser {
    fn lookup(name: &str) -> anyhow::Result<Self> {
        let user = nix::unistd::User::from_name(name)
            .with_context(|| format!("looking up user {name}"))?
            .with_context(|| format!("no user named {name} on this host; create it, or pass an existing one to --user"))?;
        let cname = CString::new(name)?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .with_context(|| format!("reading the groups of {name}"))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(TargetUser {
            name: name.into(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
        })
    }
}

/// What the program's own mount namespace changes, prepared before the fork.
enum Mount {
    /// An empty read-only tmpfs over a directory.
    HideDir(CString),
    /// /dev/null over a socket or file.
    HideFile(CString),
    /// A file of the agent's over one of the host's.
    File { source: CString, target: CString },
    /// A read-only overlay: `options` names the lower directories.
    Overlay { target: CString, options: CString },
}

/// The existing sockets and socket directories to cover: PostgreSQL's usual
/// places and `extra`. A path given in `extra` that does not exist is an
/// error (a typo would leave a socket in reach).
fn out_of_reach(extra: &[PathBuf]) -> anyhow::Result<Vec<Mount>> {
    let mut paths: Vec<PathBuf> = UNIX_SOCKETS_HIDDEN.iter().map(PathBuf::from).collect();
    if let Ok(entries) = std::fs::read_dir("/tmp") {
        paths.extend(
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with(UNIX_SOCKET_PREFIX_IN_TMP) && !name.ends_with(".lock")
                })
                .map(|e| e.path()),
        );
    }
    for path in extra {
        if !path.exists() {
            bail!(
                "--hide-path {}: no such file or directory; give the unix socket or the directory that holds it",
                path.display()
            );
        }
        paths.push(path.clone());
    }
    let mut covered = Vec::new();
    let mut seen = Vec::new();
    for path in paths {
        // Through symlinks (/var/run -> /run): the mount lands on the target.
        let Ok(real) = std::fs::canonicalize(&path) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(&real) else {
            continue;
        };
        let c_path = c_path(&real)?;
        if seen.contains(&c_path) {
            continue;
        }
        seen.push(c_path.clone());
        covered.push(if meta.is_dir() {
            Mount::HideDir(c_path)
        } else {
            Mount::HideFile(c_path)
        });
    }
    Ok(covered)
}

/// Writes the known_hosts files the program sees: the system's
/// (`/etc/ssh/ssh_known_hosts`, through a read-only overlay on /etc/ssh)
/// and, when the user has one, `~/.ssh/known_hosts`, each with its own
/// lines kept and the agent's `lines` added. Returns the file with the
/// agent's lines and the mounts to make.
fn ssh_known_hosts(
    run_dir: &Path,
    lines: &str,
    home: Option<&Path>,
) -> anyhow::Result<(PathBuf, Vec<Mount>)> {
    let write = |path: &Path, original: Option<&Path>| -> anyhow::Result<()> {
        let mut text = original
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(lines);
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
        Ok(())
    };
    let dir = run_dir.join("ssh");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let system = Path::new(SYSTEM_SSH_DIR);
    let trusted = dir.join("ssh_known_hosts");
    write(&trusted, Some(&system.join("ssh_known_hosts")))?;
    let mut mounts = Vec::new();
    if system.is_dir() {
        mounts.push(Mount::Overlay {
            target: c_path(system)?,
            options: CString::new(format!("lowerdir={}:{SYSTEM_SSH_DIR}", dir.display()))?,
        });
    }
    if let Some(user_file) = home.map(|h| h.join(".ssh/known_hosts"))
        && user_file.is_file()
    {
        let copy = run_dir.join("user_known_hosts");
        write(&copy, Some(&user_file))?;
        mounts.push(Mount::File {
            source: c_path(&copy)?,
            target: c_path(&user_file)?,
        });
    }
    Ok((trusted, mounts))
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))
}

/// In the child, before exec: a mount namespace of its own in which each
/// hidden directory is an empty read-only tmpfs and each hidden socket is
/// /dev/null, so that connecting to them fails, and the agent's SSH host
/// keys are in the known_hosts files. Host mounts made later still
/// propagate in.
///
/// # Safety
/// Between fork and exec: only syscalls on data prepared before the fork.
unsafe fn mount_in_new_namespace(mounts: &[Mount]) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls on NUL-terminated strings that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ))?;
        for mount in mounts {
            match mount {
                Mount::HideDir(path) => check(libc::mount(
                    c"warden-hidden".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"size=4k,mode=0755".as_ptr().cast(),
                ))?,
                Mount::HideFile(path) => check(libc::mount(
                    c"/dev/null".as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?,
                Mount::File { source, target } => check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?,
                Mount::Overlay { target, options } => check(libc::mount(
                    c"warden-ssh".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    libc::MS_RDONLY,
                    options.as_ptr().cast(),
                ))?,
            }
        }
    }
    Ok(())
}

fn spawn(
    command: &[OsString],
    cgroup: &ManagedCgroup,
    user: Option<&TargetUser>,
    env: &[(&str, PathBuf)],
    hidden: &[OsString],
    (fd_soft, fd_hard): (libc::rlim_t, libc::rlim_t),
    mounts: Vec<Mount>,
) -> anyhow::Result<tokio::process::Child> {
    let Some((program, args)) = command.split_first() else {
        bail!("no program to run: put it after `--`, e.g. `warden run -- python3 app.py`");
    };
    // Opened before the fork: the child only writes to it.
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.procs_file())
        .with_context(|| format!("opening {}", cgroup.procs_file().display()))?;
    let procs_fd = procs.as_raw_fd();
    let ids = user.map(|u| (u.uid, u.gid, u.groups.clone()));

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .kill_on_drop(false)
        .envs(env.iter().map(|(k, v)| (k, v)));
    for name in hidden {
        cmd.env_remove(name);
    }
    if let Some(u) = user {
        cmd.env("USER", &u.name)
            .env("LOGNAME", &u.name)
            .env("HOME", &u.home);
    }
    // SAFETY: only async-signal-safe calls between fork and exec: write,
    // unshare, mount, setrlimit, setgroups, setgid, setuid, on data prepared
    // before the fork. The cgroup is joined first, while the child is still
    // root, and before exec, so that the program's first connect is already
    // redirected; the unix sockets are covered while it may still mount.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if !mounts.is_empty() {
                mount_in_new_namespace(&mounts)?;
            }
            let limit = libc::rlimit {
                rlim_cur: fd_soft,
                rlim_max: fd_hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
            std::io::ErrorKind::PermissionDenied => EXIT_NOT_EXECUTABLE,
            _ => EXIT_WARDEN_FAILED,
        };
        anyhow::Error::new(SpawnError {
            code,
            program: program.to_string_lossy().into_owned(),
            source: e,
        })
    })?;
    drop(procs);
    Ok(child)
}

/// A program that could not be started; carries the shell-style exit code.
#[derive(Debug, thiserror::Error)]
#[error("cannot run {program}")]
pub struct SpawnError {
    pub code: i32,
    pub program: String,
    #[source]
    pub source: std::io::Error,
}
