//! `warden daemon`: one agent per host for the services it is told to
//! protect. The same [`Agent`] as `warden run`, attached to the cgroups the
//! configuration selects, following them as they come and go, rereading
//! the policy on SIGHUP, and failing closed across its own restarts.
pub mod config;
mod notify;
mod watch;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    agent::{self, Agent, AgentOptions, Detach},
    approvals::Fetcher,
    capture, identity,
    kubernetes::{
        NodeFiles, PodCgroup, PodInfo,
        api::{self, ApiEvent, ApiPods},
    },
    policy::Policy,
    preflight,
    proxy::ssh::HostKeys,
};
pub use config::DaemonConfig;
use notify::Notifier;
use watch::{CgroupWatch, Change, Descend};

/// Connections still open at stop get this long to finish.
const DRAIN: Duration = Duration::from_secs(10);

/// `warden daemon --check`: the configuration and the policy it names
/// load, and what they say, in one line each.
pub fn check(config_path: &Path) -> anyhow::Result<String> {
    let config = DaemonConfig::load(config_path)?;
    let policy = match &config.policy {
        Some(path) => format!("{}: ok ({})", path.display(), Policy::load(path)?.summary()),
        None => format!(
            "embedded default policy ({})",
            Policy::embedded_default().summary()
        ),
    };
    Ok(format!(
        "{}: ok ({} unit patterns, {} cgroups, {} pod selectors{}, {})\n{policy}",
        config_path.display(),
        config.manage.units.len(),
        config.manage.cgroups.len(),
        config.manage.pods.len(),
        if config.kubernetes_api.is_some() {
            " with labels from the Kubernetes API"
        } else {
            ""
        },
        if config.fail_open {
            "fail open"
        } else {
            "fail closed"
        }
    ))
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = DaemonConfig::load(config_path)?;
    identity::use_node_root(&config.node_root);
    let host = preflight::check(preflight::Role::Daemon)?;
    let policy = agent::load_policy(config.policy.as_deref())?;
    if config.manage.is_empty() {
        tracing::warn!(
            config = %config_path.display(),
            "manage: selects nothing, so the daemon protects nothing; list units or cgroups there"
        );
    }
    let api_client = match &config.kubernetes_api {
        Some(k) => {
            let settings = k.resolve(|name| std::env::var(name).ok())?;
            let tls = crate::tls::private_ca_config(&settings.ca_file).with_context(|| {
                format!(
                    "kubernetes_api: the cluster CA {}; mount the service account's ca.crt or set kubernetes_api.ca_file",
                    settings.ca_file.display()
                )
            })?;
            Some((settings, Fetcher::new(tls)))
        }
        None => None,
    };
    let audit = agent::audit_config(config.audit_dir.clone(), &policy);
    let interceptor =
        agent::interceptor(config.tls_intercept, &config.state_dir, &config.upstream_ca)?;
    let ssh_keys = Arc::new(HostKeys::load_or_create(&config.state_dir.join("ssh"))?);
    // Dead daemons' pins keep their cgroups failing closed until this one
    // has attached; then they go.
    let predecessors: Vec<PathBuf> = capture::stale_pin_dirs(&host.bpffs)
        .into_iter()
        .filter(|(dir, _)| {
            dir.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(capture::DAEMON_PIN_PREFIX))
        })
        .map(|(dir, _)| dir)
        .collect();
    let pin_dir = (!config.fail_open).then(|| {
        host.bpffs.join("warden").join(format!(
            "{}{}",
            capture::DAEMON_PIN_PREFIX,
            std::process::id()
        ))
    });
    let agent = Agent::start(AgentOptions {
        listen_port: config.listen_port,
        policy,
        policy_source: config.policy.clone(),
        audit,
        pin_dir,
        tls: interceptor,
        upstream_ca: config.upstream_ca.clone(),
        control_socket: config.control_socket.clone(),
        serve_control: true,
        review_listen: config.review_listen,
        control_listen: config.control_listen,
        metrics_listen: config.metrics_listen,
        ssh_host_keys: Some(ssh_keys),
    })
    .await?;

    let pods_api = api_client.map(|(settings, fetcher)| {
        tracing::info!(server = %settings.server, node = %settings.node_name, "reading this node's pods from the Kubernetes API");
        let (pods, events) = api::spawn(settings, fetcher);
        identity::use_api_pods(pods.clone());
        (pods, events)
    });
    let result = serve(&agent, &config, &host.cgroup_root, &predecessors, pods_api).await;
    let detach = if config.fail_open {
        Detach::All
    } else {
        Detach::KeepPins
    };
    let report = agent.stop(DRAIN, detach).await?;
    tracing::info!(
        rows = report.rows_written,
        fail_closed = detach == Detach::KeepPins,
        "daemon stopped"
    );
    result
}

