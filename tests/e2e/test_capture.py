"""Transparent capture: every outbound TCP connection of a managed program,
whatever the address family, goes through the agent and is audited."""
import hashlib
import os
import subprocess
import sys
import textwrap

from conftest import WARDEN, duckdb_query, read_audit, warden_run

CLIENT = textwrap.dedent(
    """
    import hashlib, json, os, socket, sys, threading
    results = []
    for host, port, family in {targets!r}:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.connect((host, port))
        peer = list(s.getpeername()[:2])
        payload = os.urandom({size})
        got = bytearray()
        def read():
            while True:
                d = s.recv(1 << 16)
                if not d:
                    return
                got.extend(d)
        t = threading.Thread(target=read); t.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        t.join()
        results.append(dict(host=host, local=list(s.getsockname()[:2]), peer=peer,
                            sent=hashlib.sha256(payload).hexdigest(), got=hashlib.sha256(bytes(got)).hexdigest(),
                            n=len(got)))
        s.close()
    print(json.dumps(dict(pid=os.getpid(), uid=os.getuid(), exe=os.path.realpath(sys.executable), results=results)))
    """
)


def test_ipv4_ipv6_and_mapped_connections_arrive_intact(echo4, echo6, audit_dir):
    import socket

    size = 8 << 20
    targets = [
        ("127.0.0.1", echo4.port, int(socket.AF_INET)),
        ("::1", echo6.port, int(socket.AF_INET6)),
        ("::ffff:127.0.0.1", echo4.port, int(socket.AF_INET6)),
    ]
    run = warden_run(CLIENT.format(targets=targets, size=size), audit_dir)
    assert run.returncode == 0, run.stderr
    for r, (host, port, _) in zip(run.report["results"], targets):
        assert r["n"] == size and r["got"] == r["sent"], r
        # getpeername() shows the program where it connected, not the agent.
        assert r["peer"] == [host, port], r
    # The servers saw the agent's upstream sockets, never the client's own.
    client_ports = {r["local"][1] for r in run.report["results"]}
    seen_ports = {p for _, p in echo4.peers + echo6.peers}
    assert len(echo4.peers) == 2 and len(echo6.peers) == 1
    assert not client_ports & seen_ports

    rows = read_audit(audit_dir)
    assert len(rows) == 3
    by_dst = sorted((r["dst_addr"], r["dst_port"], r["family"]) for r in rows)
    assert by_dst == sorted([("127.0.0.1", echo4.port, "ipv4"), ("127.0.0.1", echo4.port, "ipv4"), ("::1", echo6.port, "ipv6")])
    for row in rows:
        assert row["pid"] == run.report["pid"]
        assert row["uid"] == run.report["uid"] == 0
        assert row["exe"] == run.report["exe"]
        assert row["decision"] == "allow" and row["rule"] == "default"
        assert row["bytes_up"] == size and row["bytes_down"] == size
        assert row["transport"] == "tcp"
        assert row["cgroup_path"].startswith("/warden/run-")
        assert row["error"] is None


def test_children_are_captured_and_outsiders_are_not(echo4, audit_dir, tmp_path):
    child = (
        "import socket, os, json; s = socket.create_connection(('127.0.0.1', %d)); s.sendall(b'child'); "
        "s.recv(10); print(json.dumps(dict(pid=os.getpid(), local=s.getsockname()[1])))" % echo4.port
    )
    code = textwrap.dedent(
        f"""
        import json, os, socket, subprocess, sys
        out = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, check=True).stdout
        child = json.loads(out)
        s = socket.create_connection(("127.0.0.1", {echo4.port})); s.sendall(b"parent"); s.recv(10)
        print(json.dumps(dict(pid=os.getpid(), child=child["pid"])))
        """
    )
    # A process outside the managed cgroup talks to the same server meanwhile.
    outsider = subprocess.Popen([sys.executable, "-c", child.replace("'child'", "'outsider'")], stdout=subprocess.PIPE, text=True)
    run = warden_run(code, audit_dir)
    outsider_out = outsider.communicate(timeout=30)[0]
    assert run.returncode == 0, run.stderr
    import json

    outsider_report = json.loads(outsider_out)
    rows = read_audit(audit_dir)
    pids = sorted(r["pid"] for r in rows)
    assert pids == sorted([run.report["pid"], run.report["child"]])
    assert outsider_report["pid"] not in pids
    # The outsider reached the server directly: the server saw its own port.
    assert outsider_report["local"] in {p for _, p in echo4.peers}


def test_duckdb_and_pyarrow_agree_on_the_audit(echo4, audit_dir):
    code = "import socket\nfor i in range(5):\n    s = socket.create_connection(('127.0.0.1', %d)); s.sendall(b'x' * (i + 1)); s.recv(10); s.close()" % echo4.port
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    (count, up, hours), = duckdb_query(audit_dir, "SELECT count(*), sum(bytes_up), count(DISTINCT hour) FROM connections")
    rows = read_audit(audit_dir)
    assert count == len(rows) == 5
    assert up == sum(r["bytes_up"] for r in rows) == 15
    assert hours == 1
    protocols = duckdb_query(audit_dir, "SELECT DISTINCT protocol FROM connections")
    assert protocols == [("unknown",)]


def test_exit_code_is_the_programs(audit_dir):
    run = warden_run("import sys; sys.exit(7)", audit_dir)
    assert run.returncode == 7, run.stderr


def test_missing_program_exits_127(audit_dir):
    proc = subprocess.run([WARDEN, "run", "--audit-dir", str(audit_dir), "--", "/nonexistent/program"], capture_output=True, text=True)
    assert proc.returncode == 127
    assert "/nonexistent/program" in proc.stderr


def test_programs_as_root_are_warned_about_and_user_drops_privileges(echo4, audit_dir):
    code = "import socket, os, json; s = socket.create_connection(('127.0.0.1', %d)); s.sendall(b'u'); s.recv(1); print(json.dumps(dict(uid=os.getuid())))" % echo4.port
    as_root = warden_run(code, audit_dir)
    assert "runs as root" in as_root.stderr
    # The test's own interpreter may live under /root, out of nobody's reach.
    as_nobody = warden_run(code, audit_dir, "--user", "nobody", python="/usr/bin/python3")
    assert as_nobody.returncode == 0, as_nobody.stderr
    assert "runs as root" not in as_nobody.stderr
    assert as_nobody.report["uid"] == 65534
    users = sorted((r["uid"], r["user"]) for r in read_audit(audit_dir))
    assert users == [(0, "root"), (65534, "nobody")]


def test_large_transfer_hash(echo4, audit_dir):
    # 256 MiB each way through the splice relay.
    code = CLIENT.format(targets=[("127.0.0.1", echo4.port, 2)], size=256 << 20)
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    r = run.report["results"][0]
    assert r["got"] == r["sent"] and r["n"] == 256 << 20
    assert hashlib.sha256(b"").hexdigest() != r["got"]
