"""`warden daemon`: one agent for the host's services. Cgroups made by the
test stand for systemd units; a real PostgreSQL server and real clients run
in them. Covers selection (at start and later), policy reload (good, bad,
SIGHUP), `warden status`, and what a stop or a crash does to the services'
connections (fail closed, or open when configured)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import WARDEN, read_audit, read_requests
from test_lifecycle import cgroup2_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from kube_api import KubeApiServer  # noqa: E402
from pg import PostgresServer  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    server.psql_admin("CREATE TABLE IF NOT EXISTS cards (id int, number text)", database=server.database)
    server.psql_admin("GRANT ALL ON cards TO app", database=server.database)
    yield server
    server.stop()


@pytest.fixture
def slice_dir():
    """A slice of the test's own at the top of the cgroup tree; its children stand for units."""
    path = cgroup2_root() / f"warden-test-{uuid.uuid4().hex[:8]}.slice"
    path.mkdir()
    yield path
    for child in sorted(path.glob("*"), reverse=True):
        if child.is_dir():
            kill_all(child)
            child.rmdir()
    path.rmdir()


def kill_all(cgroup: Path):
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 5
    while (cgroup / "cgroup.procs").read_text().strip() and time.monotonic() < end:
        time.sleep(0.02)


class Daemon:
    """`warden daemon` with a configuration in a temporary directory."""

    def __init__(self, tmp: Path, manage: dict, policy: Path | None = None, fail_open: bool = False,
                 metrics_port: int | None = None, env: dict | None = None, node_root: Path | None = None,
                 kubernetes_api: dict | None = None):
        self.tmp = tmp
        self.socket = tmp / "control.sock"
        self.audit_dir = tmp / "audit"
        self.config = tmp / "warden.yaml"
        config = {
            "state_dir": str(tmp / "state"),
            "audit_dir": str(self.audit_dir),
            "control_socket": str(self.socket),
            "fail_open": fail_open,
            "manage": manage,
        }
        if policy:
            config["policy"] = str(policy)
        if metrics_port:
            config["metrics_listen"] = f"127.0.0.1:{metrics_port}"
        if node_root:
            config["node_root"] = str(node_root)
        if kubernetes_api is not None:
            config["kubernetes_api"] = kubernetes_api
        # JSON is YAML.
        self.config.write_text(json.dumps(config, indent=2))
        self.log = open(tmp / f"daemon-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([WARDEN, "daemon", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.status()["ready"]:
                    break
            except AssertionError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"the daemon did not get ready within 30 s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([WARDEN, *args, "--socket", str(self.socket)], capture_output=True, text=True, timeout=30)

    def status(self) -> dict:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def managed(self) -> list[str]:
        return [a["cgroup"] for a in self.status()["attached"]]

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def events(self) -> list[tuple[str, str]]:
        import duckdb

        glob = str(self.audit_dir / "events" / "**" / "*.parquet")
        return duckdb.connect().execute(
            f"SELECT event, message FROM read_parquet('{glob}', hive_partitioning=true) ORDER BY start_time").fetchall()


def in_cgroup(cgroup: Path, code: str, timeout: float = 60) -> dict:
    """Runs a Python snippet as a process of `cgroup`; returns the JSON it prints last."""
    def join():
        (cgroup / "cgroup.procs").write_text("0")

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], preexec_fn=join,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def query(pg, sql: str) -> str:
    """A psycopg client's code that runs `sql` and prints what happened."""
    return f"""
        import json, psycopg
        try:
            with psycopg.connect({pg.dsn!r}, autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute({sql!r}).fetchall()
            print(json.dumps({{"ok": len(rows)}}))
        except psycopg.errors.InsufficientPrivilege as e:
            print(json.dumps({{"denied": str(e)}}))
        except psycopg.OperationalError as e:
            print(json.dumps({{"failed": str(e)}}))
        """


