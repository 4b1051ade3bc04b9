//! Kubernetes pods on this node: which pod and container a cgroup belongs
//! to, and that pod's namespace, name and service account.
//!
//! Everything comes from the node: the cgroup path the kernel reports, the
//! directories the kubelet makes, and the files the container runtime
//! keeps. Nothing comes from inside the pod (its environment, hostname or
//! files), which a process in the pod could change. docs/kubernetes.md
//! says which file gives which field. Labels, which containerd keeps in no
//! file, come from the API server ([`api`]) when the daemon is given one.
pub mod api;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::identity::{PodIdentity, container_id};

/// A pod's QoS class, as its cgroup's place under `kubepods` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The pod (and container) a cgroup v2 path belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID, with its dashes (the systemd driver writes them as `_`).
    pub pod_uid: String,
    pub qos: Qos,
    /// The container's 64-hex-digit id; none for the pod's own cgroup.
    pub container_id: Option<String>,
}

impl PodCgroup {
    /// Reads the kubelet's layouts under both cgroup drivers:
    /// - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice/cri-containerd-<id>.scope`
    ///   (`crio-<id>.scope`, `docker-<id>.scope`), Guaranteed pods as `kubepods-pod<uid>.slice` directly under `kubepods.slice`;
    /// - cgroupfs: `/kubepods/burstable/pod<uid>/<id>` (`crio-<id>` for CRI-O), Guaranteed pods as `/kubepods/pod<uid>/<id>`;
    /// - a kubelet with another cgroup root, as kind's `/kubelet.slice/kubelet-kubepods.slice/...`, or below a
    ///   prefix (the host's view of a kubelet in a container).
    pub fn parse(cgroup_path: &str) -> Option<PodCgroup> {
        let segments: Vec<&str> = cgroup_path.split('/').filter(|s| !s.is_empty()).collect();
        let (at, pod_uid, qos) = segments
            .iter()
            .enumerate()
            .find_map(|(i, seg)| pod_segment(&segments[..i], seg).map(|(u, q)| (i, u, q)))?;
        // Only what is below the pod names its container: a prefix can hold
        // a container id of its own (the node's, on kind).
        let container_id = container_id(&segments[at + 1..].join("/"));
        Some(PodCgroup {
            pod_uid,
            qos,
            container_id,
        })
    }
}

/// A pod's cgroup: `pod<uid>` under `kubepods[/qos]` (cgroupfs), or the
/// slice `<root>-kubepods[-qos]-pod<uid>.slice` (systemd).
fn pod_segment(parents: &[&str], seg: &str) -> Option<(String, Qos)> {
    let (uid, qos) = match seg.strip_suffix(".slice") {
        Some(slice) => {
            let parts: Vec<&str> = slice.split('-').collect();
            let (pod, before) = parts.split_last()?;
            (pod.strip_prefix("pod")?.replace('_', "-"), qos(before)?)
        }
        None => (seg.strip_prefix("pod")?.to_string(), qos(parents)?),
    };
    valid_uid(&uid).then_some((uid, qos))
}

fn qos(before: &[&str]) -> Option<Qos> {
    match before {
        [.., "kubepods"] => Some(Qos::Guaranteed),
        [.., "kubepods", "burstable"] => Some(Qos::Burstable),
        [.., "kubepods", "besteffort"] => Some(Qos::BestEffort),
        _ => None,
    }
}

/// Pod UIDs are UUIDs, or 32 hex digits for static pods. Checking keeps
/// them safe to join onto paths.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn valid_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the kubelet and the container runtimes keep their files on the node.
#[derive(Clone, Debug)]
pub struct NodeFiles {
    /// `/var/log/pods`: a `<namespace>_<pod>_<uid>` directory per pod.
    pub log_pods: PathBuf,
    /// `/var/lib/kubelet/pods`: a `<uid>` directory per pod, with its volumes.
    pub kubelet_pods: PathBuf,
    /// containerd's task bundles in its `k8s.io` namespace: `<id>/config.json`.
    pub containerd_state: PathBuf,
    /// CRI-O's containers (containers/storage): `<id>/userdata/config.json`.
    pub crio_containers: PathBuf,
}

