//! The agent: listeners, kernel programs, proxy and audit, started together
//! and stopped in the order that loses nothing. `warden run` starts one for
//! a single program; `warden daemon` starts the same agent for many cgroups.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, net::TcpListener};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use warden_common::{Refused, refused};

use crate::{
    approvals::{Approvals, Fetcher, control, review},
    audit::{AuditConfig, AuditSink, AuditWriter, ConnectionRow, Event, EventRow, RECORDINGS_DIR},
    capture::{Capture, Listener},
    identity::Origin,
    metrics::Metrics,
    netns::{Namespace, Namespaces, NsId},
    policy::{ApprovalSettings, ConnectionRequest, LivePolicy, Policy, Transport},
    proxy::{
        Proxy, detect::Protocol, intercept::Interceptor, ssh::HostKeys, token::WorkloadTokens,
    },
    tls::Authority,
};

pub struct AgentOptions {
    /// Port of the loopback listeners (127.0.0.1 and ::1); 0 picks a free one.
    pub listen_port: u16,
    pub policy: Policy,
    /// The file a reload rereads; None for the embedded default.
    pub policy_source: Option<PathBuf>,
    pub audit: AuditConfig,
    /// This agent's directory in bpffs: its links are pinned there and
    /// outlive it, so its cgroups fail closed. None: they fail open.
    pub pin_dir: Option<PathBuf>,
    /// TLS interception; None relays TLS as opaque bytes.
    pub tls: Option<Interceptor>,
    /// Extra CAs the agent trusts for its own TLS (servers, the identity
    /// provider, the approvals webhook).
    pub upstream_ca: Vec<PathBuf>,
    /// The control API's socket, served when the policy has `approvals:`
    /// or `serve_control` asks for it.
    pub control_socket: PathBuf,
    /// Serve the control API (status, policy reload) even without approvals.
    pub serve_control: bool,
    /// Where the reviewers' web page listens (loopback), if anywhere.
    pub review_listen: Option<SocketAddr>,
    /// Where the control API also listens, with TLS (loopback), if anywhere.
    pub control_listen: Option<SocketAddr>,
    /// The host keys SSH clients are shown; None relays SSH as opaque bytes.
    pub ssh_host_keys: Option<Arc<HostKeys>>,
    /// Where Prometheus metrics are served (loopback), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

pub struct Agent {
    core: Arc<Core>,
    audit: AuditWriter,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// What the agent's operations (status, reload, attach) share with the
/// control API.
struct Core {
    capture: Arc<Capture>,
    sink: AuditSink,
    policy: Arc<LivePolicy>,
    policy_source: Option<PathBuf>,
    policy_loaded: Mutex<DateTime<Utc>>,
    approvals: Option<Arc<Approvals>>,
    listener: SocketAddr,
    audit_dir: PathBuf,
    started: DateTime<Utc>,
    /// Why each attached cgroup is managed, and since when.
    reasons: Mutex<BTreeMap<PathBuf, (String, DateTime<Utc>)>>,
    /// What is wrong now, by subject, for `warden status`.
    problems: Mutex<BTreeMap<String, String>>,
    /// Whether the daemon has attached to everything selected at start.
    ready: AtomicBool,
    /// What programs must trust: the CA, the SSH host keys.
    authority: Option<Arc<Authority>>,
    ssh_host_keys: Option<Arc<HostKeys>>,
    /// The network namespaces served besides the agent's own.
    namespaces: Namespaces,
}

/// What `warden status` shows.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    /// False while the daemon is still attaching to what it selected at start.
    pub ready: bool,
    pub started: DateTime<Utc>,
    pub listener: SocketAddr,
    /// Whether managed cgroups fail closed while the agent is down.
    pub fail_closed: bool,
    pub policy: PolicyStatus,
    pub attached: Vec<AttachedCgroup>,
    pub approvals_pending: Option<usize>,
    pub audit_dir: PathBuf,
    pub audit_writable: bool,
    pub audit_rows_dropped: u64,
    pub problems: Vec<String>,
    /// The policy's daily token budgets and what each workload used today.
    #[serde(default)]
    pub budgets: Vec<BudgetStatus>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BudgetStatus {
    pub workload: String,
    pub tokens_per_day: u64,
    /// None: every provider.
    pub providers: Option<Vec<String>>,
    pub spent_today: u64,
    /// False until the day's calls from before the agent started have been
    /// read from the audit (at the first LLM call a budget covers).
    pub earlier_calls_counted: bool,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct PolicyStatus {
    pub source: Option<PathBuf>,
    pub summary: String,
    pub loaded: DateTime<Utc>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct AttachedCgroup {
    pub cgroup: PathBuf,
    pub reason: String,
    pub since: DateTime<Utc>,
    /// The network namespaces of its processes that the agent listens in,
    /// besides its own.
    #[serde(default)]
    pub netns: Vec<String>,
}

/// What a stop left behind, for the caller to report.
#[derive(Debug)]
pub struct StopReport {
    pub rows_written: u64,
    pub connections_cut: bool,
}

impl Agent {
    pub async fn start(options: AgentOptions) -> anyhow::Result<Agent> {
        raise_fd_limit();
        let (v4, v6) = bind_listeners(options.listen_port).await?;
        let port = v4.local_addr()?.port();
        let capture = Arc::new(
            Capture::load(
                Listener {
                    v4: Ipv4Addr::LOCALHOST,
                    v6: Ipv6Addr::LOCALHOST,
                    port,
                },
                options.pin_dir,
            )
            .context("loading the kernel programs")?,
        );
        capture.set_udp_allowed(&options.policy.udp_allowed_ports())?;
        let audit_dir = options.audit.dir.clone();
        let recordings = audit_dir.join(RECORDINGS_DIR);
        let metrics = options.metrics_listen.map(|_| Arc::new(Metrics::new()));
        let (sink, audit) = AuditWriter::start_with_metrics(options.audit, metrics.clone())
            .context("starting the audit writer")?;
        sink.record_event(EventRow::now(
            Event::AgentStarted,
            format!(
                "agent {} started; policy: {}",
                env!("CARGO_PKG_VERSION"),
                options.policy.summary()
            ),
        ));
        let policy = Arc::new(LivePolicy::new(options.policy));
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let approvals = match policy.current().approvals() {
            Some(settings) => {
                Some(start_approvals(settings, &policy, &sink, &options.upstream_ca).await?)
            }
            None => None,
        };
        let workload_tokens = Arc::new(WorkloadTokens::new(Fetcher::new(
            crate::tls::upstream_config(&options.upstream_ca, &[b"http/1.1".to_vec()])?,
        )));
        if let Some(settings) = policy.current().workload_tokens().cloned() {
            let tokens = workload_tokens.clone();
            tokio::spawn(async move { tokens.discover(&settings).await });
        }
        let authority = options.tls.as_ref().map(|t| t.authority().clone());
        let proxy = Arc::new(Proxy {
            capture: capture.clone(),
            policy: policy.clone(),
            audit: sink.clone(),
            tls: options.tls,
            lineage: Arc::default(),
            approvals: approvals.clone(),
            workload_tokens,
            ssh_host_keys: options.ssh_host_keys.clone(),
            recordings: Some(recordings),
        });
        let own = Arc::new(Namespace::own().context("reading the agent's network namespace")?);
        capture.serve_netns(own.cookie)?;
        let namespaces = {
            let (proxy, tracker) = (proxy.clone(), tracker.clone());
            Namespaces::new(
                own.id,
                port,
                Box::new(move |listener, netns, stop| {
                    tokio::spawn(proxy.clone().serve(listener, netns, tracker.clone(), stop));
                }),
                cancel.clone(),
            )
        };
        tokio::spawn(
            proxy
                .clone()
                .serve(v4, own.clone(), tracker.clone(), cancel.clone()),
        );
        tokio::spawn(proxy.serve(v6, own, tracker.clone(), cancel.clone()));
        let now = Utc::now();
        let core = Arc::new(Core {
            capture: capture.clone(),
            sink: sink.clone(),
            policy: policy.clone(),
            policy_source: options.policy_source,
            policy_loaded: Mutex::new(now),
            approvals: approvals.clone(),
            listener: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            audit_dir,
            started: now,
            reasons: Mutex::default(),
            problems: Mutex::default(),
            ready: AtomicBool::new(false),
            authority: authority.clone(),
            ssh_host_keys: options.ssh_host_keys,
            namespaces,
        });
        if approvals.is_some() || options.serve_control {
            let socket = options.control_socket;
            let listener = control::bind(&socket).await?;
            tracing::info!(socket = %socket.display(), "control API listening");
            let services = control::Services {
                approvals: approvals.clone(),
                operations: Some(core.clone()),
            };
            tokio::spawn(control::serve(listener, socket, services, cancel.clone()));
        }
        if options.review_listen.is_some() || options.control_listen.is_some() {
            let Some(approvals) = &approvals else {
                anyhow::bail!(
                    "--review-listen and --control-listen serve reviewers, and this policy holds nothing for review: add an `approvals:` section and rules with `action: approve`"
                );
            };
            let Some(authority) = &authority else {
                anyhow::bail!(
                    "the review page and the control port are served over TLS with the agent's CA: run without --no-tls-intercept"
                );
            };
            if let Some(addr) = options.review_listen {
                review::start(addr, authority, approvals.clone(), cancel.clone()).await?;
            }
            if let Some(addr) = options.control_listen {
                control::serve_tls(addr, authority, approvals.clone(), cancel.clone()).await?;
            }
        }
        if let (Some(addr), Some(metrics)) = (options.metrics_listen, metrics) {
            crate::metrics::serve(addr, metrics, approvals.clone(), cancel.clone()).await?;
        }
        if let Some(ring) = capture.take_refusals() {
            tokio::spawn(audit_refusals(ring, core.clone(), cancel.clone()));
        }
        tracing::info!(port, "agent listening on 127.0.0.1 and [::1]");
        Ok(Agent {
            core,
            audit,
            tracker,
            cancel,
        })
    }

    pub fn listener(&self) -> SocketAddr {
        self.core.listener
    }

    /// Redirect the connections of every process in a cgroup (and below it).
    pub fn attach(&self, cgroup: &Path) -> anyhow::Result<()> {
        self.core
            .capture
            .attach(cgroup)
            .with_context(|| format!("attaching to cgroup {}", cgroup.display()))
    }

    /// [`Agent::attach`], remembered with the reason for `warden status`
    /// and written to the audit's events.
    pub fn manage(&self, cgroup: &Path, reason: &str) -> anyhow::Result<()> {
        self.core.manage(cgroup, reason)
    }

    /// Stop managing a cgroup (it went, or no longer matches).
    pub fn release(&self, cgroup: &Path, why: &str) {
        self.core.release(cgroup, why);
    }

    /// Processes came into a managed cgroup: listen in any network
    /// namespace of theirs the agent does not serve yet.
    pub fn follow_namespaces(&self, cgroup: &Path) {
        self.core.follow_namespaces(cgroup);
    }

    pub fn detach(&self, cgroup: &Path) {
        self.core.capture.detach(cgroup);
    }

    /// The cgroups this agent's programs are attached to.
    pub fn attached(&self) -> Vec<PathBuf> {
        self.core.capture.attached()
    }

    /// Everything selected at start is attached: `warden status` says so.
    pub fn set_ready(&self) {
        self.core.ready.store(true, Ordering::Release);
    }

    /// Something `warden status` should say is wrong, until cleared.
    pub fn set_problem(&self, subject: &str, problem: Option<String>) {
        let mut problems = self.core.problems.lock().expect("agent lock");
        match problem {
            Some(p) => problems.insert(subject.to_string(), p),
            None => problems.remove(subject),
        };
    }

    /// Reread the policy file and put it in force; see [`Core::reload`].
    pub fn reload(&self) -> anyhow::Result<String> {
        self.core.reload()
    }

    pub fn status(&self) -> Status {
        self.core.status()
    }

    /// Stop: no new connections, in-flight ones get `grace` to finish, then
    /// the audit is flushed. With `Detach::All` the caller has already
    /// emptied the cgroups (or chose fail-open); with `Detach::KeepPins`
    /// the pinned programs stay, and the cgroups' new connections fail
    /// until an agent takes over.
    pub async fn stop(self, grace: Duration, detach: Detach) -> anyhow::Result<StopReport> {
        self.cancel.cancel();
        let core = &self.core;
        // Held requests are refused now rather than cut at the end of the
        // grace: their clients get the reason.
        if let Some(approvals) = &core.approvals {
            approvals.abandon_all("the agent stopped before a reviewer decided");
        }
        self.tracker.close();
        let connections_cut = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err();
        if connections_cut {
            tracing::warn!(?grace, "connections still open at shutdown were cut");
        }
        let (pending, flows) = core.capture.records_in_flight();
        tracing::info!(pending, flows, "kernel records left at stop");
        let kept = match detach {
            Detach::KeepPins if core.capture.pinned() => {
                core.capture.leave_pinned();
                "; managed cgroups fail closed until an agent takes over"
            }
            _ => {
                core.capture.detach_all();
                ""
            }
        };
        core.sink.record_event(EventRow::now(
            Event::AgentStopped,
            if connections_cut {
                format!("agent stopped; connections still open after {grace:?} were cut{kept}")
            } else {
                format!("agent stopped{kept}")
            },
        ));
        let rows_written = self.audit.shutdown().await.context("flushing the audit")?;
        Ok(StopReport {
            rows_written,
            connections_cut,
        })
    }
}

/// The subject under which `warden status` shows that a cgroup's network
/// namespaces could not be served.
fn netns_problem(cgroup: &Path) -> String {
    format!("netns {}", cgroup.display())
}

/// The policy file, or the embedded default without one.
pub fn load_policy(path: Option<&Path>) -> anyhow::Result<Policy> {
    Ok(match path {
        Some(path) => Policy::load(path)?,
        None => Policy::embedded_default(),
    })
}

/// Where and how the audit is written: `dir` (a flag or the daemon's
/// configuration) over the policy's `audit:`, over the defaults.
pub fn audit_config(dir: Option<PathBuf>, policy: &Policy) -> AuditConfig {
    let from_policy = policy.audit_settings();
    let defaults = AuditConfig::default();
    AuditConfig {
        dir: dir.or(from_policy.dir).unwrap_or(defaults.dir),
        rotate_every: from_policy.rotate.unwrap_or(defaults.rotate_every),
        retention: from_policy.retention,
        ..defaults
    }
}

/// TLS interception with the CA in `<state_dir>/ca` (made on first use),
/// or None to relay TLS as opaque bytes.
pub fn interceptor(
    intercept: bool,
    state_dir: &Path,
    upstream_ca: &[PathBuf],
) -> anyhow::Result<Option<Interceptor>> {
    if !intercept {
        return Ok(None);
    }
    let authority = Arc::new(Authority::load_or_create(&state_dir.join("ca"))?);
    let upstream = crate::tls::upstream_config(upstream_ca, &[])?;
    Ok(Some(Interceptor::new(authority, upstream)))
}

/// What happens to the kernel programs when the agent stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detach {
    All,
    KeepPins,
}

impl Core {
    fn manage(&self, cgroup: &Path, reason: &str) -> anyhow::Result<()> {
        self.capture
            .attach(cgroup)
            .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
        self.reasons
            .lock()
            .expect("agent lock")
            .insert(cgroup.to_path_buf(), (reason.to_string(), Utc::now()));
        self.sink.record_event(EventRow::now(
            Event::CgroupAttached,
            format!("{}: {reason}", cgroup.display()),
        ));
        self.follow_namespaces(cgroup);
        Ok(())
    }

    /// Listen in each network namespace the cgroup's processes are in. A
    /// namespace that cannot be served is a problem for `warden status`;
    /// the kernel keeps refusing its connects.
    fn follow_namespaces(&self, cgroup: &Path) {
        let followed = self.namespaces.follow(cgroup);
        self.let_go(followed.gone);
        let mut failed: Vec<String> = followed.failed.iter().map(|e| e.to_string()).collect();
        for (id, cookie) in followed.added {
            match self.capture.serve_netns(cookie) {
                Ok(()) => self.sink.record_event(EventRow::now(
                    Event::NetnsServed,
                    format!("{id}: processes of {}", cgroup.display()),
                )),
                Err(e) => failed.push(format!("{id}: {e}")),
            }
        }
        let subject = netns_problem(cgroup);
        let mut problems = self.problems.lock().expect("agent lock");
        if failed.is_empty() {
            problems.remove(&subject);
        } else {
            tracing::error!(cgroup = %cgroup.display(), problems = ?failed, "cannot serve a managed cgroup's network namespace");
            problems.insert(
                subject,
                format!(
                    "{}: connections from these network namespaces are refused: {}",
                    cgroup.display(),
                    failed.join("; ")
                ),
            );
        }
    }

    /// Namespaces no managed cgroup has processes in any more: connects
    /// from there are refused again.
    fn let_go(&self, gone: Vec<(NsId, u64)>) {
        for (id, cookie) in gone {
            self.capture.unserve_netns(cookie);
            self.sink.record_event(EventRow::now(
                Event::NetnsReleased,
                format!("{id}: no managed cgroup has processes there"),
            ));
        }
    }

    /// A connect came from a namespace not served: look for it among the
    /// processes of every managed cgroup (it may be one that a unit made
    /// after its first process came, as systemd's `PrivateNetwork=` does).
    fn follow_all_namespaces(&self) {
        for cgroup in self.capture.attached() {
            self.follow_namespaces(&cgroup);
        }
    }

    fn release(&self, cgroup: &Path, why: &str) {
        self.capture.detach(cgroup);
        self.let_go(self.namespaces.forget(cgroup));
        self.problems
            .lock()
            .expect("agent lock")
            .remove(&netns_problem(cgroup));
        self.reasons.lock().expect("agent lock").remove(cgroup);
        self.sink.record_event(EventRow::now(
            Event::CgroupDetached,
            format!("{}: {why}", cgroup.display()),
        ));
    }

    /// A reload is all or nothing: a policy that does not load, or that
    /// changes what is read only at start, is refused with the reason and
    /// the old one stays in force. Either way it is an audit event.
    fn reload(&self) -> anyhow::Result<String> {
        let result = self.try_reload();
        let (event, message) = match &result {
            Ok(summary) => (Event::PolicyReloaded, summary.clone()),
            Err(e) => (Event::PolicyReloadRefused, format!("{e:#}")),
        };
        self.sink.record_event(EventRow::now(event, message));
        result
    }

    fn try_reload(&self) -> anyhow::Result<String> {
        let Some(source) = &self.policy_source else {
            anyhow::bail!(
                "this agent runs the embedded default policy: there is no file to reread; \
                 give the daemon a `policy:` file to reload"
            );
        };
        let policy = self.policy.replace(Policy::load(source)?)?;
        self.capture
            .set_udp_allowed(&policy.udp_allowed_ports())
            .context("the new policy is in force, but the kernel kept the old UDP ports")?;
        *self.policy_loaded.lock().expect("agent lock") = Utc::now();
        Ok(format!("{}: {}", source.display(), policy.summary()))
    }

    fn status(&self) -> Status {
        let reasons = self.reasons.lock().expect("agent lock");
        let namespaces = self.namespaces.served();
        let attached = self
            .capture
            .attached()
            .into_iter()
            .map(|cgroup| {
                let (reason, since) = reasons
                    .get(&cgroup)
                    .cloned()
                    .unwrap_or_else(|| ("attached by warden run".into(), self.started));
                let netns = namespaces
                    .iter()
                    .filter(|(_, users)| users.contains(&cgroup))
                    .map(|(id, _)| id.to_string())
                    .collect();
                AttachedCgroup {
                    cgroup,
                    reason,
                    since,
                    netns,
                }
            })
            .collect();
        let mut problems: Vec<String> = self
            .problems
            .lock()
            .expect("agent lock")
            .values()
            .cloned()
            .collect();
        if !self.sink.writable() {
            problems.push(format!(
                "the audit cannot be written to {}: check the disk and its permissions",
                self.audit_dir.display()
            ));
        }
        let policy = self.policy.current();
        let ledger = self.sink.tokens();
        let budgets = policy
            .budgets()
            .iter()
            .map(|b| BudgetStatus {
                workload: b.workload.clone(),
                tokens_per_day: b.tokens_per_day,
                providers: b
                    .providers
                    .as_ref()
                    .map(|p| p.iter().map(|s| s.to_string()).collect()),
                spent_today: ledger.spent(b),
                earlier_calls_counted: ledger.has_earlier_calls(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            ready: self.ready.load(Ordering::Acquire),
            started: self.started,
            listener: self.listener,
            fail_closed: self.capture.pinned(),
            policy: PolicyStatus {
                source: self.policy_source.clone(),
                summary: policy.summary(),
                loaded: *self.policy_loaded.lock().expect("agent lock"),
            },
            attached,
            approvals_pending: self.approvals.as_ref().map(|a| a.list().len()),
            audit_dir: self.audit_dir.clone(),
            audit_writable: self.sink.writable(),
            audit_rows_dropped: self.sink.dropped(),
            problems,
            budgets,
        }
    }
}

impl control::Operations for Core {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(Core::status(self)).unwrap_or_default()
    }

    fn reload_policy(&self) -> Result<String, String> {
        self.reload().map_err(|e| format!("{e:#}"))
    }

    fn trust(&self) -> serde_json::Value {
        let policy = self.policy.current();
        serde_json::json!({
            "ca_pem": self.authority.as_ref().map(|a| a.ca_pem()),
            "ssh_known_hosts": self.ssh_host_keys.as_ref().map(|k| k.known_hosts(policy.ssh_logins())),
            "audit_dir": self.audit_dir,
        })
    }

    fn attach_run(&self, cgroup: &Path, reason: &str) -> Result<(), String> {
        run_cgroup(cgroup)?;
        self.manage(cgroup, reason).map_err(|e| format!("{e:#}"))
    }

    fn release_run(&self, cgroup: &Path) -> Result<(), String> {
        run_cgroup(cgroup)?;
        if !self.capture.attached().iter().any(|c| c == cgroup) {
            return Err(format!("{} is not managed by this agent", cgroup.display()));
        }
        self.release(cgroup, "the program of `warden run` ended");
        Ok(())
    }
}

/// `warden run` asks only for the cgroups it makes, `<root>/warden/run-<pid>`.
fn run_cgroup(cgroup: &Path) -> Result<(), String> {
    let parent_is_warden = cgroup
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == "warden");
    let named_run = cgroup
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("run-"));
    if parent_is_warden && named_run && cgroup.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{} is not a cgroup of `warden run` (<cgroup root>/warden/run-<pid>); the daemon manages others by its configuration's manage:",
            cgroup.display()
        ))
    }
}

