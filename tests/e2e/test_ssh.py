"""SSH through the agent: the program's OpenSSH client and paramiko reach a
real sshd on loopback through `warden run`. The agent shows them its own
host key for the target (trusted through the known_hosts files `warden run`
gives the program), logs in upstream with the policy's key while the
program holds a placeholder, decides each exec, shell, subsystem and
forward, and records what the server showed in asciicast files that
`asciinema cat` replays."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from sshd import Sshd, keygen, public_line  # noqa: E402

from conftest import read_audit, read_requests, warden_run  # noqa: E402

ASCIINEMA = str(Path(sys.executable).parent / "asciinema")


@pytest.fixture(scope="module")
def sshd():
    with Sshd() as server:
        yield server


@pytest.fixture
def placeholder_key(tmp_path):
    """A key the server has never seen: what the program holds."""
    return keygen(tmp_path / "placeholder", "ed25519", "placeholder")


def policy(tmp_path: Path, sshd: Sshd, rules: str = "", host_keys: str | None = None, credential: str | None = None,
           extra: str = "") -> Path:
    if host_keys is None:
        host_keys = json.dumps(sshd.host_key_lines())
    if credential is None:
        credential = f"{{ user: root, private_key_file: {sshd.client_key} }}"
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        targets:
          box: {{ address: 127.0.0.1, port: {sshd.port}, protocol: ssh, host_keys: {host_keys} }}
        credentials:
          box: {credential}
        """) + extra + (f"rules:\n{textwrap.indent(textwrap.dedent(rules), '  ')}" if rules else ""))
    return path


def openssh(sshd: Sshd, key, *args, **kw) -> list[str]:
    """The program's OpenSSH client as a user would run it: the system's
    known_hosts (where `warden run` puts the agent's keys), no other."""
    return sshd.ssh_cmd(*args, key=key, known_hosts="/dev/null",
                        extra_opts={"GlobalKnownHostsFile": "/etc/ssh/ssh_known_hosts", **kw.pop("opts", {})}, **kw)


def run_program(tmp_path, audit_dir, policy_path, code: str, timeout: float = 120):
    run = warden_run(code, audit_dir, "--policy", str(policy_path), timeout=timeout)
    return run


def ssh_rows(audit_dir):
    if not list((audit_dir / "requests").glob("**/*.parquet")):
        return []
    return read_requests(audit_dir, "protocol = 'ssh'")


def replay(recording: str) -> str:
    out = subprocess.run([ASCIINEMA, "cat", recording], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode(errors="replace")


def test_an_allowed_exec_runs_with_the_agents_key_and_is_recorded(sshd, audit_dir, tmp_path, placeholder_key):
    argv = openssh(sshd, placeholder_key, "echo", "hello-from-$(hostname -s)", ";", "exit", "3")
    code = textwrap.dedent(f"""
        import json, subprocess
        out = subprocess.run({argv!r}, capture_output=True, text=True)
        print(json.dumps(dict(code=out.returncode, out=out.stdout, err=out.stderr)))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd), code)
    assert run.returncode == 0, run.stderr
    assert run.report["code"] == 3, run.report
    assert run.report["out"].startswith("hello-from-"), run.report
    # Upstream, the agent logged in with the policy's key, not the placeholder.
    sshd.wait_log("Accepted publickey for root")
    [row] = ssh_rows(audit_dir)
    assert row["ssh_channel"] == "exec"
    assert row["ssh_user"] == "root"
    assert row["command"].startswith("echo hello-from-")
    assert row["exit_status"] == 3
    assert row["decision"] == "allow" and row["rule"] == "default"
    assert Path(row["recording"]).is_file()
    assert replay(row["recording"]).startswith("hello-from-")
    [conn] = [c for c in read_audit(audit_dir) if c["dst_port"] == sshd.port]
    assert conn["protocol"] == "ssh" and conn["error"] is None, conn
    assert conn["bytes_up"] > 0 and conn["bytes_down"] > 0


PARAMIKO = """
import json, os, paramiko
c = paramiko.SSHClient()
c.load_host_keys(os.environ["WARDEN_SSH_KNOWN_HOSTS"])
c.set_missing_host_key_policy(paramiko.RejectPolicy())
c.connect("127.0.0.1", {port}, username="root", password="placeholder", look_for_keys=False, allow_agent=False)
def run(cmd):
    _, out, err = c.exec_command(cmd)
    status = out.channel.recv_exit_status()
    return dict(status=status, out=out.read().decode(), err=err.read().decode())
"""


def test_a_denied_exec_gets_an_exit_status_and_the_session_stays_usable(sshd, audit_dir, tmp_path):
    rules = """\
        - name: no-destruction
          when: { target: box, ssh: { command: ["rm *", "shutdown*"] } }
          action: deny
        """
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent("""
        denied = run("rm -rf /srv/data")
        allowed = run("echo still-here")
        print(json.dumps(dict(denied=denied, allowed=allowed)))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd, rules), code)
    assert run.returncode == 0, run.stderr
    denied, allowed = run.report["denied"], run.report["allowed"]
    assert denied["status"] == 126, denied
    assert 'denied by rule "no-destruction"' in denied["err"], denied
    assert allowed == {"status": 0, "out": "still-here\n", "err": ""}
    rows = ssh_rows(audit_dir)
    assert [(r["command"], r["decision"], r["rule"], r["exit_status"]) for r in rows] == [
        ("rm -rf /srv/data", "deny", "no-destruction", 126),
        ("echo still-here", "allow", "default", 0),
    ]
    assert rows[0]["recording"] is None
    # One connection carried both.
    assert len({r["session_id"] for r in rows}) == 1


