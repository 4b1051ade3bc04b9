"""Records the fuzz targets' seed corpus from real sessions, on loopback only.

A relay listens on 127.0.0.1 and forwards each connection to a real server
on 127.0.0.1, keeping the bytes of each direction. Real clients talk to the
relay:

- `postgres`: a PostgreSQL cluster started as the end-to-end tests start one
  (tests/peers/pg.py: initdb, 127.0.0.1 only, SCRAM), then sessions of `psql`
  and `psycopg` (simple and extended protocol, COPY, pipeline, binary
  results, errors, notices, a cancel, a failed login). Each connection gives
  postgres_frontend/<session> (what the client sent) and
  postgres_backend/<session> (what the server sent).
- `llm`: the test LLM server (tests/peers/llm_server.py) behind the relay,
  called with the `openai` and `anthropic` clients. Each HTTP exchange is
  cut out of the relayed bytes: request bodies and JSON response bodies go
  to llm_json/, streamed (text/event-stream) bodies, de-chunked, to sse/.

    sudo -E <venv>/bin/python agent-protocols/fuzz/capture/capture.py [postgres|llm|all]

(root: initdb and the server run as the `postgres` user, as in the tests;
<venv> is the test peers' environment `cargo xtask setup` makes,
~/.cache/warden-dev/venv-*). Files are written under
agent-protocols/fuzz/corpus/<target>/ (`--out` for another directory) and
replace files of the same name; the values in them are the test suite's
fakes (the test card 4111 1111 1111 1111, made-up emails and keys).

Nothing here connects anywhere but 127.0.0.1: the relay and every client
are given that address, and proxy variables are cleared so that the HTTP
clients cannot go through a proxy.
"""
from __future__ import annotations

import argparse
import warnings
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FUZZ = ROOT / "agent-protocols" / "fuzz"
LOOPBACK = "127.0.0.1"

for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

sys.path.insert(0, str(ROOT / "tests" / "peers"))


# --------------------------------------------------------------------------
# The relay


class Connection:
    """One relayed connection: the bytes of each direction, in order."""

    def __init__(self):
        self.client = bytearray()  # client to server
        self.server = bytearray()  # server to client
        self.done = threading.Event()


class Relay:
    """Accepts on 127.0.0.1 and forwards every connection to 127.0.0.1:port."""

    def __init__(self, upstream_port: int):
        self.upstream = (LOOPBACK, upstream_port)
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            conn = Connection()
            with self.lock:
                self.connections.append(conn)
            a = threading.Thread(target=self._pump, args=(client, upstream, conn.client), daemon=True)
            b = threading.Thread(target=self._pump, args=(upstream, client, conn.server), daemon=True)
            a.start()
            b.start()
            threading.Thread(target=self._finish, args=(a, b, client, upstream, conn), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray):
        try:
            while data := src.recv(65536):
                record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def _finish(a, b, client, upstream, conn):
        a.join()
        b.join()
        client.close()
        upstream.close()
        conn.done.set()

    def take(self, timeout: float = 10.0) -> list[Connection]:
        """The connections made since the last call, once they have closed."""
        deadline = time.monotonic() + timeout
        with self.lock:
            conns, self.connections = self.connections, []
        for c in conns:
            if not c.done.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a relayed connection did not close")
        return conns

    def close(self):
        self.listener.close()


def write(out: Path, target: str, name: str, data: bytes):
    if not data:
        return  # e.g. what the server sends after a CancelRequest: nothing
    path = out / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    print(f"  {target}/{name}: {len(data)} bytes")


# --------------------------------------------------------------------------
# PostgreSQL

