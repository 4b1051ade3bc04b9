//! `/etc/warden/warden.yaml`: what the host daemon protects and how.
//! Read once at start; the policy it names is the part that reloads.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{kubernetes::PodInfo, policy::glob::Glob};

pub const DEFAULT_PATH: &str = "/etc/warden/warden.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}; create it (docs/daemon.md shows one) or pass --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    policy: Option<PathBuf>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    audit_dir: Option<PathBuf>,
    #[serde(default)]
    listen_port: u16,
    #[serde(default = "default_control_socket")]
    control_socket: PathBuf,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default = "yes")]
    tls_intercept: bool,
    #[serde(default)]
    upstream_ca: Vec<PathBuf>,
    review_listen: Option<SocketAddr>,
    control_listen: Option<SocketAddr>,
    #[serde(default)]
    manage: RawManage,
    #[serde(default = "default_node_root")]
    node_root: PathBuf,
    kubernetes_api: Option<KubernetesApi>,
}

/// `kubernetes_api:`: where the node's pods' labels come from on nodes
/// whose runtime keeps them in no file (containerd). Each key left out is
/// the in-cluster default, from the pod the daemon runs in.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesApi {
    /// `https://host:port`; by default the `KUBERNETES_SERVICE_HOST` and
    /// `_PORT` Kubernetes puts in every pod's environment.
    pub server: Option<String>,
    /// By default `NODE_NAME`, which the chart sets from `spec.nodeName`.
    pub node_name: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl KubernetesApi {
    /// The settings, with what is left out taken from `env` (the daemon's
    /// environment).
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<crate::kubernetes::api::ApiSettings> {
        use crate::kubernetes::api::{ApiSettings, IN_CLUSTER_DIR};
        let server = match &self.server {
            Some(server) => server.trim_end_matches('/').to_string(),
            None => {
                let host = env("KUBERNETES_SERVICE_HOST").ok_or_else(|| {
                    anyhow::anyhow!("kubernetes_api: no server given and KUBERNETES_SERVICE_HOST is not set (it is in a pod); set kubernetes_api.server")
                })?;
                let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("https://{host}:{port}")
            }
        };
        let node_name = self.node_name.clone().or_else(|| env("NODE_NAME")).ok_or_else(|| {
            anyhow::anyhow!("kubernetes_api: no node_name given and NODE_NAME is not set; set it from the downward API (fieldRef spec.nodeName), as the chart does")
        })?;
        let dir = Path::new(IN_CLUSTER_DIR);
        Ok(ApiSettings {
            server,
            node_name,
            token_file: self.token_file.clone().unwrap_or_else(|| dir.join("token")),
            ca_file: self.ca_file.clone().unwrap_or_else(|| dir.join("ca.crt")),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManage {
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    cgroups: Vec<String>,
    #[serde(default)]
    pods: Vec<RawPodSelector>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPodSelector {
    namespace: String,
    name: Option<String>,
    service_account: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn default_node_root() -> PathBuf {
    PathBuf::from("/")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/warden")
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(crate::approvals::control::DEFAULT_SOCKET)
}

fn yes() -> bool {
    true
}

/// The daemon's configuration, checked.
#[derive(Debug)]
pub struct DaemonConfig {
    pub policy: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub audit_dir: Option<PathBuf>,
    pub listen_port: u16,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub fail_open: bool,
    pub tls_intercept: bool,
    pub upstream_ca: Vec<PathBuf>,
    pub review_listen: Option<SocketAddr>,
    pub control_listen: Option<SocketAddr>,
    pub manage: Selection,
    /// Where the node's kubelet and runtime files are: `/` when they are at
    /// their own paths, as the DaemonSet mounts them.
    pub node_root: PathBuf,
    pub kubernetes_api: Option<KubernetesApi>,
}

/// Which cgroups the daemon manages.
#[derive(Debug, Default)]
pub struct Selection {
    /// systemd units, by name or glob ("langchain-*.service").
    pub units: Vec<Glob>,
    /// cgroup v2 paths relative to the hierarchy's root, "/" first.
    pub cgroups: Vec<String>,
    /// Kubernetes pods, by what the node's files say of them.
    pub pods: Vec<PodSelector>,
}

/// Pods by namespace, and optionally name, service account and labels:
/// every key given must match.
#[derive(Debug)]
pub struct PodSelector {
    namespace: Glob,
    name: Option<Glob>,
    service_account: Option<Glob>,
    labels: BTreeMap<String, String>,
}

impl PodSelector {
    pub fn matches(&self, pod: &PodInfo) -> bool {
        self.namespace.is_match(&pod.namespace)
            && self.name.as_ref().is_none_or(|g| g.is_match(&pod.name))
            && self.service_account.as_ref().is_none_or(|g| {
                pod.service_account
                    .as_deref()
                    .is_some_and(|sa| g.is_match(sa))
            })
            && self
                .labels
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        DaemonConfig::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<DaemonConfig, ConfigError> {
        let invalid = |line, message: String| ConfigError::Invalid {
            path: path.into(),
            line,
            message,
        };
        // An empty file is the defaults, not an error.
        let raw: Raw = if text.trim().is_empty() {
            serde_yaml::from_str("{}")
        } else {
            serde_yaml::from_str(text)
        }
        .map_err(|e| invalid(e.location().map(|l| l.line()), strip_location(&e)))?;
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
        let units = raw
            .manage
            .units
            .iter()
            .map(|u| {
                Glob::new(u).map_err(|e| invalid(line_of(u), format!("manage.units: {u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let cgroups = raw
            .manage
            .cgroups
            .iter()
            .map(|c| normalize_cgroup(c).map_err(|e| invalid(line_of(c), e)))
            .collect::<Result<_, _>>()?;
        let glob = |what: &str, text: &str| {
            Glob::new(text).map_err(|e| invalid(line_of(text), format!("{what}: {text:?}: {e}")))
        };
        let pods = raw
            .manage
            .pods
            .iter()
            .map(|p| {
                Ok(PodSelector {
                    namespace: glob("manage.pods namespace", &p.namespace)?,
                    name: p
                        .name
                        .as_deref()
                        .map(|n| glob("manage.pods name", n))
                        .transpose()?,
                    service_account: p
                        .service_account
                        .as_deref()
                        .map(|n| glob("manage.pods service_account", n))
                        .transpose()?,
                    labels: p.labels.clone(),
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        for (name, addr) in [
            ("metrics_listen", raw.metrics_listen),
            ("review_listen", raw.review_listen),
            ("control_listen", raw.control_listen),
        ] {
            if let Some(addr) = addr
                && !addr.ip().is_loopback()
            {
                return Err(invalid(
                    line_of(name),
                    format!("{name}: {addr} is not a loopback address; use 127.0.0.1 or [::1]"),
                ));
            }
        }
        if let Some(server) = raw
            .kubernetes_api
            .as_ref()
            .and_then(|k| k.server.as_deref())
        {
            let ok = server
                .parse::<http::Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
            if !ok || server.trim_end_matches('/').matches('/').count() > 2 {
                return Err(invalid(
                    line_of(server),
                    format!(
                        "kubernetes_api.server: {server:?} is not an https://host:port URL; the token goes to it, so only https is taken"
                    ),
                ));
            }
        }
        Ok(DaemonConfig {
            policy: raw.policy,
            state_dir: raw.state_dir,
            audit_dir: raw.audit_dir,
            listen_port: raw.listen_port,
            control_socket: raw.control_socket,
            metrics_listen: raw.metrics_listen,
            fail_open: raw.fail_open,
            tls_intercept: raw.tls_intercept,
            upstream_ca: raw.upstream_ca,
            review_listen: raw.review_listen,
            control_listen: raw.control_listen,
            manage: Selection {
                units,
                cgroups,
                pods,
            },
            node_root: raw.node_root,
            kubernetes_api: raw.kubernetes_api,
        })
    }
}

/// serde_yaml appends " at line L column C"; the line is in our prefix.
fn strip_location(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// "/langchain.slice/", "langchain.slice" and "/sys/fs/cgroup/langchain.slice"
/// (or "/sys/fs/cgroup/unified/langchain.slice" on a hybrid host) name the
/// same cgroup: "/langchain.slice".
fn normalize_cgroup(path: &str) -> Result<String, String> {
    let trimmed = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .find_map(|mount| {
            path.strip_prefix(mount)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        .unwrap_or(path)
        .trim_matches('/');
    if trimmed.is_empty() {
        return Err(format!(
            "manage.cgroups: {path:?} is the root cgroup: that would redirect every process on the host, the daemon's own clients included; name the slices or units to protect"
        ));
    }
    if trimmed
        .split('/')
        .any(|seg| seg == ".." || seg == "." || seg.is_empty())
    {
        return Err(format!(
            "manage.cgroups: {path:?} is not a plain cgroup path; write it like /langchain.slice or /apps/agent"
        ));
    }
    Ok(format!("/{trimmed}"))
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.units.is_empty() && self.cgroups.is_empty() && self.pods.is_empty()
    }

    /// Why a pod is managed, or None when no `manage.pods` entry selects it.
    pub fn pod_reason(&self, pod: &PodInfo) -> Option<String> {
        let at = self.pods.iter().position(|s| s.matches(pod))?;
        Some(format!(
            "pod {}/{} matches manage.pods[{at}]",
            pod.namespace, pod.name
        ))
    }

    /// Why the cgroup at `path` (relative to the root, "/" first) is
    /// managed, or None when nothing selects it.
    pub fn reason(&self, path: &str) -> Option<String> {
        if self.cgroups.iter().any(|c| c == path) {
            return Some(format!("cgroup {path} is listed in manage.cgroups"));
        }
        let name = path.rsplit('/').next()?;
        if !is_unit_name(name) {
            return None;
        }
        self.units
            .iter()
            .find(|g| g.is_match(name))
            .map(|g| format!("unit {name} matches manage.units {:?}", g.as_str()))
    }
}

/// The kinds of unit that own a cgroup of their own.
fn is_unit_name(name: &str) -> bool {
    [".service", ".scope", ".slice"]
        .iter()
        .any(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse(text, Path::new("warden.yaml"))
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.state_dir, Path::new("/var/lib/warden"));
        assert!(config.policy.is_none());
        assert!(!config.fail_open);
        assert!(config.tls_intercept);
        assert!(config.manage.is_empty());
    }

    #[test]
    fn an_unknown_key_names_its_line() {
        let err = parse("policy: /etc/warden/policy.yaml\nmanage:\n  unit: [a.service]\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("warden.yaml:3: "), "{err}");
        assert!(err.contains("unknown field `unit`"), "{err}");
    }

    #[test]
    fn a_bad_glob_names_its_line() {
        let err = parse("manage:\n  units:\n    - \"app-[.service\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("warden.yaml:3: manage.units"), "{err}");
    }

    #[test]
    fn the_root_cgroup_and_odd_paths_are_refused() {
        for bad in ["/", "/sys/fs/cgroup", "/a/../b", "a//b"] {
            let text = format!("manage:\n  cgroups: [\"{bad}\"]\n");
            assert!(parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_kubernetes_api_defaults_to_the_pods_own() {
        let config = parse("kubernetes_api: {}\n").unwrap();
        let api = config.kubernetes_api.unwrap();
        let env = |name: &str| match name {
            "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some("6443".to_string()),
            "NODE_NAME" => Some("node-a".to_string()),
            _ => None,
        };
        let settings = api.resolve(env).unwrap();
        assert_eq!(settings.server, "https://[fd00::1]:6443");
        assert_eq!(settings.node_name, "node-a");
        assert_eq!(
            settings.token_file,
            Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        let err = api.resolve(|_| None).unwrap_err().to_string();
        assert!(err.contains("set kubernetes_api.server"), "{err}");
        let named = parse(
            "kubernetes_api:\n  server: https://127.0.0.1:6443/\n  node_name: n1\n  token_file: /t\n  ca_file: /c\n",
        )
        .unwrap()
        .kubernetes_api
        .unwrap()
        .resolve(|_| None)
        .unwrap();
        assert_eq!(named.server, "https://127.0.0.1:6443");
        assert_eq!(named.ca_file, Path::new("/c"));
    }

    #[test]
    fn the_kubernetes_api_is_https_only() {
        for bad in [
            "http://127.0.0.1:8080",
            "https://",
            "127.0.0.1:6443",
            "https://h:1/api",
        ] {
            let err = parse(&format!(
                "manage: {{}}\nkubernetes_api:\n  server: \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("warden.yaml:3: kubernetes_api.server"),
                "{bad}: {err}"
            );
        }
    }

    fn pod(namespace: &str, name: &str, sa: Option<&str>, labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: namespace.into(),
            name: name.into(),
            uid: "0b7c5a64-2f2e-4c11-9d7e-7a1f3c9e8d21".into(),
            service_account: sa.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn pods_are_selected_by_every_key_given() {
        let config = parse(
            "manage:\n  pods:\n    - namespace: \"ai-*\"\n    - namespace: crm\n      name: \"bot-*\"\n      service_account: agent\n      labels: {app: langchain}\n",
        )
        .unwrap();
        let m = &config.manage;
        assert!(!m.is_empty());
        assert_eq!(
            m.pod_reason(&pod("ai-chat", "x", None, &[])).as_deref(),
            Some("pod ai-chat/x matches manage.pods[0]")
        );
        assert_eq!(m.pod_reason(&pod("default", "x", None, &[])), None);
        let full = pod(
            "crm",
            "bot-1",
            Some("agent"),
            &[("app", "langchain"), ("tier", "x")],
        );
        assert_eq!(
            m.pod_reason(&full).as_deref(),
            Some("pod crm/bot-1 matches manage.pods[1]")
        );
        // Each key narrows: another name, another account, no such label
        // (or labels the node does not know) do not match.
        assert_eq!(
            m.pod_reason(&pod("crm", "web-1", Some("agent"), &[("app", "langchain")])),
            None
        );
        assert_eq!(
            m.pod_reason(&pod("crm", "bot-1", Some("other"), &[("app", "langchain")])),
            None
        );
        assert_eq!(
            m.pod_reason(&pod("crm", "bot-1", None, &[("app", "langchain")])),
            None
        );
        assert_eq!(m.pod_reason(&pod("crm", "bot-1", Some("agent"), &[])), None);
    }

    #[test]
    fn a_bad_pod_selector_names_its_line() {
        let err = parse("manage:\n  pods:\n    - namespace: ai\n      label: {app: x}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `label`"), "{err}");
        assert!(err.starts_with("warden.yaml:"), "{err}");
        let err = parse("manage:\n  pods:\n    - name: bot\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `namespace`"), "{err}");
        let err = parse("manage:\n  pods:\n    - namespace: \"[ai\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("warden.yaml:3: manage.pods namespace"),
            "{err}"
        );
    }

    #[test]
    fn listeners_must_be_on_loopback() {
        let err = parse("metrics_listen: 0.0.0.0:9464\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("warden.yaml:1: ") && err.contains("loopback"),
            "{err}"
        );
        assert!(parse("metrics_listen: \"[::1]:9464\"\n").is_ok());
    }

    #[test]
    fn units_and_cgroups_select_with_a_reason() {
        let config = parse(
            "manage:\n  units: [\"langchain-*.service\"]\n  cgroups: [\"/sys/fs/cgroup/apps.slice/\"]\n",
        )
        .unwrap();
        let m = &config.manage;
        assert_eq!(
            m.reason("/system.slice/langchain-chat.service").as_deref(),
            Some("unit langchain-chat.service matches manage.units \"langchain-*.service\"")
        );
        assert_eq!(
            m.reason("/apps.slice").as_deref(),
            Some("cgroup /apps.slice is listed in manage.cgroups")
        );
        assert_eq!(m.reason("/system.slice/sshd.service"), None);
        let hybrid = parse("manage:\n  cgroups: [/sys/fs/cgroup/unified/apps.slice]\n").unwrap();
        assert_eq!(hybrid.manage.cgroups, ["/apps.slice"]);
        assert_eq!(m.reason("/apps.slice/other"), None);
        // A directory inside a unit is the unit's own business, not a unit.
        assert_eq!(m.reason("/system.slice/x.service/langchain-a"), None);
    }
}