/// The approvals broker; the identity provider is read now so that a wrong
/// issuer shows at start (the agent serves on without it: reviews fail
/// until it answers).
async fn start_approvals(
    settings: &ApprovalSettings,
    policy: &Arc<LivePolicy>,
    sink: &AuditSink,
    upstream_ca: &[PathBuf],
) -> anyhow::Result<Arc<Approvals>> {
    let tls = crate::tls::upstream_config(upstream_ca, &[b"http/1.1".to_vec()])?;
    let approvals = Approvals::new(settings, policy.clone(), sink.clone(), Fetcher::new(tls));
    if let Err(error) = approvals.verifier().discover().await {
        tracing::warn!(%error, "reviewers cannot sign in until the identity provider answers");
    }
    Ok(approvals)
}

/// Each proxied connection holds two sockets and two pipes: lift the soft
/// descriptor limit to the hard one so that thousands of connections fit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

async fn bind_listeners(port: u16) -> anyhow::Result<(TcpListener, TcpListener)> {
    let bind = |addr: SocketAddr| async move {
        crate::netns::listen_here(addr).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow::anyhow!("{addr} is already in use: another agent or program listens there; choose another port with --listen-port, or 0 for a free one")
            } else {
                anyhow::anyhow!("binding the agent's listener on {addr}: {e}")
            }
        })
    };
    if port != 0 {
        let v4 = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)).await?;
        let v6 = bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)).await?;
        return Ok((v4, v6));
    }
    // Both families must share one port: the kernel programs know only one.
    for _ in 0..32 {
        let v4 = bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).await?;
        let port = v4.local_addr()?.port();
        if let Ok(v6) = crate::netns::listen_here(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port))
        {
            return Ok((v4, v6));
        }
    }
    anyhow::bail!("found no port free on both 127.0.0.1 and [::1]; pass one with --listen-port")
}