/// The daemon's life between start and stop.
async fn serve(
    agent: &Agent,
    config: &DaemonConfig,
    cgroup_root: &Path,
    predecessors: &[PathBuf],
    pods_api: Option<(ApiPods, mpsc::Receiver<ApiEvent>)>,
) -> anyhow::Result<()> {
    let (api_pods, mut api_events) = pods_api.unzip();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut manager = Manager {
        agent,
        config,
        pods: Pods {
            files: NodeFiles::under(&config.node_root),
            api: api_pods,
        },
        pod_cgroups: HashMap::new(),
        predecessors: Vec::new(),
        managed: BTreeSet::new(),
        watch: CgroupWatch::new(cgroup_root)?,
    };
    manager.rescan();
    // Pods selected by label are known once the API server has answered:
    // until then a dead predecessor's pins keep them failing closed.
    let synced = match &mut api_events {
        Some(events) => first_sync(events, &mut manager).await,
        None => true,
    };
    if synced {
        take_over(predecessors);
    } else {
        tracing::warn!(
            "the Kubernetes API has not answered: a stopped daemon's pins stay until it does"
        );
        manager.predecessors = predecessors.to_vec();
    }
    agent.set_ready();
    let systemd = Notifier::from_env();
    systemd.send(&format!(
        "READY=1\nSTATUS=managing {} cgroups",
        manager.managed.len()
    ));
    tracing::info!(
        managed = manager.managed.len(),
        watched = manager.watch.watched(),
        "daemon ready"
    );
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                systemd.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                match agent.reload() {
                    Ok(summary) => tracing::info!(policy = %summary, "policy reloaded"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "policy reload refused; the old policy stays in force"),
                }
                systemd.send("READY=1");
            }
            changes = manager.watch.changes() => {
                for change in changes.context("watching the cgroup tree")? {
                    manager.apply(change);
                }
            }
            Some(event) = next(&mut api_events) => manager.api_event(event),
        }
    }
    systemd.send("STOPPING=1");
    tracing::info!("stopping: draining open connections");
    Ok(())
}

/// How long the daemon waits at start for the API server's pods.
const FIRST_SYNC: Duration = Duration::from_secs(10);

