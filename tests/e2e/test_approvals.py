"""Hold for approval: a statement a rule holds waits, with its client, until
reviewers signed in with a real OIDC provider (oidc-provider-mock) decide
through `warden approvals`; approved it runs, rejected or expired the client
gets SQLSTATE 42501 with the reason. Segregation of duties: a reviewer
outside the rule's groups, a workload owner, a second approval by the same
person, and tokens that are forged, for another client, from another issuer
or expired are all refused, and every step is an `approvals` audit row."""
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from oidc import OidcProvider, tamper_signature  # noqa: E402
from pg import PostgresServer  # noqa: E402

from conftest import WARDEN, read_requests  # noqa: E402

REVIEWER = "dana@example.com"  # in the dba group
OWNER = "olga@example.com"  # in the dba group, but owns the workload
OUTSIDER = "sam@example.com"  # not in the dba group


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    server.psql_admin("CREATE TABLE customers (id serial PRIMARY KEY, name text)", database=server.database)
    server.psql_admin(f"GRANT ALL ON customers, customers_id_seq TO {server.user}", database=server.database)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idp():
    with OidcProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def tokens(idp):
    """One genuine token per person, as signing in would give them."""
    return {
        "reviewer": idp.id_token(REVIEWER, groups=["dba"], email=REVIEWER),
        "second": idp.id_token("erin@example.com", groups=["dba", "ops"], email="erin@example.com"),
        "owner": idp.id_token(OWNER, groups=["dba"], email=OWNER),
        "outsider": idp.id_token(OUTSIDER, groups=["support"], email=OUTSIDER),
    }