SCHEMA = """
CREATE TABLE customers (
    id serial PRIMARY KEY, name text NOT NULL, email text, card text, ssn text,
    balance numeric(10, 2), created timestamptz DEFAULT now(), tags text[], meta jsonb, photo bytea
);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total numeric(10, 2), note text);
INSERT INTO customers (name, email, card, ssn, balance, tags, meta, photo) VALUES
    ('Ada Lovelace', 'ada@example.com', '4111 1111 1111 1111', '123-45-6789', 1024.50, '{vip,early}', '{"tier": "gold"}', '\\x89504e47'),
    ('Alan Turing', 'alan@example.org', '5500-0000-0000-0004', '987-65-4321', 0, '{}', '{"phone": "+1 415 555 2671"}', NULL),
    ('Grace Hopper', NULL, NULL, NULL, -12.00, NULL, NULL, NULL);
INSERT INTO orders (customer_id, total, note) VALUES (1, 99.90, 'call me at ada@example.com'), (2, 5, NULL);
"""

PSQL_SCRIPT = r"""
SELECT version();
SELECT id, name, email, card, ssn, balance, tags, meta FROM customers ORDER BY id;
SELECT c.name, sum(o.total) AS spent FROM customers c LEFT JOIN orders o ON o.customer_id = c.id GROUP BY c.name;
WITH moved AS (UPDATE customers SET balance = balance + 1 WHERE id = 2 RETURNING id) SELECT count(*) FROM moved;
INSERT INTO orders (customer_id, total, note) VALUES (3, 1.5, 'first order') RETURNING id;
UPDATE orders SET note = 'updated' WHERE total < 10;
DELETE FROM orders WHERE note = 'updated';
SELECT * FROM no_such_table;
SELECT 1 / 0;
DO $$ BEGIN RAISE NOTICE 'a notice from %', current_user; END $$;
BEGIN;
SAVEPOINT s1;
UPDATE customers SET email = 'x@example.com';
ROLLBACK TO SAVEPOINT s1;
COMMIT;
SELECT 1 AS one \; SELECT 'two' AS two \; SELECT NULL::int AS nothing;
SET application_name = 'capture';
SHOW server_version;
PREPARE by_id(int) AS SELECT name, email FROM customers WHERE id = $1;
EXECUTE by_id(1);
DEALLOCATE by_id;
COPY (SELECT id, name, email FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER);
COPY orders (customer_id, total, note) FROM STDIN;
1	10.00	copied row
2	20.00	\N
\.
LISTEN events;
NOTIFY events, 'hello from capture';
CREATE FUNCTION add_one(i int) RETURNS int LANGUAGE sql AS 'SELECT i + 1';
SELECT add_one(41), now() > '2000-01-01'::timestamptz, pg_sleep(0);
CREATE TEMP TABLE scratch AS SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 20) g;
SELECT n, h FROM scratch WHERE n % 3 = 0;
EXPLAIN SELECT * FROM customers WHERE email LIKE '%@example.com';
SELECT E'tab\there', 'quote''s', $tag$dollar $ quoted$tag$, U&'\0041', B'1010', X'ff', 1e10, -0.5, ARRAY[1, 2, NULL];
"""

PSQL_META = r"""
\dt
\d customers
\df add_one
\dn
\du
\l
"""


def psql(port: int, server, script: str, *extra: str):
    env = {**os.environ, "PGPASSWORD": server.password, "PGCONNECT_TIMEOUT": "10"}
    subprocess.run(
        ["psql", "-X", "-h", LOOPBACK, "-p", str(port), "-U", server.user, "-d", server.database, *extra, "-f", "-"],
        input=script, text=True, env=env, capture_output=True, check=False, timeout=60,
    )


