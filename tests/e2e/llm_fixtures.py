"""Fixtures for the LLM end-to-end tests: the test LLM server (an OpenAI- and
Anthropic-compatible stand-in for a provider), the environment an LLM app
gets, and `warden run` of the LangChain app in tests/apps.

Import the fixtures into a test module to use them:
    from llm_fixtures import llm_server, run_app  # noqa: F401
"""
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "peers"))
from llm_server import read_log, start_server  # noqa: E402
from pki import make_provider_pki  # noqa: E402

from conftest import warden_run  # noqa: E402

LANGCHAIN_APP = TESTS / "apps" / "langchain_app.py"
# What the app sends as its key: never a real one. The server records only
# its first 8 characters.
PLACEHOLDER_KEY = "sk-placeholder-not-a-real-key"


class LLMServerHandle:
    """A running test LLM server and the JSON-lines log of what reached it."""

    def __init__(self, server, port: int, log_path: Path):
        self.server, self.port, self.log_path = server, port, log_path
        self.host = "127.0.0.1"
        self.base_url = f"http://{self.host}:{port}/v1"

    def records(self) -> list[dict]:
        """Every request the server received, in order, from its log."""
        return read_log(self.log_path)

    @property
    def connections(self) -> int:
        """How many TCP connections the server accepted."""
        return self.server.connections


@pytest.fixture
def llm_server(tmp_path):
    log = tmp_path / "llm-requests.jsonl"
    server, port = start_server("127.0.0.1", 0, log=log)
    yield LLMServerHandle(server, port, log)
    server.close()


@pytest.fixture
def upstream_pki(tmp_path):
    """The "real" provider's CA and certificate, which only the agent is told to trust."""
    return make_provider_pki(tmp_path / "pki")


@pytest.fixture
def https_llm(tmp_path, upstream_pki):
    """The test LLM server over TLS, as `https://localhost:PORT/v1`."""
    log = tmp_path / "llm-requests.jsonl"
    server, port = start_server("127.0.0.1", 0, log=log, tls_cert=str(upstream_pki / "server.pem"),
                                tls_key=str(upstream_pki / "server.key"))
    handle = LLMServerHandle(server, port, log)
    handle.base_url = f"https://localhost:{port}/v1"
    yield handle
    server.close()


def app_env(llm: LLMServerHandle, **extra: str) -> dict:
    """The environment of an LLM app pointed at the test server.

    Nothing may leave loopback: no LangSmith tracing or gateway, and no HTTP
    proxy from the caller's environment (httpx honours those)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    for k in ("LANGSMITH_GATEWAY", "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        env.pop(k, None)
    env.update(
        OPENAI_BASE_URL=llm.base_url,
        OPENAI_API_KEY=PLACEHOLDER_KEY,
        LANGCHAIN_TRACING_V2="false",
        LANGSMITH_TRACING="false",
        NO_PROXY="127.0.0.1,localhost,::1",
        WARDEN_LOG="warden=warn",
        **extra,
    )
    return env


@pytest.fixture
def run_app():
    """`run_app(audit_dir, env, *warden_args)`: the LangChain app under `warden run`."""

    def run(audit_dir: Path, env: dict, *extra: str, timeout: float = 180):
        # warden_run runs `python -c CODE`; the code runs the app file as its
        # __main__, so the process (pid, exe) is the app's own.
        code = (
            f"import runpy, sys; sys.argv = [{str(LANGCHAIN_APP)!r}]; "
            f"runpy.run_path({str(LANGCHAIN_APP)!r}, run_name='__main__')"
        )
        return warden_run(code, audit_dir, *extra, timeout=timeout, env=env)

    return run
