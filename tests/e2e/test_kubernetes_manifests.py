"""The Kubernetes deploy files (agent/packaging/kubernetes): the DaemonSet
manifest and the Helm chart rendered by Helm's own engine, validated against
the Kubernetes API schemas with unknown fields rejected, their embedded
daemon configuration held to the documented keys, and their policy loaded by
`warden policy check`. No cluster runs here: docs/kubernetes.md says what
this does not cover."""
import subprocess
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from conftest import WARDEN

PACKAGING = Path(__file__).resolve().parents[2] / "agent/packaging/kubernetes"
CHART = PACKAGING / "chart"
# The newest Kubernetes release whose schemas kubernetes-validate ships.
K8S = kubernetes_validate.latest_version()

# The keys of `warden daemon`'s configuration file (docs/kubernetes.md).
DAEMON_KEYS = {
    "policy", "state_dir", "audit_dir", "listen_port", "control_socket", "metrics_listen",
    "fail_open", "tls_intercept", "upstream_ca", "manage", "kubernetes_api",
}
MANAGE_KEYS = {"units", "cgroups", "pods"}
POD_SELECTOR_KEYS = {"namespace", "name", "service_account", "labels"}

# SYS_ADMIN: setns into pods' network namespaces (docs/kubernetes.md).
CAPABILITIES = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_ADMIN"]


def manifest():
    return [d for d in yaml.safe_load_all((PACKAGING / "daemonset.yaml").read_text()) if d]


def render(values=None):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="warden", namespace="warden-system", is_install=True)
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


def by_kind(docs, kind):
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def validate_all(docs):
    for doc in docs:
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_manifest_validates_against_the_kubernetes_schemas():
    docs = manifest()
    assert [d["kind"] for d in docs] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    validate_all(docs)


# What the agent may do with the API server: read pods, nothing else.
READ_PODS = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def check_rbac(docs, namespace="warden-system"):
    """The agent's service account reads pods, and that is all it is given."""
    account = by_kind(docs, "ServiceAccount")["metadata"]
    role, binding = by_kind(docs, "ClusterRole"), by_kind(docs, "ClusterRoleBinding")
    assert role["rules"] == READ_PODS
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"], "namespace": namespace}]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_manifest_gives_the_agent_read_access_to_pods_only():
    check_rbac(manifest())


def test_the_validator_rejects_unknown_and_mistyped_fields():
    """The check above can fail: a misspelt field or a wrong type is refused."""
    ds = by_kind(manifest(), "DaemonSet")
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostPid"):
        kubernetes_validate.validate(ds, K8S, strict=True)
    ds = by_kind(manifest(), "DaemonSet")
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S, strict=True)


def check_pod_spec(spec, containerd=True, crio=True, api=True):
    """What docs/kubernetes.md promises about the agent's pod."""
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    # A token only when the agent reads pods from the API server.
    assert spec["automountServiceAccountToken"] is api
    assert {"operator": "Exists"} in spec["tolerations"]
    agent = spec["containers"][0]
    assert agent["args"][:3] == ["daemon", "--config", "/etc/warden/warden.yaml"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()}
    # The node's paths at the same paths in the container: the agent reads
    # them at their defaults.
    expected = {
        "/sys/fs/cgroup": True,
        "/sys/fs/bpf": False,
        "/var/lib/warden": False,
        "/run/warden": False,
        "/var/log/pods": True,
        "/var/lib/kubelet/pods": True,
    }
    if containerd:
        expected["/run/containerd/io.containerd.runtime.v2.task/k8s.io"] = True
    if crio:
        expected["/var/lib/containers/storage/overlay-containers"] = True
    for path, read_only in expected.items():
        assert host[path] == path, path
        assert mounts[path].get("readOnly", False) is read_only, path
    assert ("/run/containerd/io.containerd.runtime.v2.task/k8s.io" in mounts) is containerd
    assert ("/var/lib/containers/storage/overlay-containers" in mounts) is crio
    # Not the runtime's socket: that would give the agent the node.
    assert not any(p in ("/run/containerd", "/run/crio", "/var/run") for p in host.values())
    # Projected token mounts made after the agent started must reach it.
    assert mounts["/var/lib/kubelet/pods"]["mountPropagation"] == "HostToContainer"
    # Bidirectional needs a privileged container.
    assert all(m.get("mountPropagation") != "Bidirectional" for m in mounts.values())
    assert volumes[mounts["/etc/warden"]["name"]]["configMap"]
    env = {e["name"]: e for e in agent.get("env", [])}
    if api:
        assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    else:
        assert "NODE_NAME" not in env
    return agent


