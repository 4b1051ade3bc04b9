"""A stand-in Kubernetes API server for pods, on 127.0.0.1 only.

There is no kube-apiserver on the test machines (no registry we can reach
ships one), so this speaks its list/watch protocol for pods over HTTPS:
bearer-token auth, Status errors, field and label selectors, chunked watch
streams with history replay, bookmarks and 410 "too old resource version".
tests/e2e/test_kube_api_peer.py checks it against the official `kubernetes`
Python client, so a test that passes against it exercises the real protocol.

    with KubeApiServer(tmp_path) as api:
        api.add_pod("shop", "web-0", uid, node="node-a", labels={"app": "web"})
        # agent: server api.url, CA api.ca_file, token from api.token_file

The model is kube-apiserver with --anonymous-auth=false and a watch cache:
one global resourceVersion (an integer, sent as a string) that every change
bumps; a history of changes since the last `compact()`; pods are served
read-only (get, list, watch) and changed only through this object's methods.
"""
import copy
import hmac
import json
import os
import re
import secrets
import select
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from pki import make_provider_pki  # noqa: E402

# Who the 403s name: the agent's service account in the Helm chart.
FORBIDDEN_USER = "system:serviceaccount:warden:warden"
# Arbitrary, but not 1: a client that confuses resourceVersions with counts
# of changes shows up.
FIRST_RESOURCE_VERSION = 1000
# How often an idle watch looks for a client that went away.
_PEER_POLL = 0.2

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # Go's strconv.ParseBool, as the API's query decoding uses
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}

# Field labels kube-apiserver lets a pod field selector use (pkg/registry/core/pod
# and the v1 field label conversion), with their values in this model.
_POD_FIELDS = {
    "metadata.name": lambda p: p["metadata"]["name"],
    "metadata.namespace": lambda p: p["metadata"]["namespace"],
    "spec.nodeName": lambda p: p["spec"].get("nodeName", ""),
    "spec.restartPolicy": lambda p: p["spec"].get("restartPolicy", ""),
    "spec.schedulerName": lambda p: p["spec"].get("schedulerName", ""),
    "spec.serviceAccountName": lambda p: p["spec"].get("serviceAccountName", ""),
    "spec.hostNetwork": lambda p: "true" if p["spec"].get("hostNetwork") else "false",
    "status.phase": lambda p: p["status"].get("phase", ""),
    "status.podIP": lambda p: p["status"].get("podIP", ""),
    "status.podIPs": lambda p: ",".join(i["ip"] for i in p["status"].get("podIPs", [])),
    "status.nominatedNodeName": lambda p: p["status"].get("nominatedNodeName", ""),
}

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}"
_LABEL_VALUE = rf"(?:{_NAME})?"
_REQUIREMENT = re.compile(rf"""\s*(?:
    !\s*(?P<absent>{_LABEL_KEY})
  | (?P<key>{_LABEL_KEY})\s*(?:
        (?P<op>==|!=|=|>|<)\s*(?P<value>{_LABEL_VALUE})
      | \s(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
    )?
)\s*""", re.X)


class SelectorError(ValueError):
    """A selector kube-apiserver would refuse with 400 BadRequest."""


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A failure `Status`, as kube-apiserver sends for errors (as a body, or as a watch ERROR event's object)."""
    s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
         "reason": reason}
    if details is not None:
        s["details"] = details
    s["code"] = code
    return s


