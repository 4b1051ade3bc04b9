"""Credential injection for PostgreSQL: the program holds a placeholder, the
agent logs in with the policy's password (SCRAM-SHA-256, MD5 or cleartext,
as the server's pg_hba.conf asks), and the real password never reaches the
program."""
import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import read_audit, read_requests, warden_run  # noqa: E402

REAL_PASSWORD = "real-db-password-7c1e"
METHODS = ["scram-sha-256", "md5", "password"]


def bot(method: str) -> str:
    return "bot_" + method.replace("-", "_")


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    hba = server.data / "pg_hba.conf"
    # One role per method, each with its own pg_hba.conf line ahead of the
    # default ones, so that the server asks for exactly that method.
    lines = [f"host all {bot(m)} 127.0.0.1/32 {m}" for m in METHODS]
    hba.write_text("\n".join(lines) + "\n" + hba.read_text())
    for method in METHODS:
        encryption = "md5" if method == "md5" else "scram-sha-256"
        server.psql_admin(
            f"SET password_encryption = '{encryption}'; CREATE ROLE {bot(method)} LOGIN PASSWORD '{REAL_PASSWORD}'"
        )
        server.psql_admin(f"GRANT CONNECT ON DATABASE {server.database} TO {bot(method)}")
    server.psql_admin("SELECT pg_reload_conf()")
    yield server
    server.stop()


def policy_file(tmp_path: Path, pg: PostgresServer, credential: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        targets:
          crm: {{ address: 127.0.0.1, port: {pg.port}, protocol: postgres }}
        credentials:
          crm: {credential}
        """))
    return path


def run_with_login(tmp_path, audit_dir, pg, credential: str, code: str, password_env: str = REAL_PASSWORD):
    policy = policy_file(tmp_path, pg, credential)
    env = dict(os.environ, WARDEN_TEST_PG_PASSWORD=password_env)
    return warden_run(code, audit_dir, "--policy", str(policy), env=env)


PROGRAM = textwrap.dedent("""
    import json, os, psycopg
    seen = sorted(k for k, v in os.environ.items() if "{real}" in v)
    with psycopg.connect("host=127.0.0.1 port={port} dbname={db} user=placeholder password=placeholder", autocommit=True) as conn:
        user = conn.execute("SELECT current_user").fetchone()[0]
    print(json.dumps(dict(user=user, env_with_password=seen)))
""")


@pytest.mark.parametrize("method", METHODS)
def test_the_agent_logs_in_with_the_real_password(pg, audit_dir, tmp_path, method):
    code = PROGRAM.format(real=REAL_PASSWORD, port=pg.port, db=pg.database)
    run = run_with_login(tmp_path, audit_dir, pg, f"{{ user: {bot(method)}, password_env: WARDEN_TEST_PG_PASSWORD }}", code)
    assert run.returncode == 0, run.stderr
    # The session runs as the policy's user; the program never had the password.
    assert run.report == {"user": bot(method), "env_with_password": []}
    rows = read_requests(audit_dir)
    assert [(r["statement"], r["db_user"], r["decision"]) for r in rows] == [
        ("SELECT current_user", bot(method), "allow"),
    ]
    connection = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert len(connection) == 1 and connection[0]["error"] is None, connection


def test_a_password_file_and_the_clients_user(pg, audit_dir, tmp_path):
    secret = tmp_path / "crm-password"
    secret.write_text(REAL_PASSWORD + "\n")
    secret.chmod(0o600)
    # No `user`: the agent logs in as the user the program asked for.
    code = textwrap.dedent(f"""
        import json, psycopg
        with psycopg.connect("host=127.0.0.1 port={pg.port} dbname={pg.database} user={bot('md5')} password=wrong", autocommit=True) as conn:
            print(json.dumps(dict(user=conn.execute("SELECT current_user").fetchone()[0])))
    """)
    run = run_with_login(tmp_path, audit_dir, pg, f"{{ password_file: {secret} }}", code)
    assert run.returncode == 0, run.stderr
    assert run.report == {"user": bot("md5")}


def test_a_wrong_credential_is_a_clear_error_and_the_agent_goes_on(pg, audit_dir, tmp_path):
    code = textwrap.dedent(f"""
        import json, psycopg
        errors = []
        for _ in range(2):
            try:
                # No TLS: with `prefer` libpq tries again in clear after a refusal.
                psycopg.connect("host=127.0.0.1 port={pg.port} dbname={pg.database} user=placeholder password=x sslmode=disable").close()
            except psycopg.OperationalError as e:
                errors.append(str(e))
        print(json.dumps(dict(errors=errors)))
    """)
    run = run_with_login(tmp_path, audit_dir, pg, f"{{ user: {bot('scram-sha-256')}, password_env: WARDEN_TEST_PG_PASSWORD }}",
                         code, password_env="not-the-password")
    assert run.returncode == 0, run.stderr
    errors = run.report["errors"]
    # Both attempts fail the same way: the agent stayed up after the first.
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert "Warden could not log in to the database for you" in errors[0], errors[0]
    assert f"credential of target `crm` as user `{bot('scram-sha-256')}`" in errors[0], errors[0]
    assert "28P01" in errors[0], errors[0]
    assert "not-the-password" not in errors[0] and "not-the-password" not in run.stderr
    connections = [r for r in read_audit(audit_dir) if r["dst_port"] == pg.port]
    assert len(connections) == 2
    assert all("login with the policy's credential failed" in r["error"] for r in connections), connections


def test_without_a_credential_the_servers_own_error_comes_back(pg, audit_dir, tmp_path):
    code = textwrap.dedent(f"""
        import json, psycopg
        try:
            psycopg.connect("host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password=wrong").close()
            outcome = "connected"
        except psycopg.OperationalError as e:
            outcome = "refused" if 'password authentication failed for user "{pg.user}"' in str(e) else str(e)
        with psycopg.connect("host=127.0.0.1 port={pg.port} dbname={pg.database} user={pg.user} password={pg.password}") as conn:
            ok = conn.execute("SELECT 1").fetchone()[0]
        print(json.dumps(dict(outcome=outcome, ok=ok)))
    """)
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report == {"outcome": "refused", "ok": 1}
