//! The layouts below are the real ones, from the sources that make them:
//! - kubelet (k8s.io/kubernetes pkg/kubelet/cm): the pod cgroup is
//!   `pod<uid>` (pod_container_manager_linux.go, `podCgroupNamePrefix`)
//!   under `kubepods` for Guaranteed pods and `kubepods/burstable` or
//!   `kubepods/besteffort` for the others (qos_container_manager_linux.go);
//!   the systemd driver joins the components with `-` into nested slices,
//!   after turning each component's `-` into `_` (cgroup_manager_linux.go,
//!   `CgroupName.ToSystemd`, `escapeSystemdCgroupName`);
//! - containerd (internal/cri/server, `getCgroupsPath`): `<slice>:cri-containerd:<id>`
//!   under systemd, which runc makes `cri-containerd-<id>.scope`, and
//!   `<parent>/<id>` under cgroupfs;
//! - CRI-O (internal/config/cgmgr): `crio-<id>.scope` (systemd) or
//!   `crio-<id>` (cgroupfs), conmon in `crio-conmon-<id>[.scope]`, and crun
//!   adds a `container` child below the container's cgroup;
//! - kind runs the kubelet with `cgroupRoot: /kubelet` and the systemd
//!   driver, so pods sit under `kubelet.slice/kubelet-kubepods.slice`; seen
//!   from the host, that is below the node container's own cgroup.
use std::{os::unix::fs::symlink, path::Path};

use serde_json::json;

use super::*;

const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const UID_: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";
const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const NODE: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const SANDBOX: &str = "aaaabbbbccccddddeeeeffff00001111aaaabbbbccccddddeeeeffff00001111";
const POD: &str = "langchain-7d9f8b6c5-x2kqp";
const NS: &str = "ai-agents";

fn pod(uid: &str, qos: Qos, container: Option<&str>) -> Option<PodCgroup> {
    Some(PodCgroup {
        pod_uid: uid.into(),
        qos,
        container_id: container.map(str::to_string),
    })
}

#[test]
fn parses_the_systemd_driver() {
    let cases = [
        // containerd, Burstable.
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            pod(UID, Qos::Burstable, Some(ID)),
        ),
        // CRI-O, Guaranteed: directly under kubepods.slice.
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope"),
            pod(UID, Qos::Guaranteed, Some(ID)),
        ),
        // CRI-O with crun: a `container` child below the scope.
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope/container"
            ),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        // CRI-O's conmon for that container.
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            pod(UID, Qos::Guaranteed, Some(ID)),
        ),
        // dockershim / cri-dockerd.
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"
            ),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        // The pod's own cgroup.
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
            pod(UID, Qos::Burstable, None),
        ),
        // A static pod: its UID is a hash without dashes.
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f1c3a8e9b2d4c6e8f0a1b3c5d7e9f01.slice/cri-containerd-{ID}.scope"
            ),
            pod("5f1c3a8e9b2d4c6e8f0a1b3c5d7e9f01", Qos::Burstable, Some(ID)),
        ),
    ];
    for (path, want) in cases {
        assert_eq!(PodCgroup::parse(&path), want, "{path}");
    }
}

#[test]
fn parses_the_cgroupfs_driver() {
    let cases = [
        (
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            pod(UID, Qos::Burstable, Some(ID)),
        ),
        (
            format!("/kubepods/pod{UID}/{ID}"),
            pod(UID, Qos::Guaranteed, Some(ID)),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/crio-{ID}"),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/crio-conmon-{ID}"),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}"),
            pod(UID, Qos::BestEffort, None),
        ),
    ];
    for (path, want) in cases {
        assert_eq!(PodCgroup::parse(&path), want, "{path}");
    }
}