def connect(port: int) -> str:
    """A raw TCP client's code: connects to 127.0.0.1:port, says what happened."""
    return f"""
        import json, socket
        try:
            s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
            s.sendall(b"ping"); reply = s.recv(4); s.close()
            print(json.dumps({{"reply": reply.decode()}}))
        except OSError as e:
            print(json.dumps({{"error": type(e).__name__}}))
        """


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def test_selected_units_are_managed_from_start_and_as_they_appear(pg, slice_dir, tmp_path):
    before = slice_dir / "langchain-batch.service"
    before.mkdir()
    other = slice_dir / "backup.service"
    other.mkdir()
    metrics_port = free_port()
    daemon = Daemon(tmp_path, {"units": ["langchain-*.service"]}, metrics_port=metrics_port)
    try:
        root = cgroup2_root()
        assert daemon.managed() == [str(before)]
        # A service that starts later is managed within a second (inotify, no polling).
        later = slice_dir / "langchain-chat.service"
        later.mkdir()
        took = wait_until(lambda: str(later) in daemon.managed(), 1.0, "managing the new unit")
        print(f"new unit managed after {took * 1000:.1f} ms")

        assert in_cgroup(later, query(pg, "SELECT 'from chat'")) == {"ok": 1}
        assert in_cgroup(before, query(pg, "SELECT 'from batch'")) == {"ok": 1}
        assert in_cgroup(other, query(pg, "SELECT 'from backup'")) == {"ok": 1}

        status = daemon.cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "managed cgroups: 2" in status.stdout
        assert 'unit langchain-chat.service matches manage.units "langchain-*.service"' in status.stdout
        assert "when stopped: managed cgroups fail closed" in status.stdout

        # The daemon's metrics count what its services did.
        from prometheus_client.parser import text_string_to_metric_families
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        requests_total = {
            (s.labels["protocol"], s.labels["decision"]): s.value
            for f in text_string_to_metric_families(text) if f.name == "warden_requests"
            for s in f.samples if s.name == "warden_requests_total"
        }
        assert requests_total.get(("postgres", "allow"), 0) >= 2, requests_total
        events_total = {
            s.labels["event"]: s.value
            for f in text_string_to_metric_families(text) if f.name == "warden_events"
            for s in f.samples if s.name == "warden_events_total"
        }
        assert events_total.get("cgroup_attached") == 2, events_total

        # The unit goes: it is released.
        later.rmdir()
        wait_until(lambda: str(later) not in daemon.managed(), 1.0, "releasing the removed unit")
    finally:
        assert daemon.stop() == 0, daemon.output()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)

    rows = read_requests(daemon.audit_dir, "protocol = 'postgres'")
    statements = {r["statement"]: r for r in rows}
    assert "SELECT 'from chat'" in statements and "SELECT 'from batch'" in statements
    # Not selected: not redirected, not audited.
    assert "SELECT 'from backup'" not in statements
    chat = statements["SELECT 'from chat'"]
    assert chat["cgroup_path"] == "/" + str(later.relative_to(root)), chat["cgroup_path"]
    assert chat["unit"] == "langchain-chat.service"
    events = daemon.events()
    kinds = [e for e, _ in events]
    assert kinds.count("cgroup_attached") == 2, events
    assert ("cgroup_detached", f"{later}: the cgroup was removed") in events


def test_policy_reload_applies_a_good_policy_and_refuses_a_bad_one(pg, slice_dir, tmp_path):
    unit = slice_dir / "langchain-app.service"
    unit.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: audit\n")
    daemon = Daemon(tmp_path, {"units": ["langchain-*.service"]}, policy=policy)
    cards = query(pg, "SELECT number FROM cards")
    try:
        assert in_cgroup(unit, cards) == {"ok": 0}

        policy.write_text(textwrap.dedent("""\
            version: 1
            default: audit
            rules:
              - name: no-card-tables
                when: { sql: { tables: "*card*" } }
                action: deny
            workloads:
              bot: { match: { exe: "/usr/bin/python3*" } }
            budgets:
              bot: { tokens_per_day: 1000, providers: [openai] }
            """))
        out = daemon.cli("policy", "reload")
        assert out.returncode == 0, out.stderr
        assert "policy reloaded" in out.stdout and "1 rule" in out.stdout
        # `warden status` shows the budgets in force and what was used of them.
        assert "  bot: 0 of 1000 tokens (openai)" in daemon.cli("status").stdout
        [budget] = daemon.status()["budgets"]
        assert (budget["workload"], budget["spent_today"], budget["tokens_per_day"]) == ("bot", 0, 1000)
        denied = in_cgroup(unit, cards)
        assert "no-card-tables" in denied["denied"], denied

        # A bad file: refused with its line, and the policy in force stays.
        policy.write_text("version: 1\ndefault: audit\nrules:\n  - name: broken\n    when: { sql: { tables: x } }\n    action: maybe\n")
        out = daemon.cli("policy", "reload")
        assert out.returncode == 1
        assert f"{policy}:6:" in out.stderr, out.stderr
        assert "no-card-tables" in in_cgroup(unit, cards)["denied"]

        # SIGHUP rereads it too (systemctl reload).
        policy.write_text("version: 1\ndefault: audit\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "0 rules" in daemon.status()["policy"]["summary"], 5, "the SIGHUP reload")
        assert in_cgroup(unit, cards) == {"ok": 0}
    finally:
        assert daemon.stop() == 0, daemon.output()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)
    kinds = [e for e, _ in daemon.events()]
    assert kinds.count("policy_reloaded") == 2, kinds
    assert kinds.count("policy_reload_refused") == 1, kinds


