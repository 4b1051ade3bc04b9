"""Warden's demo (README): a real LangChain support bot under `warden run`.

Run it with `sudo -E cargo xtask demo`, which runs this file with the test
virtual environment's Python and WARDEN_BIN set. By hand, as root:

    WARDEN_BIN=target/release/warden <venv>/bin/python tests/demo/run_demo.py

It starts a stand-in LLM provider on loopback (tests/peers/llm_server.py),
runs the bot (tests/apps/langchain_app.py) under Warden, shows the audit
with DuckDB, then runs the bot again under a policy that blocks the
provider. All traffic stays on 127.0.0.1. The audit is left in
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
RULE = "block-llm-provider"


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
    glob = AUDIT / "connections" / "**" / "*.parquet"
    con.execute(f"CREATE VIEW connections AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true)")
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
    cells = [COLUMNS] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    numeric = {1, 8, 9}
    for n, row in enumerate(cells):
        say("  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip(), 3)
        if n == 0:
            say("  ".join("-" * w for w in widths), 3)
    return rows


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
    # agent is told to trust that CA, the bot trusts the agent's.
    pki = make_provider_pki(tmp / "provider-pki")
    server, port = start_server("127.0.0.1", 0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    base_url = f"https://localhost:{port}/v1"
    tls_args = ("--state-dir", str(tmp / "state"), "--upstream-ca", str(pki / "ca.pem"))
    try:
        heading(1, "A stand-in LLM provider")
        say(f"An OpenAI-compatible server listens on {base_url}. It plays the part of the", 3)
        say("provider (which this machine cannot reach) and echoes what it is asked. Its", 3)
        say("certificate comes from a CA of its own, which only Warden's agent is told to trust", 3)
        say("(--upstream-ca); the bot is given no certificate settings at all.", 3)

        heading(2, "The support bot, under Warden")
        say(f"The bot ({rel(APP)}) answers a customer ticket with a LangChain chain,", 3)
        say("streams the answer, and files a summary with the plain OpenAI SDK. Warden starts", 3)
        say("its agent, puts the bot in a fresh cgroup, and sends each of the bot's outbound", 3)
        say("TCP connections through the agent's proxy.", 3)
        say("Here the bot runs as root, because its Python environment lives under /root;", 3)
        say("in production, run it as its service user: `warden run --user bot-svc -- ...`.", 3)
        say()
        t0 = time.monotonic()
        report, proc = warden_run(app_env(base_url), *tls_args)
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
        say("(The ticket's card number 4111 1111 1111 1111 reached it as typed: redaction comes later.)", 3)

        heading(3, "The audit, read with DuckDB")
        rows = show_audit(f"pid = {report['pid']}")
        if not rows:
            raise DemoFailed(f"the audit in {AUDIT} has no rows for the bot")
        say()
        say(f"{len(rows)} connections captured, each attributed to the bot's process, with the", 3)
        say("protocol Warden recognised and the bytes each way (one connection carries several", 3)
        say("requests: HTTP keep-alive). Warden ended the bot's TLS with a certificate its own", 3)
        say("CA made for the name the bot asked for (server name), which the bot trusted through", 3)
        say("the bundle `warden run` gave it (SSL_CERT_FILE), and verified the provider itself.", 3)
        if any(r[11] != "intercepted" for r in rows):
            raise DemoFailed("the bot's TLS was not intercepted")
        if any(r[4] != f"127.0.0.1:{port}" or r[6] != "allow" for r in rows):
            raise DemoFailed("the audit shows connections other than the bot's allowed calls to the provider")

        heading(4, "Policy")
        say("Without --policy, Warden uses its built-in policy: allow and record everything,", 3)
        say("and mask card numbers, SSNs and secrets in database results.", 3)
        check_policy(ROOT / "policies" / "default.yaml")
        say()
        say("Now a policy that blocks the provider:", 3)
        policy = tmp / "block-llm.yaml"
        policy.write_text(
            textwrap.dedent(
                f"""\
                version: 1
                default: audit
                targets:
                  llm-provider: {{ address: "127.0.0.1/32", port: {port} }}
                rules:
                  - name: {RULE}
                    when: {{ target: llm-provider }}
                    action: deny
                """
            )
        )
        say(policy.read_text().rstrip(), 5)
        check_policy(policy)

        heading(5, "The bot again, with the provider blocked")
        before = len(server.requests)
        report, proc = warden_run(app_env(base_url, DEMO_EXPECT_DENY="1"), "--policy", str(policy), *tls_args)
        if proc.returncode != 0 or not report.get("denied"):
            raise DemoFailed(f"the bot's calls were not refused as expected: {report}\n{proc.stderr}")
        say()
        for call in report["calls"]:
            kind = call["error_type"].rsplit(".", 1)[1]
            if call["error_type"] != "openai.APIConnectionError":
                kind += " (LangChain's subclass of openai.APIConnectionError)"
            say(f"{call['via']:>9} call: {kind}: {call['error']!r} after {call['elapsed_s']:.2f} s", 3)
        say("The bot failed at once with a clear error (one retry included), instead of", 3)
        say("hanging until its 30 s timeout.", 3)
        if len(server.requests) != before:
            raise DemoFailed("a request reached the provider although the policy denies it")
        say("The provider received nothing. The audit records each refused attempt:", 3)
        say()
        denied = show_audit(f"pid = {report['pid']}")
        if not denied or any(r[6] != "deny" or r[7] != RULE for r in denied):
            raise DemoFailed(f"the audit does not show the denies with rule {RULE}")
        say()
        say(f"{len(denied)} connections refused by rule `{RULE}`, before any byte left.", 3)
    finally:
        server.close()

    say()
    say(f"Done. The audit stays in {rel(AUDIT)}; query it with DuckDB, e.g.:")
    say(f"SELECT * FROM read_parquet('{rel(AUDIT)}/connections/**/*.parquet', hive_partitioning = true);", 3)


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
