"""Signals, load and failure: the agent under pressure and after its death."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from conftest import WARDEN, read_audit, warden_run


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    raise AssertionError("no cgroup2 mount")


def wait_for(path: Path, timeout: float = 30):
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def test_sigterm_reaches_the_program(tmp_path, audit_dir):
    ready = tmp_path / "ready"
    code = textwrap.dedent(
        f"""
        import signal, sys, time, pathlib
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([WARDEN, "run", "--audit-dir", str(audit_dir), "--", sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    wait_for(ready)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3
    # Its cgroup and pinned programs are gone.
    assert not any(Path("/sys/fs/bpf/warden").glob(f"agent-{proc.pid}"))
    assert not (cgroup2_root() / "warden" / f"run-{proc.pid}").exists()


def test_a_thousand_concurrent_connections(echo4, audit_dir):
    code = textwrap.dedent(
        f"""
        import asyncio, json, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        async def one(i):
            r, w = await asyncio.open_connection("127.0.0.1", {echo4.port})
            msg = f"connection {{i}}\\n".encode()
            w.write(msg)
            await w.drain()
            return r, w, msg
        async def main():
            opened = await asyncio.gather(*(one(i) for i in range(1000)))
            ok = 0
            for r, w, msg in opened:  # all 1000 are open at once here
                if await r.readline() == msg:
                    ok += 1
                w.close()
            print(json.dumps(dict(ok=ok)))
        asyncio.run(main())
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report["ok"] == 1000
    # Every kernel record was consumed: nothing is left to fill the maps.
    assert "kernel records left at stop pending=0 flows=0" in run.stderr
    rows = read_audit(audit_dir)
    # On a mismatch, say what the rows are: repeated sessions point at the
    # writer, rows of other kinds at capture or attribution.
    kinds = Counter((r["decision"], r["rule"], r["transport"], r["dst_port"], r["comm"], r["error"]) for r in rows)
    repeated = [s for s, n in Counter(r["session_id"] for r in rows).items() if n > 1]
    assert len(rows) == 1000, f"{len(rows)} rows; kinds {dict(kinds)}; repeated sessions {repeated[:5]}\n{run.stderr[-4000:]}"
    assert all(r["decision"] == "allow" and r["bytes_up"] == r["bytes_down"] for r in rows)


def test_fail_closed_when_the_agent_is_killed(echo4, tmp_path, audit_dir):
    ready, go, result = tmp_path / "ready", tmp_path / "go", tmp_path / "result"
    code = textwrap.dedent(
        f"""
        import json, pathlib, socket, time
        s = socket.create_connection(("127.0.0.1", {echo4.port})); s.sendall(b"before"); s.recv(10); s.close()
        pathlib.Path({str(ready)!r}).touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.02)
        try:
            s = socket.create_connection(("127.0.0.1", {echo4.port}), timeout=5)
            s.sendall(b"after")
            outcome = "connected"
        except OSError as e:
            outcome = type(e).__name__
        pathlib.Path({str(result)!r}).write_text(outcome)
        """
    )
    proc = subprocess.Popen([WARDEN, "run", "--audit-dir", str(audit_dir), "--", sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    wait_for(ready)
    peers_before = len(echo4.peers)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    go.touch()
    wait_for(result)
    assert result.read_text() == "ConnectionRefusedError"
    time.sleep(0.2)
    assert len(echo4.peers) == peers_before, "a connection went around the dead agent"

    # Recovery: `warden cleanup` releases the dead agent's cgroup and programs.
    pins = Path(f"/sys/fs/bpf/warden/agent-{proc.pid}")
    assert pins.exists()
    cleanup = subprocess.run([WARDEN, "cleanup", "--kill"], capture_output=True, text=True)
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"agent {proc.pid}: released" in cleanup.stdout
    assert not pins.exists()


def test_connections_that_skip_the_redirect_are_refused(tmp_path, audit_dir):
    """The agent's listener is no open relay: a local process outside the
    managed cgroup that connects to it straight has no kernel record."""
    import re
    import socket

    go = tmp_path / "go"
    code = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)"
    proc = subprocess.Popen(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--", sys.executable, "-c", code],
        stderr=subprocess.PIPE,
        text=True,
    )
    port = None
    for line in proc.stderr:
        m = re.search(r"agent listening .* port=(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "the agent did not say where it listens"
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        outcome = "closed" if s.recv(100) == b"" else "answered"
    except ConnectionResetError:
        outcome = "reset"
    assert outcome in ("closed", "reset")
    go.touch()
    assert proc.wait(timeout=30) == 0
    rows = read_audit(audit_dir)
    assert [(r["decision"], r["rule"]) for r in rows] == [("deny", "unattributed")]


def test_clear_error_when_not_root(tmp_path):
    import shutil
    import tempfile

    # A copy that an unprivileged user can execute (the build may sit under /root).
    bindir = Path(tempfile.mkdtemp(prefix="warden-bin-"))
    bindir.chmod(0o755)
    copy = bindir / "warden"
    shutil.copy(WARDEN, copy)
    copy.chmod(0o755)
    try:
        proc = subprocess.run(
            [str(copy), "run", "--audit-dir", str(tmp_path), "--", "true"],
            capture_output=True,
            text=True,
            user=65534,
            group=65534,
            cwd="/",
        )
    finally:
        shutil.rmtree(bindir)
    assert proc.returncode == 125
    assert "must run as root" in proc.stderr and "sudo" in proc.stderr


def test_clear_error_when_the_listener_port_is_taken(audit_dir):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    proc = subprocess.run(
        [WARDEN, "run", "--listen-port", str(port), "--audit-dir", str(audit_dir), "--", "true"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 125
    assert f"127.0.0.1:{port} is already in use" in proc.stderr
    assert "--listen-port" in proc.stderr


def test_ctrl_c_on_the_terminal_reaches_the_program_once(tmp_path, audit_dir):
    """Ctrl-C makes the terminal signal its whole foreground group, the
    program included: Warden must not deliver it a second time."""
    import fcntl
    import pty
    import termios

    ready, counted = tmp_path / "ready", tmp_path / "count"
    code = textwrap.dedent(
        f"""
        import pathlib, signal, socket, sys, time
        # The wakeup fd gets one byte per signal delivered, even when two
        # arrive before the Python-level handler runs.
        r, w = socket.socketpair()
        r.setblocking(False); w.setblocking(False)
        signal.signal(signal.SIGINT, lambda *a: None)
        signal.set_wakeup_fd(w.fileno())
        pathlib.Path({str(ready)!r}).touch()
        got = b""
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.01)
            try:
                got += r.recv(64)
            except BlockingIOError:
                pass
            if got and deadline is None:
                deadline = time.monotonic() + 0.5  # time for a duplicate to arrive
        pathlib.Path({str(counted)!r}).write_text(str(got.count(bytes([signal.SIGINT]))))
        sys.exit(130)
        """
    )
    master, slave = pty.openpty()

    def take_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--", sys.executable, "-c", code],
        stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_terminal,
    )
    os.close(slave)
    wait_for(ready)
    os.write(master, b"\x03")
    assert proc.wait(timeout=30) == 130
    os.close(master)
    assert counted.read_text() == "1"


def test_the_program_keeps_its_descriptor_limit(audit_dir):
    """The agent raises its own limit for thousands of connections; the
    program must still see the limit it was started with."""
    import resource

    def lower_limit():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard))

    code = "import json, resource; print(json.dumps(dict(soft=resource.getrlimit(resource.RLIMIT_NOFILE)[0])))"
    proc = subprocess.run(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--", sys.executable, "-c", code],
        capture_output=True, text=True, preexec_fn=lower_limit,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"soft": 1000}