class Webhook:
    """A loopback receiver in the place of a Slack incoming webhook."""

    def __init__(self):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/approvals"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def policy(tmp_path: Path, pg: PostgresServer, idp: OidcProvider, quorum: int = 1, expires: str = "10m",
           webhook: str | None = None) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        workloads:
          bot:
            match: {{ exe: "{os.path.realpath(sys.executable)}" }}
            owners: ["{OWNER}"]
        targets:
          crm: {{ address: 127.0.0.1, port: {pg.port}, protocol: postgres }}
        rules:
          - name: writes-need-a-dba
            when: {{ target: crm, sql: {{ class: [write, ddl] }} }}
            action: approve
            approve: {{ groups: [dba], quorum: {quorum}, expires: {expires}, message: "ask #dba" }}
        approvals:
          oidc: {{ issuer: "{idp.issuer}", client_id: warden }}
        """))
    if webhook:
        path.write_text(path.read_text() + f"  webhook: {webhook}\n")
    return path


# The program: a read, then a held write; prints what it saw, notices included.
PROGRAM = textwrap.dedent("""
    import json, sys, psycopg
    notices = []
    out = {{}}
    with psycopg.connect("{dsn}", autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        out["before"] = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
        try:
            conn.execute("INSERT INTO customers (name) VALUES (%s)", ["{name}"])
            out["write"] = "ok"
        except psycopg.Error as e:
            out["write"] = "error"
            out["sqlstate"] = e.sqlstate
            out["message"] = e.diag.message_primary
        # The session stays usable either way.
        out["after"] = conn.execute("SELECT count(*) FROM customers WHERE name = %s", ["{name}"]).fetchone()[0]
    out["notices"] = notices
    print(json.dumps(out))
""")


class HeldRun:
    """`warden run` in the background, with its own control socket."""

    def __init__(self, tmp_path: Path, audit_dir: Path, policy_path: Path, code: str, extra=()):
        self.socket = tmp_path / "control.sock"
        cmd = [WARDEN, "run", "--audit-dir", str(audit_dir), "--policy", str(policy_path),
               "--control-socket", str(self.socket), *extra, "--", sys.executable, "-c", code]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def approvals(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("WARDEN_ID_TOKEN", None)
        if token is not None:
            env["WARDEN_ID_TOKEN"] = token
        return subprocess.run([WARDEN, "approvals", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=30, env=env)

    def pending(self, count: int = 1, timeout: float = 30) -> list[dict]:
        """Waits until `count` requests wait, and returns them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists():
                listed = self.approvals("list", "--json")
                if listed.returncode == 0 and len(json.loads(listed.stdout)) >= count:
                    return json.loads(listed.stdout)
            if self.proc.poll() is not None:
                raise AssertionError(f"warden run ended early:\n{self.proc.stdout.read()}\n{self.proc.stderr.read()}")
            time.sleep(0.1)
        raise AssertionError(f"no {count} pending request(s) within {timeout}s")

    def finish(self, timeout: float = 60) -> dict:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        lines = [l for l in out.splitlines() if l.startswith("{")]
        assert lines, f"no report:\n{out}\n{err}"
        return json.loads(lines[-1])

    def kill(self):
        """SIGTERM (`warden run` passes it to the program and stops cleanly), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def held(tmp_path, audit_dir):
    runs = []

    def start(policy_path: Path, code: str, extra=()) -> HeldRun:
        run = HeldRun(tmp_path, audit_dir, policy_path, code, extra)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


def approval_rows(audit_dir: Path) -> list[dict]:
    import duckdb

    glob = str(audit_dir / "approvals" / "**" / "*.parquet")
    cur = duckdb.connect().execute(
        f"SELECT * EXCLUDE (start_time, expires_at) FROM read_parquet('{glob}', hive_partitioning=true) ORDER BY start_time")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def program(pg: PostgresServer, name: str) -> str:
    return PROGRAM.format(dsn=pg.dsn, name=name)


def test_an_approved_write_runs_and_every_step_is_audited(pg, idp, tokens, tmp_path, audit_dir, held, webhook):
    run = held(policy(tmp_path, pg, idp, webhook=webhook.url), program(pg, "approved"))
    [pending] = run.pending()
    # Reviewers hear of it without polling, in the shape Slack takes.
    deadline = time.monotonic() + 10
    while not webhook.received and time.monotonic() < deadline:
        time.sleep(0.05)
    [(content_type, hook)] = webhook.received
    assert content_type == "application/json"
    assert pending["id"] in hook["text"] and "writes-need-a-dba" in hook["text"]
    assert "INSERT INTO customers" in hook["text"]
    # Everything a reviewer needs to decide.
    assert pending["request"].startswith("INSERT INTO customers (name) VALUES ")
    assert pending["rule"] == "writes-need-a-dba"
    assert pending["protocol"] == "postgres"
    assert pending["requester"]["workload"] == "bot"
    assert pending["requester"]["exe"] == os.path.realpath(sys.executable)
    assert pending["destination"] == f"127.0.0.1:{pg.port}"
    assert pending["context"]["tables_written"] == "customers"
    assert pending["context"]["database"] == pg.database
    shown = run.approvals("show", pending["id"])
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == pending["id"]
    text = run.approvals("list")
    assert pending["id"] in text.stdout and "writes-need-a-dba" in text.stdout

    approved = run.approvals("approve", pending["id"], token=tokens["reviewer"])
    assert approved.returncode == 0, approved.stderr
    assert "runs now" in approved.stdout
    report = run.finish()
    assert report["write"] == "ok" and report["after"] == 1
    assert any("approval" in n and "ask #dba" in n for n in report["notices"]), report["notices"]

    steps = approval_rows(audit_dir)
    assert [r["step"] for r in steps] == ["requested", "approved", "executed"]
    assert {r["approval_id"] for r in steps} == {pending["id"]}
    assert steps[1]["reviewer"] == REVIEWER and steps[1]["reviewer_email"] == REVIEWER
    assert list(steps[1]["reviewer_groups"]) == ["dba"]
    [insert] = read_requests(audit_dir, "statement LIKE 'INSERT%'")
    assert insert["decision"] == "allow" and insert["approval_id"] == pending["id"]
    assert insert["rows"] == 1


def test_a_rejected_write_gets_the_reason_and_the_session_goes_on(pg, idp, tokens, tmp_path, audit_dir, held):
    run = held(policy(tmp_path, pg, idp), program(pg, "rejected"))
    [pending] = run.pending()
    no_reason = run.approvals("reject", pending["id"], "--reason", " ", token=tokens["reviewer"])
    assert no_reason.returncode == 1 and "reason" in no_reason.stderr
    rejected = run.approvals("reject", pending["id"], "--reason", "not during the freeze", token=tokens["reviewer"])
    assert rejected.returncode == 0, rejected.stderr
    report = run.finish()
    assert report["write"] == "error" and report["sqlstate"] == "42501"
    assert "not during the freeze" in report["message"] and REVIEWER in report["message"]
    assert report["after"] == 0
    assert [r["step"] for r in approval_rows(audit_dir)] == ["requested", "rejected"]
    [insert] = read_requests(audit_dir, "statement LIKE 'INSERT%'")
    assert insert["decision"] == "deny" and insert["approval_id"] == pending["id"]
    # A decided request is gone.
    again = run.approvals("approve", pending["id"], token=tokens["reviewer"])
    assert again.returncode == 1


def test_an_unanswered_write_expires(pg, idp, tmp_path, audit_dir, held):
    run = held(policy(tmp_path, pg, idp, expires="2s"), program(pg, "expired"))
    report = run.finish()
    assert report["write"] == "error" and report["sqlstate"] == "42501"
    assert "expired" in report["message"]
    assert [r["step"] for r in approval_rows(audit_dir)] == ["requested", "expired"]


def test_reviewers_who_may_not_decide_are_refused(pg, idp, tokens, tmp_path, audit_dir, held):
    run = held(policy(tmp_path, pg, idp, quorum=2), program(pg, "refusals"))
    [pending] = run.pending()
    id_ = pending["id"]
    refusals = {
        "outsider": (tokens["outsider"], "not in a group"),
        "owner": (tokens["owner"], "owns the workload"),
        "forged": (tamper_signature(tokens["reviewer"]), "signature"),
        "other client": (idp.id_token(REVIEWER, client_id="someone-else", groups=["dba"]), "another client"),
        "other issuer": (idp.id_token(REVIEWER, groups=["dba"], extra={"iss": "http://127.0.0.1:1"}), "issuer"),
        "expired": (idp.id_token(REVIEWER, groups=["dba"], extra={"exp": int(time.time()) - 60}), "expired"),
        "no token": (None, "--id-token-file"),
    }
    for who, (token, why) in refusals.items():
        answer = run.approvals("approve", id_, token=token)
        assert answer.returncode == 1, who
        assert why in answer.stderr, (who, answer.stderr)
    # Quorum 2: one approval leaves it waiting; the same person again is refused.
    first = run.approvals("approve", id_, token=tokens["reviewer"])
    assert first.returncode == 0 and "1 of 2" in first.stdout, first.stdout
    twice = run.approvals("approve", id_, token=tokens["reviewer"])
    assert twice.returncode == 1 and "already approved" in twice.stderr
    assert run.pending()[0]["approved_by"] == [REVIEWER]
    second = run.approvals("approve", id_, token=tokens["second"])
    assert second.returncode == 0 and "runs now" in second.stdout
    assert run.finish()["write"] == "ok"

    steps = [(r["step"], r["reviewer"]) for r in approval_rows(audit_dir)]
    assert [s for s in steps if s[0] != "refused"] == [
        ("requested", None), ("approved", REVIEWER), ("approved", "erin@example.com"), ("executed", None)]
    refused = [s for s in steps if s[0] == "refused"]
    # Every refusal the agent heard is on record: the six above (a missing
    # token never reaches the agent: the CLI asks for one first) and the
    # second approval by the same reviewer.
    assert len(refused) == 7, refused
    assert (("refused", OUTSIDER) in refused) and (("refused", OWNER) in refused)


SEVERAL = textwrap.dedent("""
    import json, threading, psycopg
    results = {{}}
    def write(name):
        with psycopg.connect("{dsn}", autocommit=True) as conn:
            try:
                conn.execute("INSERT INTO customers (name) VALUES (%s)", [name])
                results[name] = "ok"
            except psycopg.Error as e:
                results[name] = e.sqlstate
    threads = [threading.Thread(target=write, args=(n,)) for n in ("first", "second", "third")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps(results))
""")


def test_several_requests_wait_at_once_and_are_decided_apart(pg, idp, tokens, tmp_path, audit_dir, held):
    run = held(policy(tmp_path, pg, idp), SEVERAL.format(dsn=pg.dsn))
    pending = run.pending(3)
    ids = [p["id"] for p in pending]
    assert len(set(ids)) == 3
    assert run.approvals("approve", ids[0], token=tokens["reviewer"]).returncode == 0
    assert run.approvals("reject", ids[1], "--reason", "no", token=tokens["reviewer"]).returncode == 0
    assert run.approvals("approve", ids[2], token=tokens["second"]).returncode == 0
    results = run.finish()
    assert sorted(results.values()) == ["42501", "ok", "ok"]
    steps = approval_rows(audit_dir)
    assert sorted(r["step"] for r in steps if r["step"] != "requested") == [
        "approved", "approved", "executed", "executed", "rejected"]
    assert len({r["approval_id"] for r in steps}) == 3


def test_a_client_that_gives_up_abandons_its_request(pg, idp, tmp_path, audit_dir, held):
    # A client that goes away while it waits: the process exits mid-query.
    code = textwrap.dedent(f"""
        import socket, threading, psycopg, os
        conn = psycopg.connect("{pg.dsn}", autocommit=True)
        threading.Timer(1.5, lambda: os._exit(0)).start()
        conn.execute("INSERT INTO customers (name) VALUES ('impatient')")
    """)
    run = held(policy(tmp_path, pg, idp), code)
    [pending] = run.pending()
    run.proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not (tmp_path / "control.sock").exists():
            break
        time.sleep(0.1)
    steps = [r["step"] for r in approval_rows(audit_dir)]
    assert steps == ["requested", "abandoned"], steps
    assert pg.psql_admin("SELECT count(*) FROM customers WHERE name = 'impatient'", database=pg.database).strip() == "0"


class Deploys(http.server.BaseHTTPRequestHandler):
    """An internal API whose POSTs change things."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.deployed.append(self.path)
        body = b'{"deployed": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_http_request_is_held_and_released(idp, tokens, tmp_path, audit_dir, held):
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deploys)
    api.deployed = []
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        port = api.server_address[1]
        path = tmp_path / "policy.yaml"
        path.write_text(textwrap.dedent(f"""\
            version: 1
            targets:
              deploy-api: {{ address: 127.0.0.1, port: {port}, protocol: http }}
            rules:
              - name: deploys-need-ops
                when: {{ target: deploy-api, http: {{ method: POST }} }}
                action: approve
                approve: {{ groups: [ops] }}
            approvals:
              oidc: {{ issuer: "{idp.issuer}", client_id: warden }}
            """))
        code = textwrap.dedent(f"""
            import json, urllib.request, urllib.error
            out = {{}}
            for name in ("first", "second"):
                req = urllib.request.Request("http://127.0.0.1:{port}/deploy/" + name, data=b"{{}}", method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        out[name] = [r.status, json.loads(r.read())]
                except urllib.error.HTTPError as e:
                    out[name] = [e.code, e.read().decode()]
            print(json.dumps(out))
        """)
        run = held(path, code)
        [first] = run.pending()
        assert first["protocol"] == "http" and first["request"] == "POST 127.0.0.1/deploy/first"
        assert not api.deployed
        # dana is a DBA, not in ops: refused; erin is in ops.
        assert run.approvals("approve", first["id"], token=tokens["reviewer"]).returncode == 1
        assert run.approvals("approve", first["id"], token=tokens["second"]).returncode == 0
        [second] = [p for p in run.pending() if p["id"] != first["id"]]
        assert run.approvals("reject", second["id"], "--reason", "one deploy a day", token=tokens["second"]).returncode == 0
        report = run.finish()
        assert report["first"] == [200, {"deployed": True}]
        assert report["second"][0] == 403 and "one deploy a day" in report["second"][1]
        assert api.deployed == ["/deploy/first"]
        rows = read_requests(audit_dir, "protocol = 'http'")
        assert [(r["decision"], r["approval_id"]) for r in rows] == [
            ("allow", first["id"]), ("deny", second["id"])]
    finally:
        api.shutdown()