def test_a_shell_session_is_recorded_and_replayed_by_asciinema(sshd, audit_dir, tmp_path):
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent("""
        import time
        chan = c.invoke_shell(term="xterm", width=100, height=30)
        chan.send(b"echo marker-$((6*7))\\n")
        seen = b""
        deadline = time.time() + 20
        while b"marker-42" not in seen and time.time() < deadline:
            seen += chan.recv(65536)
        chan.send(b"exit 5\\n")
        status = chan.recv_exit_status()
        print(json.dumps(dict(status=status, seen="marker-42" in seen.decode(errors="replace"))))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd), code)
    assert run.returncode == 0, run.stderr
    assert run.report == {"status": 5, "seen": True}
    [row] = ssh_rows(audit_dir)
    assert row["ssh_channel"] == "shell" and row["exit_status"] == 5
    header = json.loads(Path(row["recording"]).read_text().splitlines()[0])
    assert (header["version"], header["width"], header["height"]) == (2, 100, 30)
    assert header["env"]["TERM"] == "xterm"
    assert "marker-42" in replay(row["recording"])


def test_shells_can_be_refused(sshd, audit_dir, tmp_path):
    rules = """\
        - name: no-shells
          when: { ssh: { channel: shell } }
          action: deny
        """
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent("""
        chan = c.invoke_shell()
        status = chan.recv_exit_status()
        err = chan.recv_stderr(4096).decode()
        print(json.dumps(dict(status=status, err=err, after=run("echo ok"))))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd, rules), code)
    assert run.returncode == 0, run.stderr
    assert run.report["status"] == 126
    assert "interactive shell denied by rule" in run.report["err"]
    assert run.report["after"]["out"] == "ok\n"
    assert [(r["ssh_channel"], r["decision"]) for r in ssh_rows(audit_dir)] == [("shell", "deny"), ("exec", "allow")]


def test_the_real_key_never_reaches_the_program(sshd, audit_dir, tmp_path):
    """The program logs in with a password it made up; it gets in as the
    policy's user, and the private key is not in its environment."""
    key_text = Path(sshd.client_key).read_text()
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent(f"""
        leaked = [k for k, v in os.environ.items() if {key_text.splitlines()[1]!r} in v]
        print(json.dumps(dict(who=run("id -un")["out"].strip(), leaked=leaked)))
    """)
    os.environ["WARDEN_TEST_SSH_KEY"] = key_text
    try:
        pol = policy(tmp_path, sshd, credential="{ user: root, private_key_env: WARDEN_TEST_SSH_KEY }")
        run = run_program(tmp_path, audit_dir, pol, code)
    finally:
        del os.environ["WARDEN_TEST_SSH_KEY"]
    assert run.returncode == 0, run.stderr
    assert run.report == {"who": "root", "leaked": []}


