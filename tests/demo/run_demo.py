"""Warden's demo (README): a real LangChain support bot under `warden run`.

Run it with `sudo -E cargo xtask demo`, which runs this file with the test
virtual environment's Python and WARDEN_BIN set. By hand, as root:

    WARDEN_BIN=target/release/warden <venv>/bin/python tests/demo/run_demo.py

It starts a stand-in LLM provider on loopback (tests/peers/llm_server.py)
that takes one API key, runs the bot (tests/apps/langchain_app.py) under
Warden with a placeholder key (Warden injects the real one) and a ticket
whose card number Warden redacts, shows the audit with DuckDB, then runs
the bot again under a policy that allows another model only. All traffic stays on 127.0.0.1. The audit is left in
target/demo-audit for you to query. Exits non-zero, saying why, if any step
does not go as shown.
"""
import json
import os
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
from pki import make_provider_pki  # noqa: E402

WARDEN = os.environ.get("WARDEN_BIN", str(ROOT / "target" / "release" / "warden"))
APP = ROOT / "tests" / "apps" / "langchain_app.py"
AUDIT = ROOT / "target" / "demo-audit"
PLACEHOLDER_KEY = "sk-placeholder-not-a-real-key"
RULE = "one-model-only"
REAL_KEY = "sk-demo-real-7f3a9c1e5b2d"
CARD = "4111 1111 1111 1111"


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


def warden_run(env: dict, *warden_args: str):
    """The bot under `warden run`; returns (its JSON report, the process)."""
    cmd = [WARDEN, "run", "--audit-dir", str(AUDIT), *warden_args, "--", sys.executable, str(APP)]
    shown = ["warden", "run", "--audit-dir", rel(AUDIT), *warden_args, "--", "python", rel(APP)]
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
    say("Warden demo: a LangChain support bot, its LLM traffic, and the audit")
    say("=" * 68)

    if AUDIT.exists():
        shutil.rmtree(AUDIT)
    AUDIT.mkdir(parents=True)

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
    finally:
        server.close()

    say()
    say(f"Done. The audit stays in {rel(AUDIT)}; query it with DuckDB, e.g.:")
    say(f"SELECT * FROM read_parquet('{rel(AUDIT)}/requests/**/*.parquet', hive_partitioning = true);", 3)


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
