"""Durability of the audit: the agent killed with SIGKILL in the middle of a
stream of PostgreSQL statements loses at most the last second of rows, and
leaves no file that a reader cannot open. The program counts the statements
it completed (and when); the test counts the rows it finds."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import WARDEN, read_requests  # noqa: E402

LOSS_BOUND_S = 1.0


def test_sigkill_loses_at_most_the_last_second_of_rows(tmp_path, audit_dir):
    pg = PostgresServer()
    log = tmp_path / "done.log"
    stop = tmp_path / "stop"
    code = textwrap.dedent(
        f"""
        import pathlib, time, psycopg
        stop = pathlib.Path({str(stop)!r})
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn, open({str(log)!r}, "a") as log:
            n = 0
            while not stop.exists():
                n += 1
                conn.execute(f"SELECT {{n}} AS n").fetchone()
                log.write(f"{{n}} {{time.time()}}\\n")
                log.flush()
                time.sleep(0.002)
        """
    )
    # Rotation an hour away: every row of the run is only in the journal.
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\naudit:\n  rotate: 1h\n")
    proc = subprocess.Popen(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--policy", str(policy), "--", sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(_done(log)) < 300:
            time.sleep(0.05)
        assert len(_done(log)) >= 300, "the program made too little progress under the agent"
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop.touch()
        subprocess.run([WARDEN, "cleanup", "--kill"], capture_output=True)
        pg.stop()

    assert not list((audit_dir / "requests").rglob("*.parquet")), "rotation is an hour away"
    recovered = subprocess.run([WARDEN, "audit", "recover", "--audit-dir", str(audit_dir)], capture_output=True, text=True)
    assert recovered.returncode == 0, recovered.stderr
    assert re.match(r"recovered \d+ rows from 4 journals", recovered.stdout), recovered.stdout

    # Every file reads, and no journal is left.
    for f in audit_dir.rglob("*"):
        assert not f.name.startswith(".journal-"), f
        if f.suffix == ".parquet":
            pq.read_table(f)
    found = set()
    for row in read_requests(audit_dir):
        m = re.fullmatch(r"SELECT (\d+) AS n", row["statement"] or "")
        if m:
            found.add(int(m.group(1)))
    done = _done(log)
    before_kill = {n: t for n, t in done.items() if t <= killed_at}
    missing = sorted(n for n in before_kill if n not in found)
    window = killed_at - min((before_kill[n] for n in missing), default=killed_at)
    print(
        f"SIGKILL: {len(before_kill)} statements completed before the kill, {len(found)} rows found, "
        f"{len(missing)} lost, covering the last {window * 1000:.0f} ms before the kill"
    )
    assert window <= LOSS_BOUND_S, f"rows lost from {window:.3f} s before the kill: {missing[:20]}"
    assert not (found - set(done)), "rows of statements the program never completed"


def _done(log: Path) -> dict:
    """Statement number -> when the program had its result."""
    if not log.exists():
        return {}
    out = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[int(parts[0])] = float(parts[1])
    return out


def test_a_full_disk_fails_closed_and_the_outage_is_audited(tmp_path, echo4):
    """The audit directory on a small tmpfs that the test fills: with
    `audit.on_failure: fail_closed` new connections are refused while the
    audit cannot be written and served again once space returns; the outage,
    and each refusal, are in the audit afterwards."""
    import errno

    import duckdb

    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(audit_dir)], check=True)
    flags = tmp_path / "flags"
    flags.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\naudit:\n  on_failure: fail_closed\n")
    code = textwrap.dedent(
        f"""
        import pathlib, socket, time
        flags = pathlib.Path({str(flags)!r})

        def connect():
            try:
                with socket.create_connection(("127.0.0.1", {echo4.port}), timeout=5) as s:
                    s.sendall(b"ping")
                    return s.recv(4) == b"ping"
            except OSError:
                return False

        def until(flag):
            while not (flags / flag).exists():
                time.sleep(0.02)

        def try_for(want, seconds):
            end = time.time() + seconds
            while time.time() < end:
                if connect() == want:
                    return True
                time.sleep(0.05)
            return False

        (flags / "served").write_text(str(connect()))
        until("full")
        (flags / "refused").write_text(str(try_for(False, 10)))
        until("freed")
        (flags / "served-again").write_text(str(try_for(True, 15)))
        """
    )
    proc = subprocess.Popen(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--policy", str(policy), "--", sys.executable, "-c", code],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    filler = audit_dir / "filler"
    try:
        _wait_for(flags / "served", proc)
        assert (flags / "served").read_text() == "True"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        (flags / "full").touch()
        _wait_for(flags / "refused", proc, timeout=30)
        assert (flags / "refused").read_text() == "True", "a connection was served while the audit could not be written"
        filler.unlink()
        (flags / "freed").touch()
        _wait_for(flags / "served-again", proc, timeout=30)
        assert (flags / "served-again").read_text() == "True", "connections stayed refused after space returned"
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr

        con = duckdb.connect()
        events = con.execute(
            f"SELECT event, rows FROM read_parquet('{audit_dir}/events/**/*.parquet') ORDER BY start_time"
        ).fetchall()
        names = [e for e, _ in events]
        assert names[0] == "agent_started" and names[-1] == "agent_stopped", names
        assert "audit_unwritable" in names and "audit_writable" in names, names
        assert names.index("audit_unwritable") < names.index("audit_writable")
        refused = con.execute(
            f"SELECT count(*) FROM read_parquet('{audit_dir}/connections/**/*.parquet') "
            "WHERE decision = 'deny' AND rule = 'audit.on_failure'"
        ).fetchone()[0]
        assert refused >= 1
        print(f"full disk: {refused} connections refused, events {events}")
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["umount", "-l", str(audit_dir)])


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"warden run ended early: {proc.stderr.read()}"
        assert time.time() < end, f"no {path.name} within {timeout} s"
        time.sleep(0.05)