def test_an_ssh_command_is_held_and_released(idp, tokens, tmp_path, audit_dir, held):
    from sshd import Sshd

    with Sshd(password_user=False) as sshd:
        path = tmp_path / "policy.yaml"
        path.write_text(textwrap.dedent(f"""\
            version: 1
            targets:
              box: {{ address: 127.0.0.1, port: {sshd.port}, protocol: ssh, host_keys: {json.dumps(sshd.host_key_lines())} }}
            credentials:
              box: {{ user: root, private_key_file: {sshd.client_key} }}
            rules:
              - name: restarts-need-ops
                when: {{ target: box, ssh: {{ command: ["touch *"] }} }}
                action: approve
                approve: {{ groups: [ops], message: "ask #ops" }}
            approvals:
              oidc: {{ issuer: "{idp.issuer}", client_id: warden }}
            """))
        marker = tmp_path / "restarted"
        code = textwrap.dedent(f"""
            import json, os, paramiko
            c = paramiko.SSHClient()
            c.load_host_keys(os.environ["WARDEN_SSH_KNOWN_HOSTS"])
            c.connect("127.0.0.1", {sshd.port}, username="root", password="placeholder", look_for_keys=False, allow_agent=False)
            out = {{}}
            for name, cmd in (("first", "touch {marker}"), ("second", "touch {marker}.again")):
                _, o, e = c.exec_command(cmd)
                out[name] = [o.channel.recv_exit_status(), e.read().decode()]
            print(json.dumps(out))
        """)
        run = held(path, code)
        [first] = run.pending()
        assert first["protocol"] == "ssh" and first["request"] == f"touch {marker}"
        assert first["context"]["ssh user"] == "root"
        assert not marker.exists()
        assert run.approvals("approve", first["id"], token=tokens["second"]).returncode == 0
        [second] = [p for p in run.pending() if p["id"] != first["id"]]
        assert run.approvals("reject", second["id"], "--reason", "not now", token=tokens["second"]).returncode == 0
        report = run.finish()
        assert report["first"][0] == 0 and "ask #ops" in report["first"][1], report
        assert report["second"][0] == 126 and "not now" in report["second"][1], report
        assert marker.exists() and not Path(f"{marker}.again").exists()
        rows = read_requests(audit_dir, "protocol = 'ssh'")
        assert [(r["decision"], r["approval_id"], r["exit_status"]) for r in rows] == [
            ("allow", first["id"], 0), ("deny", second["id"], 126)]


