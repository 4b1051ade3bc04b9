"""An internal JSON API through the agent: a rule's mask_response masks the
fields its JSON paths select and the detectors' findings in every answer it
decides, and what it cannot read is not passed on."""
import gzip
import json
import socket
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import read_requests, warden_run

CUSTOMERS = {
    "customers": [
        {"name": "Ada", "card": "4111 1111 1111 1111", "ssn": "123-45-6789", "note": "paid with 5555 5555 5555 4444"},
        {"name": "Alan", "card": "4012888888881881", "ssn": 987654321, "note": "none"},
    ],
    "total": 2,
}


class Api(BaseHTTPRequestHandler):
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append(dict(self.headers))
        if self.path == "/customers":
            body, ctype, extra = json.dumps(CUSTOMERS).encode(), "application/json; charset=utf-8", {}
        elif self.path == "/compressed":
            body, ctype, extra = gzip.compress(json.dumps(CUSTOMERS).encode()), "application/json", {
                "Content-Encoding": "gzip"}
        else:
            body, ctype, extra = b"card 4111 1111 1111 1111 in plain text", "text/plain", {}
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_json_fields_and_findings_are_masked(api, audit_dir, tmp_path):
    port = api.server_address[1]
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        targets:
          crm-api: {{ address: 127.0.0.1, port: {port}, protocol: http }}
        rules:
          - name: crm-reads
            when: {{ target: crm-api, http: {{ method: GET }} }}
            action: allow
            mask_response: {{ fields: ["$.customers[*].card", "$..ssn"], detectors: [payment] }}
        """))
    code = textwrap.dedent(f"""
        import json, urllib.request
        out = {{}}
        for path in ["/customers", "/compressed", "/text"]:
            req = urllib.request.Request("http://127.0.0.1:{port}" + path, headers={{"Accept-Encoding": "gzip"}})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    out[path] = r.read().decode()
            except urllib.error.HTTPError as e:
                out[path] = e.code
        print(json.dumps(out))
    """)
    run = warden_run(code, audit_dir, "--policy", str(policy))
    assert run.returncode == 0, run.stderr
    report = run.report
    assert json.loads(report["/customers"]) == {
        "customers": [
            {"name": "Ada", "card": "**** **** **** 1111", "ssn": "***-**-****", "note": "paid with **** **** **** 4444"},
            {"name": "Alan", "card": "************1881", "ssn": None, "note": "none"},
        ],
        "total": 2,
    }
    # A compressed answer cannot be masked: it is not passed on.
    assert report["/compressed"] == 502
    # Not JSON: the body goes on as it came.
    assert report["/text"] == "card 4111 1111 1111 1111 in plain text"
    # The server was asked for uncompressed answers.
    assert all("Accept-Encoding" not in seen for seen in api.seen[-3:]), api.seen[-3:]
    rows = {r["http_path"]: r for r in read_requests(audit_dir)}
    assert (rows["/customers"]["masked"], rows["/customers"]["rule"]) == (5, "crm-reads")
    assert "compressed an answer that the policy masks" in rows["/compressed"]["error"]
    assert rows["/text"]["masked"] == 0