def test_a_dead_daemon_fails_closed_and_the_next_one_takes_over(echo4, slice_dir, tmp_path):
    unit = slice_dir / "langchain-app.service"
    unit.mkdir()
    manage = {"cgroups": [str(slice_dir.relative_to(cgroup2_root()))]}
    first = Daemon(tmp_path, manage)
    assert in_cgroup(unit, connect(echo4.port)) == {"reply": "ping"}
    # Selected by its slice: a unit born inside it is covered from its first process.
    assert first.managed() == [str(slice_dir)]

    first.stop(signal.SIGKILL)
    # Its pinned programs still redirect, to a listener that is gone.
    assert in_cgroup(unit, connect(echo4.port)) == {"error": "ConnectionRefusedError"}
    peers_while_dead = len(echo4.peers)

    second = Daemon(tmp_path, manage)
    try:
        assert second.managed() == [str(slice_dir)]
        assert in_cgroup(unit, connect(echo4.port)) == {"reply": "ping"}
        bpffs = Path("/sys/fs/bpf/warden")
        assert not (bpffs / f"daemon-{first.proc.pid}").exists(), "the dead daemon's pins were taken over"
    finally:
        # A graceful stop keeps failing closed too.
        assert second.stop() == 0, second.output()
    assert in_cgroup(unit, connect(echo4.port)) == {"error": "ConnectionRefusedError"}
    assert len(echo4.peers) == peers_while_dead + 1

    # `warden cleanup` releases the cgroups: connections go direct again.
    out = subprocess.run([WARDEN, "cleanup"], capture_output=True, text=True)
    assert f"daemon {second.proc.pid}: released" in out.stdout, out.stdout + out.stderr
    assert in_cgroup(unit, connect(echo4.port)) == {"reply": "ping"}
    stopped = [m for e, m in second.events() if e == "agent_stopped"]
    assert stopped and "fail closed" in stopped[-1], stopped


def test_a_fail_open_daemon_lets_connections_go_direct_after_a_crash(echo4, slice_dir, tmp_path):
    unit = slice_dir / "langchain-app.service"
    unit.mkdir()
    daemon = Daemon(tmp_path, {"units": ["langchain-*.service"]}, fail_open=True)
    assert "fail open" in daemon.cli("status").stdout
    assert in_cgroup(unit, connect(echo4.port)) == {"reply": "ping"}
    daemon.stop(signal.SIGKILL)
    assert in_cgroup(unit, connect(echo4.port)) == {"reply": "ping"}
    # The agent's listener is gone, so the reply came straight from the server.
    assert not any(p.name.startswith(f"daemon-{daemon.proc.pid}") for p in Path("/sys/fs/bpf/warden").glob("*"))