def test_an_agent_killed_while_a_request_waits_runs_nothing(pg, idp, tokens, tmp_path, audit_dir, held):
    """Pending requests live in the agent's memory: killed (SIGKILL, no
    goodbye), it takes them along. The held client's connection breaks, the
    statement never reaches the server, the cgroup fails closed, and a new
    agent on the same control socket starts with nothing pending."""
    import signal

    result = tmp_path / "result"
    code = textwrap.dedent(f"""
        import pathlib, psycopg
        conn = psycopg.connect("{pg.dsn}", autocommit=True)
        try:
            conn.execute("INSERT INTO customers (name) VALUES ('orphan')")
            outcome = "ran"
        except psycopg.Error as e:
            outcome = type(e).__name__
        try:
            psycopg.connect("{pg.dsn}", connect_timeout=5).close()
            outcome += " reconnected"
        except psycopg.Error as e:
            outcome += " " + type(e).__name__
        pathlib.Path({str(result)!r}).write_text(outcome)
    """)
    run = held(policy(tmp_path, pg, idp), code)
    [pending] = run.pending()
    # The journal takes rows every 200 ms: a kill loses at most those.
    time.sleep(0.5)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait()
    deadline = time.monotonic() + 30
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The held connection broke; a new one is refused (the cgroup fails closed).
    assert result.read_text() == "OperationalError OperationalError"
    assert pg.psql_admin("SELECT count(*) FROM customers WHERE name = 'orphan'", database=pg.database).strip() == "0"
    cleanup = subprocess.run([WARDEN, "cleanup", "--kill"], capture_output=True, text=True)
    assert cleanup.returncode == 0, cleanup.stderr
    # The request was audited before the kill (the journal keeps it).
    recovered = subprocess.run([WARDEN, "audit", "recover", "--audit-dir", str(audit_dir)], capture_output=True, text=True)
    assert recovered.returncode == 0, recovered.stderr
    assert [(r["step"], r["approval_id"]) for r in approval_rows(audit_dir)] == [("requested", pending["id"])]

    # A new agent takes over the stale socket; nothing is pending, and the
    # old approval id is unknown to it.
    again = held(policy(tmp_path, pg, idp), "import time; time.sleep(30)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = again.approvals("list", "--json")
        if listed.returncode == 0:
            break
        time.sleep(0.1)
    assert json.loads(listed.stdout) == []
    late = again.approvals("approve", pending["id"], token=tokens["reviewer"])
    assert late.returncode == 1 and "no request" in late.stderr


def test_the_control_api_over_tls_needs_a_token_for_everything(pg, idp, tokens, tmp_path, audit_dir, held):
    import socket
    import ssl

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = held(policy(tmp_path, pg, idp), program(pg, "over-tls"), extra=("--control-listen", f"127.0.0.1:{port}"))
    [pending] = run.pending()
    # The port's certificate is the agent's CA's: verified, not waved through.
    ca = tmp_path / "ca.pem"
    ca.write_text(subprocess.run([WARDEN, "ca", "export"], capture_output=True, text=True, check=True).stdout)
    base = f"https://127.0.0.1:{port}/v1/approvals"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), trust_env=False, timeout=30) as client:
        anonymous = client.get(base)
        assert anonymous.status_code == 401 and pending["id"] not in anonymous.text
        assert client.get(f"{base}/{pending['id']}").status_code == 401
        forged = client.get(base, headers={"Authorization": f"Bearer {tamper_signature(tokens['reviewer'])}"})
        assert forged.status_code == 401 and pending["id"] not in forged.text
        auth = {"Authorization": f"Bearer {tokens['reviewer']}"}
        assert [p["id"] for p in client.get(base, headers=auth).json()] == [pending["id"]]
        outsider = client.post(f"{base}/{pending['id']}/approve", headers={"Authorization": f"Bearer {tokens['outsider']}"})
        assert outsider.status_code == 403 and "not in a group" in outsider.json()["error"]
        approved = client.post(f"{base}/{pending['id']}/approve", headers=auth)
        assert approved.status_code == 200 and approved.json()["state"] == "released"
    assert run.finish()["write"] == "ok"


