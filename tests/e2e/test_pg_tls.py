"""PostgreSQL clients that ask for TLS: the agent ends their TLS with its own
CA (which `warden run` makes trusted through PGSSLROOTCERT), and the session
inside is decoded, decided and audited as a plaintext one would be."""
import json
import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402
from pki import make_provider_pki  # noqa: E402

from conftest import WARDEN, read_audit, read_requests, warden_run  # noqa: E402


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


@pytest.fixture(scope="module")
def pg_ssl_only(tmp_path_factory):
    """A server that takes TLS connections only (hostssl), with a certificate
    for 127.0.0.1 and localhost from a CA of its own."""
    server = PostgresServer()
    pki = make_provider_pki(tmp_path_factory.mktemp("pg-pki"))
    owner = pwd.getpwnam("postgres")
    for name in ("server.pem", "server.key"):
        dest = server.data / name
        dest.write_bytes((pki / name).read_bytes())
        os.chown(dest, owner.pw_uid, owner.pw_gid)
        dest.chmod(0o600)
    hba = server.data / "pg_hba.conf"
    lines = [("hostssl" + line[4:]) if line.startswith("host ") else line for line in hba.read_text().splitlines()]
    hba.write_text("\n".join(lines) + "\n")
    server.psql_admin(f"ALTER SYSTEM SET ssl_cert_file = '{server.data / 'server.pem'}'")
    server.psql_admin(f"ALTER SYSTEM SET ssl_key_file = '{server.data / 'server.key'}'")
    server.psql_admin("ALTER SYSTEM SET ssl = on")
    server.psql_admin("SELECT pg_reload_conf()")
    yield server, pki / "ca.pem"
    server.stop()


def upstream_tls_policy(tmp_path: Path, pg: PostgresServer, extra: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        targets:
          crm: {{ address: 127.0.0.1, port: {pg.port}, protocol: postgres, tls: verify{extra} }}
        """))
    return path


SERVER_SIDE = textwrap.dedent("""
    import json, sys, psycopg
    try:
        with psycopg.connect(sys.argv[1], autocommit=True) as conn:
            ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]
            print(json.dumps(dict(server_ssl=ssl, client_ssl=conn.pgconn.ssl_in_use)))
    except psycopg.OperationalError as e:
        print(json.dumps(dict(error=str(e))))
""")


def run_program(audit_dir, dsn, *args):
    proc = subprocess.run([WARDEN, "run", "--audit-dir", str(audit_dir), *args, "--", sys.executable, "-c",
                           SERVER_SIDE, dsn], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_agent_speaks_tls_to_a_server_that_requires_it(pg_ssl_only, audit_dir, tmp_path):
    pg, ca = pg_ssl_only
    plain = f"host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password={pg.password} sslmode=disable"
    # Without the agent, plaintext is refused by the server.
    direct = subprocess.run([sys.executable, "-c", SERVER_SIDE, plain], capture_output=True, text=True)
    assert "no encryption" in direct.stdout, direct.stdout
    # Through the agent: the client in clear, the agent in TLS, verified against the server's CA.
    policy = upstream_tls_policy(tmp_path, pg)
    assert run_program(audit_dir, plain, "--policy", str(policy), "--upstream-ca", str(ca)) == {
        "server_ssl": True, "client_ssl": False}
    rows = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert [(r["tls"], r["error"]) for r in rows] == [("upstream", None)]
    assert [r["statement"] for r in read_requests(audit_dir)] == [
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"]


def test_tls_on_both_sides_with_a_certificate_name_and_the_agents_login(pg_ssl_only, audit_dir, tmp_path):
    pg, ca = pg_ssl_only
    # SCRAM over TLS on both sides cannot be relayed (libpq binds it to its
    # own TLS channel): the agent logs in itself, the client holds a placeholder.
    full = f"host=127.0.0.1 port={pg.port} dbname={pg.database} user=placeholder password=placeholder sslmode=verify-full"
    policy = upstream_tls_policy(tmp_path, pg, ", tls_name: localhost")
    policy.write_text(policy.read_text() + "credentials:\n  crm: { user: app, password_env: WARDEN_TEST_PG_PASSWORD }\n")
    os.environ["WARDEN_TEST_PG_PASSWORD"] = pg.password
    try:
        report = run_program(audit_dir, full, "--policy", str(policy), "--upstream-ca", str(ca))
    finally:
        del os.environ["WARDEN_TEST_PG_PASSWORD"]
    assert report == {"server_ssl": True, "client_ssl": True}
    rows = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert [(r["tls"], r["error"]) for r in rows] == [("intercepted", None)]


def test_a_server_certificate_the_agent_cannot_verify_is_refused(pg_ssl_only, audit_dir, tmp_path):
    pg, _ = pg_ssl_only
    plain = f"host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password={pg.password} sslmode=disable"
    policy = upstream_tls_policy(tmp_path, pg)
    report = run_program(audit_dir, plain, "--policy", str(policy))
    assert "Warden could not reach the database over TLS" in report["error"], report
    assert "certificate" in report["error"].lower(), report
    rows = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert len(rows) == 1 and rows[0]["tls"] == "failed", rows
    assert rows[0]["error"].startswith("TLS to the server:"), rows
