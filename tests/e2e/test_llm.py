"""LLM API calls on the data path: real openai and anthropic clients under
`warden run`, over HTTPS to the test provider (loopback, its own CA), with
prompt DLP, masking of answers (streams included, values split across
chunks), key injection, and denials the SDKs understand."""
import json
import textwrap

import pytest

from conftest import read_audit, read_requests, warden_run
from llm_fixtures import PLACEHOLDER_KEY, app_env, https_llm, upstream_pki  # noqa: F401 - fixtures

CARD = "4111 1111 1111 1111"
MASKED_CARD = "**** **** **** 1111"
SSN = "123-45-6789"
REAL_KEY = "sk-real-0123456789abcdef"


@pytest.fixture
def run_py(tmp_path, upstream_pki, https_llm, audit_dir):  # noqa: F811
    """`run_py(code, *warden_args, **env)`: a Python snippet under `warden run`,
    pointed at the HTTPS test provider; returns its JSON report."""

    def run(code: str, *extra: str, expect_ok: bool = True, **env):
        args = ["--state-dir", str(tmp_path / "state"), "--upstream-ca", str(upstream_pki / "ca.pem"), *extra]
        run = warden_run(textwrap.dedent(code), audit_dir, *args, env=app_env(https_llm, **env))
        if expect_ok:
            assert run.returncode == 0 and run.report is not None, run.stdout + run.stderr
        return run

    return run


def script(https_llm, *entries):  # noqa: F811
    https_llm.server.script.entries.extend(entries)


def llm_rows(audit_dir, where="protocol = 'llm'"):
    return read_requests(audit_dir, where)


def test_prompt_dlp_redacts_before_the_prompt_leaves_the_host(run_py, https_llm, audit_dir):  # noqa: F811
    run = run_py(
        f"""
        import json, openai
        c = openai.OpenAI(max_retries=0)
        r = c.chat.completions.create(model="gpt-4o-mini", messages=[
            {{"role": "system", "content": "You are a support bot."}},
            {{"role": "user", "content": "Refund my card {CARD}, SSN {SSN}, order 88231."}}])
        print(json.dumps(dict(answer=r.choices[0].message.content, usage=r.usage.total_tokens)))
        """
    )
    (record,) = https_llm.records()
    sent = record["body"]["messages"][-1]["content"]
    assert CARD not in sent and SSN not in sent, sent
    assert MASKED_CARD in sent and "order 88231" in sent, sent
    # The echo answer carries the redacted text back; the app never sees the card again.
    assert MASKED_CARD in run.report["answer"] and CARD not in run.report["answer"]

    (row,) = llm_rows(audit_dir)
    assert (row["llm_provider"], row["llm_endpoint"], row["llm_model"], row["llm_stream"]) == ("openai", "chat", "gpt-4o-mini", False)
    assert (row["http_method"], row["http_host"], row["http_path"], row["http_status"]) == ("POST", "localhost", "/v1/chat/completions", 200)
    assert row["decision"] == "allow" and row["rule"] == "default"
    assert row["redacted"] == 2
    assert CARD not in row["prompt"] and MASKED_CARD in row["prompt"] and "support bot" in row["prompt"]
    assert len(row["prompt_sha256"]) == 64
    assert row["response"].startswith("You said: ")
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert row["pid"] == read_audit(audit_dir)[0]["pid"]


def test_a_card_split_across_stream_chunks_is_masked_as_it_streams(run_py, https_llm, audit_dir):  # noqa: F811
    # The provider's answer carries a card number cut in three deltas.
    script(https_llm, {"pieces": ["Your card is 4111 11", "11 1111 11", "11, and that is all."]})
    run = run_py(
        """
        import json, openai
        c = openai.OpenAI(max_retries=0)
        deltas = []
        for chunk in c.chat.completions.create(model="gpt-4o-mini", stream=True,
                                               stream_options={"include_usage": True},
                                               messages=[{"role": "user", "content": "what is my card?"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
        print(json.dumps(dict(deltas=deltas)))
        """
    )
    deltas = run.report["deltas"]
    text = "".join(deltas)
    assert text == f"Your card is {MASKED_CARD}, and that is all.", deltas
    assert not any(d.isdigit() and "4111" in d for d in deltas)
    assert len(deltas) >= 2  # still a stream, not one blob at the end

    (row,) = llm_rows(audit_dir)
    assert row["llm_stream"] is True and row["masked"] == 1
    assert row["response"] == text
    assert row["output_tokens"] is not None


def test_responses_api_stream_is_masked(run_py, https_llm, audit_dir):  # noqa: F811
    script(https_llm, {"pieces": ["SSN on file: 123-", "45-67", "89 (verified)"]})
    run = run_py(
        """
        import json, openai
        c = openai.OpenAI(max_retries=0)
        deltas, final = [], None
        with c.responses.stream(model="gpt-4o-mini", input="my ssn?") as s:
            for event in s:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
            final = s.get_final_response().output_text
        print(json.dumps(dict(deltas=deltas, final=final)))
        """
    )
    text = "".join(run.report["deltas"])
    assert SSN not in text and SSN not in run.report["final"], run.report
    assert text.startswith("SSN on file: ") and text.endswith(" (verified)")
    assert run.report["final"] == text
    (row,) = llm_rows(audit_dir)
    assert (row["llm_endpoint"], row["masked"]) == ("responses", 1)


