"""A small OpenAI- and Anthropic-compatible LLM server for tests and the demo.

It stands in for an LLM provider that cannot be reached from the test
machines, so it speaks the real wire protocols closely enough for the real
`openai`, `langchain-openai` and Anthropic clients:

    POST /v1/chat/completions   JSON, or SSE `chat.completion.chunk`s + `[DONE]`
    POST /v1/responses          JSON, or SSE `response.*` events
    POST /v1/embeddings         float or base64 vectors
    GET  /v1/models[/{id}]
    POST /v1/messages           Anthropic messages, JSON or SSE events

HTTP/1.1 with keep-alive; streamed replies use chunked transfer encoding, as
the real providers do, so a connection carries several requests.

Replies are deterministic. By default the answer echoes the last user
message ("You said: <text>"), or the last tool result ("Tool result: ...").
A script (a JSON file, or a list given to `start_server`) can give canned
replies instead, taken in order:

    [
      "a plain text answer",
      {"tool_calls": [{"name": "run_sql", "arguments": {"query": "SELECT 1"}}]},
      {"content": "only when asked about refunds", "match": "refund", "repeat": true},
      {"error": {"status": 429, "message": "slow down"}},
      {"content": "late answer", "delay": 2.5},
      {"pieces": ["card 4111 11", "11 1111 1111", " ok"]}
    ]

Each chat-like request (chat completions, responses, messages) takes the
first entry whose `match` (a substring of the last user text, optional)
holds; the entry is used up unless `repeat` is true. `pieces` gives the
exact deltas of a streamed answer (its text is their concatenation). When no entry applies
the echo answer is given. Tool calls become OpenAI `tool_calls`, Responses
`function_call` items or Anthropic `tool_use` blocks.

Every request is recorded (in memory as `server.requests`, and as one JSON
line per request with --log): path, headers, body JSON, the exact bytes read
and written for it, and which connection carried it. Credentials are never
recorded: for `Authorization`, `X-Api-Key` and `Api-Key` only the scheme and
the first 8 characters of the value are kept, under `auth`.

Command line:

    python llm_server.py --host 127.0.0.1 --port 0 --port-file FILE \
        [--log FILE] [--script FILE] [--chunk-delay S] [--tls-cert CERT --tls-key KEY]
        [--api-key KEY]

(the script may also come from the environment variable LLM_SERVER_SCRIPT).
From Python: `server, port = start_server(...)`, then `server.close()`.

Not implemented (no test needs them yet): `n` > 1, logprobs, stop sequences,
max_tokens truncation, audio and images in replies.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-sonnet-4-5"]
DEFAULT_EMBEDDING_DIMENSIONS = 16
# Request headers that carry credentials: never recorded in full.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


# --------------------------------------------------------------------------
# Replies


class Reply:
    """One answer: text, tool calls, or an HTTP error."""

    def __init__(self, content: str | None = None, tool_calls=None, error=None, delay: float = 0.0, pieces=None):
        # `pieces`: the exact stream deltas, when a test needs a value cut at chosen places.
        self.pieces = list(pieces) if pieces else None
        self.content = "".join(self.pieces) if self.pieces else content
        # [(call id, name, arguments as a JSON string)]
        self.tool_calls = tool_calls or []
        self.error = error  # {"status": int, "type": str, "message": str}
        self.delay = delay

    @classmethod
    def from_entry(cls, entry, serial: int) -> "Reply":
        if isinstance(entry, str):
            return cls(content=entry)
        calls = []
        for i, call in enumerate(entry.get("tool_calls") or []):
            args = call.get("arguments", {})
            if not isinstance(args, str):
                args = json.dumps(args)
            calls.append((call.get("id") or f"call_{serial:06d}_{i}", call["name"], args))
        error = entry.get("error")
        if error is not None:
            error = {"status": 500, "type": "server_error", "message": "scripted error", **error}
        return cls(content=entry.get("content"), tool_calls=calls, error=error, delay=float(entry.get("delay", 0)),
                   pieces=entry.get("pieces"))

    def summary(self):
        """What the log records about the answer."""
        if self.error:
            return {"error": self.error}
        out = {"content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": i, "name": n, "arguments": a} for i, n, a in self.tool_calls]
        return out


class Script:
    """Canned replies, taken in order; the echo answer when none applies."""

    def __init__(self, entries=None):
        if isinstance(entries, dict):
            entries = entries.get("replies", [])
        for e in entries or []:
            if not isinstance(e, (str, dict)):
                raise ValueError(f"a script entry must be a string or an object, not {e!r}")
        self.entries = list(entries or [])
        self.lock = threading.Lock()
        self.serial = itertools.count(1)

    @classmethod
    def load(cls, path) -> "Script":
        return cls(json.loads(Path(path).read_text()))

    def next_reply(self, last_user: str, last_tool: str | None) -> Reply:
        with self.lock:
            serial = next(self.serial)
            for i, entry in enumerate(self.entries):
                match = entry.get("match") if isinstance(entry, dict) else None
                if match is not None and match not in last_user:
                    continue
                if not (isinstance(entry, dict) and entry.get("repeat")):
                    del self.entries[i]
                return Reply.from_entry(entry, serial)
        # A model that asked for a tool gets its result back as the last message.
        if last_tool is not None:
            return Reply(content=f"Tool result: {last_tool}")
        return Reply(content=f"You said: {last_user}")


def _text_of(content) -> str:
    """The text in an OpenAI or Anthropic message content (string or parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "tool_result":
                    texts.append(_text_of(part.get("content")))
        return "\n".join(texts)
    return str(content)


def _conversation(messages):
    """(last user text, last tool result or None, all text) of a message list.

    A tool result counts only when it comes after the last user message, that
    is when the model is being given the answer to the tool call it made."""
    last_user, last_tool, texts = "", None, []
    for m in messages or []:
        if not isinstance(m, dict):
            continue
        kind = m.get("type")
        if kind == "function_call_output":  # Responses API tool result
            last_tool = str(m.get("output", ""))
            texts.append(last_tool)
            continue
        text = _text_of(m.get("content"))
        texts.append(text)
        role = m.get("role")
        if role == "tool":
            last_tool = text
        elif role == "user":
            blocks = m.get("content") if isinstance(m.get("content"), list) else []
            if any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
                last_tool = text  # Anthropic sends tool results as user content
            else:
                last_user, last_tool = text, None
    return last_user, last_tool, "\n".join(texts)


def _tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: whitespace-separated words."""
    return len(text.split())


def _pieces(text: str):
    """The reply cut into word-sized stream deltas (at least one)."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _embedding(text: str, dims: int):
    """A deterministic unit vector for `text`."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dims:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(b / 127.5) - 1.0 for b in raw[: 4 * dims : 4]]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


# --------------------------------------------------------------------------
# HTTP


class _Counting:
    """Wraps the handler's rfile or wfile to count the bytes that pass."""

    def __init__(self, f):
        self._f = f
        self.count = 0

    def read(self, *a):
        data = self._f.read(*a)
        self.count += len(data)
        return data

    def readline(self, *a):
        data = self._f.readline(*a)
        self.count += len(data)
        return data

    def write(self, data):
        n = self._f.write(data)
        self.count += len(data)
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # Replies go out as written: without this each small write waits on a
    # delayed ACK (about 40 ms) and hides everything else in a benchmark.
    disable_nagle_algorithm = True
    server_version = "warden-test-llm/1"
    sys_version = ""
    # An idle keep-alive connection is closed after this many seconds.
    timeout = 120

    server: "LLMServer"

    # -- plumbing -----------------------------------------------------------

    def setup(self):
        super().setup()
        self.rfile = _Counting(self.rfile)
        self.wfile = _Counting(self.wfile)
        self.conn_id = self.server.new_connection_id()
        self.record = None

    def handle_one_request(self):
        # Count this request's bytes from its first line to the end of its
        # response; the record is written once the response is complete.
        read0, written0 = self.rfile.count, self.wfile.count
        self.record = None
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        if self.record is not None:
            self.record["request_bytes"] = self.rfile.count - read0
            self.record["response_bytes"] = self.wfile.count - written0
            self.server.log_request_record(self.record)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _start_record(self, body: bytes):
        headers, auth = {}, {}
        for name, value in self.headers.items():
            key = name.lower()
            if key in CREDENTIAL_HEADERS:
                scheme, _, rest = value.partition(" ") if key == "authorization" else ("", "", value)
                auth[key] = {"scheme": scheme or None, "prefix": (rest or scheme)[:8]}
            else:
                headers[key] = value
        try:
            body_json = json.loads(body) if body else None
            body_text = None
        except ValueError:
            body_json, body_text = None, body[:4096].decode("utf-8", "replace")
        self.record = {
            "time": datetime.now(timezone.utc).isoformat(),
            "conn": self.conn_id,
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            "method": self.command,
            "path": self.path,
            "http_version": self.request_version,
            "headers": headers,
            "auth": auth,
            "body": body_json,
            "body_text": body_text,
            "stream": bool(isinstance(body_json, dict) and body_json.get("stream")),
            "status": None,
            "reply": None,
        }
        return body_json

    def _send_json(self, status: int, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._common_headers()
        self.end_headers()
        self.wfile.write(data)
        self.record["status"] = status

    def _common_headers(self):
        rid = f"req_{self.server.new_request_id():012d}"
        self.send_header("x-request-id", rid)  # OpenAI
        self.send_header("request-id", rid)  # Anthropic
        if self.close_connection:
            self.send_header("Connection", "close")

    def _send_error_json(self, status: int, message: str, kind: str):
        if self._anthropic():
            payload = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        self._send_json(status, payload)

    def _anthropic(self) -> bool:
        return self.path.split("?")[0].rstrip("/") == "/v1/messages"

    # A stream is sent with chunked encoding, so the connection stays usable
    # afterwards; HTTP/1.0 clients get it unframed and the connection closes.
    def _start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self.request_version == "HTTP/1.1":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self._common_headers()
        self.end_headers()
        self.record["status"] = 200

    def _send_event(self, data, event: str | None = None):
        text = "" if event is None else f"event: {event}\n"
        text += f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
        self._write_stream(text.encode())
        if self.server.chunk_delay:
            time.sleep(self.server.chunk_delay)

    def _write_stream(self, data: bytes):
        if self.request_version == "HTTP/1.1":
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)

    def _end_stream(self):
        if self.request_version == "HTTP/1.1":
            self.wfile.write(b"0\r\n\r\n")

    # -- routing ------------------------------------------------------------

    ROUTES = {
        ("POST", "/v1/chat/completions"): "chat_completions",
        ("POST", "/v1/responses"): "responses",
        ("POST", "/v1/embeddings"): "embeddings",
        ("GET", "/v1/models"): "models",
        ("POST", "/v1/messages"): "messages",
    }

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self):
        body = self._read_body() if self.command == "POST" else b""
        body_json = self._start_record(body)
        path = self.path.split("?")[0].rstrip("/")
        route = self.ROUTES.get((self.command, path))
        if route is None and self.command == "GET" and path.startswith("/v1/models/"):
            route = "model_get"
        try:
            if self.server.api_key is not None and self._presented_key() != self.server.api_key:
                raise HttpError(401, "Incorrect API key provided.", "authentication_error")
            if route is None:
                raise HttpError(404, f"Unknown request URL: {self.command} {self.path}", "not_found_error")
            if self.command == "POST" and not isinstance(body_json, dict):
                raise HttpError(400, "the request body must be a JSON object")
            getattr(self, "_" + route)(body_json)
        except HttpError as e:
            self._send_error_json(e.status, e.message, e.kind)

    def _presented_key(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return self.headers.get("X-Api-Key")

    def _reply_for(self, messages) -> tuple[Reply, str]:
        last_user, last_tool, all_text = _conversation(messages)
        reply = self.server.script.next_reply(last_user, last_tool)
        self.record["reply"] = reply.summary()
        if reply.delay:
            time.sleep(reply.delay)
        if reply.error:
            e = reply.error
            raise HttpError(int(e["status"]), e["message"], e["type"])
        return reply, all_text

    def _model_of(self, body):
        model = body.get("model")
        if not model:
            raise HttpError(400, "you must provide a model parameter")
        return model

    # -- OpenAI chat completions --------------------------------------------

    def _chat_completions(self, body):
        model = self._model_of(body)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise HttpError(400, "'messages' must be a non-empty array")
        reply, prompt = self._reply_for(body["messages"])
        cid, created = f"chatcmpl-{self.server.new_request_id():012d}", int(time.time())
        usage = _openai_usage(_tokens(prompt), _tokens(reply.content or "") + sum(_tokens(a) for _, _, a in reply.tool_calls))
        finish = "tool_calls" if reply.tool_calls else "stop"
        base = {"id": cid, "created": created, "model": model, "system_fingerprint": "fp_warden_test", "service_tier": "default"}
        if not body.get("stream"):
            message = {"role": "assistant", "content": reply.content if reply.content is not None or not reply.tool_calls else None,
                       "refusal": None, "annotations": []}
            if reply.tool_calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in reply.tool_calls
                ]
            self._send_json(200, {**base, "object": "chat.completion",
                                  "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                                  "usage": usage})
            return

        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta, finish_reason=None):
            c = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if with_usage:
                c["usage"] = None  # as OpenAI does: usage only in the last chunk
            return c

        self._start_stream()
        self._send_event(chunk({"role": "assistant", "content": "", "refusal": None}))
        if reply.content:
            for piece in reply.pieces or _pieces(reply.content):
                self._send_event(chunk({"content": piece}))
        for index, (call_id, name, args) in enumerate(reply.tool_calls):
            self._send_event(chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                                    "function": {"name": name, "arguments": ""}}]}))
            for piece in _split(args, 16):
                self._send_event(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
        self._send_event(chunk({}, finish))
        if with_usage:
            self._send_event({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        self._send_event("[DONE]")
        self._end_stream()

    # -- OpenAI responses -----------------------------------------------------

    def _responses(self, body):
        model = self._model_of(body)
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list) or not items:
            raise HttpError(400, "'input' must be a string or a non-empty array")
        if body.get("instructions"):
            items = [{"role": "system", "content": body["instructions"]}, *items]
        reply, prompt = self._reply_for(items)
        rid = self.server.new_request_id()
        output = []
        if reply.content is not None or not reply.tool_calls:
            output.append({"type": "message", "id": f"msg_{rid:012d}", "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": reply.content or "", "annotations": [], "logprobs": []}]})
        for call_id, name, args in reply.tool_calls:
            output.append({"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name,
                           "arguments": args, "status": "completed"})
        n_in, n_out = _tokens(prompt), _tokens(reply.content or "") + sum(_tokens(a) for _, _, a in reply.tool_calls)
        response = {
            "id": f"resp_{rid:012d}", "object": "response", "created_at": int(time.time()), "status": "completed",
            "model": model, "output": output, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
            "parallel_tool_calls": True, "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "text": {"format": {"type": "text"}}, "previous_response_id": body.get("previous_response_id"),
            "usage": {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": n_in + n_out},
        }
        if not body.get("stream"):
            self._send_json(200, response)
            return
        # The event sequence of a streamed response, for the text and the calls.
        seq = itertools.count()

        def event(kind, **fields):
            self._send_event({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        self._start_stream()
        event("response.created", response={**response, "status": "in_progress", "output": [], "usage": None})
        event("response.in_progress", response={**response, "status": "in_progress", "output": [], "usage": None})
        for index, item in enumerate(output):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                event("response.output_item.added", output_index=index,
                      item={**item, "status": "in_progress", "content": []})
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part)
                for piece in reply.pieces or _pieces(text):
                    event("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                          delta=piece, logprobs=[])
                event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=text, logprobs=[])
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part={**part, "text": text})
            else:
                event("response.output_item.added", output_index=index,
                      item={**item, "status": "in_progress", "arguments": ""})
                for piece in _split(item["arguments"], 16):
                    event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=piece)
                event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      arguments=item["arguments"])
            event("response.output_item.done", output_index=index, item=item)
        event("response.completed", response=response)
        self._end_stream()

    # -- OpenAI embeddings and models ----------------------------------------

    def _embeddings(self, body):
        model = self._model_of(body)
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # one string, or one array of token ids
        if not isinstance(inputs, list) or not inputs:
            raise HttpError(400, "'input' must be a string or a non-empty array")
        dims = int(body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vector = _embedding(item if isinstance(item, str) else json.dumps(item), dims)
            if as_base64:  # little-endian float32, as the OpenAI API sends it
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        n = sum(_tokens(x) if isinstance(x, str) else len(x) for x in inputs)
        self.record["reply"] = {"embeddings": len(data), "dimensions": dims}
        self._send_json(200, {"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})

    @staticmethod
    def _model_object(name):
        return {"id": name, "object": "model", "created": 1700000000, "owned_by": "warden-test"}

    def _models(self, _body):
        self._send_json(200, {"object": "list", "data": [self._model_object(m) for m in MODELS]})

    def _model_get(self, _body):
        name = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[1]
        if name not in MODELS:
            raise HttpError(404, f"The model `{name}` does not exist", "not_found_error")
        self._send_json(200, self._model_object(name))

    # -- Anthropic messages ---------------------------------------------------

    def _messages(self, body):
        model = self._model_of(body)
        if not body.get("max_tokens"):
            raise HttpError(400, "max_tokens: Field required")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise HttpError(400, "messages: at least one message is required")
        system = body.get("system")
        messages = ([{"role": "system", "content": system}] if system else []) + body["messages"]
        reply, prompt = self._reply_for(messages)
        blocks = []
        if reply.content is not None or not reply.tool_calls:
            blocks.append({"type": "text", "text": reply.content or ""})
        for call_id, name, args in reply.tool_calls:
            try:
                tool_input = json.loads(args)
            except ValueError:  # a script may give arguments that are not JSON
                tool_input = {"arguments": args}
            blocks.append({"type": "tool_use", "id": call_id.replace("call_", "toolu_", 1), "name": name,
                           "input": tool_input})
        stop = "tool_use" if reply.tool_calls else "end_turn"
        n_in, n_out = _tokens(prompt), _tokens(reply.content or "") + sum(_tokens(a) for _, _, a in reply.tool_calls)
        message = {"id": f"msg_{self.server.new_request_id():012d}", "type": "message", "role": "assistant",
                   "model": model, "content": blocks, "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": n_in, "output_tokens": n_out,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        if not body.get("stream"):
            self._send_json(200, message)
            return

        def event(kind, **fields):
            self._send_event({"type": kind, **fields}, event=kind)

        self._start_stream()
        event("message_start", message={**message, "content": [], "stop_reason": None,
                                        "usage": {**message["usage"], "output_tokens": 1}})
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                if index == 0:
                    event("ping")
                for piece in reply.pieces or _pieces(block["text"]):
                    event("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})
            else:
                event("content_block_start", index=index, content_block={**block, "input": {}})
                for piece in _split(json.dumps(block["input"]), 16):
                    event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": piece})
            event("content_block_stop", index=index)
        event("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage={"output_tokens": n_out})
        event("message_stop")
        self._end_stream()


def _split(text: str, size: int):
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _openai_usage(n_in: int, n_out: int):
    return {
        "prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


# --------------------------------------------------------------------------
# Server


class LLMServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str, port: int, *, script: Script | None = None, log: str | os.PathLike | None = None,
                 tls_cert=None, tls_key=None, chunk_delay: float = 0.0, verbose: bool = False,
                 api_key: str | None = None):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.script = script or Script()
        self.chunk_delay = chunk_delay
        self.verbose = verbose
        # When set, a request without this key (Bearer or X-Api-Key) gets 401, as a provider answers.
        self.api_key = api_key
        self.requests: list[dict] = []  # every record, as also written to the log
        self._lock = threading.Lock()
        self.connections = 0  # connections that got as far as HTTP (past TLS, if any)
        self._request_ids = itertools.count(1)
        self._log = open(log, "a", encoding="utf-8") if log else None  # noqa: SIM115 - closed in server_close
        self.tls = None
        if tls_cert:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(tls_cert, tls_key)
            self.tls.set_alpn_protocols(["http/1.1"])

    @property
    def port(self) -> int:
        return self.server_address[1]

    def new_connection_id(self) -> int:
        with self._lock:
            self.connections += 1
            return self.connections

    def new_request_id(self) -> int:
        with self._lock:
            return next(self._request_ids)

    def log_request_record(self, record: dict):
        with self._lock:
            record["seq"] = len(self.requests) + 1
            self.requests.append(record)
            if self._log:
                self._log.write(json.dumps(record) + "\n")
                self._log.flush()

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, in the connection's own thread, so a
        # slow or broken client does not hold up the accept loop.
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:
            request.settimeout(Handler.timeout)
            tls_sock = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return None
        try:
            return super().finish_request(tls_sock, client_address)
        finally:
            tls_sock.close()

    def close(self):
        """Stop serving (when started with `start_server`) and close the log."""
        if getattr(self, "_thread", None) is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def server_close(self):
        super().server_close()
        with self._lock:
            if self._log:
                self._log.close()
                self._log = None


def start_server(host: str = "127.0.0.1", port: int = 0, *, log=None, script=None, tls_cert=None, tls_key=None,
                 chunk_delay: float = 0.0, verbose: bool = False, api_key: str | None = None) -> tuple[LLMServer, int]:
    """Start a server in a background thread; returns (server, port).

    `script` is a Script, a list of entries, or a path to a JSON script."""
    if script is not None and not isinstance(script, Script):
        script = Script.load(script) if isinstance(script, (str, os.PathLike)) else Script(script)
    server = LLMServer(host, port, script=script, log=log, tls_cert=tls_cert, tls_key=tls_key,
                       chunk_delay=chunk_delay, verbose=verbose, api_key=api_key)
    server._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                      name="llm-server", daemon=True)
    server._thread.start()
    return server, server.port


def read_log(path) -> list[dict]:
    """The records of a --log file."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--port-file", help="write the port here once listening")
    ap.add_argument("--log", help="append one JSON line per request to this file")
    ap.add_argument("--script", default=os.environ.get("LLM_SERVER_SCRIPT"),
                    help="JSON file of canned replies (default: $LLM_SERVER_SCRIPT, else echo)")
    ap.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed events")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--verbose", action="store_true", help="log each request on stderr")
    ap.add_argument("--api-key", default=os.environ.get("LLM_SERVER_API_KEY"),
                    help="refuse requests without this key (default: $LLM_SERVER_API_KEY, else accept any)")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")

    script = Script.load(args.script) if args.script else Script()
    server = LLMServer(args.host, args.port, script=script, log=args.log, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, chunk_delay=args.chunk_delay, verbose=args.verbose,
                       api_key=args.api_key)
    if args.port_file:
        # Written whole (rename), so a reader never sees a partial number.
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(f"{server.port}\n")
        tmp.replace(args.port_file)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    scheme = "https" if server.tls else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"llm server listening on {scheme}://{host}:{server.port}/v1", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
