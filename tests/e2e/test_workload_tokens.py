"""Workload tokens: an app under `warden run` presents a token from a real
OIDC provider (oidc-provider-mock, standing in for a Kubernetes cluster's
service-account issuer) in the policy's header, over plain HTTP (httpx) and
in LLM calls over intercepted TLS (the openai client's `default_headers`).
A valid token's subject is matched by a `token` rule and written to the
audit, in addition to the kernel's attribution; a forged, expired,
wrong-audience or untrusted token denies the request with the reason; and
the header never reaches the server, whatever it held.

A Kubernetes API server cannot run here, so a loopback issuer serves the
two documents it serves (a discovery document with only issuer and
jwks_uri, and the key set) and signs tokens shaped as the kubelet's
projected tokens (ES256, a kid and no typ, the kubernetes.io claim)."""
import base64
import http.server
import json
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from oidc import OidcProvider, tamper_signature  # noqa: E402

from conftest import read_requests, warden_run  # noqa: E402
from test_approvals import held  # noqa: E402,F401 - fixture
from llm_fixtures import app_env, https_llm, upstream_pki  # noqa: E402,F401 - fixtures

HEADER = "x-warden-workload-token"
BILLING = "system:serviceaccount:crm:billing"
FRONTEND = "system:serviceaccount:web:frontend"


@pytest.fixture(scope="module")
def idp():
    with OidcProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def tokens(idp):
    """Genuine tokens for two service accounts, and tokens to be refused."""
    billing = idp.id_token(BILLING)
    return {
        "billing": billing,
        "frontend": idp.id_token(FRONTEND),
        "forged": tamper_signature(billing),
        "expired": idp.id_token(BILLING, extra={"exp": int(time.time()) - 60}),
        "other audience": idp.id_token(BILLING, client_id="someone-else"),
        "other issuer": idp.id_token(BILLING, extra={"iss": "http://127.0.0.1:1"}),
    }


class Recorder(http.server.BaseHTTPRequestHandler):
    """A loopback API that records the headers of every request it gets."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def do_GET(self):
        self.server.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def write_policy(tmp_path: Path, idp: OidcProvider, target: str, extra_rules: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        workload_tokens:
          issuers:
            - {{ issuer: "{idp.issuer}", audience: warden }}
        targets:
          {target}
        rules:
          - name: crm-accounts
            when: {{ target: api, token: {{ subject: "system:serviceaccount:crm:*" }} }}
            action: allow
        """) + textwrap.indent(textwrap.dedent(extra_rules), "  "))
    return path


def test_http_requests_with_tokens(idp, tokens, api, tmp_path, audit_dir):
    port = api.server_address[1]
    policy = write_policy(tmp_path, idp, f"api: {{ address: 127.0.0.1, port: {port}, protocol: http }}", """\
        - name: private-needs-a-crm-account
          when: { target: api, http: { path: "/private/*" } }
          action: deny
        """)
    code = textwrap.dedent(f"""
        import json, httpx
        tokens = json.loads({json.dumps(json.dumps(tokens))})
        out = {{}}
        with httpx.Client(base_url="http://127.0.0.1:{port}", trust_env=False, timeout=30) as c:
            for name, token in tokens.items():
                r = c.get("/private/" + name.replace(" ", "-"), headers={{"{HEADER}": token}})
                out[name] = [r.status_code, r.text, r.headers.get("x-warden-rule")]
            for path in ("/private/no-token", "/public"):
                r = c.get(path)
                out[path] = [r.status_code, r.text, r.headers.get("x-warden-rule")]
        print(json.dumps(out))
    """)
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0 and run.report is not None, run.stdout + run.stderr
    out = run.report

    # A valid token of a crm service account: allowed by the token rule.
    assert out["billing"][:2] == [200, '{"ok": true}'], out["billing"]
    # A valid token of another namespace: the token rule does not hold, the
    # next rule denies.
    assert out["frontend"][0] == 403 and out["frontend"][2] == "private-needs-a-crm-account", out["frontend"]
    # Tokens that do not verify: denied, with the reason, under the rule
    # workload_tokens, whatever the rules say.
    refused = {
        "forged": "signature does not verify",
        "expired": "expired",
        "other audience": "issued to another client or audience",
        "other issuer": "is not one the policy trusts",
    }
    for name, why in refused.items():
        status, body, rule = out[name]
        assert status == 401 and rule == "workload_tokens", (name, out[name])
        message = json.loads(body)["error"]["message"]
        assert f"the workload token in {HEADER} was refused" in message and why in message, (name, message)
    # No token: behaviour unchanged; the token rule does not hold.
    assert out["/private/no-token"][0] == 403 and out["/private/no-token"][2] == "private-needs-a-crm-account"
    assert out["/public"][:2] == [200, '{"ok": true}'], out["/public"]

    # Only allowed requests reached the server, and never with the header.
    assert [s["path"] for s in api.seen] == ["/private/billing", "/public"], api.seen
    assert all(HEADER not in s["headers"] for s in api.seen), api.seen

    rows = {r["http_path"]: r for r in read_requests(audit_dir, "protocol = 'http'")}
    ok = rows["/private/billing"]
    assert (ok["decision"], ok["rule"]) == ("allow", "crm-accounts")
    assert (ok["token_issuer"], ok["token_subject"]) == (idp.issuer, BILLING)
    # The kernel's attribution is all there too: the token adds to it.
    assert ok["pid"] > 0 and ok["exe"] and ok["cgroup_path"], ok
    assert rows["/private/frontend"]["token_subject"] == FRONTEND
    for name, why in refused.items():
        row = rows["/private/" + name.replace(" ", "-")]
        assert (row["decision"], row["rule"], row["http_status"]) == ("deny", "workload_tokens", 401), row
        assert why in row["error"] and row["token_subject"] is None, row
    for path in ("/private/no-token", "/public"):
        assert rows[path]["token_subject"] is None and rows[path]["token_issuer"] is None


