"""More real PostgreSQL clients through the agent, each against a real server
on loopback: psycopg2 (libpq, simple protocol), asyncpg (its own protocol
code: extended protocol, binary results, named prepared statements),
SQLAlchemy 2 over psycopg 3, LangChain's SQL tool, COPY both ways, query
cancellation (a CancelRequest on a second connection) and a wrong password.
Each test checks what the client sees and the audit rows the agent wrote."""
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import read_audit, read_requests, warden_run  # noqa: E402

CARD = "4111 1111 1111 1111"
MASKED_CARD = "**** **** **** 1111"


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.stop()


def url(pg: PostgresServer, scheme: str = "postgresql") -> str:
    return f"{scheme}://{pg.user}:{pg.password}@127.0.0.1:{pg.port}/{pg.database}"


def write_policy(tmp_path: Path, text: str) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(text))
    return policy


def summary(r: dict) -> dict:
    """What the tests compare of a requests row."""
    keys = ("statement_class", "tables_read", "tables_written", "rows", "masked", "decision", "rule", "sqlstate")
    return {k: r[k] for k in keys}


def row(statement_class, rows, *, read=(), written=(), masked=0, decision="allow", rule="default", sqlstate=None):
    return {
        "statement_class": statement_class,
        "tables_read": list(read),
        "tables_written": list(written),
        "rows": rows,
        "masked": masked,
        "decision": decision,
        "rule": rule,
        "sqlstate": sqlstate,
    }


def the(got: list[dict], statement: str) -> dict:
    """The one audit row of this exact statement."""
    matches = [r for r in got if r["statement"] == statement]
    assert len(matches) == 1, (statement, [r["statement"] for r in got])
    return matches[0]


def assert_only_this_server(audit_dir: Path, pg: PostgresServer, pid: int):
    """Every connection the program made went to the test server on loopback,
    was decoded as PostgreSQL, was allowed, and is the program's."""
    conns = read_audit(audit_dir)
    assert conns, "no connections row"
    for c in conns:
        assert (c["dst_addr"], c["dst_port"], c["protocol"], c["decision"], c["pid"]) == (
            "127.0.0.1", pg.port, "postgres", "allow", pid), c
    return conns


