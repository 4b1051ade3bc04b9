"""Lineage: a real LangChain SQL agent under `warden run`, the model's
answers scripted; the audit links each statement the model wrote, and each
URL it had the app fetch, to the LLM call that wrote it, and none of the
statements and requests the app sends on its own (some of the same shape).
Policy can tell the two apart."""
import json
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import read_requests, warden_run  # noqa: E402
from llm_fixtures import app_env, llm_server  # noqa: E402,F401 - fixtures

APP = Path(__file__).resolve().parents[1] / "apps" / "sql_agent_app.py"

SCRIPT = [
    # Formatted as models write SQL; the app tidies the whitespace: a normalized match.
    {"match": "open tickets", "tool_calls": [{"name": "run_sql", "arguments": {
        "query": "SELECT id, subject\n  FROM tickets\n WHERE status = 'open'\n ORDER BY id"}}]},
    {"match": "close ticket 2", "tool_calls": [{"name": "run_sql", "arguments": {
        "query": "UPDATE tickets SET status = 'closed' WHERE id = 2"}}]},
    {"match": "how many customers", "tool_calls": [{"name": "run_sql", "arguments": {
        "query": "SELECT count(*) FROM customers"}}]},
]
QUESTIONS = [
    "Which are the open tickets?",
    "Please close ticket 2.",
    "And how many customers do we have?",
    "Show the model details.",
]


def script(llm_server):  # noqa: F811
    # The model has the app fetch a URL of the test server (its models API).
    url = f"{llm_server.base_url}/models/gpt-4o-mini?detail=full"
    return json.loads(json.dumps(SCRIPT)) + [
        {"match": "model details", "tool_calls": [{"name": "fetch", "arguments": {"url": url}}]}
    ]


@pytest.fixture
def pg():
    server = PostgresServer()
    with psycopg.connect(server.dsn, autocommit=True) as c:
        c.execute("CREATE TABLE tickets (id int PRIMARY KEY, subject text, status text)")
        c.execute("INSERT INTO tickets VALUES (1, 'refund', 'open'), (2, 'login', 'open'), (3, 'invoice', 'closed')")
        c.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        c.execute("INSERT INTO customers VALUES (1, 'Ada'), (2, 'Bob')")
        c.execute("CREATE TABLE bot_log (question text, answer text)")
    yield server
    server.stop()


def run_agent(llm_server, pg, audit_dir, *extra):  # noqa: F811
    llm_server.server.script.entries.extend(script(llm_server))
    env = app_env(
        llm_server, DATABASE_URL=pg.dsn, QUESTIONS=json.dumps(QUESTIONS), MODELS_URL=f"{llm_server.base_url}/models"
    )
    code = f"import runpy; runpy.run_path({str(APP)!r}, run_name='__main__')"
    run = warden_run(code, audit_dir, *extra, env=env)
    assert run.returncode == 0 and run.report, run.stdout + run.stderr
    return run.report


def test_statements_are_linked_to_the_llm_call_that_wrote_them(llm_server, pg, audit_dir):  # noqa: F811
    report = run_agent(llm_server, pg, audit_dir)
    ran = report["ran"]
    assert [r["by"] for r in ran].count("model") == 3 and len(ran) == 12

    rows = read_requests(audit_dir)
    llm = {(r["session_id"], r["seq"]): r for r in rows if r["protocol"] == "llm"}
    statements = [r for r in rows if r["protocol"] == "postgres"]
    assert len(statements) == len(ran), [s["statement"] for s in statements]

    s_linked, s_expected, s_hits, kinds = tally(
        zip(statements, ran),
        llm,
        report["pid"],
        # The link names the call whose tool call carried this statement.
        lambda args, sent, row: " ".join(args["query"].split()) == row["statement"],
    )
    # The HTTP requests the app made: its own listing, and the model's URL.
    fetched = report["fetched"]
    assert [f["by"] for f in fetched] == ["app", "model"]
    http = [r for r in rows if r["protocol"] == "http"]
    assert [r["http_path"] for r in http] == ["/v1/models", "/v1/models/gpt-4o-mini"], http
    h_linked, h_expected, h_hits, h_kinds = tally(
        zip(http, fetched), llm, report["pid"], lambda args, sent, row: args["url"] == sent["url"]
    )
    linked, expected, hits = s_linked + h_linked, s_expected + h_expected, s_hits + h_hits
    kinds += h_kinds
    precision, recall = hits / linked, hits / expected
    print(
        f"lineage over {len(ran)} statements and {len(fetched)} HTTP requests: "
        f"precision {precision:.2f}, recall {recall:.2f}, matches {kinds}"
    )
    assert (precision, recall) == (1.0, 1.0)
    assert kinds == ["normalized", "exact", "exact", "exact"]


def tally(pairs, llm, pid, carried):
    """Over (audit row, what the app did) pairs: how many rows are linked,
    how many the model chose, how many of those are linked, and how they
    matched. A link must name the LLM call whose tool call `carried` what
    was run (given its arguments), made by the same process; a row the app
    sent on its own must have no link."""
    linked, expected, hits, kinds = 0, 0, 0, []
    for row, sent in pairs:
        by_model = sent["by"] == "model"
        is_linked = row["caused_by_session_id"] is not None
        expected += by_model
        linked += is_linked
        if by_model and is_linked:
            hits += 1
            kinds.append(row["caused_by_match"])
            source = llm[(row["caused_by_session_id"], row["caused_by_seq"])]
            (call,) = source["tool_calls"]
            assert carried(json.loads(json.loads(call)["arguments"]), sent, row), (call, row)
            assert source["pid"] == row["pid"] == pid
        else:
            assert not is_linked, f"the app's own request was credited to the model: {row}"
    return linked, expected, hits, kinds


def test_policy_refuses_llm_written_writes_but_not_the_apps_own(llm_server, pg, audit_dir, tmp_path):  # noqa: F811
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """
            version: 1
            rules:
              - name: no-llm-writes
                when: { sql: { class: [write, ddl, privilege, unknown], from_llm: true } }
                action: deny
            """
        )
    )
    report = run_agent(llm_server, pg, audit_dir, "--policy", str(policy))
    # The model's UPDATE was refused (the tool saw the error); the app's own INSERTs went through.
    with psycopg.connect(pg.dsn) as c:
        assert c.execute("SELECT status FROM tickets WHERE id = 2").fetchone() == ("open",)
        assert c.execute("SELECT count(*) FROM bot_log").fetchone() == (4,)
    rows = [r for r in read_requests(audit_dir) if r["protocol"] == "postgres"]
    denied = [(r["statement"], r["rule"], r["sqlstate"]) for r in rows if r["decision"] == "deny"]
    assert denied == [("UPDATE tickets SET status = 'closed' WHERE id = 2", "no-llm-writes", "42501")]
    assert report["answers"][1].startswith("Tool result: error:")
