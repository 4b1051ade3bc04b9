"""`warden audit sql`, `replay` and `tail` over a real audit: PostgreSQL
sessions (and a denied connection) made under `warden run`, read back by the
CLI, by DuckDB and by Spark, which must give the same answers to the same SQL."""
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from echo import EchoServer  # noqa: E402
from pg import PostgresServer  # noqa: E402

from conftest import WARDEN, warden_run  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def audited(pg, tmp_path_factory):
    """One `warden run` of a program with two PostgreSQL sessions (statements
    allowed, failed and denied) and a connection the policy denies; returns
    the audit directory and the program's report."""
    pg.psql_admin("CREATE TABLE IF NOT EXISTS cli_secret (id int)", database=pg.database)
    pg.psql_admin("GRANT ALL ON cli_secret TO app", database=pg.database)
    echo = EchoServer("127.0.0.1")
    base = tmp_path_factory.mktemp("audit-cli")
    audit_dir = base / "audit"
    audit_dir.mkdir()
    policy = base / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            default: audit
            targets:
              echo: {{ address: "127.0.0.1", port: {echo.port} }}
            rules:
              - name: no-echo
                when: {{ target: echo }}
                action: deny
              - name: no-secrets
                when: {{ sql: {{ tables: "*secret*" }} }}
                action: deny
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import json, os, socket, psycopg
        with psycopg.connect({pg.dsn!r}) as conn:
            conn.execute("DROP TABLE IF EXISTS cli_notes")
            conn.execute("CREATE TABLE cli_notes (id int primary key, body text)")
            conn.execute("INSERT INTO cli_notes VALUES (1, 'one'), (2, 'two'), (3, 'three')")
            conn.execute("SELECT id, body FROM cli_notes WHERE id > %s ORDER BY id", (1,)).fetchall()
            conn.execute("UPDATE cli_notes SET body = 'uno' WHERE id = 1")
            conn.commit()
            try:
                conn.execute("SELECT * FROM cli_missing")
            except psycopg.errors.UndefinedTable:
                pass
            conn.rollback()
            try:
                conn.execute("SELECT * FROM cli_secret")
            except psycopg.errors.InsufficientPrivilege:
                pass
            conn.rollback()
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            count = conn.execute("SELECT count(*) FROM cli_notes").fetchone()[0]
        try:
            s = socket.create_connection(("127.0.0.1", {echo.port}), timeout=5)
            s.sendall(b"hello")
            denied = s.recv(10) == b""
        except OSError:
            denied = True
        print(json.dumps(dict(pid=os.getpid(), count=count, denied=denied)))
        """
    )
    try:
        run = warden_run(code, audit_dir, "--policy", str(policy))
    finally:
        echo.close()
    assert run.returncode == 0, run.stderr
    assert run.report["count"] == 3 and run.report["denied"], run.report
    return audit_dir, run.report


def warden_audit(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([WARDEN, "audit", *args], capture_output=True, text=True, timeout=timeout, env=env)


def cli_sql(audit_dir: Path, sql: str):
    """The rows `warden audit sql --format json` prints, as dicts."""
    out = warden_audit("sql", "--audit-dir", str(audit_dir), "--format", "json", sql)
    assert out.returncode == 0, out.stderr
    assert "panicked" not in out.stderr, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def plain(v):
    """A value as `--format json` shows it: dates as ISO strings (timestamps
    are compared as microseconds, see the timestamp tests)."""
    if isinstance(v, datetime.date) and not isinstance(v, datetime.datetime):
        return v.isoformat()
    return v


def duck_sql(audit_dir: Path, sql: str):
    """The same SQL with DuckDB over the same files, as JSON would show it
    (dates as ISO strings)."""
    import duckdb

    con = duckdb.connect()
    for table in ("connections", "requests"):
        glob = str(audit_dir / table / "**" / "*.parquet")
        con.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{glob}', hive_partitioning=true, union_by_name=true)"
        )
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [{n: plain(v) for n, v in zip(names, row)} for row in cur.fetchall()]


@pytest.fixture(scope="module")
def spark():
    """One local Spark (a JVM, started once for the module) that only binds
    and talks on loopback."""
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        # Else Spark picks the address of a network interface for itself.
        mp.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        session = (
            SparkSession.builder.master("local[1]")
            .appName("warden-audit-e2e")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.shuffle.partitions", "1")
            # The JIT's quick tier only: a third faster for a JVM this short-lived.
            .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1")
            .getOrCreate()
        )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def spark_audit(spark, audited):
    """Spark with `connections` and `requests` as temp views over the audit,
    read as docs/audit.md says."""
    audit_dir, _ = audited
    for table in ("connections", "requests"):
        spark.read.option("mergeSchema", "true").parquet(str(audit_dir / table)).createOrReplaceTempView(table)
    return spark


def spark_sql(spark, sql: str):
    """The same SQL with Spark (see `spark_audit`), as JSON would show it."""
    df = spark.sql(sql)
    return [{n: plain(v) for n, v in zip(df.columns, row)} for row in df.collect()]


SAME_ANSWERS = [
    # Counts by protocol and decision, in both tables.
    "SELECT protocol, decision, count(*) AS n FROM connections GROUP BY protocol, decision ORDER BY protocol, decision",
    "SELECT protocol, statement_class, decision, rule, count(*) AS n FROM requests "
    "GROUP BY protocol, statement_class, decision, rule ORDER BY protocol, statement_class, decision, rule",
    # Requests joined to their connections.
    "SELECT c.pid, c.exe, c.protocol, c.dst_port, r.session_id, count(*) AS statements, sum(r.rows) AS rows, "
    "count(r.sqlstate) AS failed FROM requests r JOIN connections c ON r.session_id = c.session_id "
    "GROUP BY c.pid, c.exe, c.protocol, c.dst_port, r.session_id ORDER BY r.session_id",
    # The statements in order, with their lists.
    "SELECT session_id, seq, statement, statement_class, tables_read, tables_written, rows, sqlstate, decision "
    "FROM requests ORDER BY session_id, seq",
    # The partition columns.
    "SELECT date, hour, count(*) AS n FROM requests GROUP BY date, hour ORDER BY date, hour",
    "SELECT count(*) AS n FROM connections WHERE date >= DATE '2020-01-01' AND hour >= 0",
    # Filters, CASE, subqueries.
    "SELECT CASE WHEN rows IS NULL THEN 'none' ELSE 'some' END AS has_rows, count(*) AS n FROM requests "
    "WHERE session_id IN (SELECT session_id FROM connections WHERE protocol = 'postgres') "
    "GROUP BY 1 ORDER BY 1",
    # GROUP BY ALL and the list functions docs/audit.md names.
    "SELECT protocol, statement_class, count(*) AS n FROM requests GROUP BY ALL ORDER BY protocol, statement_class",
    # Spark SQL has no list_contains and no unnest (UNRESOLVED_ROUTINE): a
    # pair is (the query for us and DuckDB, the same query as Spark spells it).
    (
        "SELECT session_id, seq, statement FROM requests WHERE list_contains(tables_written, 'cli_notes') "
        "ORDER BY session_id, seq",
        "SELECT session_id, seq, statement FROM requests WHERE array_contains(tables_written, 'cli_notes') "
        "ORDER BY session_id, seq",
    ),
    (
        "SELECT t AS table_name, count(*) AS statements FROM (SELECT unnest(tables_read) AS t FROM requests) AS u "
        "GROUP BY ALL ORDER BY table_name",
        "SELECT t AS table_name, count(*) AS statements FROM (SELECT explode(tables_read) AS t FROM requests) AS u "
        "GROUP BY ALL ORDER BY table_name",
    ),
]


def sql_of(query) -> str:
    """The SQL of a SAME_ANSWERS entry as `warden audit sql` and DuckDB take it."""
    return query if isinstance(query, str) else query[0]


SPARK_SPELLING = {q[0]: q[1] for q in SAME_ANSWERS if not isinstance(q, str)}


@pytest.mark.parametrize("sql", [sql_of(q) for q in SAME_ANSWERS])
def test_warden_audit_sql_and_duckdb_agree(audited, sql):
    audit_dir, _ = audited
    ours = cli_sql(audit_dir, sql)
    theirs = duck_sql(audit_dir, sql)
    assert ours, f"no rows for {sql}"
    assert ours == theirs


@pytest.mark.parametrize("sql", [sql_of(q) for q in SAME_ANSWERS])
def test_warden_audit_sql_and_spark_agree(audited, spark_audit, sql):
    audit_dir, _ = audited
    ours = cli_sql(audit_dir, sql)
    theirs = spark_sql(spark_audit, SPARK_SPELLING.get(sql, sql))
    assert ours, f"no rows for {sql}"
    assert ours == theirs


def test_the_audit_has_what_the_program_did(audited):
    audit_dir, report = audited
    by_protocol = {(r["protocol"], r["decision"]): r["n"] for r in cli_sql(audit_dir, SAME_ANSWERS[0])}
    assert by_protocol[("postgres", "allow")] == 2, by_protocol
    assert any(decision == "deny" for (_, decision) in by_protocol), by_protocol
    statements = cli_sql(audit_dir, "SELECT statement, decision, rule, sqlstate, pid FROM requests ORDER BY start_time")
    assert all(s["pid"] == report["pid"] for s in statements)
    denied = [s for s in statements if s["decision"] == "deny"]
    assert [(s["statement"], s["rule"], s["sqlstate"]) for s in denied] == [("SELECT * FROM cli_secret", "no-secrets", "42501")]


def cli_timestamps_as_micros(audit_dir: Path, table: str, key: str):
    """start_time and end_time as `warden audit sql` prints them (RFC 3339,
    UTC), as microseconds since the epoch."""
    rows = cli_sql(audit_dir, f"SELECT {key}, start_time, end_time FROM {table} ORDER BY {key}")

    def micros(text: str) -> int:
        assert text.endswith("Z"), text
        t = datetime.datetime.fromisoformat(text)
        assert t.utcoffset() == datetime.timedelta(0)
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (t - epoch) // datetime.timedelta(microseconds=1)

    return [{**r, "start_time": micros(r["start_time"]), "end_time": micros(r["end_time"])} for r in rows]


def test_timestamps_are_rfc3339_utc_and_match_duckdb(audited):
    audit_dir, _ = audited
    theirs = duck_sql(
        audit_dir,
        "SELECT session_id, seq, epoch_us(start_time) AS start_time, epoch_us(end_time) AS end_time "
        "FROM requests ORDER BY session_id, seq",
    )
    assert cli_timestamps_as_micros(audit_dir, "requests", "session_id, seq") == theirs


@pytest.mark.parametrize("table,key", [("requests", "session_id, seq"), ("connections", "session_id")])
def test_timestamps_match_spark(audited, spark_audit, table, key):
    audit_dir, _ = audited
    # unix_micros is Spark's epoch_us: no Python datetimes, whose conversion
    # would depend on the test process's local time zone.
    theirs = spark_sql(
        spark_audit,
        f"SELECT {key}, unix_micros(start_time) AS start_time, unix_micros(end_time) AS end_time "
        f"FROM {table} ORDER BY {key}",
    )
    ours = cli_timestamps_as_micros(audit_dir, table, key)
    assert ours and ours == theirs


def test_csv_and_table_formats_and_the_env_variable(audited):
    audit_dir, _ = audited
    env = dict(os.environ, WARDEN_AUDIT_DIR=str(audit_dir))
    sql = "SELECT session_id, seq, statement FROM requests WHERE statement LIKE '%cli_notes%' ORDER BY session_id, seq"
    expected = cli_sql(audit_dir, sql)
    csv = warden_audit("sql", "--format", "csv", sql, env=env)
    assert csv.returncode == 0, csv.stderr
    import csv as csvlib

    rows = list(csvlib.DictReader(csv.stdout.splitlines()))
    assert [dict(r, seq=int(r["seq"])) for r in rows] == expected
    table = warden_audit("sql", sql, env=env)
    assert table.returncode == 0, table.stderr
    assert "| session_id" in table.stdout and f"{len(expected)} rows" in table.stdout, table.stdout
    assert all(r["statement"] in table.stdout for r in expected)


def test_replay_shows_the_session_and_its_statements_in_order(audited):
    audit_dir, report = audited
    (first,) = cli_sql(
        audit_dir,
        "SELECT session_id FROM requests GROUP BY session_id ORDER BY count(*) DESC LIMIT 1",
    )
    session = first["session_id"]
    out = warden_audit("replay", "--audit-dir", str(audit_dir), session)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"session {session}\n"), text
    assert f"pid {report['pid']} " in text and "protocol postgres" in text, text
    assert "database  crm as app" in text and "decision  allow" in text, text
    statements = [r["statement"] for r in duck_sql(
        audit_dir, f"SELECT statement FROM requests WHERE session_id = '{session}' ORDER BY seq"
    )]
    assert len(statements) >= 7, statements
    lines = text.splitlines()
    # Each statement on its own line, in order (BEGIN and COMMIT come back).
    at = 0
    for statement in statements:
        found = [i for i in range(at, len(lines)) if f": {statement}" in lines[i]]
        assert found, f"{statement!r} not after line {at}:\n{text}"
        at = found[0] + 1
        assert lines[found[0]].lstrip().startswith("+"), lines[found[0]]
    # The statement lines (the `command` line above them shows the program's
    # text, which names the same tables).
    requests = [line for line in lines if line.lstrip().startswith("+")]
    denied = next(line for line in requests if "cli_secret" in line)
    assert " deny no-secrets " in denied and "error 42501" in denied, denied
    missing = next(line for line in requests if "cli_missing" in line)
    assert "error 42P01" in missing, missing
    # No such session: exit 1 with a readable message.
    out = warden_audit("replay", "--audit-dir", str(audit_dir), "no-such-session")
    assert out.returncode == 1 and 'no session "no-such-session"' in out.stderr, out.stderr


def test_bad_sql_fails_with_exit_1_and_a_readable_message(audited):
    audit_dir, _ = audited
    for sql, what in [
        ("SELEC", "SELEC"),
        ("SELECT nope FROM requests", "nope"),
        ("SELECT * FROM statements", "statements"),
    ]:
        out = warden_audit("sql", "--audit-dir", str(audit_dir), sql)
        assert out.returncode == 1, (sql, out.stdout, out.stderr)
        assert out.stdout == ""
        assert "panicked" not in out.stderr and "RUST_BACKTRACE" not in out.stderr, out.stderr
        assert what in out.stderr and "docs/audit.md" in out.stderr, out.stderr
        assert "`connections`" in out.stderr and "`requests`" in out.stderr, out.stderr


def test_an_empty_audit_directory_is_empty_tables(tmp_path):
    rows = cli_sql(tmp_path, "SELECT (SELECT count(*) FROM connections) AS c, (SELECT count(*) FROM requests) AS r")
    assert rows == [{"c": 0, "r": 0}]


def test_tail_follows_new_rows_until_sigterm(pg, tmp_path):
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    first = warden_run(
        f"import psycopg\nwith psycopg.connect({pg.dsn!r}) as c: c.execute(\"SELECT 'before tail'\")", audit_dir
    )
    assert first.returncode == 0, first.stderr
    tail = subprocess.Popen(
        [WARDEN, "audit", "tail", "--audit-dir", str(audit_dir), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        second = warden_run(
            f"import psycopg\nwith psycopg.connect({pg.dsn!r}) as c: c.execute(\"SELECT 'after tail'\")", audit_dir
        )
        assert second.returncode == 0, second.stderr
        time.sleep(2)  # a few polls
    finally:
        tail.send_signal(signal.SIGTERM)
        out, err = tail.communicate(timeout=10)
    assert tail.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    mine = [r for r in rows if "tail" in (r["statement"] or "")]
    assert [r["statement"] for r in mine] == ["SELECT 'after tail'"], out
    assert mine[0]["date"] and isinstance(mine[0]["hour"], int), mine[0]
