"""Daily LLM token budgets: real openai and anthropic clients under `warden run`
spend a small budget at the HTTPS test provider (loopback, its own CA); the
next call is a RateLimitError (429) the SDK does not retry, audited as denied;
streams count too, with or without usage; and a new agent on the same audit
learns what the day already used."""
import os
import sys
import textwrap

import pytest

from conftest import read_requests, warden_run
from llm_fixtures import app_env, https_llm, upstream_pki  # noqa: F401 - fixtures


@pytest.fixture
def run_py(tmp_path, upstream_pki, https_llm, audit_dir):  # noqa: F811
    """`run_py(code, *warden_args)`: a Python snippet under `warden run` with the
    budget policy, pointed at the HTTPS test provider; returns its JSON report."""

    def run(code: str, *extra: str):
        args = ["--state-dir", str(tmp_path / "state"), "--upstream-ca", str(upstream_pki / "ca.pem"),
                "--policy", str(tmp_path / "policy.yaml"), *extra]
        run = warden_run(textwrap.dedent(code), audit_dir, *args, env=app_env(https_llm))
        assert run.returncode == 0 and run.report is not None, run.stdout + run.stderr
        return run

    return run


def write_policy(tmp_path, https_llm, tokens_per_day: int):  # noqa: F811
    (tmp_path / "policy.yaml").write_text(
        textwrap.dedent(
            f"""
            version: 1
            workloads:
              bot: {{ match: {{ exe: "{os.path.realpath(sys.executable)}" }} }}
            targets:
              provider: {{ address: "127.0.0.1", port: {https_llm.port}, protocol: llm }}
            budgets:
              bot: {{ tokens_per_day: {tokens_per_day} }}
            """
        )
    )


def words(n: int) -> str:
    # The test provider counts a word as a token.
    return " ".join(["word"] * n)


# Each call is reported as {"ok": tokens} or {"status", "code", "message", "retry", "type"}.
CALLS = """
import json, os, openai, anthropic
out = []

def attempt(fn):
    try:
        out.append(dict(ok=fn()))
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        out.append(dict(type=type(e).__name__, status=e.status_code, message=e.message,
                        code=(e.body or {}).get("code") if isinstance(e.body, dict) else None,
                        retry=e.response.headers.get("x-should-retry"),
                        rule=e.response.headers.get("x-warden-rule")))

# The SDKs' default retries are on: a 429 they retried would show as more rows.
oa = openai.OpenAI(max_retries=3)
an = anthropic.Anthropic(base_url=os.environ["OPENAI_BASE_URL"].removesuffix("/v1"), api_key="k", max_retries=3)

def chat():
    r = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "go"}])
    return r.usage.total_tokens

def stream(include_usage):
    extra = dict(stream_options={"include_usage": True}) if include_usage else {}
    s = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "go"}],
                                   stream=True, **extra)
    return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

def messages():
    r = an.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "go"}])
    return r.usage.input_tokens + r.usage.output_tokens
"""


def run_calls(run_py, *calls):
    body = "\n".join(f"attempt(lambda: {c})" for c in calls)
    return run_py(CALLS + body + "\nprint(json.dumps(dict(calls=out)))\n")


def test_a_spent_budget_is_a_rate_limit_error_the_sdk_does_not_retry(run_py, https_llm, audit_dir, tmp_path):  # noqa: F811
    write_policy(tmp_path, https_llm, 30)
    https_llm.server.script.entries.append(words(40))
    run = run_calls(run_py, "chat()", "chat()")
    first, second = run.report["calls"]
    assert first == {"ok": 41}, first  # 1 prompt token ("go") and 40 answer tokens
    assert second["type"] == "RateLimitError" and second["status"] == 429, second
    assert second["code"] == "warden_budget_exceeded" and second["retry"] == "false", second
    assert second["rule"] == "budgets.bot", second
    message = second["message"]
    assert 'workload "bot" has used 41 of its daily budget of 30 LLM tokens' in message, message
    assert "it resets at" in message and "T00:00:00Z (midnight UTC)" in message, message
    # Only the first call reached the provider, and the SDK did not retry the 429.
    assert len(https_llm.records()) == 1
    rows = read_requests(audit_dir, "protocol = 'llm'")
    assert [(r["decision"], r["rule"], r["http_status"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("allow", "default", 200, 1, 40),
        ("deny", "budgets.bot", 429, None, None),
    ]
    # The SDK puts "Error code: 429 - " in front of the message.
    assert rows[1]["error"] and message.endswith(rows[1]["error"]) and rows[1]["workload"] == "bot"

    # A new agent on the same audit knows what the day used: refused at once,
    # the Anthropic SDK in its own shape.
    run = run_calls(run_py, "messages()", "chat()")
    refused = run.report["calls"]
    assert [(c["type"], c["status"]) for c in refused] == [("RateLimitError", 429)] * 2, refused
    assert 'has used 41 of its daily budget of 30' in refused[0]["message"], refused
    assert refused[0]["retry"] == "false"
    assert len(https_llm.records()) == 1
    rows = read_requests(audit_dir, "protocol = 'llm' AND decision = 'deny'")
    assert [(r["llm_provider"], r["http_status"]) for r in rows] == [
        ("openai", 429), ("anthropic", 429), ("openai", 429)
    ]


def test_streams_count_with_their_usage_or_an_estimate(run_py, https_llm, audit_dir, tmp_path):  # noqa: F811
    write_policy(tmp_path, https_llm, 50)
    # A: a stream with usage, 1 + 45 tokens as reported. B: a stream without
    # usage, estimated at 4 bytes a token: the prompt as the agent reads it,
    # "user: go" (8 bytes, 2 tokens), and the 20 bytes of the answer (5).
    https_llm.server.script.entries.extend([words(45), "abcd efgh ijkl mnop."])
    run = run_calls(run_py, "stream(True)", "stream(False)", "chat()")
    a, b, c = run.report["calls"]
    assert a == {"ok": words(45)} and b == {"ok": "abcd efgh ijkl mnop."}, (a, b)
    assert c["status"] == 429 and 'has used 53 of its daily budget of 50' in c["message"], c
    rows = read_requests(audit_dir, "protocol = 'llm'")
    assert [(r["decision"], r["llm_stream"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("allow", True, 1, 45),
        ("allow", True, None, None),
        ("deny", False, None, None),
    ]
    assert len(https_llm.records()) == 2