def test_a_password_credential(sshd, audit_dir, tmp_path, placeholder_key):
    os.environ["WARDEN_TEST_SSH_PASSWORD"] = sshd.password
    try:
        pol = policy(tmp_path, sshd, credential=f"{{ user: {sshd.password_user}, password_env: WARDEN_TEST_SSH_PASSWORD }}")
        argv = openssh(sshd, placeholder_key, "id", "-un")
        code = f"import subprocess, json; o = subprocess.run({argv!r}, capture_output=True, text=True); print(json.dumps(dict(code=o.returncode, out=o.stdout, err=o.stderr)))"
        run = run_program(tmp_path, audit_dir, pol, code)
    finally:
        del os.environ["WARDEN_TEST_SSH_PASSWORD"]
    assert run.returncode == 0, run.stderr
    assert run.report["code"] == 0, run.report
    assert run.report["out"] == f"{sshd.password_user}\n"
    assert ssh_rows(audit_dir)[0]["ssh_user"] == sshd.password_user


def test_a_wrong_upstream_host_key_is_refused(sshd, audit_dir, tmp_path, placeholder_key):
    other = keygen(tmp_path / "not-the-server", "ed25519", "impostor")
    pol = policy(tmp_path, sshd, host_keys=json.dumps([public_line(f"{other}.pub")]))
    argv = openssh(sshd, placeholder_key, "echo", "never")
    code = f"import subprocess, json; o = subprocess.run({argv!r}, capture_output=True, text=True); print(json.dumps(dict(code=o.returncode, out=o.stdout, err=o.stderr)))"
    run = run_program(tmp_path, audit_dir, pol, code)
    assert run.returncode == 0, run.stderr
    assert run.report["code"] == 255 and run.report["out"] == "", run.report
    [conn] = [c for c in read_audit(audit_dir) if c["dst_port"] == sshd.port]
    assert "host key" in conn["error"] and "is not one of the host_keys" in conn["error"], conn
    assert ssh_rows(audit_dir) == []


def test_a_known_hosts_file_verifies_the_server(sshd, audit_dir, tmp_path, placeholder_key):
    known = sshd.write_known_hosts(tmp_path / "upstream_known_hosts")
    pol = tmp_path / "kh.yaml"
    pol.write_text(policy(tmp_path, sshd).read_text().replace(
        f"host_keys: {json.dumps(sshd.host_key_lines())}", f"known_hosts: {known}"))
    argv = openssh(sshd, placeholder_key, "echo", "verified")
    code = f"import subprocess, json; o = subprocess.run({argv!r}, capture_output=True, text=True); print(json.dumps(dict(code=o.returncode, out=o.stdout, err=o.stderr)))"
    run = run_program(tmp_path, audit_dir, pol, code)
    assert run.returncode == 0, run.stderr
    assert run.report["out"] == "verified\n", run.report


def test_port_and_agent_forwarding_are_refused(sshd, audit_dir, tmp_path):
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent(f"""
        t = c.get_transport()
        try:
            t.open_channel("direct-tcpip", ("127.0.0.1", {sshd.port}), ("127.0.0.1", 0))
            local = "opened"
        except paramiko.ChannelException as e:
            local = e.text
        try:
            t.request_port_forward("127.0.0.1", 0)
            remote = "granted"
        except paramiko.SSHException as e:
            remote = "refused"
        print(json.dumps(dict(local=local, remote=remote, after=run("echo ok")["out"])))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd), code)
    assert run.returncode == 0, run.stderr
    assert run.report == {"local": "Administratively prohibited", "remote": "refused", "after": "ok\n"}
    rows = ssh_rows(audit_dir)
    forwards = [(r["ssh_channel"], r["command"], r["decision"], r["rule"]) for r in rows if r["ssh_channel"] == "forward"]
    assert forwards == [
        ("forward", f"127.0.0.1:{sshd.port}", "deny", "ssh.forwarding"),
        ("forward", "127.0.0.1:0", "deny", "ssh.forwarding"),
    ]


def test_forwards_the_policy_allows(sshd, audit_dir, tmp_path):
    rules = """\
        - name: tunnels
          when: { target: box, ssh: { channel: forward } }
          action: allow
        """
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent(f"""
        import socket
        t = c.get_transport()
        # Local (-L): to the server's own port, through the tunnel.
        chan = t.open_channel("direct-tcpip", ("127.0.0.1", {sshd.port}), ("127.0.0.1", 0))
        banner = chan.recv(64).decode()[:8]
        # Remote (-R): the server listens, and its connections come back here.
        port = t.request_port_forward("127.0.0.1", 0)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"ping")
        back = t.accept(20)
        got = back.recv(4).decode()
        back.sendall(b"pong")
        answer = s.recv(4).decode()
        print(json.dumps(dict(banner=banner, got=got, answer=answer, remote_port=port)))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd, rules), code)
    assert run.returncode == 0, run.stderr
    report = run.report
    assert (report["banner"], report["got"], report["answer"]) == ("SSH-2.0-", "ping", "pong"), report
    rows = [(r["ssh_channel"], r["command"], r["decision"], r["rule"]) for r in ssh_rows(audit_dir)]
    assert ("forward", f"127.0.0.1:{sshd.port}", "allow", "tunnels") in rows
    assert ("forward", "127.0.0.1:0", "allow", "tunnels") in rows


