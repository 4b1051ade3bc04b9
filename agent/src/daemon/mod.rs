//! `warden daemon`: one agent per host for the services it is told to
//! protect. The same [`Agent`] as `warden run`, attached to the cgroups the
//! configuration selects, following them as they come and go, rereading
//! the policy on SIGHUP, and failing closed across its own restarts.
pub mod config;
mod notify;
mod watch;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    agent::{self, Agent, AgentOptions, Detach},
    capture, identity,
    kubernetes::{NodeFiles, PodCgroup},
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
        "{}: ok ({} unit patterns, {} cgroups, {} pod selectors, {})\n{policy}",
        config_path.display(),
        config.manage.units.len(),
        config.manage.cgroups.len(),
        config.manage.pods.len(),
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

    let result = serve(&agent, &config, &host.cgroup_root, &predecessors).await;
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
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut manager = Manager {
        agent,
        config,
        node: NodeFiles::under(&config.node_root),
        managed: BTreeSet::new(),
        watch: CgroupWatch::new(cgroup_root)?,
    };
    manager.rescan();
    for dir in predecessors {
        match capture::remove_pins(dir) {
            Ok(()) => tracing::info!(pins = %dir.display(), "took over from a daemon that stopped"),
            Err(e) => {
                tracing::warn!(pins = %dir.display(), error = %e, "could not remove a stopped daemon's pins; `warden cleanup` releases them")
            }
        }
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
        }
    }
    systemd.send("STOPPING=1");
    tracing::info!("stopping: draining open connections");
    Ok(())
}

struct Manager<'a> {
    agent: &'a Agent,
    config: &'a DaemonConfig,
    /// The kubelet's files, for `manage.pods`; read afresh for each pod
    /// cgroup, since the kubelet writes them after it makes the cgroup.
    node: NodeFiles,
    managed: BTreeSet<String>,
    watch: CgroupWatch,
}

impl Manager<'_> {
    fn rescan(&mut self) {
        self.scan_from("/");
    }

    fn scan_from(&mut self, relative: &str) {
        let Manager {
            agent,
            config,
            node,
            managed,
            watch,
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
            let reason = match config.manage.reason(rel) {
                Some(reason) => reason,
                None => match pod_of(rel, &config.manage, node) {
                    Pod::NotOne => return Descend::Yes,
                    Pod::NotSelected => return Descend::No,
                    Pod::Unknown => {
                        unknown_pods.push(rel.to_string());
                        return Descend::No;
                    }
                    Pod::Selected(reason) => reason,
                },
            };
            let path = root.join(rel.trim_start_matches('/'));
            match agent.manage(&path, &reason) {
                Ok(()) => {
                    tracing::info!(cgroup = %rel, %reason, "managing");
                    newly.push(rel.to_string());
                    agent.set_problem(rel, None);
                    managed.insert(rel.to_string());
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
                if self.managed.remove(&rel) {
                    tracing::info!(cgroup = %rel, "a managed cgroup went");
                    self.agent
                        .release(&self.watch.absolute(&rel), "the cgroup was removed");
                }
            }
        }
    }
}

/// What `manage.pods` says of a cgroup.
enum Pod {
    /// Not a pod's own cgroup (a slice above pods, or anything else).
    NotOne,
    /// A pod no entry selects; its containers are not looked at either.
    NotSelected,
    /// A pod the node's files do not describe yet.
    Unknown,
    Selected(String),
}

fn pod_of(rel: &str, selection: &config::Selection, node: &NodeFiles) -> Pod {
    if selection.pods.is_empty() {
        return Pod::NotOne;
    }
    let Some(cgroup) = PodCgroup::parse(rel).filter(|p| p.container_id.is_none()) else {
        return Pod::NotOne;
    };
    match node.pod(&cgroup.pod_uid) {
        None => Pod::Unknown,
        Some(pod) => selection
            .pod_reason(&pod)
            .map_or(Pod::NotSelected, Pod::Selected),
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