def test_a_bad_configuration_names_its_line(tmp_path):
    config = tmp_path / "warden.yaml"
    config.write_text("state_dir: /tmp/x\nmanage:\n  units: [a.service]\n  pod: []\n")
    out = subprocess.run([WARDEN, "daemon", "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 125
    assert f"{config}:4: " in out.stderr and "unknown field `pod`" in out.stderr, out.stderr

    config.write_text("manage:\n  units: [\"langchain-*.service\"]\n")
    out = subprocess.run([WARDEN, "daemon", "--config", str(config), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "1 unit patterns, 0 cgroups, 0 pod selectors, fail closed" in out.stdout
    assert "embedded default policy" in out.stdout


def test_warden_run_uses_the_daemon_when_one_runs(pg, tmp_path):
    daemon = Daemon(tmp_path, {})
    ready, go = tmp_path / "ready", tmp_path / "go"
    code = textwrap.dedent(f"""
        import json, os, pathlib, socket, time, psycopg
        pathlib.Path({str(ready)!r}).touch()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            conn.execute("SELECT 'through the daemon'").fetchall()
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect({str(daemon.socket)!r})
            control = "reached"
        except OSError as e:
            control = type(e).__name__
        print(json.dumps({{"bundle": open(os.environ["SSL_CERT_FILE"]).read(), "control": control}}))
        """)
    run = subprocess.Popen([WARDEN, "run", "--control-socket", str(daemon.socket), "--", sys.executable, "-c", code],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(ready.exists, 30, "the program's start")
        attached = daemon.status()["attached"]
        assert [a["cgroup"] for a in attached] == [str(cgroup2_root() / "warden" / f"run-{run.pid}")], attached
        assert attached[0]["reason"].startswith("warden run -- "), attached
        go.touch()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        # The program trusts the daemon's CA, and cannot reach its control socket.
        ca = subprocess.run([WARDEN, "ca", "export", "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, check=True).stdout
        assert report["bundle"].rstrip().endswith(ca.rstrip())
        assert report["control"] != "reached", report
        assert daemon.status()["attached"] == []

        # Flags that would set up an agent of the run's own are refused, not ignored.
        refused = subprocess.run([WARDEN, "run", "--control-socket", str(daemon.socket), "--policy", "/dev/null",
                                  "--", "true"], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 125
        assert "--policy would be ignored" in refused.stderr and "--standalone" in refused.stderr, refused.stderr
    finally:
        if run.poll() is None:
            run.kill()
        assert daemon.stop() == 0, daemon.output()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)
    rows = read_requests(daemon.audit_dir, "statement = 'SELECT ''through the daemon'''")
    assert len(rows) == 1 and rows[0]["decision"] == "allow", rows
    events = [e for e, _ in daemon.events()]
    assert events.count("cgroup_attached") == 1 and events.count("cgroup_detached") == 1, events


def test_a_standalone_run_inside_a_managed_unit_is_refused(slice_dir, tmp_path):
    """`warden run --standalone` in a unit the daemon manages would send its own
    agent's connections through the daemon too: it is refused, saying so.
    Outside the daemon's units it runs."""
    managed, other = slice_dir / "langchain-solo.service", slice_dir / "backup.service"
    managed.mkdir()
    other.mkdir()
    daemon = Daemon(tmp_path, {"units": ["langchain-*.service"]})

    def standalone_in(cgroup: Path) -> subprocess.CompletedProcess:
        return subprocess.run([WARDEN, "run", "--standalone", "--control-socket", str(daemon.socket),
                               "--state-dir", str(tmp_path / "run-state"), "--", "true"],
                              preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"),
                              capture_output=True, text=True, timeout=60)

    try:
        refused = standalone_in(managed)
        assert refused.returncode == 125, refused.stderr
        assert f"this process is in {managed}, which the warden daemon manages" in refused.stderr, refused.stderr
        assert "drop --standalone" in refused.stderr, refused.stderr
        ran = standalone_in(other)
        assert ran.returncode == 0, ran.stderr
    finally:
        assert daemon.stop() == 0, daemon.output()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)


def test_systemd_hears_ready_reloading_and_stopping(tmp_path):
    """The unit is Type=notify: `systemctl start` returns once the selected
    cgroups are attached. A datagram socket stands for systemd's."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: audit\n")
    daemon = Daemon(tmp_path, {}, policy=policy, env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")))
    try:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\n") and "STATUS=managing 0 cgroups" in ready, ready
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify.recv(4096).decode()
        assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC="), reloading
        assert notify.recv(4096).decode() == "READY=1"
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert notify.recv(4096).decode() == "STOPPING=1"


def test_a_unit_with_a_network_namespace_of_its_own_is_served(slice_dir, tmp_path):
    """A service with a network namespace of its own (a pod, or a unit with
    PrivateNetwork=) is redirected to the loopback of that namespace: the
    daemon listens there, and connects from there. The server here listens
    on the namespace's loopback only, so only a connection made from inside
    it can reach it."""
    unit = slice_dir / "langchain-isolated.service"
    unit.mkdir()
    daemon = Daemon(tmp_path, {"units": ["langchain-*.service"]})
    holder = server = None
    try:
        assert daemon.managed() == [str(unit)]
        # The unit's first process comes with its namespace made, as a
        # container runtime starts a pod's sandbox.
        holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c",
             f"ip link set lo up && echo $$ > {unit}/cgroup.procs && exec sleep 300"])
        netns = f"/proc/{holder.pid}/ns/net"

        def namespace_served():
            attached = {a["cgroup"]: a for a in daemon.status()["attached"]}
            return attached[str(unit)]["netns"]

        took = wait_until(namespace_served, 2.0, "serving the unit's network namespace")
        print(f"network namespace served {took * 1000:.1f} ms after the unit's first process")
        own_ns = os.stat(netns).st_ino
        assert namespace_served() == [f"net:[{own_ns}]"]

        server, port = serve_file_in(netns, tmp_path / "site", "hello", "from inside the namespace")

        fetch = f"""
            import json, urllib.request
            try:
                body = urllib.request.urlopen("http://127.0.0.1:{port}/hello", timeout=5).read().decode()
                print(json.dumps({{"body": body}}))
            except OSError as e:
                print(json.dumps({{"error": str(e)}}))
            """
        assert in_netns_and_cgroup(netns, unit, fetch) == {"body": "from inside the namespace"}

        # A namespace made later by a process of an already busy unit (as
        # systemd's PrivateNetwork= does, after placing the process) is not
        # served at first: its connect is refused, never sent around the
        # agent. The kernel's report makes the agent look, and serve it.
        late = subprocess.run(
            ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} -c '{LATE_CONNECT}' {port}"],
            preexec_fn=lambda: (unit / "cgroup.procs").write_text("0"),
            capture_output=True, text=True, timeout=30)
        assert late.returncode == 0, late.stderr
        assert json.loads(late.stdout.strip().splitlines()[-1]) == {"first": "PermissionError", "then": "accepted"}
        status = daemon.cli("status")
        assert f"listening in its network namespace net:[{own_ns}]" in status.stdout, status.stdout

        # The unit stops: the namespace is let go.
        server.kill()
        server.wait()
        kill_all(unit)
        holder.wait()
        unit.rmdir()
        wait_until(lambda: str(unit) not in daemon.managed(), 1.0, "releasing the removed unit")
    finally:
        for proc in (server, holder):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        assert daemon.stop() == 0, daemon.output()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)

    rows = read_requests(daemon.audit_dir, "protocol = 'http'")
    assert [(r["http_method"], r["http_path"], r["http_status"]) for r in rows] == [("GET", "/hello", 200)], rows
    assert rows[0]["unit"] == "langchain-isolated.service"
    kinds = [e for e, _ in daemon.events()]
    assert kinds.count("netns_served") == 2 and kinds.count("netns_released") == 2, kinds
    refused = [(r["decision"], r["transport"], r["dst_port"]) for r in read_audit(daemon.audit_dir) if r["rule"] == "netns"]
    assert refused == [("deny", "tcp", port)], refused


# Connects until the agent serves this namespace: refused by the kernel at
# first, then accepted by the agent's listener (the server is in another
# namespace, so the agent's own connect then fails and the connection ends).
LATE_CONNECT = """
import json, socket, sys, time
port = int(sys.argv[1])
def attempt():
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return "accepted"
    except OSError as e:
        return type(e).__name__
first = attempt()
then = first
deadline = time.monotonic() + 5
while then != "accepted" and time.monotonic() < deadline:
    time.sleep(0.05)
    then = attempt()
print(json.dumps({"first": first, "then": then}))
"""


def serve_file_in(netns: str, site: Path, name: str, text: str) -> tuple[subprocess.Popen, int]:
    """An HTTP server on the loopback of a network namespace only, serving one file."""
    site.mkdir()
    (site / name).write_text(text)
    port = free_port()
    server = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-m", "http.server",
                               "--bind", "127.0.0.1", "--directory", str(site), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        probe = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c",
                                f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)"],
                               capture_output=True)
        return probe.returncode == 0

    wait_until(listening, 10.0, "the server in the namespace")
    return server, port


def in_netns_and_cgroup(netns: str, cgroup: Path, code: str) -> dict:
    """Runs a Python snippet in a network namespace, as a process of `cgroup`."""
    proc = subprocess.run(["nsenter", f"--net={netns}", sys.executable, "-c", textwrap.dedent(code)],
                          preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def remove_kubepods(slice_dir: Path):
    """Empties and removes the kubelet-layout cgroups below the test's slice, deepest first."""
    for cgroup in sorted(slice_dir.glob("kubepods.slice/**"), key=lambda p: len(p.parts), reverse=True):
        kill_all(cgroup)
        cgroup.rmdir()


def test_pods_are_selected_by_namespace_from_the_node_files(slice_dir, tmp_path):
    """`manage.pods` selects pods by what the kubelet's files on the node say
    (here below a node root of the test's own), at the cgroup path the
    kubelet gives a pod. As on a node, a pod's cgroup comes first, then its
    files, then its first process, in a network namespace of its own."""
    node = tmp_path / "node"
    besteffort = slice_dir / "kubepods.slice" / "kubepods-besteffort.slice"
    besteffort.mkdir(parents=True)
    chat_uid, web_uid = str(uuid.uuid4()), str(uuid.uuid4())

    def pod_cgroup(uid: str) -> Path:
        return besteffort / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"

    def pod_files(namespace: str, name: str, uid: str):
        (node / "var/log/pods" / f"{namespace}_{name}_{uid}").mkdir(parents=True)

    daemon = Daemon(tmp_path, {"pods": [{"namespace": "ai-*"}]}, node_root=node)
    chat, web = pod_cgroup(chat_uid), pod_cgroup(web_uid)
    holder = server = None
    try:
        chat.mkdir()
        web.mkdir()
        pod_files("default", "web-5d8f", web_uid)
        time.sleep(0.3)
        assert daemon.managed() == [], "no pod is selected before the node's files say which it is"
        pod_files("ai-chat", "bot-7f9c", chat_uid)
        holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c",
             f"ip link set lo up && echo $$ > {chat}/cgroup.procs && exec sleep 300"])
        took = wait_until(lambda: str(chat) in daemon.managed(), 2.0, "selecting the ai-chat pod")
        print(f"pod selected {took * 1000:.1f} ms after its first process")
        assert daemon.managed() == [str(chat)]
        status = daemon.cli("status")
        assert "pod ai-chat/bot-7f9c matches manage.pods[0]" in status.stdout, status.stdout
        netns = f"/proc/{holder.pid}/ns/net"
        wait_until(lambda: "listening in its network namespace" in daemon.cli("status").stdout, 2.0,
                   "serving the pod's network namespace")

        server, port = serve_file_in(netns, tmp_path / "site", "model", "sidecar answer")
        # The app's container, below the pod's cgroup.
        container = chat / f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
        container.mkdir()
        fetch = f"""
            import json, urllib.request
            body = urllib.request.urlopen("http://127.0.0.1:{port}/model", timeout=5).read().decode()
            print(json.dumps({{"body": body}}))
            """
        assert in_netns_and_cgroup(netns, container, fetch) == {"body": "sidecar answer"}
    finally:
        for proc in (server, holder):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        assert daemon.stop() == 0, daemon.output()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)
        remove_kubepods(slice_dir)

    rows = read_requests(daemon.audit_dir, "protocol = 'http'")
    assert [(r["http_path"], r["pod_namespace"], r["pod_name"], r["pod_uid"]) for r in rows] == [
        ("/model", "ai-chat", "bot-7f9c", chat_uid)], rows


def test_pods_are_selected_by_labels_from_the_kubernetes_api(echo4, slice_dir, tmp_path):
    """On containerd nodes a pod's labels are in no file: with `kubernetes_api`
    the daemon lists and watches its node's pods on the API server (a
    stand-in speaking the API's list and watch protocol, tests/peers/kube_api.py)
    and selects pods by their labels, as they are labelled and unlabelled."""
    node = tmp_path / "node"
    besteffort = slice_dir / "kubepods.slice" / "kubepods-besteffort.slice"
    besteffort.mkdir(parents=True)
    chat_uid, web_uid, elsewhere_uid = (str(uuid.uuid4()) for _ in range(3))

    def pod(namespace: str, name: str, uid: str) -> Path:
        """A pod's cgroup, its log directory, and its sandbox's process."""
        (node / "var/log/pods" / f"{namespace}_{name}_{uid}").mkdir(parents=True)
        cgroup = besteffort / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        cgroup.mkdir()
        holders.append(subprocess.Popen(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec sleep 300"]))
        return cgroup

    api = KubeApiServer(tmp_path / "kube")
    api.add_pod("ai-chat", "bot-7f9c", chat_uid, "node-a", labels={"app": "langchain"}, service_account="agent")
    api.add_pod("ai-chat", "web-5d8f", web_uid, "node-a", labels={"app": "web"})
    # Another node's pod with the label, and the same UID as a cgroup here: not this node's.
    api.add_pod("ai-chat", "bot-other", elsewhere_uid, "node-b", labels={"app": "langchain"})
    holders: list[subprocess.Popen] = []
    daemon = Daemon(tmp_path, {"pods": [{"namespace": "ai-*", "labels": {"app": "langchain"}}]}, node_root=node,
                    kubernetes_api={"server": api.url, "node_name": "node-a",
                                    "token_file": str(api.token_file), "ca_file": str(api.ca_file)})
    try:
        chat, web = pod("ai-chat", "bot-7f9c", chat_uid), pod("ai-chat", "web-5d8f", web_uid)
        elsewhere = pod("ai-chat", "bot-other", elsewhere_uid)
        wait_until(lambda: str(chat) in daemon.managed(), 2.0, "selecting the labelled pod")
        time.sleep(0.3)
        assert daemon.managed() == [str(chat)], "only this node's pod with the label"
        assert "pod ai-chat/bot-7f9c matches manage.pods[0]" in daemon.cli("status").stdout
        assert in_cgroup(chat, connect(echo4.port)) == {"reply": "ping"}

        # Labelled later: selected as the watch says so.
        api.set_labels(web_uid, {"app": "langchain", "tier": "agent"})
        took = wait_until(lambda: str(web) in daemon.managed(), 2.0, "selecting the relabelled pod")
        print(f"relabelled pod selected {took * 1000:.1f} ms after the change")
        # Unlabelled: let go; its new connections go direct and are not audited.
        api.set_labels(chat_uid, {"app": "retired"})
        took = wait_until(lambda: str(chat) not in daemon.managed(), 2.0, "letting the unlabelled pod go")
        print(f"unlabelled pod let go {took * 1000:.1f} ms after the change")
        assert in_cgroup(chat, connect(echo4.port)) == {"reply": "ping"}

        # A rotated token is read again for the next watch.
        api.rotate_token()
        api.end_watches()
        api.set_labels(chat_uid, {"app": "langchain"})
        wait_until(lambda: str(chat) in daemon.managed(), 5.0, "selecting the pod after the token rotated")

        # Without RBAC the daemon says what to grant, and recovers when it is granted.
        api.forbid(True)
        api.end_watches()
        wait_until(lambda: any("get, list and watch on pods" in p for p in daemon.status()["problems"]), 5.0,
                   "reporting the refusal")
        api.forbid(False)
        wait_until(lambda: not daemon.status()["problems"], 10.0, "recovering once allowed")

        # History the server no longer has: the daemon lists again, and misses nothing.
        lists = sum(1 for r in api.requests if not r["watch"] and r["status"] == 200)
        api.compact()
        api.set_labels(web_uid, {"app": "web"})
        wait_until(lambda: str(web) not in daemon.managed(), 5.0, "letting the pod go after a relist")
        assert sum(1 for r in api.requests if not r["watch"] and r["status"] == 200) > lists
        assert in_cgroup(web, connect(echo4.port)) == {"reply": "ping"}
        assert elsewhere.exists()
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
        assert daemon.stop() == 0, daemon.output()
        api.close()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)
        remove_kubepods(slice_dir)

    # Every request the daemon made carried the token it was given, and asked for its node's pods only.
    assert all(r["query"].get("fieldSelector") == "spec.nodeName=node-a" for r in api.requests), api.requests
    rows = read_audit(daemon.audit_dir)
    audited = [(r["pod_name"], r["pod_service_account"]) for r in rows if r["dst_port"] == echo4.port]
    # The chat pod while selected, its account from the pod spec (the node
    # root holds no token); neither pod while let go.
    assert audited == [("bot-7f9c", "agent")], rows
    events = daemon.events()
    assert any(e == "cgroup_detached" and "no longer matches manage.pods" in m for e, m in events), events