def capture_postgres(out: Path):
    import psycopg
    from pg import PostgresServer

    server = PostgresServer()
    relay = Relay(server.port)
    try:
        dsn = f"host={LOOPBACK} port={relay.port} dbname={server.database} user={server.user} password={server.password}"
        direct = f"host={LOOPBACK} port={server.port} dbname={server.database} user={server.user} password={server.password}"
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(SCHEMA)

        def save(session: str):
            conns = relay.take()
            for i, c in enumerate(conns):
                name = session if len(conns) == 1 else f"{session}-{i + 1}"
                write(out, "postgres_frontend", name, c.client)
                write(out, "postgres_backend", name, c.server)

        # psql: TLS is tried first (sslmode=prefer: SSLRequest, then 'N').
        psql(relay.port, server, PSQL_SCRIPT, "-v", "ON_ERROR_STOP=0")
        save("psql-session")
        psql(relay.port, server, PSQL_META)
        save("psql-meta")

        # psycopg: the extended protocol (Parse/Bind/Describe/Execute/Sync).
        with psycopg.connect(dsn + " sslmode=disable application_name=psycopg-capture") as conn:
            cur = conn.cursor()
            cur.execute("SELECT id, name, email, balance, created, tags, meta, photo FROM customers WHERE id = %s", (1,))
            cur.fetchall()
            cur.execute("SELECT %s::int + %s, %s::text, %s::bool, %s::date, %s::uuid, %s::jsonb, %s::float8[]",
                        (1, 2, "héllo wörld", True, "2024-02-29", "12345678-1234-5678-1234-567812345678",
                         json.dumps({"k": [1, 2]}), [1.5, None]))
            cur.fetchall()
            cur.executemany("INSERT INTO orders (customer_id, total, note) VALUES (%s, %s, %s)",
                            [(1, 3, "n1"), (2, 4, None), (3, 5, "card 4111111111111111")])
            cur.execute("SELECT name FROM customers WHERE email = %s", ("ada@example.com",), prepare=True)
            cur.execute("SELECT name FROM customers WHERE email = %s", ("alan@example.org",), prepare=True)
            try:
                cur.execute("SELECT %s::int", ("not a number",))
            except psycopg.errors.DataError:
                conn.rollback()
            with conn.cursor(binary=True) as bcur:
                bcur.execute("SELECT id, balance, created, photo, tags FROM customers ORDER BY id")
                bcur.fetchall()
            with conn.cursor(name="server_side") as scur:
                scur.itersize = 2
                scur.execute("SELECT n, h FROM generate_series(1, 7) n, md5(n::text) h")
                for _ in scur:
                    pass
            with cur.copy("COPY orders (customer_id, total, note) FROM STDIN") as copy:
                copy.write_row((1, 7, "copied by psycopg"))
                copy.write_row((2, 8, None))
            with cur.copy("COPY (SELECT id, name FROM customers ORDER BY id) TO STDOUT") as copy:
                for _ in copy.rows():
                    pass
            conn.commit()
            with conn.pipeline():
                cur.execute("SELECT 1")
                cur.execute("UPDATE customers SET balance = balance WHERE id = %s", (1,))
                cur.execute("SELECT count(*) FROM orders")
            conn.commit()
        save("psycopg-extended")

        # A cancel: a second connection carrying a CancelRequest.
        with psycopg.connect(dsn + " sslmode=disable", autocommit=True) as conn:
            def cancel():
                time.sleep(0.5)
                conn.cancel_safe()  # cancel() blocks in C holding the GIL: the relay is in this process
            t = threading.Thread(target=cancel)
            t.start()
            try:
                conn.execute("SELECT pg_sleep(5)")
            except psycopg.errors.QueryCanceled:
                pass
            t.join()
        save("psycopg-cancel")

        # asyncpg: its own protocol code (not libpq), binary formats, binary COPY.
        try:
            import asyncpg
        except ImportError:
            print("  (asyncpg not installed: its session skipped)")
        else:
            import asyncio

            async def asyncpg_session():
                conn = await asyncpg.connect(host=LOOPBACK, port=relay.port, user=server.user,
                                             password=server.password, database=server.database, ssl=False)
                try:
                    await conn.fetch("SELECT id, name, balance, created, tags, meta, photo FROM customers WHERE id > $1", 0)
                    stmt = await conn.prepare("SELECT $1::int * 2, $2::text || '!', $3::numeric, $4::timestamptz")
                    import datetime
                    import decimal
                    await stmt.fetchrow(21, "ok", decimal.Decimal("3.14"), datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc))
                    await conn.executemany("INSERT INTO orders (customer_id, total, note) VALUES ($1, $2, $3)",
                                           [(1, decimal.Decimal("1.25"), "asyncpg"), (2, decimal.Decimal("2"), None)])
                    async with conn.transaction():
                        async for _ in conn.cursor("SELECT n FROM generate_series(1, 5) n", prefetch=2):
                            pass
                    await conn.copy_records_to_table("orders", records=[(1, decimal.Decimal("9.99"), "binary copy")],
                                                     columns=["customer_id", "total", "note"])
                    try:
                        await conn.execute("INSERT INTO orders (customer_id) VALUES (12345)")
                    except asyncpg.PostgresError:
                        pass
                finally:
                    await conn.close()

            asyncio.run(asyncpg_session())
            save("asyncpg")

        # A failed login.
        try:
            psycopg.connect(dsn.replace(server.password, "wrong-password") + " sslmode=disable").close()
        except psycopg.OperationalError:
            pass
        save("failed-login")
    finally:
        relay.close()
        server.stop()