/// Waits for the first list of the node's pods; false when the API server
/// did not give it in time.
async fn first_sync(events: &mut mpsc::Receiver<ApiEvent>, manager: &mut Manager<'_>) -> bool {
    let wait = async {
        while let Some(event) = events.recv().await {
            let synced = matches!(event, ApiEvent::Synced { .. });
            manager.api_event(event);
            if synced {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(FIRST_SYNC, wait)
        .await
        .unwrap_or(false)
}

/// Removes dead daemons' pins, once this one has attached what it selects.
fn take_over(predecessors: &[PathBuf]) {
    for dir in predecessors {
        match capture::remove_pins(dir) {
            Ok(()) => tracing::info!(pins = %dir.display(), "took over from a daemon that stopped"),
            Err(e) => {
                tracing::warn!(pins = %dir.display(), error = %e, "could not remove a stopped daemon's pins; `warden cleanup` releases them")
            }
        }
    }
}

/// The next event of a channel that may not be there; never, when not.
async fn next<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `warden status` lists the API server's failures under this name.
const API_SUBJECT: &str = "kubernetes_api";

struct Manager<'a> {
    agent: &'a Agent,
    config: &'a DaemonConfig,
    pods: Pods,
    /// The pod cgroups seen, by pod UID, so that news from the API server
    /// finds them.
    pod_cgroups: HashMap<String, PodCgroupSeen>,
    /// Dead daemons' pins kept until the API server's pods are known.
    predecessors: Vec<PathBuf>,
    managed: BTreeSet<String>,
    watch: CgroupWatch,
}

#[derive(Clone)]
struct PodCgroupSeen {
    rel: String,
    /// Managed because a `manage.pods` entry selects it, so a change of
    /// labels can let it go.
    by_selector: bool,
}

/// What `manage.pods` is matched against.
struct Pods {
    /// The kubelet's files; read afresh for each pod cgroup, since the
    /// kubelet writes them after it makes the cgroup.
    files: NodeFiles,
    /// The API server's pods, when configured: the only source of labels
    /// on containerd nodes.
    api: Option<ApiPods>,
}

impl Pods {
    fn pod(&self, uid: &str) -> Option<PodInfo> {
        self.api
            .as_ref()
            .and_then(|api| api.pod(uid))
            .or_else(|| self.files.pod(uid))
    }
}

impl Manager<'_> {
    fn rescan(&mut self) {
        self.scan_from("/");
    }

    fn scan_from(&mut self, relative: &str) {
        let Manager {
            agent,
            config,
            pods,
            pod_cgroups,
            managed,
            watch,
            ..
        } = self;
        let root = watch.absolute("/");
        let mut newly = Vec::new();
        let mut unknown_pods = Vec::new();
        watch.scan(relative, &mut |rel| {
            if managed.contains(rel) {
                return Descend::No;
            }
            // Cgroups `warden run` makes have their own agent.
            if rel == "/warden" || rel.starts_with("/warden/") {
                return Descend::No;
            }
            let seen = |by_selector| PodCgroupSeen {
                rel: rel.to_string(),
                by_selector,
            };
            let (reason, pod_uid) = match config.manage.reason(rel) {
                Some(reason) => (reason, None),
                None => match pod_of(rel, &config.manage, pods) {
                    Pod::NotOne => return Descend::Yes,
                    Pod::NotSelected(uid) => {
                        pod_cgroups.insert(uid, seen(false));
                        return Descend::No;
                    }
                    Pod::Unknown(uid) => {
                        pod_cgroups.insert(uid, seen(false));
                        unknown_pods.push(rel.to_string());
                        return Descend::No;
                    }
                    Pod::Selected { uid, reason } => (reason, Some(uid)),
                },
            };
            let path = root.join(rel.trim_start_matches('/'));
            match agent.manage(&path, &reason) {
                Ok(()) => {
                    tracing::info!(cgroup = %rel, %reason, "managing");
                    newly.push(rel.to_string());
                    agent.set_problem(rel, None);
                    managed.insert(rel.to_string());
                    if let Some(uid) = pod_uid {
                        pod_cgroups.insert(uid, seen(true));
                    }
                }
                Err(e) => {
                    let problem = format!("{rel}: {e:#}");
                    tracing::error!(%problem, "cannot manage a selected cgroup");
                    agent.set_problem(rel, Some(problem));
                }
            }
            Descend::No
        });
        // The kubelet writes a pod's files after making its cgroup, and
        // before the pod's first process: look again when that comes.
        for rel in unknown_pods {
            if let Err(e) = watch.follow(&rel) {
                tracing::warn!(cgroup = %rel, error = %e, "cannot follow a pod cgroup the node's files do not describe yet");
            }
        }
        for rel in newly {
            match watch.follow(&rel) {
                // Processes that came between managing and following.
                Ok(()) => agent.follow_namespaces(&watch.absolute(&rel)),
                Err(e) => {
                    tracing::warn!(cgroup = %rel, error = %e, "cannot follow processes coming into a managed cgroup; those in a network namespace of their own stay refused")
                }
            }
        }
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Appeared(rel) if rel == "/" => self.rescan(),
            Change::Appeared(rel) => self.scan_from(&rel),
            Change::Populated(rel) => {
                if self.managed.contains(&rel) {
                    self.agent.follow_namespaces(&self.watch.absolute(&rel));
                } else {
                    self.scan_from(&rel);
                }
            }
            Change::Gone(rel) => {
                self.agent.set_problem(&rel, None);
                self.pod_cgroups.retain(|_, seen| seen.rel != rel);
                if self.managed.remove(&rel) {
                    tracing::info!(cgroup = %rel, "a managed cgroup went");
                    self.agent
                        .release(&self.watch.absolute(&rel), "the cgroup was removed");
                }
            }
        }
    }
}