def _split_top_level(s: str) -> list[str]:
    """`s` split at commas outside parentheses (`a in (x,y),b` is two requirements)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def parse_label_selector(text: str):
    """A predicate over a labels dict, for the syntax of k8s.io/apimachinery/pkg/labels:
    `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, `k>1`, `k<1`, ANDed by commas."""
    tests = []
    if not text.strip():
        return lambda labels: True
    for req in _split_top_level(text):
        m = _REQUIREMENT.fullmatch(req)
        if not m:
            raise SelectorError(f"unable to parse requirement: {req.strip()!r}")
        if m["absent"]:
            tests.append(lambda l, k=m["absent"]: k not in l)
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",")}
            if not all(re.fullmatch(_LABEL_VALUE, v) for v in values):
                raise SelectorError(f"unable to parse requirement: {req.strip()!r}")
            if m["setop"] == "in":
                tests.append(lambda l, k=m["key"], vs=values: k in l and l[k] in vs)
            else:
                tests.append(lambda l, k=m["key"], vs=values: k not in l or l[k] not in vs)
        elif m["op"] in ("=", "=="):
            tests.append(lambda l, k=m["key"], v=m["value"]: l.get(k) == v)
        elif m["op"] == "!=":
            tests.append(lambda l, k=m["key"], v=m["value"]: l.get(k) != v)
        elif m["op"] in (">", "<"):
            if not re.fullmatch(r"-?[0-9]+", m["value"]):
                raise SelectorError("unable to parse requirement: for 'gt', 'lt' operators, "
                                    "the value must be an integer")
            n, gt = int(m["value"]), m["op"] == ">"

            def cmp(l, k=m["key"], n=n, gt=gt):
                if not re.fullmatch(r"-?[0-9]+", l.get(k, "")):
                    return False
                return int(l[k]) > n if gt else int(l[k]) < n
            tests.append(cmp)
        else:
            tests.append(lambda l, k=m["key"]: k in l)
    return lambda labels: all(t(labels) for t in tests)


def parse_field_selector(text: str):
    """A predicate over a pod for a field selector (`spec.nodeName=x,metadata.namespace!=y`);
    unknown field labels are refused as kube-apiserver refuses them."""
    tests = []
    if not text.strip():
        return lambda pod: True
    for term in text.split(","):
        for op in ("!=", "==", "="):
            if op in term:
                field, value = term.split(op, 1)
                break
        else:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
        field = field.strip()
        if field not in _POD_FIELDS:
            raise SelectorError(f'field label not supported: {field}')
        get = _POD_FIELDS[field]
        if op == "!=":
            tests.append(lambda p, get=get, v=value: get(p) != v)
        else:
            tests.append(lambda p, get=get, v=value: get(p) == v)
    return lambda pod: all(t(pod) for t in tests)


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bool(q: dict, name: str):
    """A boolean query parameter: True, False, or None when absent; ValueError when not a Go bool."""
    v = q.get(name)
    if v is None or v == "":
        return None
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: invalid value {v!r}")


class _Event:
    __slots__ = ("rv", "type", "obj", "prev")

    def __init__(self, rv: int, type_: str, obj: dict, prev: dict | None):
        self.rv, self.type, self.obj, self.prev = rv, type_, obj, prev


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, api: "KubeApiServer", tls: ssl.SSLContext):
        self.api = api
        self.tls = tls
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's own thread, so a slow
        # or broken client does not hold up the accept loop.
        try:
            request.settimeout(_Handler.timeout)
            tls_sock = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            return None
        self.api._track(tls_sock, True)
        try:
            return super().finish_request(tls_sock, client_address)
        finally:
            self.api._track(tls_sock, False)
            tls_sock.close()

    def handle_error(self, request, client_address):
        # Clients that hang up mid-response (a watch being stopped) are normal.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-apiserver-standin"
    timeout = 120  # per socket operation; a watch waits on the condition, not the socket

    def log_message(self, format, *args):
        pass

    @property
    def api(self) -> "KubeApiServer":
        return self.server.api

    def do_GET(self):
        try:
            self._get()
        except OSError:  # BrokenPipe, ConnectionReset, ssl errors: the client went away
            self.close_connection = True

    def _refuse_method(self):
        # Pods are read-only here; the body is left unread, so the connection cannot be reused.
        self.close_connection = True
        try:
            if not self._authenticated():
                return self._reply(401, status(401, "Unauthorized", "Unauthorized"))
            self._reply(405, status(405, "MethodNotAllowed",
                                    "the server does not allow this method on the requested resource", {}))
        except OSError:
            pass

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse_method

    def _reply(self, code: int, obj: dict, *, query=None, watch=False):
        self.api._record(self._path, query or {}, watch, code)
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    @property
    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _authenticated(self) -> bool:
        parts = self.headers.get("Authorization", "").strip().split(" ", 2)
        if len(parts) >= 2 and parts[0].lower() == "bearer" and parts[1]:
            return hmac.compare_digest(parts[1].encode(), self.api.token.encode())
        return False

    def _get(self):
        split = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(split.query, keep_blank_values=True).items()}
        path = split.path.rstrip("/") or "/"
        if not self._authenticated():
            return self._reply(401, status(401, "Unauthorized", "Unauthorized"), query=query,
                               watch=query.get("watch") in _TRUE)

        if path == "/version":
            return self._reply(200, {
                "major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
                "minCompatibilityMajor": "1", "minCompatibilityMinor": "36", "gitVersion": "v1.37.0",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25.0",
                "compiler": "gc", "platform": "linux/amd64"}, query=query)
        if path == "/api":
            return self._reply(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.api.port}"}]}, query=query)
        if path == "/apis":
            return self._reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}, query=query)
        if path == "/api/v1":
            return self._reply(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
                 "verbs": ["get", "list", "watch"], "shortNames": ["po"], "categories": ["all"]}]}, query=query)

        m = re.fullmatch(r"/api/v1(?:/namespaces/([^/]+))?/pods(?:/([^/]+))?", path)
        if not m or (m[2] and not m[1]):
            return self._reply(404, status(404, "NotFound", "the server could not find the requested resource",
                                           {}), query=query)
        ns, name = m[1], m[2]
        try:
            watch = bool(_bool(query, "watch")) and not name
            bookmarks = bool(_bool(query, "allowWatchBookmarks"))
            send_initial = _bool(query, "sendInitialEvents")
        except ValueError as e:
            return self._reply(400, status(400, "BadRequest", str(e)), query=query)

        if self.api._forbidden:
            verb = "get" if name else "watch" if watch else "list"
            what = f'pods "{name}"' if name else "pods"
            scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
            details = {"name": name, "kind": "pods"} if name else {"kind": "pods"}
            return self._reply(403, status(
                403, "Forbidden", f'{what} is forbidden: User "{FORBIDDEN_USER}" cannot {verb} resource "pods" '
                                  f'in API group "" {scope}', details), query=query, watch=watch)

        if name:
            pod = self.api._get(ns, name)
            if pod is None:
                return self._reply(404, status(404, "NotFound", f'pods "{name}" not found',
                                               {"name": name, "kind": "pods"}), query=query)
            return self._reply(200, pod, query=query)

        try:
            fields = parse_field_selector(query.get("fieldSelector", ""))
            labels = parse_label_selector(query.get("labelSelector", ""))
        except SelectorError as e:
            return self._reply(400, status(400, "BadRequest", str(e)), query=query, watch=watch)

        def matches(pod: dict) -> bool:
            return ((ns is None or pod["metadata"]["namespace"] == ns) and fields(pod)
                    and labels(pod["metadata"].get("labels", {})))

        if not watch:
            rv, items = self.api._snapshot(matches)
            return self._reply(200, {"kind": "PodList", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": str(rv)}, "items": items}, query=query)

        rv_param = query.get("resourceVersion", "")
        if rv_param not in ("", "0") and not re.fullmatch(r"[0-9]+", rv_param):
            return self._reply(400, status(400, "BadRequest", f"invalid resource version: {rv_param}"),
                               query=query, watch=True)
        timeout = query.get("timeoutSeconds", "")
        try:
            deadline = time.monotonic() + int(timeout) if timeout else None
        except ValueError:
            return self._reply(400, status(400, "BadRequest", f"timeoutSeconds: invalid value {timeout!r}"),
                               query=query, watch=True)
        # Unset means "yes" for a watch from "" or "0" (the legacy list-less watch), "no" otherwise.
        asked = send_initial is True
        if send_initial is None:
            send_initial = rv_param in ("", "0")
        since = None if send_initial or rv_param in ("", "0") else int(rv_param)
        self._watch(query, matches, since, send_initial, asked, bookmarks, deadline)

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, type_: str, obj: dict):
        self._chunk(json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n")

    def _peer_gone(self) -> bool:
        """True once the client closed (or wrote to) the connection: a watch
        client sends nothing more, so anything readable is its goodbye."""
        try:
            if self.connection.pending():
                return True
            readable, _, _ = select.select([self.connection], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _watch(self, query, matches, since, send_initial: bool, initial_events_end: bool, bookmarks: bool,
               deadline):
        api = self.api
        w = api._open_watch(since, matches, send_initial)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        api._record(self._path, query, True, 200)
        if w["expired"]:
            # A too old resourceVersion is not an HTTP error: kube-apiserver
            # answers 200 and a single ERROR event carrying the 410 Status.
            self._event("ERROR", status(410, "Expired", w["expired"]))
            self._chunk(b"")
            return
        try:
            for pod in w["initial"]:
                self._event("ADDED", pod)
            if send_initial and bookmarks and initial_events_end:
                # Asked-for initial events end with this bookmark (the WatchList protocol).
                self._event("BOOKMARK", _bookmark(w["cursor"], initial_events_end=True))
            next_bookmark = time.monotonic() + api.bookmark_interval
            while True:
                now = time.monotonic()
                wake = min(now + _PEER_POLL, next_bookmark if bookmarks else now + _PEER_POLL)
                if deadline is not None:
                    wake = min(wake, deadline)
                batch = api._next_events(w, max(0.0, wake - now))
                for type_, obj in batch["events"]:
                    self._event(type_, obj)
                if batch["compacted"]:
                    # What kube-apiserver says when etcd compacts under an open watch.
                    self._event("ERROR", status(410, "Expired",
                                                "The resourceVersion for the provided watch is too old."))
                    break
                if batch["ended"] or (deadline is not None and time.monotonic() >= deadline):
                    break
                if bookmarks and time.monotonic() >= next_bookmark:
                    # w["cursor"] is current as of the batch, so no event is skipped by this RV.
                    self._event("BOOKMARK", _bookmark(w["cursor"]))
                    next_bookmark = time.monotonic() + api.bookmark_interval
                if not batch["events"] and self._peer_gone():
                    self.close_connection = True
                    return
            self._chunk(b"")
        finally:
            api._close_watch(w)


def _bookmark(rv: int, initial_events_end: bool = False) -> dict:
    # An empty Pod but for its resourceVersion, as the watch cache sends.
    meta = {"resourceVersion": str(rv)}
    if initial_events_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": {"containers": None}, "status": {}}


def _watch_event(ev: _Event, matches) -> tuple[str, dict] | None:
    """What one change looks like to a watch with this filter, as kube-apiserver's
    cacheWatcher.convertToWatchEvent decides: an object that stops matching is
    DELETED (its previous state, at the change's resourceVersion), one that
    starts matching is ADDED."""
    cur = ev.type != "DELETED" and matches(ev.obj)
    old = ev.prev is not None and matches(ev.prev)
    if cur and not old:
        return "ADDED", copy.deepcopy(ev.obj)
    if cur and old:
        return "MODIFIED", copy.deepcopy(ev.obj)
    if old:
        gone = copy.deepcopy(ev.prev)
        gone["metadata"]["resourceVersion"] = str(ev.rv)
        return "DELETED", gone
    return None


class KubeApiServer:
    """The API server, serving from the constructor until `close()` (or the
    end of a `with` block). `bookmark_interval`: seconds between BOOKMARK
    events on watches that allow them."""

    def __init__(self, tmp_dir: Path, bookmark_interval: float = 1.0):
        tmp_dir = Path(tmp_dir)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        pki = make_provider_pki(tmp_dir / "kube-pki")
        self.ca_file = pki / "ca.pem"
        self.token_file = tmp_dir / "kube-token"
        self.bookmark_interval = bookmark_interval
        self.requests: list[dict] = []
        self._requests_lock = threading.Lock()
        self._cond = threading.Condition()
        self._rv = FIRST_RESOURCE_VERSION
        self._pods: dict[str, dict] = {}  # uid -> pod
        self._history: list[_Event] = []  # every change with rv > self._compacted_rv, in order
        self._compacted_rv = FIRST_RESOURCE_VERSION
        self._compactions = 0  # open watches end with 410 when this moves
        self._endings = 0  # ... and normally when this does
        self._closed = False
        self._forbidden = False
        self._connections: set = set()
        self._open = 0  # watch streams being served
        self.token = ""
        self.rotate_token()

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(pki / "server.pem", pki / "server.key")
        tls.set_alpn_protocols(["http/1.1"])
        self._httpd = _HTTPServer(self, tls)
        self.port = self._httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the cluster, as the tests change it

    def add_pod(self, namespace: str, name: str, uid: str, node: str, labels: dict | None = None,
                service_account: str = "default") -> dict:
        """Creates a running pod (ADDED); returns it."""
        with self._cond:
            if uid in self._pods:
                raise ValueError(f"a pod with uid {uid} exists")
            if self._find(namespace, name):
                raise ValueError(f'pods "{name}" already exists in {namespace}')
            self._rv += 1
            created = _now_rfc3339()
            meta = {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": str(self._rv),
                    "creationTimestamp": created}
            if labels:
                meta["labels"] = dict(labels)
            pod = {
                "kind": "Pod", "apiVersion": "v1", "metadata": meta,
                "spec": {
                    "containers": [{"name": "app", "image": "python:3.12", "resources": {},
                                    "terminationMessagePath": "/dev/termination-log",
                                    "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
                    "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": service_account, "serviceAccount": service_account,
                    "nodeName": node, "securityContext": {}, "schedulerName": "default-scheduler",
                    "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
                },
                "status": {"phase": "Running", "qosClass": "BestEffort", "startTime": created},
            }
            self._pods[uid] = pod
            self._change("ADDED", pod, None)
            return copy.deepcopy(pod)

    def set_labels(self, uid: str, labels: dict):
        """Replaces the pod's labels (MODIFIED, new resourceVersion)."""
        with self._cond:
            prev = self._pods[uid]
            pod = copy.deepcopy(prev)
            self._rv += 1
            pod["metadata"]["resourceVersion"] = str(self._rv)
            if labels:
                pod["metadata"]["labels"] = dict(labels)
            else:
                pod["metadata"].pop("labels", None)
            self._pods[uid] = pod
            self._change("MODIFIED", pod, prev)

    def delete_pod(self, uid: str):
        """Removes the pod at once (DELETED), as after its grace period."""
        with self._cond:
            prev = self._pods.pop(uid)
            self._rv += 1
            pod = copy.deepcopy(prev)
            pod["metadata"]["resourceVersion"] = str(self._rv)
            self._change("DELETED", pod, prev)

    def rotate_token(self) -> str:
        """A new token, written to token_file; the old one is refused from now on
        (watches already open carry on: a request is authenticated when it starts)."""
        token = secrets.token_urlsafe(32)
        tmp = self.token_file.with_name(self.token_file.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        # Replaced in one step, as the kubelet swaps a projected token, so a reader never sees half a token.
        os.replace(tmp, self.token_file)
        self.token = token
        return token

    def forbid(self, on: bool = True):
        """While on, pod requests get 403, as for an account without the RBAC to read pods."""
        self._forbidden = bool(on)

    def compact(self):
        """Forgets the history: open watches get ERROR 410 and end; a watch from
        an older resourceVersion gets 200, one ERROR 410 event, and ends."""
        with self._cond:
            self._history.clear()
            self._compacted_rv = self._rv
            self._compactions += 1
            self._cond.notify_all()

    def end_watches(self):
        """Ends every open watch normally, as when its timeout runs out."""
        with self._cond:
            self._endings += 1
            self._cond.notify_all()

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._cond:
            return str(self._rv)

    @property
    def open_watches(self) -> int:
        """How many watch streams are being served right now."""
        with self._cond:
            return self._open

    def close(self):
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        # Unblocks handlers stuck writing to a client that stopped reading.
        for sock in list(self._connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()

    # -- used by the handler

    def _track(self, sock, add: bool):
        with self._cond:
            (self._connections.add if add else self._connections.discard)(sock)

    def _record(self, path: str, query: dict, watch: bool, status_code: int):
        with self._requests_lock:
            self.requests.append({"path": path, "query": dict(query), "watch": watch, "status": status_code})

    def _find(self, namespace: str, name: str) -> dict | None:
        for pod in self._pods.values():
            if pod["metadata"]["namespace"] == namespace and pod["metadata"]["name"] == name:
                return pod
        return None

    def _get(self, namespace: str, name: str) -> dict | None:
        with self._cond:
            pod = self._find(namespace, name)
            return copy.deepcopy(pod) if pod else None

    def _snapshot(self, matches) -> tuple[int, list[dict]]:
        """The current resourceVersion and the matching pods, in key (namespace/name) order."""
        with self._cond:
            pods = sorted(self._pods.values(), key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))
            return self._rv, [copy.deepcopy(p) for p in pods if matches(p)]

    def _change(self, type_: str, pod: dict, prev: dict | None):
        # Caller holds self._cond and has bumped self._rv.
        self._history.append(_Event(self._rv, type_, copy.deepcopy(pod), copy.deepcopy(prev)))
        self._cond.notify_all()

    def _open_watch(self, since: int | None, matches, send_initial: bool) -> dict:
        with self._cond:
            w = {"matches": matches, "compactions": self._compactions, "endings": self._endings,
                 "initial": [], "cursor": self._rv, "expired": None}
            if since is not None and since < self._compacted_rv:
                w["expired"] = f"too old resource version: {since} ({self._compacted_rv})"
                return w
            if send_initial:
                w["initial"] = self._snapshot(matches)[1]
            elif since is not None:
                # Replayed from history: everything after `since`, so nothing
                # changed between a list and this watch is lost.
                w["cursor"] = since
            self._open += 1
            return w

    def _close_watch(self, w: dict):
        with self._cond:
            self._open -= 1

    def _next_events(self, w: dict, timeout: float) -> dict:
        """Waits up to `timeout` for changes after the watch's cursor; returns
        them as this watch sees them, and whether the watch must end."""
        with self._cond:
            def ready():
                return (self._closed or w["compactions"] != self._compactions or w["endings"] != self._endings
                        or (self._history and self._history[-1].rv > w["cursor"]))
            self._cond.wait_for(ready, timeout)
            if w["compactions"] != self._compactions:
                return {"events": [], "compacted": True, "ended": True}
            events = []
            for ev in self._history:
                if ev.rv > w["cursor"]:
                    seen = _watch_event(ev, w["matches"])
                    if seen:
                        events.append(seen)
            w["cursor"] = max(w["cursor"], self._rv)
            return {"events": events, "compacted": False,
                    "ended": self._closed or w["endings"] != self._endings}