#[test]
fn parses_kubelets_in_containers() {
    let kind = format!(
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
    );
    let cases = [
        // kind, inside the node container's cgroup namespace.
        (
            format!("{kind}/cri-containerd-{ID}.scope"),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        // kind, seen from the host.
        (
            format!("/system.slice/docker-{NODE}.scope{kind}/cri-containerd-{ID}.scope"),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        // The pod's own cgroup there: the node's container id is not the pod's.
        (
            format!("/system.slice/docker-{NODE}.scope{kind}"),
            pod(UID, Qos::BestEffort, None),
        ),
        (
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            pod(UID, Qos::Guaranteed, Some(ID)),
        ),
        // Seen from inside another container's cgroup namespace (the agent's
        // when it is not privileged): the path climbs out with `..`, and the
        // systemd driver's slice names still carry the whole hierarchy.
        (
            format!(
                "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            pod(UID, Qos::BestEffort, Some(ID)),
        ),
        // A cgroupfs kubelet below a prefix (k3d's nodes, seen from the host).
        (
            format!("/system.slice/docker-{NODE}.scope/kubepods/burstable/pod{UID}/{ID}"),
            pod(UID, Qos::Burstable, Some(ID)),
        ),
    ];
    for (path, want) in cases {
        assert_eq!(PodCgroup::parse(&path), want, "{path}");
    }
}

#[test]
fn other_cgroups_are_not_pods() {
    for path in [
        "/".to_string(),
        String::new(),
        "/system.slice/containerd.service".into(),
        "/kubepods.slice".into(),
        "/kubepods.slice/kubepods-burstable.slice".into(),
        "/kubepods/burstable".into(),
        format!("/system.slice/docker-{ID}.scope"),
        // `pod` outside kubepods, or under a QoS class that does not exist.
        format!("/pod{UID}/{ID}"),
        format!("/system.slice/pod{UID_}.slice"),
        format!("/kubepods.slice/kubepods-guaranteed.slice/kubepods-guaranteed-pod{UID_}.slice"),
        format!("/kubepods/guaranteed/pod{UID}/{ID}"),
        // Not a UID.
        "/kubepods.slice/kubepods-pod.slice".into(),
        "/kubepods/pod/x".into(),
        "/kubepods/pod../etc".into(),
        "/kubepods/podzz-top/x".into(),
        format!("/kubepods/pod{UID}{UID}/x"),
        "/user.slice/user-1000.slice/podman-1234.scope".into(),
        // cgroupfs seen from inside a cgroup namespace: the `kubepods`
        // ancestors are `..`, so the pod cannot be told from any `pod*`
        // directory (docs/kubernetes.md, "The agent's cgroup namespace").
        format!("/../../besteffort/pod{UID}/{ID}"),
    ] {
        assert_eq!(PodCgroup::parse(&path), None, "{path}");
    }
}

fn b64(data: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| (n << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn decodes_base64url() {
    // RFC 4648 section 10, in the URL alphabet and without padding.
    for (plain, coded) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(
            base64url(coded).as_deref(),
            Some(plain.as_bytes()),
            "{coded}"
        );
        assert_eq!(b64(plain.as_bytes()), coded);
    }
    assert_eq!(base64url("\u{fb}\u{ff}").as_deref(), None);
    assert_eq!(
        base64url(&b64(&[0xfb, 0xff, 0xfe])).unwrap(),
        [0xfb, 0xff, 0xfe]
    );
    assert_eq!(base64url("Zm9v+"), None);
    assert_eq!(base64url("Zm9vY"), None, "a lone 6-bit group");
}

/// A service-account token as the kubelet writes it: the TokenRequest
/// answer, bound to the pod (`kubernetes.io.pod`).
fn token(namespace: &str, pod: &str, uid: &str, account: &str) -> String {
    let header = json!({"alg": "RS256", "kid": "h3QpXb9TbDq8NQ4d0cZYl1iVqA"});
    let claims = json!({
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "exp": 1767225600, "iat": 1735689600, "nbf": 1735689600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "jti": "6d7b7c3e-2f0a-4d7e-9b8e-3c1f2a4b5c6d",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "worker-1", "uid": "4c1b2a39-8f7e-4d6c-b5a4-938271605f4e"},
            "pod": {"name": pod, "uid": uid},
            "serviceaccount": {"name": account, "uid": "9e8d7c6b-5a49-4837-a261-5f4e3d2c1b0a"},
            "warnafter": 1735693207
        },
        "sub": format!("system:serviceaccount:{namespace}:{account}")
    });
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(b"signature bytes the agent does not check")
    )
}

/// A projected volume as the kubelet's atomic writer lays it out: the
/// files in a timestamped directory, `..data` pointing at it, and a
/// relative symlink per file.
fn projected(root: &Path, uid: &str, volume: &str, token: &str) {
    let dir = root
        .join("var/lib/kubelet/pods")
        .join(uid)
        .join("volumes/kubernetes.io~projected")
        .join(volume);
    let data = dir.join("..2025_01_01_00_00_00.123456789");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("token"), token).unwrap();
    fs::write(data.join("namespace"), NS).unwrap();
    symlink("..2025_01_01_00_00_00.123456789", dir.join("..data")).unwrap();
    symlink("..data/token", dir.join("token")).unwrap();
    symlink("..data/namespace", dir.join("namespace")).unwrap();
}