/// What the kernel refused: UDP to a port the policy does not allow, and
/// connects from a network namespace where the agent does not listen. Each
/// is a `deny` row; a namespace not seen before is looked for among the
/// managed cgroups' processes, so that it is served from then on.
async fn audit_refusals(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    core: Arc<Core>,
    cancel: CancellationToken,
) {
    // SAFETY: the ring buffer owns its map descriptor for as long as the AsyncFd owns the ring.
    let mut ring = match unsafe {
        AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the kernel's refusals; they will not be audited");
            return;
        }
    };
    // Namespaces already looked for: one that cannot be served is not
    // looked for again at every refused connect.
    let mut seen = std::collections::HashSet::new();
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            ready = ring.readable_mut() => match ready { Ok(g) => g, Err(_) => return },
        };
        let inner = guard.get_inner_mut();
        while let Some(item) = inner.next() {
            if item.len() < size_of::<Refused>() {
                continue;
            }
            // SAFETY: the kernel wrote a Refused; read_unaligned copes with the ring's alignment.
            let event: Refused = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let origin = Origin::from_record(&event.conn);
            let (transport, kind, rule, error) = match event.reason {
                refused::NETNS => {
                    if seen.insert(event.conn.netns) {
                        core.follow_all_namespaces();
                    }
                    (
                        Transport::Tcp,
                        "tcp",
                        "netns",
                        "refused by the kernel: the connect came from a network namespace where                          the agent does not listen (docs/daemon.md#network-namespaces-of-their-own)",
                    )
                }
                _ => (
                    Transport::Udp,
                    "udp",
                    "udp",
                    "UDP to this port is not allowed (policy udp.allow_ports)",
                ),
            };
            let decision = core.policy.current().decide_connection(&ConnectionRequest {
                identity: &origin.identity,
                destination: origin.destination,
                transport,
            });
            let now = Utc::now();
            core.sink.record(ConnectionRow {
                session_id: uuid::Uuid::now_v7().to_string(),
                start_time: now,
                end_time: now,
                transport: kind,
                identity: origin.identity,
                workload: decision.workload,
                destination: origin.destination,
                protocol: Protocol::None.as_str(),
                server_name: None,
                tls: None,
                decision: "deny",
                rule: rule.into(),
                bytes_up: 0,
                bytes_down: 0,
                error: Some(error.into()),
            });
        }
        guard.clear_ready();
    }
}