impl Default for NodeFiles {
    fn default() -> Self {
        NodeFiles::under(Path::new("/"))
    }
}

/// A pod as the node's files describe it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: Option<String>,
    /// The pod's labels. Only CRI-O keeps them in a file on the node; on
    /// containerd this is empty.
    pub labels: BTreeMap<String, String>,
}

/// An OCI runtime spec (a bundle's config.json), as far as identity goes.
#[derive(Deserialize)]
struct OciSpec {
    #[serde(default)]
    annotations: HashMap<String, String>,
}

// containerd's CRI annotations (containerd internal/cri/annotations).
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const CRI_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
// CRI-O's, and the kubelet's labels CRI-O copies into annotations.
const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
const CRIO_LABELS: &str = "io.kubernetes.cri-o.Labels";
const KUBE_CONTAINER_NAME: &str = "io.kubernetes.container.name";
const KUBE_POD_NAME: &str = "io.kubernetes.pod.name";
const KUBE_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const KUBE_POD_UID: &str = "io.kubernetes.pod.uid";

/// The most a node file is read for: config.json files are tens of KiB,
/// tokens about one.
const MAX_FILE: u64 = 1 << 20;

impl NodeFiles {
    /// The node's paths below `root`: a container that mounts the host's
    /// directories elsewhere, or a test's tree.
    pub fn under(root: &Path) -> Self {
        NodeFiles {
            log_pods: root.join("var/log/pods"),
            kubelet_pods: root.join("var/lib/kubelet/pods"),
            containerd_state: root.join("run/containerd/io.containerd.runtime.v2.task/k8s.io"),
            crio_containers: root.join("var/lib/containers/storage/overlay-containers"),
        }
    }

    /// The pod with this UID, when the kubelet made its log directory.
    pub fn pod(&self, uid: &str) -> Option<PodInfo> {
        if !valid_uid(uid) {
            return None;
        }
        let (namespace, name) = self.log_dir(uid)?;
        let service_account = self.service_account(uid, &namespace, &name);
        let labels = self.crio_labels(uid, &namespace, &name).unwrap_or_default();
        Some(PodInfo {
            namespace,
            name,
            uid: uid.to_string(),
            service_account,
            labels,
        })
    }

    /// The name of a container of this pod, from its runtime's spec:
    /// containerd's bundle or CRI-O's container directory. None when the
    /// spec says the container belongs to another pod.
    pub fn container_name(&self, pod_uid: &str, container_id: &str) -> Option<String> {
        if !valid_container_id(container_id) {
            return None;
        }
        if let Some(spec) = read_spec(&self.containerd_state.join(container_id).join("config.json"))
        {
            let a = &spec.annotations;
            return (a.get(CRI_CONTAINER_TYPE)? == "container"
                && a.get(CRI_SANDBOX_UID)? == pod_uid)
                .then(|| a.get(CRI_CONTAINER_NAME).cloned())
                .flatten();
        }
        let spec = read_spec(
            &self
                .crio_containers
                .join(container_id)
                .join("userdata/config.json"),
        )?;
        let kube = CrioKube::of(&spec)?;
        (kube.container_type == "container" && kube.get(KUBE_POD_UID)? == pod_uid)
            .then(|| kube.get(KUBE_CONTAINER_NAME).map(str::to_string))
            .flatten()
    }

    /// `/var/log/pods/<namespace>_<pod>_<uid>`: the kubelet makes it before
    /// the pod's sandbox (kuberuntime `BuildPodLogsDirectory`). Namespaces
    /// and pod names are DNS names, without `_`.
    fn log_dir(&self, uid: &str) -> Option<(String, String)> {
        fs::read_dir(&self.log_pods)
            .ok()?
            .flatten()
            .find_map(|entry| {
                let name = entry.file_name();
                let mut parts = name.to_str()?.split('_');
                let (ns, pod, u) = (parts.next()?, parts.next()?, parts.next()?);
                (parts.next().is_none() && u == uid && !ns.is_empty() && !pod.is_empty())
                    .then(|| (ns.to_string(), pod.to_string()))
            })
    }