def test_anthropic_sdk_stream_and_key_injection(run_py, https_llm, audit_dir, tmp_path):  # noqa: F811
    key = tmp_path / "anthropic.key"
    key.write_text(REAL_KEY + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            targets:
              provider: {{ address: "127.0.0.1", port: {https_llm.port}, protocol: llm }}
            credentials:
              provider: {{ api_key_file: {key} }}
            prompt_redact: {{ detectors: [payment] }}
            response_mask: {{ detectors: [payment] }}
            """
        )
    )
    script(https_llm, {"pieces": ["Card: 4111 1111", " 1111 1111."]})
    https_llm.server.api_key = REAL_KEY  # the placeholder alone would get 401
    run = run_py(
        f"""
        import json, os, anthropic
        c = anthropic.Anthropic(base_url=os.environ["OPENAI_BASE_URL"].removesuffix("/v1"),
                                api_key="{PLACEHOLDER_KEY}", max_retries=0)
        text = []
        with c.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                               messages=[{{"role": "user", "content": "card {CARD}?"}}]) as s:
            for t in s.text_stream:
                text.append(t)
        print(json.dumps(dict(text="".join(text), env_has_key=any("{REAL_KEY}" in v for v in os.environ.values()))))
        """,
        "--policy",
        str(policy),
    )
    assert run.report["text"] == f"Card: {MASKED_CARD}."
    assert run.report["env_has_key"] is False
    (record,) = https_llm.records()
    # The provider got the real key in the header Anthropic reads; the app held a placeholder.
    assert record["auth"]["x-api-key"]["prefix"] == REAL_KEY[:8], record["auth"]
    assert "authorization" not in record["auth"]
    assert CARD not in json.dumps(record["body"])
    (row,) = llm_rows(audit_dir)
    assert (row["llm_provider"], row["llm_endpoint"], row["redacted"], row["masked"]) == ("anthropic", "messages", 1, 1)
    assert REAL_KEY not in json.dumps(row, default=str)


def test_openai_key_injection_replaces_the_placeholder(run_py, https_llm, tmp_path):  # noqa: F811
    key = tmp_path / "openai.key"
    key.write_text(REAL_KEY)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            targets:
              provider: {{ address: "127.0.0.1", port: {https_llm.port}, protocol: llm }}
            credentials:
              provider: {{ api_key_file: {key} }}
            """
        )
    )
    https_llm.server.api_key = REAL_KEY  # the placeholder alone would get 401
    run_py(
        """
        import json, openai
        c = openai.OpenAI(max_retries=0)
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        c.embeddings.create(model="text-embedding-3-small", input="hi")
        print(json.dumps({}))
        """,
        "--policy",
        str(policy),
    )
    records = https_llm.records()
    assert len(records) == 2
    for r in records:
        assert r["auth"]["authorization"] == {"scheme": "Bearer", "prefix": REAL_KEY[:8]}, r["auth"]


