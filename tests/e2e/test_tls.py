"""TLS interception: the agent ends the app's TLS with its own CA, verifies
the real server itself, and says in the audit when either side refuses."""
import subprocess

from conftest import WARDEN, read_audit, warden_run
from llm_fixtures import app_env, https_llm, run_app, upstream_pki  # noqa: F401 - fixtures


def test_langchain_over_https_is_intercepted(https_llm, upstream_pki, tmp_path, audit_dir, run_app):  # noqa: F811
    state = tmp_path / "state"
    run = run_app(audit_dir, app_env(https_llm), "--state-dir", str(state), "--upstream-ca", str(upstream_pki / "ca.pem"))
    assert run.returncode == 0, run.stderr
    assert len(run.report["answers"]) == 3 and run.report["streamed_chunks"] > 1
    assert len(https_llm.records()) == 4
    rows = read_audit(audit_dir)
    assert rows and all(r["dst_port"] == https_llm.port for r in rows)
    for r in rows:
        assert (r["protocol"], r["tls"], r["server_name"], r["error"]) == ("https", "intercepted", "localhost", None), r
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    # The CA's key stays root's.
    assert oct((state / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_a_client_that_refuses_the_agents_ca_is_audited(https_llm, upstream_pki, tmp_path, audit_dir):
    # curl told to trust only the provider's own CA: it refuses the agent's certificate.
    code = (
        "import subprocess, json; p = subprocess.run(['curl', '-sS', '--cacert', %r, %r], capture_output=True, text=True); "
        "print(json.dumps(dict(code=p.returncode, err=p.stderr)))"
    ) % (str(upstream_pki / "ca.pem"), https_llm.base_url + "/models")
    run = warden_run(code, audit_dir, "--state-dir", str(tmp_path / "state"), "--upstream-ca", str(upstream_pki / "ca.pem"))
    assert run.returncode == 0, run.stderr
    assert run.report["code"] == 60, run.report  # curl: peer certificate cannot be authenticated
    (row,) = read_audit(audit_dir)
    assert row["tls"] == "failed" and row["server_name"] == "localhost"
    assert "refused the agent's certificate for localhost" in row["error"]
    assert https_llm.records() == []


def test_an_upstream_the_agent_cannot_verify_is_refused(https_llm, tmp_path, audit_dir):
    # No --upstream-ca: the provider's certificate chains to nothing the agent trusts.
    code = (
        "import subprocess, json; p = subprocess.run(['curl', '-sS', %r], capture_output=True, text=True); "
        "print(json.dumps(dict(code=p.returncode, err=p.stderr)))"
    ) % (https_llm.base_url + "/models",)
    run = warden_run(code, audit_dir, "--state-dir", str(tmp_path / "state"))
    assert run.returncode == 0, run.stderr
    assert run.report["code"] != 0, run.report
    (row,) = read_audit(audit_dir)
    assert row["tls"] == "failed"
    assert "upstream TLS to localhost" in row["error"] and "UnknownIssuer" in row["error"], row["error"]
    assert https_llm.records() == []


def test_plain_curl_trusts_the_agent_through_the_bundle(https_llm, upstream_pki, tmp_path, audit_dir):
    code = (
        "import subprocess, json; p = subprocess.run(['curl', '-sS', %r], capture_output=True, text=True); "
        "print(json.dumps(dict(code=p.returncode, out=p.stdout)))"
    ) % (https_llm.base_url + "/models",)
    run = warden_run(code, audit_dir, "--state-dir", str(tmp_path / "state"), "--upstream-ca", str(upstream_pki / "ca.pem"))
    assert run.report["code"] == 0, run.report
    assert '"object": "list"' in run.report["out"] or '"object":"list"' in run.report["out"]


def test_ca_export_prints_the_ca(tmp_path):
    state = tmp_path / "state"
    first = subprocess.run([WARDEN, "ca", "export", "--state-dir", str(state)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert first.stdout == (state / "ca" / "ca.pem").read_text()
    again = subprocess.run([WARDEN, "ca", "export", "--state-dir", str(state)], capture_output=True, text=True)
    assert again.stdout == first.stdout
