"""A real LangChain app under `warden run`: its calls to an OpenAI-compatible
provider go through the agent intact and are audited to the process; a
policy that blocks the provider makes the OpenAI client fail at once, and
nothing reaches the provider."""
import ipaddress
import os
import sys
import textwrap
from collections import Counter

from conftest import duckdb_query, read_audit
from llm_fixtures import PLACEHOLDER_KEY, app_env, llm_server, run_app  # noqa: F401 - fixtures

CARD = "4111 1111 1111 1111"


def assert_only_loopback(rows):
    # LangChain and the OpenAI SDK must not call home (tracing, telemetry):
    # any other destination would have a row here.
    elsewhere = [(r["dst_addr"], r["dst_port"]) for r in rows if not ipaddress.ip_address(r["dst_addr"]).is_loopback]
    assert not elsewhere, f"connections left loopback: {elsewhere}"


def test_langchain_app_is_relayed_and_audited(llm_server, run_app, audit_dir):  # noqa: F811
    run = run_app(audit_dir, app_env(llm_server))
    assert run.returncode == 0, run.stdout + run.stderr
    report = run.report
    assert report and report["ok"], run.stdout + run.stderr
    # Three answers (chain, streamed chain, plain SDK), each the server's echo
    # of what the app sent: the bytes went both ways unchanged.
    assert len(report["answers"]) == 3
    assert all(a.startswith("You said: ") and "order #88231" in a for a in report["answers"]), report
    assert report["streamed_chunks"] > 1
    assert report["embedding_dims"] == 16

    # What reached the provider.
    records = llm_server.records()
    assert [r["path"] for r in records] == ["/v1/chat/completions"] * 3 + ["/v1/embeddings"]
    assert [r["stream"] for r in records] == [False, True, False, False]
    assert records[1]["body"]["stream_options"] == {"include_usage": True}
    assert all(r["status"] == 200 for r in records)
    for r in records:
        assert r["auth"]["authorization"] == {"scheme": "Bearer", "prefix": PLACEHOLDER_KEY[:8]}
        assert r["headers"]["user-agent"].startswith("OpenAI/Python")
    # The embedded default policy redacts card numbers in prompts: the
    # provider gets the ticket without it.
    for r in records[:3]:
        sent = r["body"]["messages"][-1]["content"]
        assert CARD not in sent and "**** **** **** 1111" in sent, sent

    rows = read_audit(audit_dir)
    assert_only_loopback(rows)
    # The app talks to its provider only, and every one of its connections is
    # a row attributed to it.
    assert {(r["dst_addr"], r["dst_port"]) for r in rows} == {("127.0.0.1", llm_server.port)}
    exe = os.path.realpath(sys.executable)
    assert report["exe"] == exe
    for row in rows:
        assert row["pid"] == report["pid"], row
        assert row["exe"] == exe
        assert row["uid"] == 0 and row["user"] == "root"
        assert row["transport"] == "tcp" and row["family"] == "ipv4"
        assert row["decision"] == "allow" and row["rule"] == "default"
        assert row["protocol"] == "http"
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["error"] is None
        assert row["cgroup_path"].startswith("/warden/run-")

    # Downstream, the audit's byte counts are the bytes the server wrote, one
    # connection at a time (keep-alive: several requests per connection);
    # upstream they are what the app sent, before redaction.
    down = Counter()
    for r in records:
        down[r["conn"]] += r["response_bytes"]
    assert len(rows) == llm_server.connections == len(down)
    assert sorted(r["bytes_down"] for r in rows) == sorted(down.values())

    # The same, as an operator would ask DuckDB.
    [(conns, total_up, total_down, pids)] = duckdb_query(
        audit_dir,
        f"SELECT count(*), sum(bytes_up), sum(bytes_down), list(DISTINCT pid) FROM connections "
        f"WHERE dst_port = {llm_server.port} AND protocol = 'http' AND decision = 'allow'",
    )
    assert conns == len(rows)
    assert total_up > 0
    assert total_down == sum(r["response_bytes"] for r in records)
    assert pids == [report["pid"]]


def test_policy_denying_the_provider_fails_fast_and_is_audited(llm_server, run_app, audit_dir, tmp_path):  # noqa: F811
    policy = tmp_path / "deny-llm.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""
            version: 1
            default: audit
            targets:
              llm-provider: {{ address: "127.0.0.1/32", port: {llm_server.port} }}
            rules:
              - name: block-llm-provider
                when: {{ target: llm-provider }}
                action: deny
            """
        )
    )
    run = run_app(audit_dir, app_env(llm_server, DEMO_EXPECT_DENY="1"), "--policy", str(policy))
    assert run.returncode == 0, run.stdout + run.stderr
    report = run.report
    assert report["denied"], report
    assert [c["via"] for c in report["calls"]] == ["langchain", "openai"]
    for call in report["calls"]:
        # openai.APIConnectionError (LangChain raises a subclass), at once:
        # the clients' own timeout was 30 s.
        assert call["api_connection_error"], call
        assert call["error_type"].endswith("ConnectionError"), call
        assert call["elapsed_s"] < 5, call

    # Nothing reached the provider, not even a TCP connection.
    assert llm_server.records() == []
    assert llm_server.connections == 0

    rows = read_audit(audit_dir)
    assert_only_loopback(rows)
    # Each call tried twice (max_retries=1): four refused connections.
    assert len(rows) == 4
    for row in rows:
        assert (row["dst_addr"], row["dst_port"]) == ("127.0.0.1", llm_server.port)
        assert row["decision"] == "deny" and row["rule"] == "block-llm-provider"
        assert row["pid"] == report["pid"]
        assert row["bytes_up"] == 0 and row["bytes_down"] == 0
    assert duckdb_query(audit_dir, "SELECT DISTINCT decision, rule FROM connections") == [("deny", "block-llm-provider")]