def test_llm_calls_with_tokens_over_intercepted_tls(idp, tokens, https_llm, upstream_pki, tmp_path, audit_dir):  # noqa: F811
    policy = write_policy(tmp_path, idp, f"api: {{ address: 127.0.0.1, port: {https_llm.port}, protocol: llm }}", """\
        - name: llm-needs-a-crm-account
          when: { target: api, llm: {} }
          action: deny
        """)
    code = textwrap.dedent(f"""
        import json, openai
        out = {{}}
        for name, token in (("valid", {tokens["billing"]!r}), ("forged", {tokens["forged"]!r}), ("none", None)):
            headers = {{"{HEADER}": token}} if token else None
            c = openai.OpenAI(max_retries=0, default_headers=headers)
            try:
                r = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}])
                out[name] = ["ok", r.choices[0].message.content]
            except openai.APIStatusError as e:
                out[name] = [e.status_code, e.message]
        print(json.dumps(out))
    """)
    args = ["--state-dir", str(tmp_path / "state"), "--upstream-ca", str(upstream_pki / "ca.pem"),
            "--policy", str(policy)]
    run = warden_run(code, audit_dir, *args, env=app_env(https_llm))
    assert run.returncode == 0 and run.report is not None, run.stdout + run.stderr
    out = run.report
    assert out["valid"][0] == "ok", out
    assert out["forged"][0] == 401 and "signature does not verify" in out["forged"][1], out
    assert out["none"][0] == 403 and "llm-needs-a-crm-account" in out["none"][1], out

    # The provider got the valid call only, without the token header.
    (record,) = https_llm.records()
    assert HEADER not in record["headers"], record["headers"]

    rows = read_requests(audit_dir, "protocol = 'llm'")
    assert [(r["decision"], r["rule"], r["token_subject"]) for r in rows] == [
        ("allow", "crm-accounts", BILLING),
        ("deny", "workload_tokens", None),
        ("deny", "llm-needs-a-crm-account", None),
    ], rows
    assert rows[0]["token_issuer"] == idp.issuer and rows[0]["llm_model"] == "gpt-4o-mini"