    /// The service account of the tokens the kubelet projects into the pod
    /// (`volumes/kubernetes.io~projected/<volume>/token`). The token is the
    /// kubelet's file, read-only to the pod, so its claims are read without
    /// checking the signature; a token that names another pod is ignored,
    /// and tokens that disagree give none.
    fn service_account(&self, uid: &str, namespace: &str, pod: &str) -> Option<String> {
        let projected = self
            .kubelet_pods
            .join(uid)
            .join("volumes/kubernetes.io~projected");
        let mut accounts = fs::read_dir(projected)
            .ok()?
            .flatten()
            .filter_map(|volume| read_limited(&volume.path().join("token")))
            .filter_map(|token| TokenClaims::decode(&token))
            .filter(|c| c.namespace == namespace && c.pod_uid == uid && c.pod_name == pod)
            .map(|c| c.service_account);
        let first = accounts.next()?;
        accounts.all(|a| a == first).then_some(first)
    }

    /// The pod's labels from its CRI-O sandbox: the kubelet hands them over
    /// as the sandbox's labels, which CRI-O keeps in `io.kubernetes.cri-o.Labels`.
    /// The kubelet's own `io.kubernetes.pod.*` entries are not the pod's labels.
    fn crio_labels(
        &self,
        uid: &str,
        namespace: &str,
        pod: &str,
    ) -> Option<BTreeMap<String, String>> {
        fs::read_dir(&self.crio_containers)
            .ok()?
            .flatten()
            .filter_map(|c| read_spec(&c.path().join("userdata/config.json")))
            .find_map(|spec| {
                let kube = CrioKube::of(&spec)?;
                let ours = kube.container_type == "sandbox"
                    && kube.get(KUBE_POD_UID)? == uid
                    && kube.get(KUBE_POD_NAMESPACE)? == namespace
                    && kube.get(KUBE_POD_NAME)? == pod;
                ours.then(|| {
                    let mut labels = kube.labels;
                    labels.retain(|k, _| {
                        ![KUBE_POD_NAME, KUBE_POD_NAMESPACE, KUBE_POD_UID].contains(&k.as_str())
                    });
                    labels
                })
            })
    }
}

/// The Kubernetes fields of a CRI-O spec: its type, and the kubelet's
/// labels (`io.kubernetes.cri-o.Labels`, JSON in an annotation), with the
/// annotations of the same names as a fallback.
struct CrioKube<'a> {
    container_type: &'a str,
    labels: BTreeMap<String, String>,
    annotations: &'a HashMap<String, String>,
}

impl<'a> CrioKube<'a> {
    fn of(spec: &'a OciSpec) -> Option<Self> {
        let a = &spec.annotations;
        Some(CrioKube {
            container_type: a.get(CRIO_CONTAINER_TYPE)?,
            labels: match a.get(CRIO_LABELS) {
                Some(json) => serde_json::from_str(json).ok()?,
                None => BTreeMap::new(),
            },
            annotations: a,
        })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.labels
            .get(key)
            .or_else(|| self.annotations.get(key))
            .map(String::as_str)
    }
}

/// The claims of a service-account token that identify its pod
/// (`kubernetes.io` in k8s.io/kubernetes pkg/serviceaccount/claims.go).
#[derive(Debug, PartialEq, Eq)]
struct TokenClaims {
    namespace: String,
    pod_name: String,
    pod_uid: String,
    service_account: String,
}

impl TokenClaims {
    /// The payload of a JWT, unverified (see [`NodeFiles::service_account`]).
    fn decode(token: &[u8]) -> Option<TokenClaims> {
        #[derive(Deserialize)]
        struct Payload {
            #[serde(rename = "kubernetes.io")]
            kubernetes: Kubernetes,
        }
        #[derive(Deserialize)]
        struct Kubernetes {
            namespace: String,
            pod: Ref,
            serviceaccount: Ref,
        }
        #[derive(Deserialize)]
        struct Ref {
            name: String,
            uid: String,
        }
        let token = std::str::from_utf8(token).ok()?.trim();
        let mut parts = token.split('.');
        let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let k = serde_json::from_slice::<Payload>(&base64url(payload)?)
            .ok()?
            .kubernetes;
        Some(TokenClaims {
            namespace: k.namespace,
            pod_name: k.pod.name,
            pod_uid: k.pod.uid,
            service_account: k.serviceaccount.name,
        })
    }
}

