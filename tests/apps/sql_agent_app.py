"""A LangChain SQL agent, built the usual way: ChatOpenAI with a `run_sql`
tool and a `fetch` tool (an HTTP GET with httpx) bound, a loop that runs
the tool calls the model makes against PostgreSQL (psycopg) or the web and
feeds the results back, until the model answers.
The tests run it under `warden run` to check that the audit links each
statement the model wrote to the LLM call that wrote it, and only those.

Like many such apps it also talks to the database on its own: it counts
open tickets before it starts, logs each question and answer (a bound
INSERT), and looks at the closed tickets after each question; and it lists
the models (MODELS_URL) on its own before it starts.

Configuration: OPENAI_BASE_URL, OPENAI_API_KEY, DATABASE_URL (a libpq
conninfo), QUESTIONS (a JSON list of strings). The last line on stdout is
a JSON report: every statement run, with who wrote it ("model" or "app"),
the URLs fetched, with who chose them, and the answers.
"""
import json
import os
import sys

os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")
os.environ.setdefault("LANGSMITH_TRACING", "false")

import httpx  # noqa: E402
import psycopg  # noqa: E402
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
ran: list[dict] = []
fetched: list[dict] = []


def run(sql: str, params=None, by: str = "app"):
    ran.append({"sql": sql, "by": by})
    cur = conn.execute(sql, params)
    return cur.fetchall() if cur.description else f"{cur.rowcount} rows"


@tool
def run_sql(query: str) -> str:
    """Run one SQL statement against the support database and return its rows."""
    # Tidy the model's formatting before running it, as such tools often do.
    tidy = " ".join(query.split())
    try:
        return json.dumps(run(tidy, by="model"), default=str)
    except psycopg.Error as e:
        return f"error: {e}"


def get(url: str, by: str = "app") -> str:
    fetched.append({"url": url, "by": by})
    return httpx.get(url, timeout=10).text


@tool
def fetch(url: str) -> str:
    """Fetch a web page or API resource with HTTP GET and return its body."""
    try:
        return get(url, by="model")[:2000]
    except httpx.HTTPError as e:
        return f"error: {e}"


TOOLS = {"run_sql": run_sql, "fetch": fetch}


def ask(llm, question: str) -> str:
    messages = [SystemMessage("You answer support questions with the run_sql tool."), HumanMessage(question)]
    for _ in range(4):
        ai = llm.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            return ai.content
        for call in ai.tool_calls:
            messages.append(ToolMessage(TOOLS[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    return "(no answer)"


def main() -> int:
    llm = ChatOpenAI(model="gpt-4o-mini", temperature=0, max_retries=0, timeout=30).bind_tools([run_sql, fetch])
    answers = []
    get(os.environ["MODELS_URL"])
    run("SELECT count(*) FROM tickets WHERE status = 'open'")
    for question in json.loads(os.environ["QUESTIONS"]):
        answer = ask(llm, question)
        answers.append(answer)
        run("INSERT INTO bot_log (question, answer) VALUES (%s, %s)", (question, answer))
        run("SELECT id, subject FROM tickets WHERE status = 'closed' ORDER BY id")
    print(json.dumps({"ran": ran, "fetched": fetched, "answers": answers, "pid": os.getpid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