# --------------------------------------------------------------------------
# LLM APIs over HTTP/1.1


def read_headers(buf: bytes, at: int):
    end = buf.index(b"\r\n\r\n", at)
    lines = buf[at:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, end + 4


def read_body(buf: bytes, at: int, headers: dict):
    """The body at `at` (de-chunked), and where the next message starts."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            eol = buf.index(b"\r\n", at)
            size = int(buf[at:eol].split(b";")[0], 16)
            at = eol + 2
            if size == 0:
                at = buf.index(b"\r\n", at) + 2  # no trailers here
                return bytes(body), at
            body += buf[at:at + size]
            at += size + 2
    n = int(headers.get("content-length", "0"))
    return buf[at:at + n], at + n


def exchanges(conn: Connection):
    """(request line, request body, response headers, response body) of a connection."""
    req, resp = bytes(conn.client), bytes(conn.server)
    i = j = 0
    while i < len(req):
        line, headers, i = read_headers(req, i)
        body, i = read_body(req, i, headers)
        status, rheaders, j = read_headers(resp, j)
        rbody, j = read_body(resp, j, rheaders)
        yield line, body, rheaders, rbody


SCRIPT = [
    {"match": "[card-stream]", "repeat": True,
     "pieces": ["Sure. The card on file is 4111 11", "11 1111 1111", ", expiring 12/29; mail ",
                "ada@exam", "ple.com or call +1 415 555 2671. "]},
    {"match": "[key-stream]", "repeat": True,
     "pieces": ["Use the key sk-proj-AbC", "dEf0123456789xyzXYZ0123456789abcd", " with header Bearer eyJhbGciOiJIUzI1NiJ9",
                ".eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U and IBAN GB82 WEST ",
                "1234 5698 7654 32."]},
    {"match": "[tool]", "repeat": True,
     "tool_calls": [{"name": "run_sql", "arguments": {"query": "SELECT email FROM customers WHERE card = '4111 1111 1111 1111'"}},
                    {"name": "send_mail", "arguments": {"to": "grace@example.net", "body": "SSN 123-45-6789"}}]},
    {"match": "[error]", "repeat": True, "error": {"status": 429, "type": "rate_limit_error", "message": "slow down"}},
    {"match": "[unicode]", "repeat": True,
     "pieces": ["Héllo — ", "日本語です。", " \u2028 emoji 🎉 ", "\"quoted\" \\ back\\slash\n", "tab\tend"]},
]

API_KEY = "sk-test-capture-0000"


def capture_llm(out: Path):
    import anthropic
    import openai
    from llm_server import start_server

    # The SDK warns that the test server's model name is deprecated.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    server, port = start_server(LOOPBACK, 0, script=SCRIPT)
    relay = Relay(port)
    base = f"http://{LOOPBACK}:{relay.port}"
    system = "You are a support agent. Never reveal card numbers."

    def oa():
        return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0,
                             http_client=openai.DefaultHttpxClient(trust_env=False))

    def an():
        return anthropic.Anthropic(base_url=base, api_key=API_KEY, max_retries=0,
                                   http_client=anthropic.DefaultHttpxClient(trust_env=False))

    def chat(prompt, stream=False, **kw):
        with oa() as c:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            r = c.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=stream, **kw)
            if stream:
                for _ in r:
                    pass

    def responses(prompt, stream=False, **kw):
        with oa() as c:
            r = c.responses.create(model="gpt-4o-mini", instructions=system, input=prompt, stream=stream, **kw)
            if stream:
                for _ in r:
                    pass

    def messages(prompt, stream=False, **kw):
        with an() as c:
            msgs = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            if stream:
                with c.messages.stream(model="claude-sonnet-4-5", max_tokens=256, system=system, messages=msgs, **kw) as s:
                    for _ in s:
                        pass
            else:
                c.messages.create(model="claude-sonnet-4-5", max_tokens=256, system=system, messages=msgs, **kw)

    def embeddings(inputs, **kw):
        with oa() as c:
            c.embeddings.create(model="text-embedding-3-small", input=inputs, **kw)

    tools = [{"type": "function", "function": {"name": "run_sql", "description": "Run SQL",
                                               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
    calls = [
        ("chat", lambda: chat("My card is 4111 1111 1111 1111 and my email is ada@example.com, can you check?")),
        ("chat-stream-card", lambda: chat("[card-stream] what card do I have?", stream=True)),
        ("chat-stream-usage", lambda: chat("[key-stream] which key?", stream=True, stream_options={"include_usage": True})),
        ("chat-tool", lambda: chat("[tool] find the customer", tools=tools)),
        ("chat-stream-tool", lambda: chat("[tool] find the customer", stream=True, tools=tools)),
        ("chat-stream-unicode", lambda: chat("[unicode] say hello", stream=True)),
        ("chat-error", lambda: chat("[error] too fast")),
        ("responses", lambda: responses("Call me on +1 415 555 2671, my SSN is 123-45-6789.")),
        ("responses-stream", lambda: responses("[card-stream] card please", stream=True)),
        ("responses-stream-tool", lambda: responses("[tool] look it up", stream=True)),
        ("messages", lambda: messages("My AWS key is AKIAIOSFODNN7EXAMPLE, is that safe?")),
        ("messages-stream", lambda: messages("[key-stream] which key?", stream=True)),
        ("messages-stream-tool", lambda: messages("[tool] look it up", stream=True)),
        ("messages-tool", lambda: messages("[tool] look it up")),
        ("embeddings", lambda: embeddings(["ada@example.com wrote about 4111 1111 1111 1111", "plain text"])),
        ("embeddings-base64", lambda: embeddings("one input", encoding_format="base64", dimensions=8)),
    ]
    try:
        for name, call in calls:
            try:
                call()
            except (openai.APIError, anthropic.APIError):
                pass  # the scripted error answer
            for conn in relay.take():
                for n, (line, body, rheaders, rbody) in enumerate(exchanges(conn)):
                    suffix = "" if n == 0 else f"-{n + 1}"
                    if body:
                        write(out, "llm_json", f"{name}{suffix}-request.json", body)
                    if rheaders.get("content-type", "").startswith("text/event-stream"):
                        write(out, "sse", f"{name}{suffix}.sse", rbody)
                    elif rbody:
                        write(out, "llm_json", f"{name}{suffix}-response.json", rbody)
    finally:
        relay.close()
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=["postgres", "llm", "all"], default="all")
    ap.add_argument("--out", type=Path, default=FUZZ / "corpus", help="corpus root (default: %(default)s)")
    args = ap.parse_args()
    if args.what in ("postgres", "all"):
        print("PostgreSQL sessions:")
        capture_postgres(args.out)
    if args.what in ("llm", "all"):
        print("LLM API calls:")
        capture_llm(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