class ClusterIssuer:
    """The service-account issuer of a Kubernetes API server, as the agent
    reads it: `/.well-known/openid-configuration` (no authorization or
    token endpoint) and `/openid/v1/jwks`, over plain HTTP on loopback."""

    def __init__(self):
        self.key = ECKey.generate_key("P-256", parameters={"kid": "sa-key-1", "use": "sig", "alg": "ES256"}, private=True)
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                documents = {
                    "/.well-known/openid-configuration": {
                        "issuer": issuer.url,
                        "jwks_uri": f"{issuer.url}/openid/v1/jwks",
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["ES256"],
                    },
                    "/openid/v1/jwks": {"keys": [issuer.key.as_dict(private=False)]},
                }
                body = json.dumps(documents.get(self.path, {})).encode()
                self.send_response(200 if self.path in documents else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, namespace: str, account: str, audience: str = "warden", key: ECKey | None = None) -> str:
        """A projected service-account token, as the kubelet gets it."""
        now = int(time.time())
        claims = {
            "aud": [audience], "exp": now + 3600, "iat": now, "nbf": now, "iss": self.url,
            "sub": f"system:serviceaccount:{namespace}:{account}",
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": f"{account}-7d9f", "uid": "0b1c2d3e-0000-4000-8000-000000000001"},
                "serviceaccount": {"name": account, "uid": "0b1c2d3e-0000-4000-8000-000000000002"},
            },
        }
        header = {"alg": "ES256", "kid": "sa-key-1"}
        return jws.serialize_compact(header, json.dumps(claims).encode(), key or self.key)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_kubernetes_projected_tokens(api, tmp_path, audit_dir):
    cluster = ClusterIssuer()
    try:
        port = api.server_address[1]
        policy = tmp_path / "policy.yaml"
        policy.write_text(textwrap.dedent(f"""\
            version: 1
            workload_tokens:
              issuers: [{{ issuer: "{cluster.url}", audience: warden }}]
            http_default: deny
            targets:
              api: {{ address: 127.0.0.1, port: {port}, protocol: http }}
            rules:
              - name: crm-accounts
                when: {{ target: api, token: {{ subject: "system:serviceaccount:crm:*" }} }}
                action: allow
            """))
        other_key = ECKey.generate_key("P-256", parameters={"kid": "sa-key-1"}, private=True)
        sent = {
            "billing": cluster.token("crm", "billing"),
            "api-server-audience": cluster.token("crm", "billing", audience="https://kubernetes.default.svc"),
            "other-key": cluster.token("crm", "billing", key=other_key),
        }
        header = json.loads(base64.urlsafe_b64decode(sent["billing"].split(".")[0] + "=="))
        assert header == {"alg": "ES256", "kid": "sa-key-1"}  # no typ, as the kubelet's
        code = textwrap.dedent(f"""
            import json, httpx
            out = {{}}
            with httpx.Client(base_url="http://127.0.0.1:{port}", trust_env=False, timeout=30) as c:
                for name, token in json.loads({json.dumps(json.dumps(sent))}).items():
                    r = c.get("/" + name, headers={{"X-Warden-Workload-Token": token}})
                    out[name] = [r.status_code, r.text]
            print(json.dumps(out))
        """)
        run = warden_run(code, audit_dir, "--policy", str(policy))
        assert run.returncode == 0 and run.report is not None, run.stdout + run.stderr
    finally:
        cluster.close()
    out = run.report
    assert out["billing"][0] == 200, out
    assert out["api-server-audience"][0] == 401 and "issued to another client or audience" in out["api-server-audience"][1], out
    assert out["other-key"][0] == 401 and "signature does not verify" in out["other-key"][1], out
    assert [s["path"] for s in api.seen] == ["/billing"] and HEADER not in api.seen[0]["headers"], api.seen
    (row,) = read_requests(audit_dir, "http_status = 200")
    assert (row["rule"], row["token_issuer"], row["token_subject"]) == ("crm-accounts", cluster.url, BILLING)


def test_a_held_request_shows_reviewers_the_token_subject(idp, tokens, api, tmp_path, audit_dir, held):
    port = api.server_address[1]
    policy = write_policy(tmp_path, idp, f"api: {{ address: 127.0.0.1, port: {port}, protocol: http }}")
    policy.write_text(policy.read_text().replace("rules:\n", textwrap.dedent("""\
        approvals:
          oidc: { issuer: "ISSUER", client_id: warden }
        rules:
          - name: crm-writes-need-ops
            when: { target: api, token: { subject: "system:serviceaccount:crm:*" }, http: { method: POST } }
            action: approve
            approve: { groups: [ops] }
        """).replace("ISSUER", idp.issuer), 1))
    code = textwrap.dedent(f"""
        import json, httpx
        r = httpx.post("http://127.0.0.1:{port}/refunds", json={{}}, trust_env=False, timeout=60,
                       headers={{"{HEADER}": {tokens["billing"]!r}}})
        print(json.dumps({{"status": r.status_code, "body": r.text}}))
    """)
    run = held(policy, code)
    [pending] = run.pending()
    assert pending["context"] == {"token_issuer": idp.issuer, "token_subject": BILLING}, pending
    reviewer = idp.id_token("erin@example.com", groups=["ops"], email="erin@example.com")
    assert run.approvals("approve", pending["id"], token=reviewer).returncode == 0
    assert run.finish() == {"status": 200, "body": '{"ok": true}'}
    assert [s["path"] for s in api.seen] == ["/refunds"] and HEADER not in api.seen[0]["headers"], api.seen
    (row,) = read_requests(audit_dir, "protocol = 'http'")
    assert (row["rule"], row["approval_id"], row["token_subject"]) == ("crm-writes-need-ops", pending["id"], BILLING)