@pytest.mark.parametrize("allowed", [False, True])
def test_agent_forwarding_only_where_a_rule_allows_it(sshd, audit_dir, tmp_path, allowed):
    """The program's ssh-agent holds a key; the remote `ssh-add -l` sees it
    through the forwarded agent only when a rule allows agent forwarding."""
    key = keygen(tmp_path / "agent-key", "ed25519", "in-the-agent")
    rules = """\
        - name: agent-ok
          when: { target: box, ssh: { channel: agent } }
          action: allow
        """ if allowed else ""
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent(f"""
        import subprocess, paramiko.agent
        sock = {str(tmp_path / "agent.sock")!r}
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
        import time
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        os.environ["SSH_AUTH_SOCK"] = sock
        subprocess.run(["ssh-add", {str(key)!r}], check=True, capture_output=True)
        session = c.get_transport().open_session()
        paramiko.agent.AgentRequestHandler(session)
        session.exec_command("ssh-add -l")
        out = session.makefile().read().decode()
        status = session.recv_exit_status()
        agent.terminate()
        print(json.dumps(dict(status=status, out=out)))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd, rules), code)
    assert run.returncode == 0, run.stderr
    if allowed:
        assert run.report["status"] == 0 and "in-the-agent" in run.report["out"], run.report
    else:
        assert run.report["status"] != 0 and "in-the-agent" not in run.report["out"], run.report
    [row] = [r for r in ssh_rows(audit_dir) if r["ssh_channel"] == "agent"]
    assert (row["decision"], row["rule"]) == (("allow", "agent-ok") if allowed else ("deny", "ssh.forwarding"))


def test_a_large_sftp_transfer_is_intact(sshd, audit_dir, tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(24 * 1024 * 1024))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    remote = tmp_path / "uploaded"
    back = tmp_path / "downloaded"
    code = PARAMIKO.format(port=sshd.port) + textwrap.dedent(f"""
        import hashlib
        sftp = c.open_sftp()
        sftp.put({str(src)!r}, {str(remote)!r})
        sftp.get({str(remote)!r}, {str(back)!r})
        sftp.close()
        print(json.dumps(dict(up=hashlib.sha256(open({str(remote)!r}, "rb").read()).hexdigest(),
                              down=hashlib.sha256(open({str(back)!r}, "rb").read()).hexdigest())))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd), code, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.report == {"up": digest, "down": digest}
    [row] = ssh_rows(audit_dir)
    assert (row["ssh_channel"], row["command"], row["decision"]) == ("subsystem", "sftp", "allow")
    [conn] = [c for c in read_audit(audit_dir) if c["dst_port"] == sshd.port]
    assert conn["bytes_up"] > 24 * 1024 * 1024 and conn["bytes_down"] > 24 * 1024 * 1024


def test_without_a_credential_ssh_is_relayed_opaque_and_says_so(sshd, audit_dir, tmp_path):
    pol = tmp_path / "none.yaml"
    pol.write_text(f"version: 1\ntargets:\n  box: {{ address: 127.0.0.1, port: {sshd.port}, protocol: ssh }}\n")
    argv = sshd.ssh_cmd("echo", "direct")
    code = f"import subprocess, json; o = subprocess.run({argv!r}, capture_output=True, text=True); print(json.dumps(dict(code=o.returncode, out=o.stdout, err=o.stderr)))"
    run = run_program(tmp_path, audit_dir, pol, code)
    assert run.returncode == 0, run.stderr
    # The client saw the real server's key and logged in with its own.
    assert run.report["out"] == "direct\n", run.report
    [conn] = [c for c in read_audit(audit_dir) if c["dst_port"] == sshd.port]
    assert conn["protocol"] == "ssh" and conn["decision"] == "allow"
    assert conn["error"].startswith("relayed opaque: no SSH credential"), conn
    assert ssh_rows(audit_dir) == []