def test_denied_model_and_token_limit_are_sdk_errors(run_py, https_llm, audit_dir, tmp_path):  # noqa: F811
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            targets:
              provider: {{ address: "127.0.0.1", port: {https_llm.port}, protocol: llm }}
            rules:
              - name: small-models-only
                when: {{ target: provider, llm: {{ endpoint: [chat] }} }}
                action: allow
                limits: {{ models: ["gpt-4o-mini"], max_tokens: 500 }}
            """
        )
    )
    run = run_py(
        """
        import json, openai
        c = openai.OpenAI(max_retries=0)
        out = {}
        for name, kw in [("model", dict(model="gpt-4o")), ("tokens", dict(model="gpt-4o-mini", max_tokens=4000)),
                         ("ok", dict(model="gpt-4o-mini", max_tokens=100))]:
            try:
                c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
                out[name] = "ok"
            except openai.PermissionDeniedError as e:
                out[name] = dict(status=e.status_code, message=e.message, code=e.code)
        print(json.dumps(out))
        """,
        "--policy",
        str(policy),
    )
    model, tokens = run.report["model"], run.report["tokens"]
    assert model["status"] == 403 and "gpt-4o" in model["message"] and "small-models-only" in model["message"], model
    assert tokens["status"] == 403 and "4000" in tokens["message"], tokens
    assert model["code"] == "warden_denied"
    assert run.report["ok"] == "ok"
    # Only the allowed call reached the provider.
    assert [r["body"]["model"] for r in https_llm.records()] == ["gpt-4o-mini"]
    rows = llm_rows(audit_dir)
    assert [(r["decision"], r["rule"], r["http_status"]) for r in rows] == [
        ("deny", "small-models-only", 403),
        ("deny", "small-models-only", 403),
        ("allow", "small-models-only", 200),
    ]
    assert "gpt-4o" in rows[0]["error"]


def test_a_secret_in_a_prompt_can_refuse_the_request(run_py, https_llm, audit_dir, tmp_path):  # noqa: F811
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """
            version: 1
            prompt_redact: { detectors: [secrets], on_detect: deny }
            """
        )
    )
    run = run_py(
        """
        import json, openai
        c = openai.OpenAI(max_retries=0)
        try:
            c.chat.completions.create(model="gpt-4o-mini",
                messages=[{"role": "user", "content": "deploy with AKIAIOSFODNN7EXAMPLE please"}])
            print(json.dumps(dict(error=None)))
        except openai.PermissionDeniedError as e:
            print(json.dumps(dict(error=e.message)))
        """,
        "--policy",
        str(policy),
    )
    assert "sensitive" in run.report["error"], run.report
    assert https_llm.records() == []
    (row,) = llm_rows(audit_dir)
    assert row["decision"] == "deny" and "AKIA" not in (row["prompt"] or "")


def test_keep_alive_async_clients_and_plain_http_requests(run_py, https_llm, audit_dir):  # noqa: F811
    run = run_py(
        """
        import asyncio, json, subprocess, os, openai
        async def main():
            c = openai.AsyncOpenAI(max_retries=0)
            answers = []
            for i in range(3):
                r = await c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"n{i}"}])
                answers.append(r.choices[0].message.content)
            stream = await c.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                     messages=[{"role": "user", "content": "streamed"}])
            parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            return answers, "".join(parts)
        answers, streamed = asyncio.run(main())
        models = subprocess.run(["curl", "-sS", os.environ["OPENAI_BASE_URL"] + "/models"], capture_output=True, text=True)
        print(json.dumps(dict(answers=answers, streamed=streamed, models=json.loads(models.stdout)["object"])))
        """
    )
    assert run.report["answers"] == ["You said: n0", "You said: n1", "You said: n2"]
    assert run.report["streamed"] == "You said: streamed"
    assert run.report["models"] == "list"
    rows = read_requests(audit_dir)
    llm = [r for r in rows if r["protocol"] == "llm"]
    assert len(llm) == 4
    # One keep-alive connection carries the async client's calls, in order.
    assert len({r["session_id"] for r in llm}) == 1
    assert [r["seq"] for r in llm] == [1, 2, 3, 4]
    (plain,) = [r for r in rows if r["protocol"] == "http"]
    assert (plain["http_method"], plain["http_path"], plain["http_status"], plain["llm_provider"]) == ("GET", "/v1/models", 200, None)
    conns = {r["session_id"]: r for r in read_audit(audit_dir)}
    assert all(conns[r["session_id"]]["protocol"] == "https" for r in rows)


@pytest.fixture
def h2_front(https_llm, upstream_pki):  # noqa: F811
    """nginx speaking HTTP/2 over TLS in front of the test provider."""
    from nginx import NginxFront

    front = NginxFront(str(upstream_pki / "server.pem"), str(upstream_pki / "server.key"), https_llm.port)
    https_llm.server.tls = None  # nginx speaks plain HTTP/1.1 to it
    yield front
    front.stop()


def test_http2_clients_through_an_http2_server(run_py, https_llm, h2_front, audit_dir):  # noqa: F811
    https_llm.server.script.entries.append({"pieces": ["card 4111 1111 ", "1111 1111 done"], "repeat": True})
    base = f"https://localhost:{h2_front.port}/v1"
    run = run_py(
        f"""
        import json, subprocess, httpx
        out = {{}}
        with httpx.Client(http2=True, timeout=30) as c:
            r = c.post("{base}/chat/completions", json={{"model": "gpt-4o-mini",
                       "messages": [{{"role": "user", "content": "mine is {CARD}"}}]}})
            out["version"], out["status"] = r.http_version, r.status_code
            out["answer"] = r.json()["choices"][0]["message"]["content"]
            text = []
            with c.stream("POST", "{base}/chat/completions", json={{"model": "gpt-4o-mini", "stream": True,
                          "messages": [{{"role": "user", "content": "stream"}}]}}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {{"):
                        d = json.loads(line[6:])["choices"]
                        if d and d[0]["delta"].get("content"):
                            text.append(d[0]["delta"]["content"])
            out["streamed"] = "".join(text)
        curl = subprocess.run(["curl", "-sS", "--http2", "-o", "/dev/null", "-w", "%{{http_version}}", "{base}/models"],
                              capture_output=True, text=True)
        out["curl"] = curl.stdout
        print(json.dumps(out))
        """
    )
    report = run.report
    assert (report["version"], report["status"], report["curl"]) == ("HTTP/2", 200, "2"), report
    assert report["streamed"] == f"card {MASKED_CARD} done", report
    assert report["answer"] == f"card {MASKED_CARD} done"
    received = [r for r in https_llm.records() if r["path"] == "/v1/chat/completions"]
    assert len(received) == 2 and CARD not in json.dumps([r["body"] for r in received])
    rows = read_requests(audit_dir)
    assert [(r["protocol"], r["http_path"], r["http_status"]) for r in rows] == [
        ("llm", "/v1/chat/completions", 200),
        ("llm", "/v1/chat/completions", 200),
        ("http", "/v1/models", 200),
    ]
    assert rows[0]["redacted"] == 1 and rows[1]["masked"] == 1
