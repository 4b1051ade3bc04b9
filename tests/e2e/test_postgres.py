"""PostgreSQL through the agent: a real server, real clients (psycopg and
psql), every statement audited with its class, tables and outcome."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import duckdb_query, warden_run  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.stop()


def requests(audit_dir: Path, where: str = "true"):
    """The requests table, read with DuckDB, in session and statement order."""
    import duckdb

    con = duckdb.connect()
    glob = str(audit_dir / "requests" / "**" / "*.parquet")
    cur = con.execute(
        f"SELECT seq, statement, statement_class, tables_read, tables_written, rows, error, sqlstate, session_id, "
        f"database, db_user, pid, decision FROM read_parquet('{glob}', hive_partitioning=true) WHERE {where} "
        f"ORDER BY session_id, seq"
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def test_psycopg_statements_are_audited_one_by_one(pg, audit_dir):
    code = textwrap.dedent(
        f"""
        import json, os, psycopg
        with psycopg.connect({pg.dsn!r}) as conn:
            conn.execute("CREATE TABLE customers (id int primary key, name text, email text)")
            conn.execute("INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), (2, 'Bob', 'bob@example.com')")
            rows = conn.execute("SELECT id, name FROM customers WHERE id > %s ORDER BY id", (0,)).fetchall()
            conn.commit()
            try:
                conn.execute("SELECT * FROM missing_table")
            except psycopg.errors.UndefinedTable:
                failed = True
            conn.rollback()
            conn.execute("UPDATE customers SET name = 'Ada L' WHERE id = 1")
            conn.commit()
        print(json.dumps(dict(pid=os.getpid(), rows=rows, failed=failed)))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report["rows"] == [[1, "Ada"], [2, "Bob"]] and run.report["failed"]
    got = requests(audit_dir)
    by_text = {r["statement"]: r for r in got}
    create = by_text["CREATE TABLE customers (id int primary key, name text, email text)"]
    assert create["statement_class"] == "ddl"
    insert = next(r for r in got if r["statement"].startswith("INSERT INTO customers"))
    assert (insert["statement_class"], insert["tables_written"], insert["rows"]) == ("write", ["customers"], 2)
    select = next(r for r in got if r["statement"].startswith("SELECT id, name FROM customers"))
    assert (select["statement_class"], select["tables_read"], select["rows"]) == ("read", ["customers"], 2)
    missing = next(r for r in got if "missing_table" in r["statement"])
    assert missing["sqlstate"] == "42P01" and "missing_table" in missing["error"]
    update = next(r for r in got if r["statement"].startswith("UPDATE customers"))
    assert (update["statement_class"], update["tables_written"], update["rows"]) == ("write", ["customers"], 1)
    assert all(r["pid"] == run.report["pid"] and r["decision"] == "allow" for r in got)
    assert all((r["database"], r["db_user"]) == ("crm", "app") for r in got)
    # Each session numbers its statements 1, 2, 3...
    assert [r["seq"] for r in got] == list(range(1, len(got) + 1))
    # The connection row says what the requests rows belong to.
    (protocol,), = duckdb_query(audit_dir, "SELECT DISTINCT protocol FROM connections")
    assert protocol == "postgres"


