"""Prometheus metrics: `warden run --metrics-listen` while a real PostgreSQL
client works through the agent; the endpoint is scraped from outside the
program's cgroup and parsed with the Prometheus project's own text-format
parser, and its counts are checked against what the client did and what the
audit wrote."""
import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import WARDEN, read_requests  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int):
    """The samples as {(name, frozenset(labels)): value}, and the content type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, content_type


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_a_postgres_client_did(pg, audit_dir, tmp_path):
    pg.psql_admin(
        "CREATE TABLE mx_items (id int, name text, email text); "
        "INSERT INTO mx_items VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.com'); "
        "GRANT ALL ON mx_items TO app",
        database=pg.database,
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""
        version: 1
        default: audit
        # Rows reach Parquet within a second, so the written counts move while the program runs.
        audit: { rotate: 1s }
        rules:
          - name: mx-read-only
            when: { sql: { class: [write, ddl], tables: mx_items } }
            action: deny
          - name: mx-masked
            when: { sql: { class: read, tables: mx_items } }
            action: allow
            mask: { columns: ["*email*"] }
        """))
    done = tmp_path / "done"
    # The client works, closes its connection, says so, then waits (bounded)
    # for the test to finish scraping: the endpoint lives as long as the run.
    code = textwrap.dedent(
        f"""
        import json, os, time, psycopg
        out = dict(pid=os.getpid())
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            out["emails"] = [r[0] for r in conn.execute("SELECT email FROM mx_items ORDER BY id").fetchall()]
            out["count"] = conn.execute("SELECT count(*) FROM mx_items").fetchone()[0]
            out["one"] = conn.execute("SELECT 1").fetchone()[0]
            try:
                conn.execute("UPDATE mx_items SET name = 'x'")
                out["update"] = "ran"
            except psycopg.Error as e:
                out["update"] = e.sqlstate
        print(json.dumps(out), flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists({str(done)!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
        """
    )
    port = free_port()
    proc = subprocess.Popen(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--policy", str(policy),
         "--metrics-listen", f"127.0.0.1:{port}", "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("{"), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        report = json.loads(line)
        assert report["emails"] != ["ada@example.com", "bob@example.com"] and report["count"] == 2
        assert report["update"] not in ("ran", None), report

        # The connection row comes when the agent sees the close, the Parquet
        # rows at the next rotation: wait for both.
        deadline = time.monotonic() + 20
        while True:
            samples, content_type = scrape(port)
            settled = (
                value(samples, "warden_connections_total", protocol="postgres", decision="allow") >= 1
                and value(samples, "warden_audit_rows_written_total", table="requests") >= 4
                and value(samples, "warden_audit_rows_written_total", table="connections") >= 1
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert content_type.startswith("text/plain; version=0.0.4"), content_type

        # 3 statements allowed (one of them masked), 1 denied, in 1 connection.
        assert value(samples, "warden_requests_total", protocol="postgres", decision="allow") == 3
        assert value(samples, "warden_requests_total", protocol="postgres", decision="deny") == 1
        assert value(samples, "warden_connections_total", protocol="postgres", decision="allow") == 1
        assert value(samples, "warden_masked_values_total", protocol="postgres", direction="response") == 2
        assert value(samples, "warden_connection_bytes_total", protocol="postgres", direction="up") > 0
        assert value(samples, "warden_connection_bytes_total", protocol="postgres", direction="down") > 0
        assert value(samples, "warden_connections_open") == 0
        assert value(samples, "warden_approvals_pending") == 0

        # Every statement's latency is in the histogram, in increasing buckets.
        count = value(samples, "warden_request_duration_seconds_count", protocol="postgres")
        assert count == 4
        assert value(samples, "warden_request_duration_seconds_bucket", protocol="postgres", le="+Inf") == 4
        assert 0 < value(samples, "warden_request_duration_seconds_sum", protocol="postgres") < 10
        buckets = sorted(
            (float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
            if name == "warden_request_duration_seconds_bucket" and dict(labels)["protocol"] == "postgres"
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
        assert value(samples, "warden_connection_setup_seconds_count") >= 1

        # The audit's own counts: everything written, nothing dropped.
        assert value(samples, "warden_audit_rows_written_total", table="requests") == 4
        assert value(samples, "warden_audit_rows_written_total", table="connections") == 1
        assert not any(name == "warden_audit_rows_dropped_total" and v for (name, _), v in samples.items())
        assert any(name == "warden_build_info" and v == 1 for (name, _), v in samples.items())
    finally:
        done.touch()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()

    # The metrics agree with the rows the audit wrote.
    rows = read_requests(audit_dir)
    assert sorted(r["decision"] for r in rows) == ["allow", "allow", "allow", "deny"], rows

    # Once the run is over, so is the endpoint.
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_non_loopback_metrics_address_is_refused_at_start(audit_dir):
    run = subprocess.run(
        [WARDEN, "run", "--audit-dir", str(audit_dir), "--metrics-listen", f"0.0.0.0:{free_port()}", "--", "true"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0
    assert "loopback only" in run.stderr and "--metrics-listen 127.0.0.1:PORT" in run.stderr, run.stderr
