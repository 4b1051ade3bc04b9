"""Fixtures for the end-to-end tests: the warden binary, loopback servers,
`warden run` of small Python programs, and the audit read back with real
Parquet readers (pyarrow, DuckDB)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from echo import EchoServer  # noqa: E402

WARDEN = os.environ.get("WARDEN_BIN", str(Path(__file__).resolve().parents[2] / "target/release/warden"))


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("the end-to-end tests need root (eBPF programs, cgroups): run `sudo -E cargo xtask test`")
    if not Path(WARDEN).exists():
        raise pytest.UsageError(f"{WARDEN} does not exist: run `cargo xtask build`")


@pytest.fixture
def echo4():
    s = EchoServer("127.0.0.1")
    yield s
    s.close()


@pytest.fixture
def echo6():
    s = EchoServer("::1")
    yield s
    s.close()


@pytest.fixture
def audit_dir(tmp_path):
    d = tmp_path / "audit"
    d.mkdir()
    return d


class Run:
    """The outcome of one `warden run`; `report` is the JSON the program printed last."""

    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        self.report = json.loads(lines[-1]) if lines else None


def warden_run(code: str, audit_dir: Path, *extra: str, timeout: float = 120, env=None, python=sys.executable) -> Run:
    """Run a Python snippet under `warden run` and wait for it."""
    cmd = [WARDEN, "run", "--audit-dir", str(audit_dir), *extra, "--", python, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return Run(proc)


def read_audit(audit_dir: Path):
    """The connections table as pyarrow reads it, as a list of dicts."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(audit_dir / "connections"), format="parquet", partitioning="hive").to_table()
    return table.to_pylist()


def duckdb_query(audit_dir: Path, sql: str):
    """Run SQL with DuckDB over the audit; the table is called `connections`."""
    import duckdb

    con = duckdb.connect()
    glob = str(audit_dir / "connections" / "**" / "*.parquet")
    con.execute(f"CREATE VIEW connections AS SELECT * FROM read_parquet('{glob}', hive_partitioning=true)")
    return con.execute(sql).fetchall()


def read_requests(audit_dir: Path, where: str = "true"):
    """The requests table, read with DuckDB, as dicts in session and request order."""
    import duckdb

    con = duckdb.connect()
    glob = str(audit_dir / "requests" / "**" / "*.parquet")
    # Timestamps stay in DuckDB (as Python values they would need pytz).
    cur = con.execute(f"SELECT * EXCLUDE (start_time, end_time) FROM read_parquet('{glob}', hive_partitioning=true) WHERE {where} ORDER BY start_time, session_id, seq")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]