def test_psycopg2_reads_masked_read_and_denied_write(pg, audit_dir, tmp_path):
    pg.psql_admin(
        "CREATE TABLE p2_customers (id int, name text, email text, note text); "
        "INSERT INTO p2_customers VALUES (1, 'Ada', 'ada@example.com', 'card 4111 1111 1111 1111 on file'), "
        "(2, 'Bob', 'bob@example.com', 'no card on file'); GRANT ALL ON p2_customers TO app",
        database=pg.database,
    )
    policy = write_policy(tmp_path, """
        version: 1
        default: audit
        rules:
          - name: p2-no-writes
            when: { sql: { class: [write, copy, ddl], tables: p2_customers } }
            action: deny
          - name: p2-masked-reads
            when: { sql: { class: read, tables: p2_customers } }
            action: allow
            mask: { columns: ["*email*"], detectors: [payment] }
        """)
    code = textwrap.dedent(
        f"""
        import json, os, psycopg2, psycopg2.errors, psycopg2.extensions as ext
        out = dict(pid=os.getpid())
        conn = psycopg2.connect({pg.dsn!r})
        cur = conn.cursor()
        cur.execute("SELECT current_user")
        out["user"] = cur.fetchone()[0]
        cur.execute("SELECT id, name FROM p2_customers WHERE id > %s ORDER BY id", (0,))
        out["names"] = cur.fetchall()
        cur.execute("SELECT id, email, note FROM p2_customers ORDER BY id")
        out["masked"] = cur.fetchall()
        try:
            cur.execute("INSERT INTO p2_customers VALUES (3, 'Eve', 'eve@example.com', '')")
            out["insert"] = "ran"
        except psycopg2.errors.InsufficientPrivilege as e:
            out["insert"] = [e.pgcode, e.diag.message_primary, e.diag.message_hint]
        # The server saw no error: the transaction psycopg2 opened goes on.
        out["tx"] = conn.get_transaction_status() == ext.TRANSACTION_STATUS_INTRANS
        cur.execute("SELECT count(*) FROM p2_customers")
        out["count"] = cur.fetchone()[0]
        conn.commit()
        conn.close()
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    r = run.report
    assert r["user"] == "app"
    assert r["names"] == [[1, "Ada"], [2, "Bob"]]
    (ada_id, ada_email, ada_note), (bob_id, bob_email, bob_note) = r["masked"]
    assert (ada_id, bob_id) == (1, 2)
    # A named column is masked whole (stars only), detectors mask in place.
    assert ada_email and set(ada_email) == {"*"} and bob_email and set(bob_email) == {"*"}, r["masked"]
    assert ada_note == f"card {MASKED_CARD} on file", ada_note
    assert bob_note == "no card on file"
    assert r["insert"] == ["42501", 'permission denied by Warden policy rule "p2-no-writes"',
                           "ask the owner of the Warden policy on this host if this statement should be allowed"], r
    assert r["tx"] and r["count"] == 2
    # Nothing denied reached the server.
    assert pg.psql_admin("SELECT count(*) FROM p2_customers", database=pg.database).strip() == "2"

    got = read_requests(audit_dir)
    assert {x["session_id"] for x in got} == {got[0]["session_id"]}  # one connection
    assert [x["seq"] for x in got] == list(range(1, len(got) + 1))
    assert [x["statement"] for x in got] == [
        "BEGIN",
        "SELECT current_user",
        "SELECT id, name FROM p2_customers WHERE id > 0 ORDER BY id",
        "SELECT id, email, note FROM p2_customers ORDER BY id",
        "INSERT INTO p2_customers VALUES (3, 'Eve', 'eve@example.com', '')",
        "SELECT count(*) FROM p2_customers",
        "COMMIT",
    ]
    assert summary(got[0]) == row("transaction", 0)
    assert summary(got[1]) == row("read", 1)
    assert summary(got[2]) == row("read", 2, read=["p2_customers"], rule="p2-masked-reads")
    # ada: email and card; bob: email.
    assert summary(got[3]) == row("read", 2, read=["p2_customers"], masked=3, rule="p2-masked-reads")
    assert summary(got[4]) == row("write", None, written=["p2_customers"], decision="deny", rule="p2-no-writes",
                                  sqlstate="42501")
    assert summary(got[5]) == row("read", 1, read=["p2_customers"], rule="p2-masked-reads")
    assert summary(got[6]) == row("transaction", 0)
    assert all((x["pid"], x["database"], x["db_user"]) == (r["pid"], "crm", "app") for x in got)
    assert_only_this_server(audit_dir, pg, r["pid"])


def test_psycopg2_multi_statement_query_is_two_rows(pg, audit_dir):
    pg.psql_admin("CREATE TABLE ms_log (id int); GRANT ALL ON ms_log TO app", database=pg.database)
    code = textwrap.dedent(
        f"""
        import json, os, psycopg2
        conn = psycopg2.connect({pg.dsn!r})
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT 1; SELECT 2")
        two = cur.fetchall()
        cur.execute("INSERT INTO ms_log VALUES (1), (2), (3); SELECT count(*) FROM ms_log")
        count = cur.fetchall()
        print(json.dumps(dict(pid=os.getpid(), two=two, count=count)))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    # libpq returns the last result of a multi-statement query.
    assert run.report["two"] == [[2]] and run.report["count"] == [[3]]
    got = read_requests(audit_dir)
    assert [(x["seq"], x["statement"]) for x in got] == [
        (1, "SELECT 1"),
        (2, "SELECT 2"),
        (3, "INSERT INTO ms_log VALUES (1), (2), (3)"),
        (4, "SELECT count(*) FROM ms_log"),
    ], got
    assert len({x["session_id"] for x in got}) == 1
    assert [summary(x) for x in got] == [
        row("read", 1),
        row("read", 1),
        row("write", 3, written=["ms_log"]),
        row("read", 1, read=["ms_log"]),
    ]
    assert_only_this_server(audit_dir, pg, run.report["pid"])


ASYNCPG_ITEMS = (
    "CREATE TABLE apg_items (id int primary key, name text, price numeric(8,2), in_stock bool, added date, "
    "tag bytea, weight float8); "
    "INSERT INTO apg_items VALUES (1, 'pen', 1.50, true, '2024-01-02', '\\x00ff10', 0.25), "
    "(2, 'ink', 12.00, false, '2024-02-29', '\\x', 1e-3), (3, 'nib ✓', 0.99, NULL, NULL, NULL, -2.5); "
    "GRANT ALL ON apg_items TO app"
)


def asyncpg_program(pg: PostgresServer, body: str) -> str:
    """A program that runs `body` (awaiting on connection `c`, filling `out`)."""
    return textwrap.dedent(
        """
        import asyncio, json, os, asyncpg
        def plain(v):
            if isinstance(v, (bytes, bytearray)): return "hex:" + bytes(v).hex()
            if hasattr(v, "isoformat"): return v.isoformat()
            if type(v).__name__ == "Decimal": return "dec:" + str(v)
            return v
        async def main():
            out = dict(pid=os.getpid())
            c = await asyncpg.connect(dsn=URL)
        BODY
            await c.close()
            print(json.dumps(out))
        asyncio.run(main())
        """
    ).replace("URL", repr(url(pg))).replace("BODY\n", textwrap.indent(textwrap.dedent(body), " " * 4))


def test_asyncpg_prepared_statements_with_binary_results(pg, audit_dir):
    pg.psql_admin(ASYNCPG_ITEMS, database=pg.database)
    code = asyncpg_program(pg, """
        # asyncpg asks for every column of these types in binary format.
        rows = await c.fetch("SELECT id, name, price, in_stock, added, tag, weight FROM apg_items WHERE id > $1 ORDER BY id", 0)
        out["all"] = [[plain(v) for v in r] for r in rows]
        stmt = await c.prepare("SELECT name, price FROM apg_items WHERE id = $1")
        out["by_id"] = [[plain(v) for v in (await stmt.fetchrow(i) or ["none"])] for i in (3, 1, 2, 1, 99)]
        out["prepared"] = await c.fetchval("SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
                                           "SELECT name, price FROM apg_items WHERE id = $1")
        """)
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    r = run.report
    assert r["all"] == [
        [1, "pen", "dec:1.50", True, "2024-01-02", "hex:00ff10", 0.25],
        [2, "ink", "dec:12.00", False, "2024-02-29", "hex:", 0.001],
        [3, "nib ✓", "dec:0.99", None, None, None, -2.5],
    ], r["all"]
    assert r["by_id"] == [["nib ✓", "dec:0.99"], ["pen", "dec:1.50"], ["ink", "dec:12.00"], ["pen", "dec:1.50"],
                          ["none"]], r["by_id"]
    # Prepared once on the server, executed five times.
    assert r["prepared"] == 1

    got = read_requests(audit_dir)
    assert len({x["session_id"] for x in got}) == 1
    assert [x["seq"] for x in got] == list(range(1, len(got) + 1))
    first = the(got, "SELECT id, name, price, in_stock, added, tag, weight FROM apg_items WHERE id > $1 ORDER BY id")
    assert summary(first) == row("read", 3, read=["apg_items"])
    executions = [x for x in got if x["statement"] == "SELECT name, price FROM apg_items WHERE id = $1"]
    assert [summary(x) for x in executions] == [row("read", n, read=["apg_items"]) for n in (1, 1, 1, 1, 0)]
    assert summary(the(got, "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1")) == row(
        "read", 1, read=["pg_prepared_statements"])
    assert_only_this_server(audit_dir, pg, r["pid"])


def test_asyncpg_masks_text_columns_in_binary_results(pg, audit_dir, tmp_path):
    pg.psql_admin(
        "CREATE TABLE apg_people (id int, email text, note varchar(80)); "
        "INSERT INTO apg_people VALUES (1, 'ada@example.com', 'card 4111 1111 1111 1111 on file'), "
        "(2, 'bob@example.com', 'no card on file'); GRANT SELECT ON apg_people TO app",
        database=pg.database,
    )
    policy = write_policy(tmp_path, """
        version: 1
        default: audit
        rules:
          - name: apg-masked
            when: { sql: { class: read, tables: apg_people } }
            action: allow
            mask: { columns: ["email"], detectors: [payment] }
        """)
    code = asyncpg_program(pg, """
        rows = await c.fetch("SELECT id, email, note FROM apg_people ORDER BY id")
        out["fetch"] = [list(r) for r in rows]
        stmt = await c.prepare("SELECT email, note FROM apg_people WHERE id = $1")
        out["prepared"] = [list(await stmt.fetchrow(1)), list(await stmt.fetchrow(2))]
        """)
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    r = run.report
    got = read_requests(audit_dir)
    fetch_row = the(got, "SELECT id, email, note FROM apg_people ORDER BY id")
    prepared_rows = [x for x in got if x["statement"] == "SELECT email, note FROM apg_people WHERE id = $1"]
    # The statements are decided by the masking rule...
    assert (fetch_row["decision"], fetch_row["rule"], fetch_row["rows"]) == ("allow", "apg-masked", 2)
    assert [(x["decision"], x["rule"], x["rows"]) for x in prepared_rows] == [("allow", "apg-masked", 1)] * 2
    # ...and what asyncpg received is masked: emails whole, the card in place.
    (ada_id, ada_email, ada_note), (bob_id, bob_email, bob_note) = r["fetch"]
    assert (ada_id, bob_id) == (1, 2)
    assert "ada@example.com" not in str(r) and "bob@example.com" not in str(r) and CARD not in str(r), (
        "asyncpg got unmasked values (it describes a statement when it prepares it: Parse, Describe, Flush; "
        f"its Bind, Execute, Sync then get rows without a RowDescription): {r}; "
        f"audit masked counts: fetch {fetch_row['masked']}, prepared {[x['masked'] for x in prepared_rows]}")
    assert set(ada_email) == {"*"} and set(bob_email) == {"*"}
    assert (ada_note, bob_note) == (f"card {MASKED_CARD} on file", "no card on file")
    assert r["prepared"] == [[ada_email, ada_note], [bob_email, bob_note]]
    assert fetch_row["masked"] == 3
    assert [x["masked"] for x in prepared_rows] == [2, 1]


def test_asyncpg_denied_write_raises_and_the_connection_goes_on(pg, audit_dir, tmp_path):
    pg.psql_admin(ASYNCPG_ITEMS.replace("apg_items", "apg_stock"), database=pg.database)
    policy = write_policy(tmp_path, """
        version: 1
        default: audit
        rules:
          - name: stock-read-only
            when: { sql: { class: [write, copy, ddl], tables: apg_stock } }
            action: deny
        """)
    code = asyncpg_program(pg, """
        stmt = await c.prepare("SELECT name FROM apg_stock WHERE id = $1")
        out["before"] = await stmt.fetchval(1)
        # execute() without arguments is a simple query; with arguments,
        # asyncpg prepares first (Parse, Describe, Flush) and waits for the
        # answer before it sends Sync.
        for how, sql, args in [("simple", "UPDATE apg_stock SET name = 'pencil' WHERE id = 1", ()),
                               ("extended", "UPDATE apg_stock SET name = $1 WHERE id = $2", ("pencil", 1))]:
            try:
                await asyncio.wait_for(c.execute(sql, *args), 10)
                out[how] = "ran"
            except asyncpg.exceptions.InsufficientPrivilegeError as e:
                out[how] = [e.sqlstate, e.message, e.hint]
            except asyncio.TimeoutError:
                out[how] = "no answer within 10 s"
        # The same connection, and a statement prepared before the denials.
        out["after"] = await stmt.fetchval(1)
        out["count"] = await c.fetchval("SELECT count(*) FROM apg_stock")
        """)
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    r = run.report
    denial = ["42501", 'permission denied by Warden policy rule "stock-read-only"',
              "ask the owner of the Warden policy on this host if this statement should be allowed"]
    got = read_requests(audit_dir)
    assert r["simple"] == denial, r
    assert r["extended"] == denial, (
        "asyncpg's Parse, Describe, Flush of a denied statement got no answer (it sends Sync only after one); "
        f"the client got {r['extended']!r} while the agent audited "
        f"{summary(the(got, 'UPDATE apg_stock SET name = $1 WHERE id = $2'))}")
    assert (r["before"], r["after"], r["count"]) == ("pen", "pen", 3), r
    assert pg.psql_admin("SELECT name FROM apg_stock WHERE id = 1", database=pg.database).strip() == "pen"

    assert len({x["session_id"] for x in got}) == 1
    assert summary(the(got, "UPDATE apg_stock SET name = 'pencil' WHERE id = 1")) == row(
        "write", None, written=["apg_stock"], decision="deny", rule="stock-read-only", sqlstate="42501")
    assert summary(the(got, "UPDATE apg_stock SET name = $1 WHERE id = $2")) == row(
        "write", None, written=["apg_stock"], decision="deny", rule="stock-read-only", sqlstate="42501")
    assert [summary(x) for x in got if x["statement"] == "SELECT name FROM apg_stock WHERE id = $1"] == [
        row("read", 1, read=["apg_stock"])] * 2
    assert summary(the(got, "SELECT count(*) FROM apg_stock")) == row("read", 1, read=["apg_stock"])
    assert_only_this_server(audit_dir, pg, r["pid"])


def test_sqlalchemy_orm_and_core_over_psycopg3(pg, audit_dir):
    code = textwrap.dedent(
        f"""
        import json, os
        from sqlalchemy import String, create_engine, func, select
        from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

        class Base(DeclarativeBase):
            pass

        class Order(Base):
            __tablename__ = "sa_orders"
            id: Mapped[int] = mapped_column(primary_key=True)
            item: Mapped[str] = mapped_column(String(40))
            qty: Mapped[int]

        engine = create_engine({url(pg, "postgresql+psycopg")!r})
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            with s.begin():
                s.add_all([Order(id=1, item="pen", qty=3), Order(id=2, item="ink", qty=1)])
            with s.begin():
                s.add(Order(id=3, item="nib", qty=9))
                s.flush()
                s.rollback()
            orm = [(o.id, o.item, o.qty) for o in s.scalars(select(Order).where(Order.qty >= 1).order_by(Order.id))]
        with engine.connect() as c:
            core = c.execute(select(func.count()).select_from(Order.__table__)).scalar_one()
        print(json.dumps(dict(pid=os.getpid(), orm=orm, core=core, driver=engine.dialect.driver)))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    r = run.report
    assert r["driver"] == "psycopg"
    assert r["orm"] == [[1, "pen", 3], [2, "ink", 1]] and r["core"] == 2, r
    assert pg.psql_admin("SELECT id, item, qty FROM sa_orders ORDER BY id", database=pg.database).split() == [
        "1|pen|3", "2|ink|1"]

    got = read_requests(audit_dir)
    create = [x for x in got if x["statement"].lstrip().startswith("CREATE TABLE sa_orders")]
    assert [summary(x) for x in create] == [row("ddl", 0, written=["sa_orders"])], create
    inserts = [i for i, x in enumerate(got) if x["statement"].startswith("INSERT INTO sa_orders")]
    assert len(inserts) == 3, [x["statement"] for x in got]
    for i in inserts:
        assert summary(got[i]) == row("write", 1, written=["sa_orders"]), got[i]
    # The transactions as the server ran them: BEGIN, two inserts, COMMIT;
    # BEGIN, one insert, ROLLBACK.
    a, b, c = inserts
    assert [got[i]["statement"] for i in (a - 1, b + 1, c - 1, c + 1)] == ["BEGIN", "COMMIT", "BEGIN", "ROLLBACK"]
    assert b == a + 1 and len({got[i]["session_id"] for i in range(a - 1, c + 2)}) == 1
    assert [got[i]["statement_class"] for i in (a - 1, b + 1, c - 1, c + 1)] == ["transaction"] * 4
    orm_select = [x for x in got if x["statement"].startswith("SELECT sa_orders.id, sa_orders.item, sa_orders.qty")]
    assert [summary(x) for x in orm_select] == [row("read", 2, read=["sa_orders"])]
    core_count = [x for x in got if x["statement"].startswith("SELECT count(*)") and "sa_orders" in x["statement"]]
    assert [summary(x) for x in core_count] == [row("read", 1, read=["sa_orders"])]
    assert all(x["decision"] == "allow" and x["sqlstate"] is None for x in got), [
        (x["statement"], x["sqlstate"]) for x in got if x["sqlstate"]]
    assert_only_this_server(audit_dir, pg, r["pid"])


def test_langchain_sql_tool_masked_read_and_denied_write(pg, audit_dir, tmp_path):
    pg.psql_admin(
        "CREATE TABLE lc_tickets (id int primary key, body text); "
        "INSERT INTO lc_tickets VALUES (1, 'please charge 4111 1111 1111 1111 today'), (2, 'where is my order?'); "
        "GRANT ALL ON lc_tickets TO app",
        database=pg.database,
    )
    policy = write_policy(tmp_path, """
        version: 1
        default: audit
        sql_mask: { detectors: [payment, ssn, secrets] }
        rules:
          - name: lc-read-only
            when: { sql: { class: [write, copy, ddl], tables: lc_tickets } }
            action: deny
        """)
    code = textwrap.dedent(
        f"""
        import json, os, warnings
        warnings.simplefilter("ignore")
        from langchain_community.tools import QuerySQLDatabaseTool
        from langchain_community.utilities import SQLDatabase
        out = dict(pid=os.getpid())
        db = SQLDatabase.from_uri({url(pg)!r}, include_tables=["lc_tickets"], sample_rows_in_table_info=2)
        out["dialect"] = [db.dialect, db._engine.dialect.driver]
        out["info"] = db.get_table_info()
        out["run"] = db.run("SELECT id, body FROM lc_tickets ORDER BY id")
        tool = QuerySQLDatabaseTool(db=db)
        out["tool_read"] = tool.invoke("SELECT body FROM lc_tickets WHERE id = 1")
        out["tool_write"] = tool.invoke("UPDATE lc_tickets SET body = 'paid' WHERE id = 1")
        try:
            db.run("DELETE FROM lc_tickets")
            out["raised"] = None
        except Exception as e:
            out["raised"] = [type(e).__name__, type(e.orig).__name__, e.orig.sqlstate]
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    r = run.report
    # SQLAlchemy 2.1 connects postgresql:// URLs with psycopg 3.
    assert r["dialect"] == ["postgresql", "psycopg"]
    # The schema LangChain gives the model (with sample rows), query results
    # and the tool's answer: no card number in any of them.
    assert CARD not in str(r), r
    assert "CREATE TABLE lc_tickets" in r["info"] and f"please charge {MASKED_CARD} today" in r["info"], r["info"]
    assert r["run"] == f"[(1, 'please charge {MASKED_CARD} today'), (2, 'where is my order?')]", r["run"]
    assert r["tool_read"] == f"[('please charge {MASKED_CARD} today',)]", r["tool_read"]
    # The tool hands the model a readable error instead of raising.
    assert r["tool_write"].startswith("Error: (psycopg.errors.InsufficientPrivilege) "
                                      'permission denied by Warden policy rule "lc-read-only"'), r["tool_write"]
    assert r["raised"] == ["ProgrammingError", "InsufficientPrivilege", "42501"], r
    assert pg.psql_admin("SELECT id, body FROM lc_tickets ORDER BY id", database=pg.database).splitlines() == [
        f"1|please charge {CARD} today", "2|where is my order?"]

    got = read_requests(audit_dir)
    sample = [x for x in got if x["statement_class"] == "read" and x["tables_read"] == ["lc_tickets"]
              and "LIMIT" in x["statement"]]
    assert [summary(x) for x in sample] == [row("read", 2, read=["lc_tickets"], masked=1)], [
        (x["statement"], x["tables_read"]) for x in got]
    assert summary(the(got, "SELECT id, body FROM lc_tickets ORDER BY id")) == row(
        "read", 2, read=["lc_tickets"], masked=1)
    assert summary(the(got, "SELECT body FROM lc_tickets WHERE id = 1")) == row("read", 1, read=["lc_tickets"], masked=1)
    for statement in ("UPDATE lc_tickets SET body = 'paid' WHERE id = 1", "DELETE FROM lc_tickets"):
        assert summary(the(got, statement)) == row(
            "write", None, written=["lc_tickets"], decision="deny", rule="lc-read-only", sqlstate="42501")
    assert [x["statement"] for x in got if x["decision"] == "deny"] == [
        "UPDATE lc_tickets SET body = 'paid' WHERE id = 1", "DELETE FROM lc_tickets"]
    # LangChain, SQLAlchemy and psycopg made no connection but to the database.
    assert_only_this_server(audit_dir, pg, r["pid"])


def test_copy_to_stdout_and_from_stdin_with_psycopg3(pg, audit_dir):
    pg.psql_admin(
        "CREATE TABLE cp_rows (id int, name text, note text); "
        "INSERT INTO cp_rows VALUES (1, 'Ada', E'tab\\there, newline\\nthere'), (2, 'Zoë ✓', E'back\\\\slash'), "
        "(3, NULL, ''); GRANT ALL ON cp_rows TO app",
        database=pg.database,
    )
    # What the server itself writes for COPY TO STDOUT, without the agent
    # (psql over the server's unix socket).
    direct = pg.psql_admin("COPY cp_rows TO STDOUT", database=pg.database)
    assert direct.count("\n") == 3
    code = textwrap.dedent(
        f"""
        import hashlib, json, os, psycopg
        out = dict(pid=os.getpid())
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn, conn.cursor() as cur:
            with cur.copy("COPY cp_rows TO STDOUT") as cp:
                out["text"] = b"".join(bytes(b) for b in cp).decode()
            # Binary COPY output cannot be scanned for the embedded default's
            # detectors: it is withheld, and the session goes on.
            try:
                with cur.copy("COPY (SELECT id, name, note FROM cp_rows ORDER BY id) TO STDOUT (FORMAT BINARY)") as cp:
                    cp.set_types(["int4", "text", "text"])
                    out["binary"] = list(cp.rows())
            except psycopg.errors.InsufficientPrivilege as e:
                out["binary"] = str(e).splitlines()[0]
            rows = [(i, f"name {{i}}", "x" * (i % 97)) for i in range(1000, 6000)]
            with cur.copy("COPY cp_rows (id, name, note) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
            out["sent_md5"] = hashlib.md5(",".join(f"{{i}}:{{n}}:{{t}}" for i, n, t in rows).encode()).hexdigest()
            out["count"] = cur.execute("SELECT count(*) FROM cp_rows").fetchone()[0]
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    r = run.report
    # Byte for byte what the server sends without the agent.
    assert r["text"] == direct, (r["text"], direct)
    assert r["binary"].startswith("Warden withheld the output of this COPY"), r["binary"]
    assert r["count"] == 5003
    stored = pg.psql_admin(
        "SELECT md5(string_agg(id || ':' || name || ':' || note, ',' ORDER BY id)) FROM cp_rows WHERE id >= 1000",
        database=pg.database).strip()
    assert stored == r["sent_md5"]

    got = read_requests(audit_dir)
    assert summary(the(got, "COPY cp_rows TO STDOUT")) == row("copy", 3, read=["cp_rows"])
    assert summary(the(got, "COPY (SELECT id, name, note FROM cp_rows ORDER BY id) TO STDOUT (FORMAT BINARY)")) == row(
        "copy", 0, read=["cp_rows"], sqlstate="42501")
    assert summary(the(got, "COPY cp_rows (id, name, note) FROM STDIN")) == row("copy", 5000, written=["cp_rows"])
    assert summary(the(got, "SELECT count(*) FROM cp_rows")) == row("read", 1, read=["cp_rows"])
    assert_only_this_server(audit_dir, pg, r["pid"])


def test_copy_output_is_masked_or_withheld(pg, audit_dir, tmp_path):
    pg.psql_admin(
        "CREATE TABLE cp_cards (id int, email text, note text); "
        f"INSERT INTO cp_cards VALUES (1, 'ada@example.com', 'card {CARD} on file'), (2, 'bob@example.com', 'none'); "
        "GRANT ALL ON cp_cards TO app",
        database=pg.database,
    )
    program = textwrap.dedent(
        f"""
        import json, psycopg
        out = {{}}
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn, conn.cursor() as cur:
            for name, sql in [("text", "COPY cp_cards TO STDOUT"), ("csv", "COPY cp_cards TO STDOUT (FORMAT csv)")]:
                try:
                    with cur.copy(sql) as cp:
                        out[name] = b"".join(bytes(b) for b in cp).decode()
                except psycopg.errors.InsufficientPrivilege as e:
                    out[name] = "error: " + str(e).splitlines()[0]
            out["after"] = cur.execute("SELECT count(*) FROM cp_cards").fetchone()[0]
        print(json.dumps(out))
        """
    )
    # The embedded default: detectors only, so each row is scanned.
    run = warden_run(program, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report == {
        "text": f"1\tada@example.com\tcard {MASKED_CARD} on file\n2\tbob@example.com\tnone\n",
        "csv": f"1,ada@example.com,card {MASKED_CARD} on file\n2,bob@example.com,none\n",
        "after": 2,
    }
    got = read_requests(audit_dir)
    assert summary(the(got, "COPY cp_cards TO STDOUT")) == row("copy", 2, read=["cp_cards"], masked=1)

    # A mask that names a column cannot be applied to COPY (no column names
    # in its output): nothing of it reaches the client.
    policy = write_policy(tmp_path, """\
        version: 1
        sql_mask: { columns: [email] }
        """)
    audit2 = tmp_path / "audit2"
    run = warden_run(program, audit2, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    assert "ada@example.com" not in run.stdout
    assert run.report["text"].startswith("error: Warden withheld the output of this COPY"), run.report
    assert run.report["csv"].startswith("error: Warden withheld the output of this COPY"), run.report
    assert run.report["after"] == 2
    got = read_requests(audit2)
    withheld = the(got, "COPY cp_cards TO STDOUT")
    assert (withheld["sqlstate"], withheld["rows"]) == ("42501", 0), withheld


def without_statements(conns: list[dict], got: list[dict]) -> list[dict]:
    """The connections that carried no statement: in the cancel tests, those
    that carried a CancelRequest."""
    sessions = {r["session_id"] for r in got}
    return [c for c in conns if c["session_id"] not in sessions]


def test_psycopg3_cancel_ends_a_running_query(pg, audit_dir):
    code = textwrap.dedent(
        f"""
        import json, os, threading, time, psycopg
        out = dict(pid=os.getpid())

        def cancel_while_running(conn, how):
            res = {{}}
            def work():
                try:
                    conn.execute("SELECT pg_sleep(30)")
                    res["outcome"] = "ran to the end"
                except psycopg.errors.QueryCanceled as e:
                    res["outcome"] = [e.sqlstate, str(e)]
                res["ended"] = time.monotonic()
            worker = threading.Thread(target=work)
            worker.start()
            # Cancel only once the server is running the query.
            with psycopg.connect({pg.dsn!r}, autocommit=True) as watch:
                deadline = time.monotonic() + 20
                while not watch.execute("SELECT count(*) FROM pg_stat_activity "
                                        "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'").fetchone()[0]:
                    assert time.monotonic() < deadline, "the query never started"
                    time.sleep(0.02)
            sent = time.monotonic()
            getattr(conn, how)()
            worker.join(25)
            res["seconds"] = res.get("ended", float("inf")) - sent
            return res

        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            out["cancel"] = cancel_while_running(conn, "cancel")
            out["cancel_safe"] = cancel_while_running(conn, "cancel_safe")
            out["after"] = conn.execute("SELECT 42").fetchone()[0]
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir, timeout=180)
    assert run.returncode == 0, run.stderr
    r = run.report
    for how in ("cancel", "cancel_safe"):
        assert r[how]["outcome"] == ["57014", "canceling statement due to user request"], r
        assert r[how]["seconds"] < 10, r
    assert r["after"] == 42

    got = read_requests(audit_dir)
    sleeps = [x for x in got if x["statement"] == "SELECT pg_sleep(30)"]
    assert [summary(x) for x in sleeps] == [row("function", None, sqlstate="57014")] * 2
    assert all(x["error"] == "canceling statement due to user request" for x in sleeps)
    after = the(got, "SELECT 42")
    assert after["session_id"] == sleeps[0]["session_id"] == sleeps[1]["session_id"]  # the same connection went on
    conns = assert_only_this_server(audit_dir, pg, r["pid"])
    # The session, the two watching it, and each cancel on its own connection
    # through the agent.
    assert len(conns) == 5 and len(without_statements(conns, got)) == 2, conns


def test_asyncpg_timeout_cancels_through_the_agent(pg, audit_dir):
    code = asyncpg_program(pg, """
        import time
        t0 = time.monotonic()
        try:
            await c.fetchval("SELECT pg_sleep(30)", timeout=1)
            out["outcome"] = "ran to the end"
        except asyncio.TimeoutError:
            out["outcome"] = "timeout"
        out["seconds"] = time.monotonic() - t0
        out["after"] = await c.fetchval("SELECT 42")
        """)
    run = warden_run(code, audit_dir, timeout=180)
    assert run.returncode == 0, run.stderr
    r = run.report
    assert r["outcome"] == "timeout" and r["seconds"] < 10 and r["after"] == 42, r
    got = read_requests(audit_dir)
    sleep = the(got, "SELECT pg_sleep(30)")
    # The server ended the query: asyncpg's CancelRequest reached it through the agent.
    assert summary(sleep) == row("function", None, sqlstate="57014"), sleep
    assert the(got, "SELECT 42")["session_id"] == sleep["session_id"]
    conns = assert_only_this_server(audit_dir, pg, r["pid"])
    assert len(conns) == 2 and len(without_statements(conns, got)) == 1, conns


def test_wrong_password_gets_the_servers_error_and_the_agent_goes_on(pg, audit_dir):
    code = textwrap.dedent(
        f"""
        import asyncio, json, os, asyncpg, psycopg
        out = dict(pid=os.getpid())
        async def attempt(password):
            c = await asyncpg.connect(dsn={url(pg)!r}.replace({pg.password!r}, password))
            try:
                return await c.fetchval("SELECT current_user")
            finally:
                await c.close()
        try:
            asyncio.run(attempt("not-the-password"))
            out["asyncpg"] = "logged in"
        except asyncpg.exceptions.InvalidPasswordError as e:
            out["asyncpg"] = [e.sqlstate, e.severity, e.message]
        try:
            psycopg.connect({pg.dsn!r}.replace("password={pg.password}", "password=not-the-password")).close()
            out["psycopg"] = "logged in"
        except psycopg.OperationalError as e:
            out["psycopg"] = str(e)
        out["right"] = asyncio.run(attempt({pg.password!r}))
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    r = run.report
    assert r["asyncpg"] == ["28P01", "FATAL", 'password authentication failed for user "app"'], r
    assert r["psycopg"].endswith('FATAL:  password authentication failed for user "app"'), r
    assert r["right"] == "app"
    got = read_requests(audit_dir)
    assert [summary(x) for x in got] == [row("read", 1)] and got[0]["statement"] == "SELECT current_user", got
    conns = assert_only_this_server(audit_dir, pg, r["pid"])
    # Logins refused by the server: sessions without statements, and no
    # connection error of the agent's. With sslmode=prefer (both clients'
    # default) a login refused inside TLS (the agent ends the client's TLS
    # when it intercepts) is tried again without TLS, so each client made one
    # plaintext attempt, and one more in TLS if the agent accepted TLS.
    refused = without_statements(conns, got)
    assert [c["tls"] for c in refused].count(None) == 2 and len(refused) in (2, 4), refused
    assert len(conns) == len(refused) + 1, conns
    assert [c["error"] for c in conns] == [None] * len(conns), conns