fn log_dir(root: &Path, namespace: &str, pod: &str, uid: &str, containers: &[&str]) {
    let dir = root
        .join("var/log/pods")
        .join(format!("{namespace}_{pod}_{uid}"));
    for c in containers {
        fs::create_dir_all(dir.join(c)).unwrap();
        fs::write(dir.join(c).join("0.log"), "").unwrap();
    }
}

fn write_json(path: &Path, value: &serde_json::Value) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, value.to_string()).unwrap();
}

/// containerd's task bundle for a container of the pod.
fn containerd_container(root: &Path, id: &str, uid: &str, name: &str) {
    write_json(
        &root
            .join("run/containerd/io.containerd.runtime.v2.task/k8s.io")
            .join(id)
            .join("config.json"),
        &json!({
            "ociVersion": "1.2.0",
            "process": {"user": {"uid": 1000, "gid": 1000}, "args": ["python", "agent.py"], "cwd": "/app"},
            "root": {"path": "rootfs"},
            "annotations": {
                "io.kubernetes.cri.container-name": name,
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.image-name": "ghcr.io/acme/langchain:1.4",
                "io.kubernetes.cri.sandbox-id": SANDBOX,
                "io.kubernetes.cri.sandbox-name": POD,
                "io.kubernetes.cri.sandbox-namespace": NS,
                "io.kubernetes.cri.sandbox-uid": uid
            },
            "linux": {"cgroupsPath": format!("kubepods-burstable-pod{}.slice:cri-containerd:{id}", uid.replace('-', "_"))}
        }),
    );
}

fn crio_labels(extra: serde_json::Value, uid: &str) -> String {
    let mut labels = json!({
        "io.kubernetes.pod.name": POD,
        "io.kubernetes.pod.namespace": NS,
        "io.kubernetes.pod.uid": uid
    });
    labels
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    labels.to_string()
}

/// CRI-O's container directory (`userdata/config.json`) for a sandbox or
/// a container of the pod.
fn crio_spec(root: &Path, id: &str, kind: &str, labels: String, extra: serde_json::Value) {
    let mut annotations = json!({
        "io.kubernetes.cri-o.ContainerType": kind,
        "io.kubernetes.cri-o.ContainerID": id,
        "io.kubernetes.cri-o.SandboxID": SANDBOX,
        "io.kubernetes.cri-o.Labels": labels,
        "io.kubernetes.cri-o.Namespace": NS,
    });
    annotations
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    write_json(
        &root
            .join("var/lib/containers/storage/overlay-containers")
            .join(id)
            .join("userdata/config.json"),
        &json!({"ociVersion": "1.0.2-dev", "annotations": annotations}),
    );
}

/// A containerd node with the pod, its token and its container.
fn containerd_node() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    log_dir(root, NS, POD, UID, &["agent", "istio-proxy"]);
    log_dir(
        root,
        "kube-system",
        "coredns-5d78c9869d-7xkq2",
        "11111111-2222-3333-4444-555555555555",
        &["coredns"],
    );
    projected(
        root,
        UID,
        "kube-api-access-9x7kq",
        &token(NS, POD, UID, "langchain"),
    );
    containerd_container(root, ID, UID, "agent");
    tmp
}

#[test]
fn reads_a_pod_on_containerd() {
    let tmp = containerd_node();
    let files = NodeFiles::under(tmp.path());
    assert_eq!(
        files.pod(UID),
        Some(PodInfo {
            namespace: NS.into(),
            name: POD.into(),
            uid: UID.into(),
            service_account: Some("langchain".into()),
            labels: BTreeMap::new(),
        })
    );
    assert_eq!(files.container_name(UID, ID).as_deref(), Some("agent"));
    // The spec names another pod: not this pod's container.
    assert_eq!(
        files.container_name("11111111-2222-3333-4444-555555555555", ID),
        None
    );
    assert_eq!(files.container_name(UID, NODE), None);
    assert_eq!(files.pod("22222222-2222-3333-4444-555555555555"), None);
}

#[test]
fn a_sandbox_has_no_container_name() {
    let tmp = containerd_node();
    write_json(
        &tmp.path()
            .join("run/containerd/io.containerd.runtime.v2.task/k8s.io")
            .join(SANDBOX)
            .join("config.json"),
        &json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-name": POD,
            "io.kubernetes.cri.sandbox-namespace": NS,
            "io.kubernetes.cri.sandbox-uid": UID
        }}),
    );
    assert_eq!(
        NodeFiles::under(tmp.path()).container_name(UID, SANDBOX),
        None
    );
}