impl Manager<'_> {
    fn api_event(&mut self, event: ApiEvent) {
        match event {
            ApiEvent::Changed(uid) => self.recheck_pod(&uid),
            ApiEvent::Synced { pods } => {
                tracing::info!(pods, "the Kubernetes API's pods of this node are known");
                self.agent.set_problem(API_SUBJECT, None);
                let uids: Vec<String> = self.pod_cgroups.keys().cloned().collect();
                for uid in uids {
                    self.recheck_pod(&uid);
                }
                take_over(&std::mem::take(&mut self.predecessors));
            }
            ApiEvent::Failed(e) => {
                tracing::warn!(error = %e, "the Kubernetes API: retrying");
                self.agent.set_problem(
                    API_SUBJECT,
                    Some(format!(
                        "{e} (pods' labels are not current; selection by label waits)"
                    )),
                );
            }
        }
    }

    /// Looks at a pod cgroup again after news of its pod: a pod newly
    /// selected is managed, one whose labels no longer match is let go.
    fn recheck_pod(&mut self, uid: &str) {
        let Some(seen) = self.pod_cgroups.get(uid).cloned() else {
            return;
        };
        if !self.managed.contains(&seen.rel) {
            self.scan_from(&seen.rel);
            return;
        }
        if !seen.by_selector {
            return;
        }
        if let Pod::NotSelected(_) = pod_of(&seen.rel, &self.config.manage, &self.pods) {
            tracing::info!(cgroup = %seen.rel, "the pod no longer matches manage.pods: letting it go");
            self.managed.remove(&seen.rel);
            self.pod_cgroups.insert(
                uid.to_string(),
                PodCgroupSeen {
                    by_selector: false,
                    ..seen.clone()
                },
            );
            self.agent.release(
                &self.watch.absolute(&seen.rel),
                "the pod no longer matches manage.pods",
            );
        }
    }
}

/// What `manage.pods` says of a cgroup.
enum Pod {
    /// Not a pod's own cgroup (a slice above pods, or anything else).
    NotOne,
    /// A pod (by UID) no entry selects; its containers are not looked at
    /// either.
    NotSelected(String),
    /// A pod neither the node's files nor the API server describe yet.
    Unknown(String),
    Selected {
        uid: String,
        reason: String,
    },
}

fn pod_of(rel: &str, selection: &config::Selection, pods: &Pods) -> Pod {
    if selection.pods.is_empty() {
        return Pod::NotOne;
    }
    let Some(cgroup) = PodCgroup::parse(rel).filter(|p| p.container_id.is_none()) else {
        return Pod::NotOne;
    };
    let uid = cgroup.pod_uid;
    match pods.pod(&uid) {
        None => Pod::Unknown(uid),
        Some(pod) => match selection.pod_reason(&pod) {
            Some(reason) => Pod::Selected { uid, reason },
            None => Pod::NotSelected(uid),
        },
    }
}

/// CLOCK_MONOTONIC in microseconds, which systemd wants with RELOADING=1.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}
