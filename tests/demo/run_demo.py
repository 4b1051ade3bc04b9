"""Warden's demo (README): a real LangChain support bot under `warden run`,
then a LangChain SQL agent against a real PostgreSQL.

Run it with `sudo -E cargo xtask demo`, which runs this file with the test
virtual environment's Python and WARDEN_BIN set. By hand, as root:

    WARDEN_BIN=target/release/warden <venv>/bin/python tests/demo/run_demo.py

It starts a stand-in LLM provider on loopback (tests/peers/llm_server.py)
that takes one API key, runs the bot (tests/apps/langchain_app.py) under
Warden with a placeholder key (Warden injects the real one) and a ticket
whose card number Warden redacts, shows the audit with DuckDB, then runs
the bot again under a policy that allows another model only.

Then it starts a real PostgreSQL (tests/peers/pg.py) whose `customers`
table holds card numbers, with a role for the bot whose password only
Warden holds, and runs a LangChain SQL agent (tests/apps/sql_tool_app.py:
ChatOpenAI bound to langchain-community's SQL tool) that connects with a
placeholder user and password. The stand-in model, scripted, has it read
the cards (Warden masks them in the rows), then try an UPDATE (a policy
rule refuses SQL an LLM answer wrote unless it only reads: PostgreSQL error
42501, the table unchanged); the audit shows each of those statements, the
role Warden logged in as, and the LLM call that wrote it.

All traffic stays on 127.0.0.1. The audit is left in target/demo-audit
for you to query, or in the directory WARDEN_DEMO_AUDIT names (new, empty,
or an earlier demo's: the demo empties it first). Exits non-zero, saying
why, if any step does not go as shown.
"""
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "peers"))
from llm_server import start_server  # noqa: E402
from pg import PostgresServer  # noqa: E402
from pki import make_provider_pki  # noqa: E402

WARDEN = os.environ.get("WARDEN_BIN", str(ROOT / "target" / "release" / "warden"))
APP = ROOT / "tests" / "apps" / "langchain_app.py"
SQL_APP = ROOT / "tests" / "apps" / "sql_tool_app.py"
DEFAULT_AUDIT = ROOT / "target" / "demo-audit"
AUDIT = Path(os.environ.get("WARDEN_DEMO_AUDIT") or DEFAULT_AUDIT).resolve()
# Marks a directory the demo wrote, which the next run may empty.
AUDIT_MARKER = ".warden-demo-audit"
PLACEHOLDER_KEY = "sk-placeholder-not-a-real-key"
RULE = "one-model-only"
REAL_KEY = "sk-demo-real-7f3a9c1e5b2d"
CARD = "4111 1111 1111 1111"

# The SQL agent's steps: a CRM database whose customers' cards are on file
# (Luhn-valid test numbers), a role for the bot whose password only Warden holds.
DB_ROLE = "support_bot"
REAL_DB_PASSWORD = "crm-bot-9d4e2a71f6"
DB_RULE = "no-llm-writes"
CUSTOMERS = [
    (1, "Ada Lovelace", "ada@example.com", "4111 1111 1111 1111"),
    (2, "Alan Turing", "alan@example.com", "5555 5555 5555 4444"),
    (3, "Grace Hopper", "grace@example.com", "4012888888881881"),
]
QUESTION = "Which cards do our customers have on file? And Ada Lovelace's new email is ada@newmail.example."
READ_SQL = "SELECT id, name, card FROM customers ORDER BY id"
WRITE_SQL = "UPDATE customers SET email = 'ada@newmail.example' WHERE id = 1"
# What the stand-in model answers to the question, in order: a read, a write, an answer.
SQL_SCRIPT = [
    {"match": "cards do our customers", "tool_calls": [{"name": "sql_db_query", "arguments": {"query": READ_SQL}}]},
    {"match": "cards do our customers", "tool_calls": [{"name": "sql_db_query", "arguments": {"query": WRITE_SQL}}]},
    {"match": "cards do our customers",
     "content": "Ada, Alan and Grace have cards on file. I could not change Ada's email: the database refused."},
]


class DemoFailed(Exception):
    pass


def say(text: str = "", indent: int = 0):
    print(textwrap.indent(text, " " * indent) if text else "", flush=True)


