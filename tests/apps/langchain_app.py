"""A customer-support bot built the usual way with LangChain: the kind of
application Warden protects. The tests and the demo run it under `warden run`.

It answers one support ticket, as such a bot does:

1. a chain `ChatPromptTemplate | ChatOpenAI | StrOutputParser` drafts the reply;
2. the same chain, streamed (`.stream`), writes the reply the customer sees
   appear word by word;
3. a plain `openai.OpenAI` client files a one-line summary for the CRM, and
   embeds the ticket to look up similar past tickets.

The ticket holds a (fake, Luhn-valid test) card number, 4111 1111 1111 1111,
as customers' tickets do; under Warden it never reaches the provider.

Configuration, as for any OpenAI app: OPENAI_BASE_URL (here
http://127.0.0.1:PORT/v1, the test LLM server) and OPENAI_API_KEY (a
placeholder). The model name comes from SUPPORT_BOT_MODEL (gpt-4o-mini).

The last line on stdout is a JSON summary:
    {"answers": [...], "streamed_chunks": N, "pid": ..., ...}
It exits 1 if anything failed.

With DEMO_EXPECT_DENY=1 the bot expects its calls to be refused by policy:
it makes one call through LangChain and one through the OpenAI client, and
exits 0 if (and only if) both were refused, with openai.APIConnectionError
(the connection was refused) or openai.PermissionDeniedError (the request
was); it reports the errors and how long they took.
"""
import json
import os
import sys
import time

# No LangSmith tracing or gateway: the bot must talk to its provider only.
# (Set before LangChain is imported; the caller may have set them already.)
os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")
os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.pop("LANGSMITH_GATEWAY", None)

import openai  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

TICKET_ID = "T-1042"
TICKET = (
    "Hello, I was charged twice for order #88231. The card I used is "
    "4111 1111 1111 1111, exp 12/29. Please refund the duplicate charge."
)


def config():
    base_url = os.environ.get("OPENAI_BASE_URL")
    api_key = os.environ.get("OPENAI_API_KEY")
    if not base_url or not api_key:
        raise SystemExit("langchain_app: set OPENAI_BASE_URL and OPENAI_API_KEY")
    return base_url, api_key, os.environ.get("SUPPORT_BOT_MODEL", "gpt-4o-mini")


def build_chain(base_url: str, api_key: str, model: str, max_retries: int):
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are the support assistant of ACME Shop. Be brief and polite."),
            ("human", "Ticket {ticket_id}: {ticket}"),
        ]
    )
    llm = ChatOpenAI(
        model=model,
        base_url=base_url,
        api_key=api_key,
        temperature=0,
        timeout=30,
        max_retries=max_retries,
        # Ask for token usage in streams too (a custom base_url turns it off).
        stream_usage=True,
    )
    return prompt | llm | StrOutputParser()


def run_bot(base_url: str, api_key: str, model: str) -> dict:
    chain = build_chain(base_url, api_key, model, max_retries=2)
    inputs = {"ticket_id": TICKET_ID, "ticket": TICKET}
    answers = []

    # 1. Draft the reply in one call.
    answers.append(chain.invoke(inputs))

    # 2. Stream it, as the chat widget shows it.
    chunks = [c for c in chain.stream(inputs) if c]
    answers.append("".join(chunks))

    # 3. The plain OpenAI SDK, as other parts of the bot use it.
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=30)
    summary = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Summarise the ticket in one line for the CRM."},
            {"role": "user", "content": TICKET},
        ],
    )
    answers.append(summary.choices[0].message.content)
    similar = client.embeddings.create(model="text-embedding-3-small", input=[TICKET])

    return {
        "answers": answers,
        "streamed_chunks": len(chunks),
        "embedding_dims": len(similar.data[0].embedding),
        "usage_tokens": summary.usage.total_tokens if summary.usage else None,
    }


def expect_deny(base_url: str, api_key: str, model: str) -> dict:
    """The bot's first calls, refused by policy: through LangChain, then
    through the plain OpenAI client. Each must fail at once, with
    openai.APIConnectionError (LangChain raises a subclass of it) when the
    connection is refused, or openai.PermissionDeniedError when the request is."""
    # One retry each, as a production bot would have; the point is that the
    # error comes at once, not after the 30 s timeout.
    chain = build_chain(base_url, api_key, model, max_retries=1)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=30, max_retries=1)
    calls = {
        "langchain": lambda: chain.invoke({"ticket_id": TICKET_ID, "ticket": TICKET}),
        "openai": lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": TICKET}]
        ).choices[0].message.content,
    }
    outcomes = []
    for via, call in calls.items():
        t0 = time.monotonic()
        outcome = {"via": via}
        try:
            outcome["answer"] = call()
            outcome["api_connection_error"] = False
            outcome["permission_denied"] = False
        except openai.PermissionDeniedError as e:
            outcome.update(
                api_connection_error=False,
                permission_denied=True,
                error_type=f"{type(e).__module__}.{type(e).__name__}",
                error=e.message,
            )
        except openai.APIConnectionError as e:
            root = e
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            outcome.update(
                api_connection_error=True,
                permission_denied=False,
                error_type=f"{type(e).__module__}.{type(e).__name__}",
                error=str(e),
                root_cause=f"{type(root).__module__}.{type(root).__name__}: {root}",
            )
        outcome["elapsed_s"] = round(time.monotonic() - t0, 3)
        outcomes.append(outcome)
    refused = all(o["api_connection_error"] or o["permission_denied"] for o in outcomes)
    return {"denied": refused, "calls": outcomes}


def main() -> int:
    base_url, api_key, model = config()
    deny_mode = os.environ.get("DEMO_EXPECT_DENY") == "1"
    try:
        report = expect_deny(base_url, api_key, model) if deny_mode else run_bot(base_url, api_key, model)
        ok = report["denied"] if deny_mode else all(report["answers"]) and report["streamed_chunks"] > 1
    except Exception as e:  # noqa: BLE001 - report any failure in the JSON line
        report, ok = {"error_type": f"{type(e).__module__}.{type(e).__name__}", "error": str(e)}, False
    report.update(pid=os.getpid(), exe=os.path.realpath(sys.executable), ok=bool(ok))
    print(json.dumps(report), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