def test_manifest_pod_has_the_documented_privileges_and_mounts():
    ds = by_kind(manifest(), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    agent = check_pod_spec(ds["spec"]["template"]["spec"])
    assert agent["image"] == "warden:VERSION"


def check_config(config_map):
    """The embedded warden.yaml holds only the documented keys, names files
    the pod has, and its policy loads."""
    config = yaml.safe_load(config_map["data"]["warden.yaml"])
    assert set(config) <= DAEMON_KEYS, set(config) - DAEMON_KEYS
    assert set(config["manage"]) <= MANAGE_KEYS
    for selector in config["manage"]["pods"]:
        assert set(selector) <= POD_SELECTOR_KEYS and selector["namespace"]
    assert config["policy"] == "/etc/warden/policy.yaml"
    assert config["state_dir"] == "/var/lib/warden"
    assert config["audit_dir"].startswith("/var/lib/warden/")
    assert config["control_socket"].startswith("/run/warden/")
    assert config["fail_open"] is False
    # In-cluster defaults: the mounted token and CA, NODE_NAME.
    assert config.get("kubernetes_api", {}) == {}
    return config_map["data"]["policy.yaml"]


def policy_check(policy, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    return subprocess.run([WARDEN, "policy", "check", str(path)], capture_output=True, text=True, timeout=60)


def test_manifest_config_and_policy(tmp_path):
    policy = check_config(by_kind(manifest(), "ConfigMap"))
    out = policy_check(policy, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok (1 rule" in out.stdout, out.stdout
    # The same check refuses a broken policy.
    out = policy_check(policy.replace("action: deny", "action: refuse"), tmp_path)
    assert out.returncode != 0 and "refuse" in out.stderr, out.stderr


def test_chart_renders_valid_objects_like_the_manifest(tmp_path):
    docs = render()
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
    validate_all(docs)
    check_rbac(docs)
    assert "kubernetes_api" in yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["warden.yaml"])
    ds = by_kind(docs, "DaemonSet")
    assert ds["metadata"]["namespace"] == "warden-system"
    agent = check_pod_spec(ds["spec"]["template"]["spec"])
    assert agent["image"] == "warden:VERSION"
    # The chart and the plain manifest give the agent the same pod.
    plain = by_kind(manifest(), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent["securityContext"] == plain["securityContext"]
    assert agent["resources"] == plain["resources"]
    out = policy_check(check_config(by_kind(docs, "ConfigMap")), tmp_path)
    assert out.returncode == 0, out.stderr


def test_chart_values_change_what_they_say():
    docs = render({
        "image": {"repository": "registry.example/warden", "tag": "1.2.3"},
        "pods": [{"namespace": "team-*"}, {"namespace": "ml", "labels": {"tier": "agent"}}],
        "audit": {"storage": "emptyDir"},
        "ship": {"enabled": True, "destination": "s3:audit-bucket/warden", "configSecret": "rclone"},
        "runtimes": {"crio": False},
        "daemon": {"metricsListen": ""},
        "kubernetesApi": {"enabled": False},
    })
    validate_all(docs)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "DaemonSet", "ServiceAccount"]
    assert by_kind(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    spec = by_kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    agent = check_pod_spec(spec, crio=False, api=False)
    assert agent["image"] == "registry.example/warden:1.2.3"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["audit"] == {"name": "audit", "emptyDir": {}}
    ship = spec["containers"][1]
    assert ship["name"] == "ship"
    assert {"name": "audit", "mountPath": "/audit", "readOnly": True} in ship["volumeMounts"]
    assert "--immutable" in ship["args"][0]
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["warden.yaml"])
    assert config["manage"]["pods"] == [{"namespace": "team-*"}, {"namespace": "ml", "labels": {"tier": "agent"}}]
    assert "metrics_listen" not in config
    assert "kubernetes_api" not in config


@pytest.mark.parametrize("values, message", [
    ({"audit": {"storage": "s3"}}, "audit.storage must be hostPath or emptyDir"),
    ({"ship": {"enabled": True}}, "ship.enabled needs ship.destination"),
])
def test_chart_refuses_values_it_cannot_honour(values, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


def test_chart_lints_clean():
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report
