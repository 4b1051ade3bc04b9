"""Connection rules: denied destinations fail at once and are audited; a bad
policy is refused with its line."""
import socket
import os
import subprocess
import textwrap
import time

from conftest import WARDEN, read_audit, warden_run


def test_denied_destination_fails_fast_and_is_audited(echo4, tmp_path, audit_dir):
    blocked = socket.socket()
    blocked.bind(("127.0.0.1", 0))
    blocked.listen(8)
    blocked_port = blocked.getsockname()[1]
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            default: audit
            targets:
              forbidden: {{ address: "127.0.0.1/32", port: {blocked_port} }}
            rules:
              - name: no-forbidden
                when: {{ target: forbidden }}
                action: deny
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import json, socket, time
        t0 = time.monotonic()
        outcome = "delivered"
        try:
            s = socket.create_connection(("127.0.0.1", {blocked_port}), timeout=20)
            s.sendall(b"secret")
            if s.recv(10) == b"":
                outcome = "closed"
        except OSError as e:
            outcome = type(e).__name__
        elapsed = time.monotonic() - t0
        ok = socket.create_connection(("127.0.0.1", {echo4.port})); ok.sendall(b"fine"); back = ok.recv(10)
        print(json.dumps(dict(outcome=outcome, elapsed=elapsed, back=back.decode())))
        """
    )
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    assert run.report["outcome"] in ("ConnectionResetError", "closed", "BrokenPipeError"), run.report
    # Not a hang: the client learned at once (its own timeout was 20 s).
    assert run.report["elapsed"] < 5
    assert run.report["back"] == "fine"
    blocked.settimeout(0.5)
    try:
        blocked.accept()
        raise AssertionError("the denied destination received a connection")
    except socket.timeout:
        pass
    rows = {r["dst_port"]: r for r in read_audit(audit_dir)}
    assert rows[blocked_port]["decision"] == "deny"
    assert rows[blocked_port]["rule"] == "no-forbidden"
    assert rows[blocked_port]["bytes_up"] == 0
    assert rows[echo4.port]["decision"] == "allow"


def test_malformed_policy_names_the_line(tmp_path, audit_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefault: audit\nrules:\n  - name: r1\n    when: { port: 22 }\n    acton: deny\n")
    check = subprocess.run([WARDEN, "policy", "check", str(bad)], capture_output=True, text=True)
    assert check.returncode == 1
    assert f"{bad}:6:" in check.stderr, check.stderr
    assert "acton" in check.stderr
    run = subprocess.run([WARDEN, "run", "--policy", str(bad), "--audit-dir", str(audit_dir), "--", "true"], capture_output=True, text=True)
    assert run.returncode == 125
    assert f"{bad}:6:" in run.stderr


def test_good_policy_checks_ok(tmp_path):
    import pathlib

    # The LLM example reads its keys from the agent's environment, as an operator would set them.
    env = {**os.environ, "OPENAI_REAL_KEY": "sk-example-openai", "ANTHROPIC_REAL_KEY": "sk-ant-example"}
    for example in sorted(pathlib.Path(__file__).resolve().parents[2].glob("policies/**/*.yaml")):
        check = subprocess.run([WARDEN, "policy", "check", str(example)], capture_output=True, text=True, env=env)
        assert check.returncode == 0, check.stderr
        assert "ok" in check.stdout
        assert "sk-example" not in check.stdout + check.stderr


def test_a_credential_from_an_unset_variable_names_the_line(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ntargets:\n  llm: { address: 127.0.0.1, protocol: llm }\ncredentials:\n  llm: { api_key_env: WARDEN_TEST_UNSET_KEY }\n")
    env = {k: v for k, v in os.environ.items() if k != "WARDEN_TEST_UNSET_KEY"}
    check = subprocess.run([WARDEN, "policy", "check", str(policy)], capture_output=True, text=True, env=env)
    assert check.returncode != 0
    assert f"{policy}:5:" in check.stderr and "WARDEN_TEST_UNSET_KEY" in check.stderr, check.stderr


def test_udp_dns_allowed_other_udp_refused_and_audited(audit_dir):
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dns.bind(("127.0.0.1", 53))
        dns_bound = True
    except OSError:
        dns_bound = False
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    other_port = other.getsockname()[1]
    code = textwrap.dedent(
        f"""
        import json, socket
        out = {{}}
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"query", ("127.0.0.1", 53)); out["dns"] = "sent"
        except OSError as e:
            out["dns"] = type(e).__name__
        try:
            s.sendto(b"quic", ("127.0.0.1", {other_port})); out["other"] = "sent"
        except OSError as e:
            out["other"] = type(e).__name__
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            c.connect(("::ffff:127.0.0.1", {other_port})); c.send(b"mapped"); out["mapped"] = "sent"
        except OSError as e:
            out["mapped"] = type(e).__name__
        print(json.dumps(out))
        """
    )
    run = warden_run(code, audit_dir)
    assert run.returncode == 0, run.stderr
    assert run.report == {"dns": "sent", "other": "PermissionError", "mapped": "PermissionError"}
    if dns_bound:
        dns.settimeout(2)
        assert dns.recvfrom(100)[0] == b"query"
    other.settimeout(0.3)
    try:
        other.recvfrom(100)
        raise AssertionError("refused UDP arrived")
    except socket.timeout:
        pass
    udp_rows = [r for r in read_audit(audit_dir) if r["transport"] == "udp"]
    assert len(udp_rows) == 2
    assert all(r["decision"] == "deny" and r["dst_port"] == other_port for r in udp_rows)


def test_rules_by_workload_use_the_kernels_attribution(echo4, tmp_path, audit_dir):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            default: audit
            workloads:
              untrusted: {{ match: {{ uid: 65534 }} }}
            targets:
              echo: {{ address: "127.0.0.1/32", port: {echo4.port} }}
            rules:
              - name: untrusted-no-echo
                when: {{ workload: untrusted, target: echo }}
                action: deny
            """
        )
    )
    code = textwrap.dedent(
        f"""
        import json, socket
        try:
            s = socket.create_connection(("127.0.0.1", {echo4.port}), timeout=10); s.sendall(b"hi")
            print(json.dumps(dict(outcome="delivered" if s.recv(10) == b"hi" else "closed")))
        except OSError as e:
            print(json.dumps(dict(outcome=type(e).__name__)))
        """
    )
    as_root = warden_run(code, audit_dir, "--policy", str(policy), python="/usr/bin/python3")
    as_nobody = warden_run(code, audit_dir, "--policy", str(policy), "--user", "nobody", python="/usr/bin/python3")
    assert as_root.report == {"outcome": "delivered"}, as_root.stderr
    assert as_nobody.report["outcome"] in ("closed", "ConnectionResetError"), as_nobody.stderr
    rows = sorted((r["uid"], r["workload"], r["decision"], r["rule"]) for r in read_audit(audit_dir))
    assert rows == [(0, None, "allow", "default"), (65534, "untrusted", "deny", "untrusted-no-echo")]
