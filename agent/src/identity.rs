//! Attribution: who made a connection, from the kernel's record and /proc.
//!
//! The kernel's record (tgid, uid, gid, cgroup id, comm) is the ground truth;
//! /proc adds the executable, command line and cgroup path while the process
//! lives. A process that exited before the agent looked keeps the kernel's
//! fields and loses only the /proc ones.
use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex, OnceLock},
    time::{Duration, Instant},
};

use warden_common::ConnRecord;

use crate::kubernetes::{NodeFiles, PodCache, PodCgroup};

/// The process behind a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub cgroup_id: u64,
    /// The cgroup v2 path, relative to the cgroup root ("/warden/run-123").
    pub cgroup_path: Option<String>,
    /// The systemd unit the cgroup belongs to, when its path shows one.
    pub unit: Option<String>,
    /// The container id, when the cgroup path shows one (docker, containerd, CRI-O, podman).
    pub container_id: Option<String>,
    /// The Kubernetes pod, when the cgroup is a pod's on this node and the
    /// node's files describe it (see [`crate::kubernetes`]).
    pub pod: Option<PodIdentity>,
}

/// A Kubernetes pod, from the node's files, never from the pod itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The container's name in the pod spec.
    pub container: Option<String>,
    pub service_account: Option<String>,
}

/// What the kernel recorded at connect() time, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub destination: SocketAddr,
    pub identity: Identity,
}

impl Origin {
    pub fn from_record(rec: &ConnRecord) -> Self {
        let ip = crate::capture::addr_from_bytes(rec.orig_addr);
        Origin {
            destination: SocketAddr::new(ip, rec.orig_port),
            identity: Identity::from_record(rec),
        }
    }
}

impl Identity {
    pub fn from_record(rec: &ConnRecord) -> Self {
        let comm_len = rec
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(rec.comm.len());
        let mut id = Identity {
            pid: rec.tgid,
            tid: rec.tid,
            uid: rec.uid,
            gid: rec.gid,
            user: user_name(rec.uid),
            comm: String::from_utf8_lossy(&rec.comm[..comm_len]).into_owned(),
            cgroup_id: rec.cgroup_id,
            ..Default::default()
        };
        id.enrich_from_proc(Path::new("/proc"));
        id
    }

    fn enrich_from_proc(&mut self, proc_root: &Path) {
        let dir = proc_root.join(self.pid.to_string());
        self.exe = fs::read_link(dir.join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        self.cmdline = fs::read(dir.join("cmdline")).ok().and_then(|raw| {
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (!args.is_empty()).then(|| args.join(" "))
        });
        if let Some(path) = fs::read_to_string(dir.join("cgroup"))
            .ok()
            .as_deref()
            .and_then(unified_cgroup_path)
        {
            self.unit = systemd_unit(&path);
            match PodCgroup::parse(&path) {
                Some(pod) => {
                    self.pod = pods().identity(&pod);
                    self.container_id = pod.container_id;
                }
                None => self.container_id = container_id(&path),
            }
            self.cgroup_path = Some(path);
        }
    }
}

/// Where the node's kubelet and runtime files are; `/` unless the daemon's
/// configuration says otherwise.
static NODE_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Read the node's files below `root`; before any identity is looked up.
pub fn use_node_root(root: &Path) {
    let _ = NODE_ROOT.set(root.to_path_buf());
}

/// Take pods' namespace, name and account from the API server's view
/// when it has the pod (the daemon's `kubernetes_api`).
pub fn use_api_pods(api: crate::kubernetes::api::ApiPods) {
    pods().use_api(api);
}

/// The pods of this node, at the paths the kubelet and runtimes use (the
/// DaemonSet mounts them at the same paths).
fn pods() -> &'static PodCache {
    static PODS: LazyLock<PodCache> = LazyLock::new(|| {
        PodCache::new(NodeFiles::under(
            NODE_ROOT.get().map_or(Path::new("/"), PathBuf::as_path),
        ))
    });
    &PODS
}

/// The cgroup v2 line of /proc/PID/cgroup ("0::/path").
pub fn unified_cgroup_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The innermost systemd unit (service or scope) named in a cgroup path.
pub fn systemd_unit(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|seg| seg.ends_with(".service") || seg.ends_with(".scope"))
        .filter(|seg| !is_container_scope(seg))
        .map(str::to_string)
}

fn is_container_scope(seg: &str) -> bool {
    ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .any(|p| seg.starts_with(p))
}

/// A 64-hex-digit container id in the last segments of a cgroup path, as
/// docker, containerd, CRI-O and podman name them under both cgroup drivers
/// ("docker-<id>.scope", "cri-containerd-<id>.scope", "crio-<id>.scope",
/// ".../docker/<id>", ".../<id>").
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|seg| {
        let seg = seg.strip_suffix(".scope").unwrap_or(seg);
        let id = seg.rsplit(['-', ':']).next().unwrap_or(seg);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    })
}

/// User names change rarely and their lookup reads /etc/passwd (or asks
/// NSS): remember them for a minute.
fn user_name(uid: u32) -> Option<String> {
    type Names = HashMap<u32, (Option<String>, Instant)>;
    static CACHE: Mutex<Option<Names>> = Mutex::new(None);
    const TTL: Duration = Duration::from_secs(60);
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some((name, at)) = cache.get(&uid)
        && at.elapsed() < TTL
    {
        return name.clone();
    }
    let name = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name);
    cache.insert(uid, (name.clone(), Instant::now()));
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn reads_the_unified_line() {
        let text = "12:cpu:/x\n0::/system.slice/support-bot.service\n";
        assert_eq!(
            unified_cgroup_path(text).as_deref(),
            Some("/system.slice/support-bot.service")
        );
        assert_eq!(unified_cgroup_path("1:name=systemd:/\n"), None);
    }

    #[test]
    fn finds_systemd_units() {
        assert_eq!(
            systemd_unit("/system.slice/support-bot.service").as_deref(),
            Some("support-bot.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope")
                .as_deref(),
            Some("run-r1.scope")
        );
        assert_eq!(systemd_unit("/warden/run-42"), None);
        assert_eq!(
            systemd_unit(&format!("/system.slice/docker-{ID}.scope")),
            None
        );
    }

    #[test]
    fn finds_container_ids_under_both_drivers() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods/besteffort/pod1234/{ID}"),
            format!("/kubepods.slice/kubepods-pod1.slice/crio-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(container_id("/system.slice/sshd.service"), None);
    }

    #[test]
    fn reads_proc_of_this_process() {
        let mut id = Identity {
            pid: std::process::id(),
            ..Default::default()
        };
        id.enrich_from_proc(Path::new("/proc"));
        assert!(id.exe.is_some());
        assert!(id.cmdline.is_some());
        assert!(id.cgroup_path.as_deref().unwrap_or("").starts_with('/'));
    }
}