def test_psql_simple_protocol_with_several_statements(pg, audit_dir):
    pg.psql_admin("CREATE TABLE IF NOT EXISTS notes (id int)", database=pg.database)
    pg.psql_admin("GRANT ALL ON notes TO app", database=pg.database)
    code = textwrap.dedent(
        f"""
        import json, os, subprocess
        env = dict(os.environ, PGPASSWORD={pg.password!r})
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", "{pg.port}", "-U", "{pg.user}", "-d", "{pg.database}",
                              "-qAt", "-c", "INSERT INTO notes VALUES (1), (2); SELECT count(*) FROM notes; DROP TABLE nope"],
                             capture_output=True, text=True, env=env)
        print(json.dumps(dict(code=out.returncode, out=out.stdout, err=out.stderr)))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report["code"] == 1 and 'table "nope" does not exist' in run.report["err"]
    got = [r for r in requests(audit_dir) if r["statement"]]
    classes = [(r["statement"], r["statement_class"], r["rows"], r["sqlstate"]) for r in got]
    assert classes == [
        ("INSERT INTO notes VALUES (1), (2)", "write", 2, None),
        ("SELECT count(*) FROM notes", "read", 1, None),
        ("DROP TABLE nope", "ddl", None, "42P01"),
    ], classes


def test_a_malformed_message_closes_only_that_connection(pg, audit_dir):
    code = textwrap.dedent(
        f"""
        import json, socket, psycopg
        s = socket.create_connection(("127.0.0.1", {pg.port}))
        # A StartupMessage, then a typed message whose length is impossible.
        s.sendall(bytes([0, 0, 0, 8, 0, 3, 0, 0]) + b"Q" + bytes([0, 0, 0, 1]))
        try:
            closed = s.recv(100) == b""
        except ConnectionResetError:
            closed = True
        with psycopg.connect({pg.dsn!r}) as conn:
            one = conn.execute("SELECT 1").fetchone()[0]
        print(json.dumps(dict(closed=closed, one=one)))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report == {"closed": True, "one": 1}
    errors = [e for (e,) in duckdb_query(audit_dir, "SELECT error FROM connections WHERE error IS NOT NULL")]
    assert any("malformed PostgreSQL message from the client" in e for e in errors), errors


def test_denied_statements_get_a_postgres_error_and_the_session_goes_on(pg, audit_dir, tmp_path):
    pg.psql_admin("CREATE TABLE IF NOT EXISTS cards (id int, number text)", database=pg.database)
    pg.psql_admin("CREATE TABLE IF NOT EXISTS orders (id int)", database=pg.database)
    pg.psql_admin("GRANT ALL ON cards, orders TO app", database=pg.database)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """
            version: 1
            default: audit
            rules:
              - name: no-card-tables
                when: { sql: { tables: "*card*" } }
                action: deny
              - name: no-ddl
                when: { sql: { class: [ddl, privilege] } }
                action: deny
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import json, os, subprocess, psycopg
        out = {{}}
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            for name, sql, params in [
                ("extended", "SELECT number FROM cards WHERE id = %s", (1,)),
                ("simple", "DROP TABLE orders", None),
            ]:
                try:
                    conn.execute(sql, params)
                    out[name] = "ran"
                except psycopg.errors.InsufficientPrivilege as e:
                    out[name] = str(e)
            # The same session goes on.
            out["after"] = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        env = dict(os.environ, PGPASSWORD={pg.password!r})
        p = subprocess.run(["psql", "-h", "127.0.0.1", "-p", "{pg.port}", "-U", "{pg.user}", "-d", "{pg.database}",
                            "-qAt", "-c", "INSERT INTO orders VALUES (7); SELECT * FROM cards"],
                           capture_output=True, text=True, env=env)
        out["psql"] = [p.returncode, p.stderr.strip()]
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    r = run.report
    assert r["extended"].startswith('permission denied by Warden policy rule "no-card-tables"'), r
    assert r["simple"].startswith('permission denied by Warden policy rule "no-ddl"'), r
    assert r["after"] == 0
    assert r["psql"][0] == 1 and "no-card-tables" in r["psql"][1]
    # Nothing denied reached the server: orders still exists and is empty.
    assert pg.psql_admin("SELECT count(*) FROM orders", database=pg.database).strip() == "0"
    got = [(x["statement"], x["decision"], x["sqlstate"]) for x in requests(audit_dir) if x["decision"] == "deny" or x["error"]]
    assert ("SELECT number FROM cards WHERE id = $1", "deny", "42501") in got, got
    assert ("DROP TABLE orders", "deny", "42501") in got, got
    assert ("SELECT * FROM cards", "deny", "42501") in got, got
    assert ("INSERT INTO orders VALUES (7)", "allow", None) in got, got  # held back with its sibling


def test_result_rows_are_masked_inline(pg, audit_dir, tmp_path):
    pg.psql_admin(
        "DROP TABLE IF EXISTS people; CREATE TABLE people (id int, email text, note text, ssn varchar(11), age int); "
        "INSERT INTO people VALUES (1, 'ada@example.com', 'card 4111 1111 1111 1111 on file', '123-45-6789', 36), "
        "(2, 'bob@example.com', 'order 4111 1111 1111 1112 is not a card', NULL, 41); GRANT SELECT ON people TO app",
        database=pg.database,
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """
            version: 1
            default: audit
            rules:
              - name: mask-people
                when: { sql: { class: read, tables: people } }
                action: allow
                mask: { columns: ["*email*", "age"], detectors: [payment, ssn] }
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import json, os, subprocess, psycopg
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            extended = conn.execute("SELECT id, email, note, ssn, age FROM people WHERE id > %s ORDER BY id", (0,)).fetchall()
        env = dict(os.environ, PGPASSWORD={pg.password!r})
        simple = subprocess.run(["psql", "-h", "127.0.0.1", "-p", "{pg.port}", "-U", "{pg.user}", "-d", "{pg.database}",
                                 "-qAt", "-c", "SELECT email FROM people ORDER BY id"],
                                capture_output=True, text=True, env=env, check=True).stdout.split()
        print(json.dumps(dict(extended=extended, simple=simple)))
        """
    )
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    rows = run.report["extended"]
    ada, bob = rows
    assert ada[0] == 1 and bob[0] == 2  # untouched
    assert ada[1] != "ada@example.com" and bob[1] != "bob@example.com"
    assert "4111 1111 1111 1111" not in ada[2] and ada[2].endswith("1111 on file")
    assert bob[2] == "order 4111 1111 1111 1112 is not a card"  # fails the Luhn check: not a card
    assert ada[3] != "123-45-6789" and bob[3] is None
    assert ada[4] is None and bob[4] is None  # a named non-text column comes back as NULL
    # psql's simple protocol gets the same masking.
    assert len(run.report["simple"]) == 2 and "ada@example.com" not in run.report["simple"]
    # ada: email, card, ssn, age; bob: email, age
    import duckdb

    (rule, count), = duckdb.connect().execute(
        f"SELECT rule, masked FROM read_parquet('{audit_dir}/requests/**/*.parquet') WHERE statement LIKE 'SELECT id, email%'"
    ).fetchall()
    assert (rule, count) == ("mask-people", 6)


def test_the_embedded_default_masks_card_numbers(pg, audit_dir):
    pg.psql_admin(
        "DROP TABLE IF EXISTS tickets; CREATE TABLE tickets (body text); "
        "INSERT INTO tickets VALUES ('please charge 4111-1111-1111-1111 today'); GRANT SELECT ON tickets TO app",
        database=pg.database,
    )
    code = f"import json, psycopg\nwith psycopg.connect({pg.dsn!r}) as c: print(json.dumps(dict(body=c.execute('SELECT body FROM tickets').fetchone()[0])))"
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert "4111-1111-1111-1111" not in run.report["body"] and run.report["body"].startswith("please charge ")
