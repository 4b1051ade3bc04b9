"""The Debian package of the host install (docs/install.md), installed with
dpkg on this machine and purged at the end: its files, conffiles, unit
(systemd-analyze verify and an offline security review), configuration,
and that installing neither starts nor enables the service.

WARDEN_DEB is the .deb that `cargo xtask package` prints (`cargo xtask test`
builds it and sets the variable)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import read_audit
from test_lifecycle import cgroup2_root

ROOT = Path(__file__).resolve().parents[2]
UNIT = Path("/usr/lib/systemd/system/warden.service")
CONFIG = Path("/etc/warden/warden.yaml")
POLICY = Path("/etc/warden/policy.yaml")
STATE = Path("/var/lib/warden")

# The daemon's configuration keys (warden daemon --config; docs/install.md).
DAEMON_KEYS = {
    "policy", "state_dir", "audit_dir", "listen_port", "control_socket", "metrics_listen",
    "fail_open", "tls_intercept", "upstream_ca", "manage",
}
MANAGE_KEYS = {"units", "cgroups", "pods"}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def installed_status() -> str:
    """dpkg's two letters (ii: installed, rc: removed, config kept), or "" if
    dpkg has no trace of it."""
    status = sh("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "warden", check=False).stdout.strip()
    return "" if status[1:2] == "n" else status


@pytest.fixture(scope="module")
def deb() -> Path:
    path = os.environ.get("WARDEN_DEB")
    if not path:
        pytest.fail("WARDEN_DEB is not set: run `cargo xtask package` and set WARDEN_DEB to the .deb it prints "
                    "(`cargo xtask test` does both)")
    if not Path(path).is_file():
        pytest.fail(f"WARDEN_DEB={path} does not exist: run `cargo xtask package` again")
    return Path(path)


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory):
    """`dpkg -i` of the package; afterwards `dpkg --purge`, and this machine's
    own /var/lib/warden (which purging deletes) put back."""
    if installed_status():
        pytest.fail(f"a warden package is already on this machine ({installed_status()}); "
                    "remove it with `dpkg --purge warden` first")
    backup = tmp_path_factory.mktemp("state") / "warden"
    had_state = STATE.exists()
    if had_state:
        shutil.copytree(STATE, backup, symlinks=True)
    try:
        proc = sh("dpkg", "-i", str(deb))
        yield proc
    finally:
        subprocess.run(["dpkg", "--purge", "warden"], capture_output=True, timeout=300)
        if had_state:
            shutil.copytree(backup, STATE, symlinks=True, dirs_exist_ok=True)


def test_package_metadata_and_contents(deb):
    info = sh("dpkg-deb", "--info", str(deb)).stdout
    fields = dict(
        line.strip().split(": ", 1) for line in info.splitlines() if line.startswith(" ") and ": " in line
    )
    assert fields["Package"] == "warden"
    assert fields["Architecture"] == "amd64"
    assert "libc6" in fields["Depends"], fields["Depends"]
    # Stripped: the unstripped release binary is about 900 MB.
    assert int(fields["Installed-Size"]) < 200_000, fields["Installed-Size"]
    conffiles = sh("dpkg-deb", "--info", str(deb), "conffiles").stdout.split()
    assert sorted(conffiles) == ["/etc/warden/policy.yaml", "/etc/warden/warden.yaml"], conffiles
    # Installing neither enables nor starts the service; an upgrade restarts
    # it only if it runs (try-restart).
    postinst = sh("dpkg-deb", "--info", str(deb), "postinst").stdout
    assert "deb-systemd-invoke start" not in postinst and "try-restart" in postinst, postinst

    listing = sh("dpkg-deb", "--contents", str(deb)).stdout
    paths = {line.split()[-1] for line in listing.splitlines()}
    for p in [
        "./usr/bin/warden",
        "./usr/lib/systemd/system/warden.service",
        "./etc/warden/warden.yaml",
        "./etc/warden/policy.yaml",
        "./usr/share/doc/warden/install.md",
        "./usr/share/doc/warden/copyright",
    ]:
        assert p in paths, f"{p} is not in the package:\n{listing}"
    # The state is the daemon's to make (StateDirectory=), not dpkg's.
    assert not any(p.startswith("./var/lib/warden") for p in paths)


def test_install_does_not_enable(installed):
    assert installed_status() == "ii"
    assert not Path("/etc/systemd/system/multi-user.target.wants/warden.service").exists()


def test_installed_binary_runs(installed, deb, tmp_path):
    version = sh("/usr/bin/warden", "--version").stdout.split()
    assert version[0] == "warden"
    package_version = sh("dpkg-deb", "--field", str(deb), "Version").stdout.strip()
    assert package_version.startswith(f"{version[1]}-"), (package_version, version)
    sections = sh("readelf", "-S", "--wide", "/usr/bin/warden").stdout
    assert ".debug_info" not in sections, "the packaged binary is not stripped"
    # The CA command that docs/install.md has users pipe into the trust store.
    pem = sh("/usr/bin/warden", "ca", "export", "--state-dir", str(tmp_path / "state")).stdout
    assert pem.startswith("-----BEGIN CERTIFICATE-----"), pem


def test_conffiles_are_the_shipped_defaults(installed):
    conffiles = sh("dpkg-query", "-W", "-f=${Conffiles}", "warden").stdout
    assert str(CONFIG) in conffiles and str(POLICY) in conffiles, conffiles
    assert CONFIG.read_text() == (ROOT / "agent/packaging/warden.yaml").read_text()
    assert POLICY.read_text() == (ROOT / "policies/default.yaml").read_text()
    out = sh("/usr/bin/warden", "policy", "check", str(POLICY)).stdout
    assert "ok" in out, out


def test_default_config_manages_nothing(installed):
    config = yaml.safe_load(CONFIG.read_text())
    assert set(config) <= DAEMON_KEYS, set(config) - DAEMON_KEYS
    assert config["policy"] == str(POLICY)
    assert config["state_dir"] == str(STATE)
    assert config["fail_open"] is False
    assert config["control_socket"] == "/run/warden/control.sock"
    assert set(config["manage"]) == MANAGE_KEYS
    assert all(v == [] for v in config["manage"].values()), config["manage"]


def test_unit_verifies_and_is_hardened(installed):
    # No systemd as PID 1 here: verify and the offline review read the file only.
    proc = sh("systemd-analyze", "verify", str(UNIT), check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # Exposure 0 (locked down) to 100 (unsandboxed); the unit rates 45 (4.5, "OK").
    review = sh("systemd-analyze", "security", "--offline=yes", "--threshold=50", str(UNIT), check=False)
    assert review.returncode == 0, review.stdout + review.stderr
    settings = [l for l in UNIT.read_text().splitlines() if l and not l.startswith("#")]
    assert "ExecStart=/usr/bin/warden daemon --config /etc/warden/warden.yaml --log-format json" in settings
    bounding = next(l for l in settings if l.startswith("CapabilityBoundingSet="))
    assert "CAP_SYS_ADMIN" not in bounding, bounding
    # The daemon writes cgroupfs (attach, its own cgroups).
    assert not any(l.startswith("ProtectControlGroups=") for l in settings)


def test_installed_daemon_protects_a_service_with_only_the_units_capabilities(installed, echo4, tmp_path):
    """The installed binary and policy, started the way the unit starts it and with
    only the capabilities its bounding set keeps (setpriv stands in for systemd,
    which is not PID 1 here; the unit's other sandboxing is not applied), protect a
    cgroup that stands for a service: a real client in it is redirected and audited."""
    settings = [l for l in UNIT.read_text().splitlines() if l and not l.startswith("#")]
    caps = next(l for l in settings if l.startswith("CapabilityBoundingSet=")).split("=", 1)[1].split()
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    cgroup_root = cgroup2_root()
    service = cgroup_root / f"warden-pkgtest-{os.getpid()}.slice" / "langchain-pkg.service"
    service.mkdir(parents=True)
    config = yaml.safe_load(CONFIG.read_text())
    config.update({
        "state_dir": str(tmp_path / "state"),
        "audit_dir": str(tmp_path / "audit"),
        "control_socket": str(tmp_path / "control.sock"),
    })
    config["manage"]["units"] = ["langchain-*.service"]
    config_file = tmp_path / "warden.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "daemon.log", "w+")
    daemon = subprocess.Popen(["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--",
                               "/usr/bin/warden", "daemon", "--config", str(config_file), "--log-format", "json"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            status = subprocess.run(["/usr/bin/warden", "status", "--json", "--socket", str(tmp_path / "control.sock")],
                                    capture_output=True, text=True)
            if status.returncode == 0 and json.loads(status.stdout)["ready"] or daemon.poll() is not None:
                break
            time.sleep(0.1)
        log.seek(0)
        assert status.returncode == 0, log.read()
        effective = next(l for l in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
                         if l.startswith("CapEff:"))
        assert int(effective.split()[1], 16).bit_count() == len(caps), effective
        assert [a["cgroup"] for a in json.loads(status.stdout)["attached"]] == [str(service)]

        def client():
            (service / "cgroup.procs").write_text("0")

        code = f"import socket; s = socket.create_connection(('127.0.0.1', {echo4.port})); s.sendall(b'hi'); print(s.recv(2).decode())"
        out = subprocess.run([sys.executable, "-c", code], preexec_fn=client, capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "hi", out.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        subprocess.run(["/usr/bin/warden", "cleanup"], capture_output=True)
        service.rmdir()
        service.parent.rmdir()
    rows = [r for r in read_audit(tmp_path / "audit") if r["dst_port"] == echo4.port]
    assert len(rows) == 1 and rows[0]["unit"] == "langchain-pkg.service", rows


def test_upgrade_keeps_edited_config(installed, deb):
    edited = CONFIG.read_text() + "# edited by the administrator\n"
    CONFIG.write_text(edited)
    sh("dpkg", "-i", str(deb))
    assert CONFIG.read_text() == edited


def test_remove_keeps_config_purge_deletes_state(installed):
    sh("/usr/bin/warden", "ca", "export")  # makes /var/lib/warden/ca if this machine had none
    sh("dpkg", "-r", "warden")
    assert installed_status() == "rc"
    assert not Path("/usr/bin/warden").exists() and not UNIT.exists()
    assert CONFIG.exists() and POLICY.exists() and (STATE / "ca/ca.pem").exists()
    sh("dpkg", "--purge", "warden")
    assert installed_status() == ""
    assert not Path("/etc/warden").exists()
    assert not STATE.exists()
