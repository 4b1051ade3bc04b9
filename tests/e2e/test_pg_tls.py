"""PostgreSQL clients that ask for TLS: the agent ends their TLS with its own
CA (which `warden run` makes trusted through PGSSLROOTCERT), and the session
inside is decoded, decided and audited as a plaintext one would be."""
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402
from pki import make_provider_pki  # noqa: E402

from conftest import read_audit, read_requests, warden_run  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.stop()


def test_verify_full_trusts_the_agent_and_statements_are_still_seen(pg, audit_dir):
    code = textwrap.dedent(f"""
        import json, os, psycopg
        dsn = "host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password={pg.password} sslmode=verify-full"
        with psycopg.connect(dsn, autocommit=True) as conn:
            one = conn.execute("SELECT 40 + 2").fetchone()[0]
            # The server's side of the connection: the agent's plaintext one.
            server_ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
            print(json.dumps(dict(one=one, client_ssl=conn.pgconn.ssl_in_use, server_ssl=server_ssl,
                                  root=os.environ.get("PGSSLROOTCERT", ""))))
    """)
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    report = run.report
    assert (report["one"], report["client_ssl"], report["server_ssl"]) == (42, True, False)
    assert report["root"].endswith("ca-bundle.pem")
    statements = [r["statement"] for r in read_requests(audit_dir)]
    assert statements == ["SELECT 40 + 2", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"]
    rows = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert [(r["protocol"], r["tls"], r["error"]) for r in rows] == [("postgres", "terminated", None)]


def test_a_client_that_does_not_trust_the_agent_is_refused_and_audited(pg, audit_dir, tmp_path):
    # A root the agent's certificate does not chain to: the client refuses it.
    other_ca = make_provider_pki(tmp_path / "pki") / "ca.pem"
    code = textwrap.dedent(f"""
        import json, psycopg
        dsn = "host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password={pg.password} sslmode=verify-ca sslrootcert={other_ca}"
        try:
            psycopg.connect(dsn).close()
            outcome = "connected"
        except psycopg.OperationalError as e:
            outcome = "refused" if "certificate verify failed" in str(e) else str(e)
        print(json.dumps(dict(outcome=outcome)))
    """)
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report == {"outcome": "refused"}
    rows = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert len(rows) == 1 and rows[0]["tls"] == "terminated", rows
    assert "the client refused the agent's certificate" in rows[0]["error"], rows


def test_without_interception_tls_is_refused_and_prefer_falls_back(pg, audit_dir):
    code = textwrap.dedent(f"""
        import json, psycopg
        with psycopg.connect("host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password={pg.password}") as conn:
            print(json.dumps(dict(client_ssl=conn.pgconn.ssl_in_use, one=conn.execute("SELECT 1").fetchone()[0])))
    """)
    run = warden_run(code, audit_dir, "--no-tls-intercept")
    assert run.returncode == 0, run.stderr
    assert run.report == {"client_ssl": False, "one": 1}
    rows = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert [(r["tls"], r["error"]) for r in rows] == [(None, None)]