def heading(n: int, title: str):
    say()
    say(f"{n}. {title}")


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def app_env(base_url: str, **extra: str) -> dict:
    """The bot's environment: pointed at the stand-in provider, and nothing
    that could send it elsewhere (LangSmith tracing or gateway, HTTP proxies)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    for k in ("LANGSMITH_GATEWAY", "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
        env.pop(k, None)
    env.update(
        OPENAI_BASE_URL=base_url,
        OPENAI_API_KEY=PLACEHOLDER_KEY,
        LANGCHAIN_TRACING_V2="false",
        LANGSMITH_TRACING="false",
        NO_PROXY="127.0.0.1,localhost,::1",
        # Warden's own log: warnings and errors only, to keep the demo readable.
        WARDEN_LOG="warden=warn",
        **extra,
    )
    return env


def warden_run(env: dict, *warden_args: str, app: Path = APP):
    """The bot under `warden run`; returns (its JSON report, the process)."""
    cmd = [WARDEN, "run", "--audit-dir", str(AUDIT), *warden_args, "--", sys.executable, str(app)]
    shown = ["warden", "run", "--audit-dir", rel(AUDIT), *warden_args, "--", "python", rel(app)]
    say("$ " + " ".join(shown), 3)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        raise DemoFailed("`warden run` did not finish within 5 minutes") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else None
    if report is None:
        raise DemoFailed(
            f"the bot printed no report (exit code {proc.returncode}).\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    # Warden's own warnings and errors, except the one about root that the
    # demo explains; the whole stderr is shown if a step fails.
    for line in proc.stderr.splitlines():
        if (" WARN " in line or " ERROR " in line) and "the program runs as root" not in line:
            say(f"[warden] {line.strip()}", 3)
    return report, proc


def query(sql: str):
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # times are shown in UTC, whatever the host's zone
    for table in ("connections", "requests"):
        glob = AUDIT / table / "**" / "*.parquet"
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
    return con.execute(sql).fetchall()


AUDIT_SQL = """\
SELECT strftime(start_time, '%H:%M:%S.%g') AS time, pid, exe, user,
       dst_addr || ':' || dst_port AS destination, protocol, decision, rule,
       bytes_up, bytes_down, server_name, tls
FROM connections WHERE {where} ORDER BY start_time"""
COLUMNS = ["time (UTC)", "pid", "exe", "user", "destination", "protocol", "decision", "rule", "bytes up", "bytes down",
           "server name", "tls"]


def show_audit(where: str) -> list[tuple]:
    rows = query(AUDIT_SQL.format(where=where))
    table(COLUMNS, rows, numeric={1, 8, 9})
    return rows


REQUESTS_SQL = """\
SELECT strftime(start_time, '%H:%M:%S.%g') AS time, http_method || ' ' || http_path AS request,
       llm_model, llm_stream, http_status, input_tokens, redacted, masked, output_tokens, decision, rule