def test_a_daemon_restarted_while_a_request_waits_refuses_it_and_the_retry_waits_anew(pg, idp, tokens, tmp_path):
    """Under `warden daemon` (systemctl restart): the held client is told the
    agent stopped, its reconnects fail while no daemon runs (fail closed), and
    once the next daemon is up its retry waits for a new decision and runs
    when approved. Nothing held before the restart ever runs."""
    import signal

    from test_daemon import Daemon, kill_all, wait_until
    from test_lifecycle import cgroup2_root

    unit = cgroup2_root() / f"warden-test-{os.getpid()}.slice" / "langchain-crm.service"
    unit.mkdir(parents=True)
    code = textwrap.dedent(f"""
        import json, time, psycopg
        outcomes = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with psycopg.connect("{pg.dsn}", autocommit=True, connect_timeout=5) as conn:
                    conn.execute("INSERT INTO customers (name) VALUES ('restarted')")
                outcomes.append("ran")
                break
            except psycopg.errors.InsufficientPrivilege as e:
                outcomes.append("refused: " + e.diag.message_primary)
            except psycopg.OperationalError:
                if outcomes[-1:] != ["cannot connect"]:
                    outcomes.append("cannot connect")
                time.sleep(0.2)
        print(json.dumps(outcomes))
    """)
    policy_path = policy(tmp_path, pg, idp)
    (tmp_path / "first").mkdir()
    first = Daemon(tmp_path / "first", {"units": ["langchain-*.service"]}, policy=policy_path)
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: (unit / "cgroup.procs").write_text("0"))
    second = None

    def pending(daemon):
        listed = subprocess.run([WARDEN, "approvals", "--socket", str(daemon.socket), "list", "--json"],
                                capture_output=True, text=True)
        return json.loads(listed.stdout) if listed.returncode == 0 else []

    try:
        wait_until(lambda: pending(first), 30, "the write being held")
        [before] = pending(first)
        assert first.stop(signal.SIGTERM) == 0, first.output()
        (tmp_path / "second").mkdir()
        second = Daemon(tmp_path / "second", {"units": ["langchain-*.service"]}, policy=policy_path)
        wait_until(lambda: pending(second), 30, "the retry being held")
        [after] = pending(second)
        assert after["id"] != before["id"]
        env = dict(os.environ, WARDEN_ID_TOKEN=tokens["reviewer"])
        approved = subprocess.run([WARDEN, "approvals", "--socket", str(second.socket), "approve", after["id"]],
                                  capture_output=True, text=True, env=env)
        assert approved.returncode == 0, approved.stderr
        out, err = client.communicate(timeout=60)
        outcomes = json.loads(out.strip().splitlines()[-1])
        assert outcomes[0].startswith("refused: ") and "stopped before a reviewer decided" in outcomes[0], outcomes
        assert outcomes[-1] == "ran", outcomes
    finally:
        if client.poll() is None:
            client.kill()
        for daemon in (first, second):
            if daemon and daemon.proc.poll() is None:
                daemon.stop()
        subprocess.run([WARDEN, "cleanup"], capture_output=True)
        kill_all(unit)
        unit.rmdir()
        unit.parent.rmdir()
    count = pg.psql_admin("SELECT count(*) FROM customers WHERE name = 'restarted'", database=pg.database)
    assert count.strip() == "1"
    steps = [(r["step"], r["approval_id"]) for r in approval_rows(first.audit_dir)]
    assert steps == [("requested", before["id"]), ("abandoned", before["id"])], steps
