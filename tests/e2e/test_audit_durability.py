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
    assert re.match(r"recovered \d+ rows from 2 journals", recovered.stdout), recovered.stdout

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