#[test]
fn reads_a_pod_and_its_labels_on_crio() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    log_dir(root, NS, POD, UID, &["agent"]);
    projected(
        root,
        UID,
        "kube-api-access-2bq8d",
        &token(NS, POD, UID, "langchain"),
    );
    crio_spec(
        root,
        SANDBOX,
        "sandbox",
        crio_labels(
            json!({"app": "langchain", "pod-template-hash": "7d9f8b6c5"}),
            UID,
        ),
        json!({
            "io.kubernetes.cri-o.KubeName": POD,
            "io.kubernetes.pod.name": POD,
            "io.kubernetes.pod.namespace": NS,
            "io.kubernetes.pod.uid": UID
        }),
    );
    crio_spec(
        root,
        ID,
        "container",
        crio_labels(json!({"io.kubernetes.container.name": "agent"}), UID),
        json!({"io.kubernetes.container.name": "agent"}),
    );
    // Another pod's sandbox with other labels.
    crio_spec(
        root,
        NODE,
        "sandbox",
        crio_labels(
            json!({"app": "other"}),
            "11111111-2222-3333-4444-555555555555",
        ),
        json!({}),
    );
    let files = NodeFiles::under(root);
    let info = files.pod(UID).unwrap();
    assert_eq!(
        info.labels,
        BTreeMap::from([
            ("app".to_string(), "langchain".to_string()),
            ("pod-template-hash".to_string(), "7d9f8b6c5".to_string()),
        ])
    );
    assert_eq!(info.service_account.as_deref(), Some("langchain"));
    assert_eq!(files.container_name(UID, ID).as_deref(), Some("agent"));
    assert_eq!(files.container_name(UID, SANDBOX), None);
}

#[test]
fn crio_names_from_annotations_without_the_labels_json() {
    let tmp = tempfile::tempdir().unwrap();
    write_json(
        &tmp.path()
            .join("var/lib/containers/storage/overlay-containers")
            .join(ID)
            .join("userdata/config.json"),
        &json!({"annotations": {
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.container.name": "agent",
            "io.kubernetes.pod.uid": UID
        }}),
    );
    let files = NodeFiles::under(tmp.path());
    assert_eq!(files.container_name(UID, ID).as_deref(), Some("agent"));
}