/// Base64url without padding (RFC 7515 section 2), as JWTs write it.
fn base64url(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone 6-bit group cannot end a byte.
    (bits < 6).then_some(out)
}

fn read_limited(path: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .ok()?;
    (buf.len() as u64 <= MAX_FILE).then_some(buf)
}

fn read_spec(path: &Path) -> Option<OciSpec> {
    serde_json::from_slice(&read_limited(path)?).ok()
}

/// Pods by UID, so that a connection does not reread the node's files: a
/// pod's identity never changes. A pod not found is looked up again after
/// [`PodCache::MISS_TTL`] (its files may not have been written yet).
pub struct PodCache {
    files: NodeFiles,
    pods: Mutex<HashMap<String, Cached>>,
    /// The API server's pods, which outrank the files when the daemon
    /// reads them: the pod spec's account, not what a token file says.
    api: std::sync::OnceLock<api::ApiPods>,
}

struct Cached {
    info: Option<PodInfo>,
    at: Instant,
    containers: HashMap<String, String>,
}

impl PodCache {
    const MAX_PODS: usize = 1024;
    const MAX_CONTAINERS: usize = 64;
    const MISS_TTL: Duration = Duration::from_secs(10);

    pub fn new(files: NodeFiles) -> Self {
        PodCache {
            files,
            pods: Mutex::new(HashMap::new()),
            api: std::sync::OnceLock::new(),
        }
    }

    /// Answers from the API server's pods first; set once.
    pub fn use_api(&self, api: api::ApiPods) {
        let _ = self.api.set(api);
    }

    /// The pod identity of a process in this cgroup.
    pub fn identity(&self, cgroup: &PodCgroup) -> Option<PodIdentity> {
        // Read (and cached) either way: the cache entry holds the
        // container names too.
        let files = self.pod(&cgroup.pod_uid);
        let info = self
            .api
            .get()
            .and_then(|api| api.pod(&cgroup.pod_uid))
            .or(files)?;
        let container = cgroup
            .container_id
            .as_deref()
            .and_then(|id| self.container(&cgroup.pod_uid, id));
        Some(PodIdentity {
            namespace: info.namespace,
            name: info.name,
            uid: info.uid,
            container,
            service_account: info.service_account,
        })
    }

    pub fn pod(&self, uid: &str) -> Option<PodInfo> {
        if let Some(c) = self.lock().get(uid)
            && (c.info.is_some() || c.at.elapsed() < Self::MISS_TTL)
        {
            return c.info.clone();
        }
        // Read without the lock: other connections' lookups go on.
        let info = self.files.pod(uid);
        let mut pods = self.lock();
        if pods.len() >= Self::MAX_PODS
            && !pods.contains_key(uid)
            && let Some(oldest) = pods
                .iter()
                .min_by_key(|(_, c)| c.at)
                .map(|(k, _)| k.clone())
        {
            pods.remove(&oldest);
        }
        pods.insert(
            uid.to_string(),
            Cached {
                info: info.clone(),
                at: Instant::now(),
                containers: HashMap::new(),
            },
        );
        info
    }

    fn container(&self, pod_uid: &str, id: &str) -> Option<String> {
        if let Some(name) = self.lock().get(pod_uid).and_then(|c| c.containers.get(id)) {
            return Some(name.clone());
        }
        let name = self.files.container_name(pod_uid, id)?;
        if let Some(c) = self.lock().get_mut(pod_uid)
            && c.containers.len() < Self::MAX_CONTAINERS
        {
            c.containers.insert(id.to_string(), name.clone());
        }
        Some(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