FROM requests WHERE {where} ORDER BY start_time, seq"""
REQUEST_COLUMNS = ["time (UTC)", "request", "model", "stream", "status", "tokens in", "redacted", "masked", "tokens out",
                   "decision", "rule"]


def show_requests(where: str) -> list[tuple]:
    rows = query(REQUESTS_SQL.format(where=where))
    table(REQUEST_COLUMNS, rows, numeric={4, 5, 6, 7, 8})
    return rows


def table(columns: list[str], rows: list[tuple], numeric: set[int]):
    cells = [columns] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        say("  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip(), 3)
        if n == 0:
            say("  ".join("-" * w for w in widths), 3)


def check_policy(path: Path) -> str:
    proc = subprocess.run([WARDEN, "policy", "check", rel(path)], capture_output=True, text=True)
    say(f"$ warden policy check {rel(path)}", 3)
    say((proc.stdout + proc.stderr).strip(), 3)
    if proc.returncode != 0:
        raise DemoFailed(f"`warden policy check {path}` failed")
    return proc.stdout


def demo(tmp: Path):
    title = "Warden demo: a LangChain support bot and a SQL agent, their LLM and database traffic, and the audit"
    say(title)
    say("=" * len(title))

    if AUDIT.exists():
        # An earlier demo's audit is removed; never a directory that
        # WARDEN_DEMO_AUDIT names by mistake (a real audit, say).
        if AUDIT != DEFAULT_AUDIT.resolve() and any(AUDIT.iterdir()) and not (AUDIT / AUDIT_MARKER).exists():
            raise DemoFailed(f"{AUDIT} is not empty and not an earlier demo's audit: "
                             "give WARDEN_DEMO_AUDIT a new or empty directory")
        shutil.rmtree(AUDIT)
    AUDIT.mkdir(parents=True)
    (AUDIT / AUDIT_MARKER).write_text("written by tests/demo/run_demo.py, which empties this directory when it runs\n")

    # The provider speaks HTTPS with a certificate from its own CA; only the
    # agent is told to trust that CA, the bot trusts the agent's. It takes
    # one API key, which only Warden holds.
    pki = make_provider_pki(tmp / "provider-pki")
    key_file = tmp / "provider.key"
    key_file.write_text(REAL_KEY + "\n")
    key_file.chmod(0o600)
    server, port = start_server("127.0.0.1", 0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                api_key=REAL_KEY)
    base_url = f"https://localhost:{port}/v1"
    tls_args = ("--state-dir", str(tmp / "state"), "--upstream-ca", str(pki / "ca.pem"))
    try:
        heading(1, "A stand-in LLM provider")
        say(f"An OpenAI-compatible server listens on {base_url}. It plays the part of the", 3)
        say("provider (which this machine cannot reach) and echoes what it is asked. Its", 3)
        say("certificate comes from a CA of its own, which only Warden's agent is told to trust", 3)
        say("(--upstream-ca); the bot is given no certificate settings at all. It accepts one", 3)
        say(f"API key, {REAL_KEY[:12]}..., kept in a root-only file that only Warden reads.", 3)

        heading(2, "The policy")
        policy = tmp / "support-bot.yaml"
        policy.write_text(
            textwrap.dedent(
                f"""\
                version: 1
                targets:
                  llm-provider: {{ address: "127.0.0.1", port: {port}, protocol: llm }}
                # The bot holds a placeholder; Warden sends the real key.
                credentials:
                  llm-provider: {{ api_key_file: {key_file} }}
                # As Warden's built-in policy: card numbers, SSNs and secrets are
                # redacted in prompts and masked in answers, streams included.
                prompt_redact: {{ detectors: [payment, ssn, secrets] }}
                response_mask: {{ detectors: [payment, ssn, secrets] }}
                """
            )
        )
        say(policy.read_text().rstrip(), 5)
        check_policy(policy)

        heading(3, "The support bot, under Warden")
        say(f"The bot ({rel(APP)}) answers a customer ticket with a LangChain chain,", 3)
        say("streams the answer, and files a summary with the plain OpenAI SDK. The ticket holds", 3)
        say(f"the customer's card number, {CARD}. The bot's API key is a placeholder,", 3)
        say(f"{PLACEHOLDER_KEY!r}. Warden starts its agent, puts the bot in a fresh cgroup,", 3)
        say("and sends each of the bot's outbound TCP connections through the agent's proxy.", 3)
        say("Here the bot runs as root, because its Python environment lives under /root;", 3)
        say("in production, run it as its service user: `warden run --user bot-svc -- ...`.", 3)
        say()
        t0 = time.monotonic()
        report, proc = warden_run(app_env(base_url), "--policy", rel(policy), *tls_args)
        if proc.returncode != 0 or not report.get("ok"):
            raise DemoFailed(f"the bot failed (exit code {proc.returncode}): {report}\n{proc.stderr}")
        say()
        say(f"The bot (pid {report['pid']}) ran and exited 0 in {time.monotonic() - t0:.1f} s; Warden flushed the audit.", 3)
        say(f"It got {len(report['answers'])} answers, one streamed in {report['streamed_chunks']} chunks. The first:", 3)
        say(textwrap.fill(report["answers"][0], 84, initial_indent='"', subsequent_indent=" ") + '"', 5)
        received = server.requests
        kinds = Counter(f"{r['method']} {r['path']}" for r in received)
        streamed = sum(r["stream"] for r in received)
        say(f"The provider received {len(received)} requests ({streamed} streamed): "
            + ", ".join(f"{k} x{n}" for k, n in kinds.items()) + ".", 3)
        sent = received[0]["body"]["messages"][-1]["content"]
        if CARD in json.dumps([r["body"] for r in received]):
            raise DemoFailed("the card number reached the provider")
        say("What the provider got of the ticket:", 3)
        say(textwrap.fill(sent, 84, initial_indent='"', subsequent_indent=" ") + '"', 5)
        keys = {r["auth"].get("authorization", {}).get("prefix") for r in received}
        if keys != {REAL_KEY[:8]}:
            raise DemoFailed(f"the provider did not get the real key on every request: {keys}")
        say(f"and on every request the real key ({REAL_KEY[:8]}...), which the bot never held.", 3)

        heading(4, "The audit, read with DuckDB")
        rows = show_audit(f"pid = {report['pid']}")
        if not rows:
            raise DemoFailed(f"the audit in {AUDIT} has no rows for the bot")
        say()
        say(f"{len(rows)} connections captured, each attributed to the bot's process. Warden ended", 3)
        say("the bot's TLS with a certificate its own CA made for the name the bot asked for,", 3)
        say("which the bot trusted through the bundle `warden run` gave it (SSL_CERT_FILE), and", 3)
        say("verified the provider itself. Inside, it decoded HTTP: one row per request.", 3)
        if any(r[11] != "intercepted" for r in rows):
            raise DemoFailed("the bot's TLS was not intercepted")
        if any(r[4] != f"127.0.0.1:{port}" or r[6] != "allow" for r in rows):
            raise DemoFailed("the audit shows connections other than the bot's allowed calls to the provider")
        say()
        calls = show_requests(f"pid = {report['pid']}")
        if len(calls) != len(received) or sum(c[6] for c in calls) < 3:
            raise DemoFailed(f"the requests table does not show the redacted calls: {calls}")
        say()
        say("Each LLM call, with its model, whether it streamed, what was redacted from the", 3)
        say("prompt before it left the host, what was masked in the answer, and token usage.", 3)
        say("The prompt and answer themselves are in the `prompt` and `response` columns.", 3)

        heading(5, "A policy that allows one model only")
        say("The bot asks for gpt-4o-mini; this policy lets it use gpt-4.1-mini only:", 3)
        limited = tmp / "one-model.yaml"
        limited.write_text(
            policy.read_text()
            + textwrap.dedent(
                f"""\
                rules:
                  - name: {RULE}
                    when: {{ target: llm-provider, llm: {{ endpoint: [chat] }} }}
                    action: allow
                    limits: {{ models: ["gpt-4.1-mini"] }}
                """
            )
        )
        say("rules:" + limited.read_text().split("rules:", 1)[1].rstrip(), 5)
        check_policy(limited)
        before = len(server.requests)
        say()
        report, proc = warden_run(app_env(base_url, DEMO_EXPECT_DENY="1"), "--policy", rel(limited), *tls_args)
        if proc.returncode != 0 or not report.get("denied"):
            raise DemoFailed(f"the bot's calls were not refused as expected: {report}\n{proc.stderr}")
        say()
        for call in report["calls"]:
            kind = call["error_type"].rsplit(".", 1)[1]
            say(f"{call['via']:>9} call: {kind}: {call['error']!r} after {call['elapsed_s']:.2f} s", 3)
        say("The bot's SDK raised the provider's own kind of error, with the reason, at once.", 3)
        if len(server.requests) != before:
            raise DemoFailed("a request reached the provider although the policy denies it")
        say("The provider received nothing. The audit records each refused call:", 3)
        say()
        denied = show_requests(f"pid = {report['pid']}")
        if not denied or any(r[9] != "deny" or r[10] != RULE for r in denied):
            raise DemoFailed(f"the audit does not show the denies with rule {RULE}")

        sql_agent(tmp, server, port, key_file, tls_args)
    finally:
        server.close()

    say()
    say(f"Done. The audit stays in {rel(AUDIT)}; query it with DuckDB, e.g.:")
    say(f"SELECT * FROM read_parquet('{rel(AUDIT)}/requests/**/*.parquet', hive_partitioning = true);", 3)


def sql_agent(tmp: Path, server, port: int, key_file: Path, tls_args: tuple):
    """Steps 6 to 9: a LangChain SQL agent against a real PostgreSQL."""
    heading(6, "A LangChain SQL agent and a real PostgreSQL")
    pg = PostgresServer()  # initdb into a fresh directory, listening on 127.0.0.1 only
    try:
        values = ", ".join(f"({i}, '{n}', '{e}', '{c}')" for i, n, e, c in CUSTOMERS)
        pg.psql_admin(
            "CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card text); "
            f"INSERT INTO customers VALUES {values}; "
            f"CREATE ROLE {DB_ROLE} LOGIN PASSWORD '{REAL_DB_PASSWORD}'; "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON customers TO {DB_ROLE}",
            database=pg.database,
        )
        password_file = tmp / "crm-db.password"
        password_file.write_text(REAL_DB_PASSWORD + "\n")
        password_file.chmod(0o600)
        say(f"A PostgreSQL server listens on 127.0.0.1:{pg.port}. Its database {pg.database!r} has a", 3)
        say("`customers` table with the customers' cards on file; as its owner sees it (psql):", 3)
        say()
        before = admin_customers(pg)
        table(["id", "name", "email", "card"], before, numeric={0})
        say()
        say(f"The bot's role, {DB_ROLE}, may read and change the table (SELECT, INSERT, UPDATE,", 3)
        say(f"DELETE). Its password, {REAL_DB_PASSWORD[:8]}..., is in a root-only file that only Warden", 3)
        say("reads: the bot connects as user 'placeholder' with password 'placeholder'.", 3)
        say()
        say(f"The bot ({rel(SQL_APP)}) is a LangChain SQL agent: ChatOpenAI bound to", 3)
        say("langchain-community's SQL tool (SQLDatabase.from_uri + QuerySQLDatabaseTool, over", 3)
        say("SQLAlchemy and psycopg), and a loop that runs the tool calls the model makes. The", 3)
        say("stand-in model is scripted as a model would answer this question:", 3)
        say(f'"{QUESTION}"', 5)
        say(f"first a tool call that reads the cards: {READ_SQL}", 3)
        say(f"then one that changes Ada's email: {WRITE_SQL}", 3)
        say("then its answer.", 3)

        heading(7, "The policy for the agent")
        policy = tmp / "sql-agent.yaml"
        policy.write_text(
            textwrap.dedent(
                f"""\
                version: 1
                targets:
                  llm-provider: {{ address: "127.0.0.1", port: {port}, protocol: llm }}
                  crm-db: {{ address: "127.0.0.1", port: {pg.port}, protocol: postgres }}
                # The bot holds placeholders; Warden sends the real key, and logs in
                # to the database itself as {DB_ROLE} with the real password.
                credentials:
                  llm-provider: {{ api_key_file: {key_file} }}
                  crm-db: {{ user: {DB_ROLE}, password_file: {password_file} }}
                prompt_redact: {{ detectors: [payment, ssn, secrets] }}
                response_mask: {{ detectors: [payment, ssn, secrets] }}
                # Card numbers, SSNs and secrets are masked in the rows the bot reads.
                sql_mask: {{ detectors: [payment, ssn, secrets] }}
                rules:
                  # The app may write; SQL that an LLM answer wrote may only read.
                  - name: {DB_RULE}
                    when: {{ target: crm-db, sql: {{ class: [write, ddl, privilege, unknown], from_llm: true }} }}
                    action: deny
                """
            )
        )
        say(policy.read_text().rstrip(), 5)
        check_policy(policy)

        heading(8, "The SQL agent, under Warden")
        server.script.entries.extend(json.loads(json.dumps(SQL_SCRIPT)))
        before_llm = len(server.requests)
        env = app_env(
            f"https://localhost:{port}/v1",
            DATABASE_URL=f"postgresql+psycopg://placeholder:placeholder@127.0.0.1:{pg.port}/{pg.database}",
            QUESTION=QUESTION,
        )
        if any(REAL_DB_PASSWORD in v for v in env.values()):
            raise DemoFailed("the demo gave the bot the real database password")
        t0 = time.monotonic()
        report, proc = warden_run(env, "--policy", rel(policy), *tls_args, app=SQL_APP)
        if proc.returncode != 0 or report.get("answer") is None:
            raise DemoFailed(f"the SQL agent failed (exit code {proc.returncode}): {report}\n{proc.stderr}")
        say()
        say(f"The agent (pid {report['pid']}) ran and exited 0 in {time.monotonic() - t0:.1f} s.", 3)
        calls = report["calls"]
        if [c["query"] for c in calls] != [READ_SQL, WRITE_SQL]:
            raise DemoFailed(f"the agent did not make the scripted tool calls: {calls}")
        read, write = calls
        say("Its first tool call read the cards; what the SQL tool returned to it, and so to the", 3)
        say("model:", 3)
        # The tool returns the rows as Python prints them; one row a line here.
        say(read["result"].replace("), (", "),\n ("), 5)
        seen = json.dumps(report) + proc.stdout + proc.stderr
        seen_digits = "".join(seen.split())
        leaked = [c for *_, c in CUSTOMERS if c in seen or "".join(c.split()) in seen_digits]
        if leaked:
            raise DemoFailed(f"card numbers reached the app unmasked: {leaked}\n{read['result']}")
        # Each card masked as the detector does: every digit but the last 4 a star, separators kept.
        masked = [(i, n, re.sub(r"\d", "*", c[:-4]) + c[-4:]) for i, n, _, c in CUSTOMERS]
        try:
            got = ast.literal_eval(read["result"])
        except (SyntaxError, ValueError):
            got = None
        if got != masked:
            raise DemoFailed(f"the read did not return every customer with the card masked: {read['result']}")
        sent = server.requests[before_llm:]
        if any(c in json.dumps([r["body"] for r in sent]) for *_, c in CUSTOMERS):
            raise DemoFailed("a card number reached the LLM provider")
        if {r["auth"].get("authorization", {}).get("prefix") for r in sent} != {REAL_KEY[:8]}:
            raise DemoFailed("the provider did not get the real key on every request of the SQL agent")
        say("Warden masked each card in the rows on their way to the app (sql_mask): the model", 3)
        say("never saw one either.", 3)
        say()
        say("Its second tool call tried to change Ada's email; the tool returned the error:", 3)
        # As SQLAlchemy words it: the driver's error, then the SQL and a link, left out here.
        error = write["result"].split("[SQL:", 1)[0].strip()
        say(error, 5)
        # psycopg raises InsufficientPrivilege for SQLSTATE 42501 (the audit has the code itself).
        if not error.startswith(f'Error: (psycopg.errors.InsufficientPrivilege) permission denied by Warden policy '
                                f'rule "{DB_RULE}"'):
            raise DemoFailed(f"the write was not refused by rule {DB_RULE}: {write['result']}")
        after = admin_customers(pg)
        if after != before:
            raise DemoFailed(f"the customers table changed although the write was refused: {after}")
        say("That is PostgreSQL's error for SQLSTATE 42501 (insufficient_privilege), naming the", 3)
        say(f"rule: the UPDATE never reached the server, although {DB_ROLE} may run it. On the", 3)
        say("server itself (psql, not through Warden) the table is as it was:", 3)
        say()
        table(["id", "name", "email", "card"], after, numeric={0})
        say()
        say("The model's answer:", 3)
        say(textwrap.fill(report["answer"], 84, initial_indent='"', subsequent_indent=" ") + '"', 5)
        connected_as = report["connected_as"]
        if DB_ROLE not in connected_as:
            raise DemoFailed(f"the agent's session does not run as {DB_ROLE}: {connected_as}")
        digest = hashlib.sha256(REAL_DB_PASSWORD.encode()).hexdigest()
        if digest in report["env_sha256"] or REAL_DB_PASSWORD in seen:
            raise DemoFailed("the agent saw the real database password")
        say(f"The app asked for user 'placeholder'; `SELECT current_user` gave it {connected_as}:", 3)
        say(f"Warden logged in as {DB_ROLE} with the password from its file (SCRAM-SHA-256). The", 3)
        say("password is in none of the app's environment variables, output or errors.", 3)

        heading(9, "The agent's statements in the audit, read with DuckDB")
        show_lineage(report["pid"], [READ_SQL, WRITE_SQL])
    finally:
        pg.stop()


def admin_customers(pg) -> list[tuple]:
    """The customers table as the server holds it (psql as postgres, not through Warden)."""
    out = pg.psql_admin("SELECT id, name, email, card FROM customers ORDER BY id", database=pg.database)
    return [tuple(line.split("|")) for line in out.splitlines()]


LINEAGE_SQL = """\
SELECT statement, statement_class, decision, rule, sqlstate, masked, db_user, caused_by_session_id, caused_by_seq,
       caused_by_match