def test_without_a_credential_ssh_rules_refuse_the_connection(sshd, audit_dir, tmp_path):
    pol = tmp_path / "rules-no-cred.yaml"
    pol.write_text(textwrap.dedent(f"""\
        version: 1
        targets:
          box: {{ address: 127.0.0.1, port: {sshd.port}, protocol: ssh }}
        rules:
          - name: no-rm
            when: {{ target: box, ssh: {{ command: ["rm *"] }} }}
            action: deny
        """))
    argv = sshd.ssh_cmd("echo", "direct")
    code = f"import subprocess, json; o = subprocess.run({argv!r}, capture_output=True, text=True); print(json.dumps(dict(code=o.returncode, out=o.stdout, err=o.stderr)))"
    run = run_program(tmp_path, audit_dir, pol, code)
    assert run.returncode == 0, run.stderr
    assert run.report["code"] == 255 and run.report["out"] == ""
    [conn] = [c for c in read_audit(audit_dir) if c["dst_port"] == sshd.port]
    assert conn["decision"] == "deny" and "SSH rules apply" in conn["error"], conn


def test_a_command_the_model_proposed_is_linked_to_its_llm_call(sshd, audit_dir, tmp_path):
    """The openai client asks the (loopback) model what to run; the tool
    call's command runs over SSH and names that LLM call in the audit; a
    command the program runs on its own names none, and a rule on
    `from_llm` refuses only the model's."""
    from llm_server import start_server

    server, port = start_server("127.0.0.1", 0, log=tmp_path / "llm.jsonl")
    try:
        server.script.entries.append(
            {"match": "disk", "tool_calls": [{"name": "run_on_host", "arguments": {"command": "df -P /"}}]})
        rules = """\
            - name: no-model-disk-commands
              when: { target: box, ssh: { from_llm: true, command: ["df *"] } }
              action: deny
            """
        code = PARAMIKO.format(port=sshd.port) + textwrap.dedent(f"""
            import openai
            llm = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="sk-placeholder")
            answer = llm.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "How is the disk?"}}],
                tools=[{{"type": "function", "function": {{"name": "run_on_host", "parameters": {{"type": "object", "properties": {{"command": {{"type": "string"}}}}}}}}}}])
            command = json.loads(answer.choices[0].message.tool_calls[0].function.arguments)["command"]
            print(json.dumps(dict(model=run(command)["status"], own=run(command)["status"])))
        """)
        run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd, rules), code)
    finally:
        server.close()
    assert run.returncode == 0, run.stderr
    assert run.report == {"model": 126, "own": 0}
    rows = read_requests(audit_dir)
    [llm] = [r for r in rows if r["protocol"] == "llm"]
    model, own = [r for r in rows if r["protocol"] == "ssh"]
    assert (model["command"], model["decision"], model["rule"]) == ("df -P /", "deny", "no-model-disk-commands")
    assert (model["caused_by_session_id"], model["caused_by_seq"], model["caused_by_match"]) == (
        llm["session_id"], llm["seq"], "exact")
    assert (own["command"], own["decision"], own["caused_by_session_id"]) == ("df -P /", "allow", None)


def test_a_malformed_client_closes_its_connection_only(sshd, audit_dir, tmp_path):
    """Garbage after a valid SSH banner ends that connection; the next one
    through the same agent works."""
    code = textwrap.dedent(f"""
        import json, os, socket, paramiko
        s = socket.create_connection(("127.0.0.1", {sshd.port}))
        # A packet length no implementation accepts, then noise.
        s.sendall(b"SSH-2.0-fuzzer\\r\\n" + b"\\xff\\xff\\xff\\xf0" + bytes(range(256)) * 64)
        s.settimeout(10)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, socket.timeout) as e:
            got += repr(e).encode()
        c = paramiko.SSHClient()
        c.load_host_keys(os.environ["WARDEN_SSH_KNOWN_HOSTS"])
        c.connect("127.0.0.1", {sshd.port}, username="root", password="x", look_for_keys=False, allow_agent=False)
        _, out, _ = c.exec_command("echo fine")
        print(json.dumps(dict(closed="timed out" not in got.decode(errors="replace"), after=out.read().decode())))
    """)
    run = run_program(tmp_path, audit_dir, policy(tmp_path, sshd), code)
    assert run.returncode == 0, run.stderr
    assert run.report == {"closed": True, "after": "fine\n"}
    conns = [c for c in read_audit(audit_dir) if c["dst_port"] == sshd.port]
    assert len(conns) == 2
    assert any(c["error"] and c["error"].startswith("ssh") for c in conns), conns
