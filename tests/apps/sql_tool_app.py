"""A LangChain SQL agent built the usual way: ChatOpenAI bound to
langchain-community's SQL tool (`SQLDatabase.from_uri(...)` and
`QuerySQLDatabaseTool`, which SQLAlchemy and psycopg connect), and a loop
that runs the tool calls the model makes and feeds the results back until
the model answers. The demo runs it under `warden run` against a CRM
database whose `customers` table holds card numbers.

It holds no real database login: DATABASE_URL names a placeholder user and
password, and Warden logs in for it with the password the policy's
credential gives.

Configuration: OPENAI_BASE_URL, OPENAI_API_KEY (a placeholder),
DATABASE_URL (an SQLAlchemy URL), QUESTION. The last line on stdout is a
JSON report: the user the session runs as, each tool call the model made
with what the tool returned, the answer, and SHA-256 digests of the
environment's values (so that the caller can check that no secret of its
own was among them without the app printing them).
"""
import hashlib
import json
import os
import sys
import warnings

os.environ.setdefault("LANGCHAIN_TRACING_V2", "false")
os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.pop("LANGSMITH_GATEWAY", None)
# langchain-community warns on import that it is being sunset; the tool works.
warnings.simplefilter("ignore", DeprecationWarning)

from langchain_community.tools import QuerySQLDatabaseTool  # noqa: E402
from langchain_community.utilities import SQLDatabase  # noqa: E402
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402


def main() -> int:
    db = SQLDatabase.from_uri(os.environ["DATABASE_URL"], include_tables=["customers"])
    sql_tool = QuerySQLDatabaseTool(db=db)
    llm = ChatOpenAI(model="gpt-4o-mini", temperature=0, max_retries=0, timeout=30).bind_tools([sql_tool])

    messages = [
        SystemMessage("You are a support agent. Use the sql_db_query tool to read and update the CRM database."),
        HumanMessage(os.environ["QUESTION"]),
    ]
    calls, answer = [], None
    for _ in range(6):
        ai = llm.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            answer = ai.content
            break
        for call in ai.tool_calls:
            result = sql_tool.invoke(call["args"])
            calls.append({"tool": call["name"], "query": call["args"].get("query"), "result": result})
            messages.append(ToolMessage(result, tool_call_id=call["id"]))

    print(json.dumps({
        "pid": os.getpid(),
        "connected_as": db.run("SELECT current_user"),
        "calls": calls,
        "answer": answer,
        "env_sha256": sorted({hashlib.sha256(v.encode()).hexdigest() for v in os.environ.values()}),
    }))
    return 0 if answer is not None else 1


if __name__ == "__main__":
    sys.exit(main())