FROM requests WHERE pid = {pid} AND protocol = 'postgres' ORDER BY start_time, seq"""
LLM_CALLS_SQL = """\
SELECT session_id, seq, llm_model, tool_calls, response
FROM requests WHERE pid = {pid} AND protocol = 'llm' ORDER BY start_time, seq"""


def tool_query(call: str):
    """The `query` argument of a tool call as the audit's `tool_calls` holds it."""
    try:
        return json.loads(json.loads(call)["arguments"]).get("query")
    except (ValueError, KeyError, AttributeError):
        return None


def short(session_id) -> str:
    """A session id (a UUIDv7) in the tables: its random end tells sessions apart."""
    return "..." + session_id[-8:] if session_id else ""


def show_lineage(pid: int, model_sql: list[str]):
    rows = query(LINEAGE_SQL.format(pid=pid))
    llm = query(LLM_CALLS_SQL.format(pid=pid))
    if not rows or not llm:
        raise DemoFailed(f"the audit in {AUDIT} has no statements or no LLM calls for the agent")
    by_model = [r for r in rows if r[7] is not None]
    own = [r for r in rows if r[7] is None]
    shown = [(*r[:7], short(r[7]), *r[8:]) for r in by_model]
    table(["statement", "class", "decision", "rule", "sqlstate", "masked", "db_user", "caused_by_session_id",
           "caused_by_seq", "caused_by_match"], shown, numeric={5, 8})
    say()
    say("The statements the model wrote, each linked (caused_by_*) to the LLM call whose tool", 3)
    say("call carried it: the read allowed with its cards masked, the write denied by the rule.", 3)
    say("Those LLM calls:", 3)
    say()
    calls = {(s, q): (m, t, a) for s, q, m, t, a in llm}
    shown = []
    for s, q, model, tools, answer in llm:
        wrote = "; ".join(f"{json.loads(t)['name']}({tool_query(t)})" for t in tools)
        shown.append((short(s), q, model, wrote or f"answer: {answer}"))
    table(["session_id", "seq", "model", "tool calls"], shown, numeric={1})
    say()
    say(f"Every statement ran as {DB_ROLE}. The app's own {len(own)} statements (SQLAlchemy's BEGIN and", 3)
    say("ROLLBACK, its look at the schema, SELECT current_user) are in the table too, with no", 3)
    say("caused_by_*. The rule holds only for SQL that an LLM answer carried: the app's own", 3)
    say("writes would go through.", 3)

    expected = [(READ_SQL, "read", "allow", "default", None, len(CUSTOMERS)),
                (WRITE_SQL, "write", "deny", DB_RULE, "42501", 0)]
    if [r[:6] for r in by_model] != expected:
        raise DemoFailed(f"the audit does not show the model's read masked and its write denied: {by_model}")
    for statement, r in zip(model_sql, by_model):
        source = calls.get((r[7], r[8]))
        if source is None or not any(tool_query(t) == statement for t in source[1]):
            raise DemoFailed(f"the audit does not link {statement!r} to the LLM call that wrote it: {r}")
    if any(r[6] != DB_ROLE for r in rows):
        raise DemoFailed(f"not every statement ran as {DB_ROLE}: {sorted({r[6] for r in rows}, key=str)}")
    if any(r[2] != "allow" for r in own):
        raise DemoFailed(f"the app's own statements were not all allowed: {own}")


def main() -> int:
    if os.geteuid() != 0:
        print("the demo loads eBPF programs: run it as root (`sudo -E cargo xtask demo`)", file=sys.stderr)
        return 1
    if not Path(WARDEN).exists():
        print(f"{WARDEN} does not exist: run `cargo xtask build`", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="warden-demo."))
    try:
        demo(tmp)
    except DemoFailed as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