#[test]
fn a_token_that_does_not_match_the_pod_gives_no_account() {
    for bad in [
        token(NS, POD, "11111111-2222-3333-4444-555555555555", "admin"),
        token("kube-system", POD, UID, "admin"),
        token(NS, "other-pod", UID, "admin"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        log_dir(tmp.path(), NS, POD, UID, &["agent"]);
        projected(tmp.path(), UID, "kube-api-access-9x7kq", &bad);
        let info = NodeFiles::under(tmp.path()).pod(UID).unwrap();
        assert_eq!((info.name.as_str(), info.service_account), (POD, None));
    }
}

#[test]
fn tokens_that_disagree_give_no_account() {
    let tmp = containerd_node();
    projected(
        tmp.path(),
        UID,
        "bound-token",
        &token(NS, POD, UID, "admin"),
    );
    assert_eq!(
        NodeFiles::under(tmp.path())
            .pod(UID)
            .unwrap()
            .service_account,
        None
    );
    // The same account twice is fine.
    let tmp = containerd_node();
    projected(
        tmp.path(),
        UID,
        "bound-token",
        &token(NS, POD, UID, "langchain"),
    );
    assert_eq!(
        NodeFiles::under(tmp.path())
            .pod(UID)
            .unwrap()
            .service_account
            .as_deref(),
        Some("langchain")
    );
}

#[test]
fn malformed_tokens_are_ignored() {
    let good = token(NS, POD, UID, "langchain");
    let payload = good.split('.').nth(1).unwrap();
    let unbound =
        json!({"kubernetes.io": {"namespace": NS, "serviceaccount": {"name": "x", "uid": "y"}}});
    for bad in [
        String::new(),
        "not a jwt".into(),
        format!("a.{payload}"),
        format!("a.{payload}.c.d"),
        format!("a.{}.c", &payload[..payload.len() - 7]),
        format!("a.{payload}!.c"),
        format!("a.{}.c", b64(b"{\"kubernetes.io\": 3}")),
        format!("a.{}.c", b64(b"[1,2]")),
        // A legacy secret token has no pod claim to check against.
        format!("a.{}.c", b64(unbound.to_string().as_bytes())),
        String::from_utf8_lossy(&[0xff, 0xfe, b'.', b'a', b'.', b'b']).into_owned(),
    ] {
        assert_eq!(TokenClaims::decode(bad.as_bytes()), None, "{bad}");
        let tmp = tempfile::tempdir().unwrap();
        log_dir(tmp.path(), NS, POD, UID, &["agent"]);
        projected(tmp.path(), UID, "kube-api-access-9x7kq", &bad);
        assert_eq!(
            NodeFiles::under(tmp.path())
                .pod(UID)
                .unwrap()
                .service_account,
            None
        );
    }
    assert_eq!(
        TokenClaims::decode(format!("{good}\n").as_bytes()).map(|c| c.service_account),
        Some("langchain".into())
    );
}

#[test]
fn malformed_runtime_files_give_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    log_dir(root, NS, POD, UID, &["agent"]);
    let bundle = root
        .join("run/containerd/io.containerd.runtime.v2.task/k8s.io")
        .join(ID);
    fs::create_dir_all(&bundle).unwrap();
    fs::write(
        bundle.join("config.json"),
        r#"{"annotations": {"io.kubernetes.cri.container-name": "ag"#,
    )
    .unwrap();
    let files = NodeFiles::under(root);
    assert_eq!(files.container_name(UID, ID), None);
    fs::write(
        bundle.join("config.json"),
        r#"{"annotations": {"io.kubernetes.cri.container-name": "agent"}}"#,
    )
    .unwrap();
    assert_eq!(files.container_name(UID, ID), None, "no type, no pod");
    fs::write(
        bundle.join("config.json"),
        vec![b' '; (MAX_FILE + 1) as usize],
    )
    .unwrap();
    assert_eq!(files.container_name(UID, ID), None);
    // A CRI-O sandbox whose labels JSON is cut short: no labels, the pod stays.
    crio_spec(
        root,
        SANDBOX,
        "sandbox",
        crio_labels(json!({"app": "x"}), UID)[..40].into(),
        json!({}),
    );
    assert_eq!(files.pod(UID).unwrap().labels, BTreeMap::new());
    // Ids and UIDs that are not one cannot walk the tree.
    assert_eq!(files.container_name(UID, "../../../../etc/passwd"), None);
    assert_eq!(files.pod("../../etc"), None);
    assert_eq!(files.pod(""), None);
}

#[test]
fn odd_log_directories_are_not_pods() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for name in [
        format!("{NS}_{POD}_{UID}_extra"),
        format!("_{POD}_{UID}"),
        format!("{NS}__{UID}"),
        format!("{POD}_{UID}"),
    ] {
        fs::create_dir_all(root.join("var/log/pods").join(name)).unwrap();
    }
    fs::write(root.join("var/log/pods/stray-file"), "").unwrap();
    assert_eq!(NodeFiles::under(root).pod(UID), None);
    // Nothing at all on the node.
    assert_eq!(NodeFiles::under(&root.join("nowhere")).pod(UID), None);
    assert_eq!(
        NodeFiles::under(&root.join("nowhere")).container_name(UID, ID),
        None
    );
}

#[test]
fn the_cache_answers_from_memory_once_a_pod_is_read() {
    let tmp = containerd_node();
    let cache = PodCache::new(NodeFiles::under(tmp.path()));
    let cgroup = PodCgroup::parse(&format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
    ))
    .unwrap();
    let want = PodIdentity {
        namespace: NS.into(),
        name: POD.into(),
        uid: UID.into(),
        container: Some("agent".into()),
        service_account: Some("langchain".into()),
    };
    assert_eq!(cache.identity(&cgroup).as_ref(), Some(&want));
    fs::remove_dir_all(tmp.path().join("var")).unwrap();
    fs::remove_dir_all(tmp.path().join("run")).unwrap();
    assert_eq!(cache.identity(&cgroup), Some(want.clone()));
    // The pod's own cgroup: the pod without a container.
    let pod_level = PodCgroup {
        container_id: None,
        ..cgroup
    };
    assert_eq!(
        cache.identity(&pod_level),
        Some(PodIdentity {
            container: None,
            ..want
        })
    );
}

#[test]
fn the_cache_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = PodCache::new(NodeFiles::under(tmp.path()));
    for n in 0..PodCache::MAX_PODS + 10 {
        assert_eq!(
            cache.pod(&format!("{n:08x}-0000-4000-8000-000000000000")),
            None
        );
    }
    assert_eq!(cache.lock().len(), PodCache::MAX_PODS);
}
