"""The stand-in Kubernetes API server (tests/peers/kube_api.py) checked on its
own with the official `kubernetes` Python client: typed lists and gets,
Status errors, and list-then-watch with history replay, label-selector
transitions, bookmarks, timeouts and 410 Gone. If these fail, a test of the
agent against the stand-in would prove nothing about a real cluster."""
import json
import queue
import sys
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from kube_api import KubeApiServer  # noqa: E402

# (connect, read) seconds on every call, so a server that stops answering
# fails the test instead of hanging it.
REQUEST_TIMEOUT = (5, 15)


@pytest.fixture
def api(tmp_path):
    with KubeApiServer(tmp_path, bookmark_interval=0.2) as a:
        yield a


def core(api: KubeApiServer, token: str | None = None) -> client.CoreV1Api:
    cfg = client.Configuration(host=api.url, ssl_ca_cert=str(api.ca_file),
                               api_key={"authorization": token or api.token},
                               api_key_prefix={"authorization": "Bearer"})
    return client.CoreV1Api(client.ApiClient(cfg))


@pytest.fixture
def v1(api):
    c = core(api)
    yield c
    c.api_client.close()


def wait_until(cond, timeout: float = 5.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def watch_requests(api: KubeApiServer) -> list[dict]:
    return [r for r in api.requests if r["watch"]]


class Stream:
    """`Watch().stream(func, **kwargs)` read in a thread, so the test can
    change the cluster while the watch is open. `next()` is the next event,
    None once the stream has ended (then `error` is what it raised, if anything)."""

    def __init__(self, func, **kwargs):
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        self.watch = watch.Watch()
        self.error: Exception | None = None
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(func, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func, kwargs):
        try:
            for event in self.watch.stream(func, **kwargs):
                self._events.put(event)
        except Exception as e:  # handed to the test by `error`
            self.error = e
        finally:
            self._events.put(None)

    def next(self, timeout: float = 5.0):
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no watch event in time") from None

    def join(self, timeout: float = 5.0):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the watch stream did not end"


def add_three(api: KubeApiServer):
    api.add_pod("shop", "web-0", "uid-web-0", "node-a", labels={"app": "web", "tier": "front"},
                service_account="web")
    api.add_pod("billing", "db-0", "uid-db-0", "node-a", labels={"app": "db"})
    api.add_pod("shop", "web-1", "uid-web-1", "node-b", labels={"app": "web"})


def test_list_by_node_returns_typed_pods(api, v1):
    add_three(api)
    pods = v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a", _request_timeout=REQUEST_TIMEOUT)
    assert isinstance(pods, client.V1PodList)
    assert pods.metadata.resource_version == api.resource_version
    assert all(isinstance(p, client.V1Pod) for p in pods.items)
    by_name = {p.metadata.name: p for p in pods.items}
    assert set(by_name) == {"web-0", "db-0"}
    web = by_name["web-0"]
    assert web.metadata.uid == "uid-web-0"
    assert web.metadata.namespace == "shop"
    assert web.metadata.labels == {"app": "web", "tier": "front"}
    assert web.spec.service_account_name == "web"
    assert web.spec.node_name == "node-a"
    assert web.status.phase == "Running"
    assert web.metadata.creation_timestamp.tzinfo is not None
    assert by_name["db-0"].spec.service_account_name == "default"

    def names(**kw):
        return sorted(p.metadata.name for p in
                      v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT, **kw).items)

    assert names(field_selector="spec.nodeName==node-a,metadata.namespace=shop") == ["web-0"]
    assert names(field_selector="spec.nodeName!=node-a") == ["web-1"]
    assert names(label_selector="app=web") == ["web-0", "web-1"]
    assert names(label_selector="app=web,tier") == ["web-0"]
    assert names(label_selector="!tier,app") == ["db-0", "web-1"]
    assert names(label_selector="app in (db, web),app!=web") == ["db-0"]

    api.add_pod("shop", "bare", "uid-bare", "node-c")
    assert [p.metadata.labels for p in v1.list_pod_for_all_namespaces(
        field_selector="spec.nodeName=node-c", _request_timeout=REQUEST_TIMEOUT).items] == [None]


def test_namespaced_list_and_get(api, v1):
    add_three(api)
    shop = v1.list_namespaced_pod("shop", _request_timeout=REQUEST_TIMEOUT)
    assert sorted(p.metadata.name for p in shop.items) == ["web-0", "web-1"]
    assert v1.list_namespaced_pod("nowhere", _request_timeout=REQUEST_TIMEOUT).items == []

    pod = v1.read_namespaced_pod("db-0", "billing", _request_timeout=REQUEST_TIMEOUT)
    assert isinstance(pod, client.V1Pod)
    assert pod.metadata.uid == "uid-db-0"

    with pytest.raises(ApiException) as e:
        v1.read_namespaced_pod("db-0", "shop", _request_timeout=REQUEST_TIMEOUT)
    assert e.value.status == 404
    assert json.loads(e.value.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "db-0" not found', "reason": "NotFound", "details": {"name": "db-0", "kind": "pods"},
        "code": 404}


def test_unsupported_field_selector_is_400(api, v1):
    with pytest.raises(ApiException) as e:
        v1.list_pod_for_all_namespaces(field_selector="spec.nodename=node-a", _request_timeout=REQUEST_TIMEOUT)
    assert e.value.status == 400
    body = json.loads(e.value.body)
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "BadRequest", 400)
    assert body["message"] == "field label not supported: spec.nodename"


def test_discovery(api, v1):
    ac = v1.api_client
    assert client.VersionApi(ac).get_code(_request_timeout=REQUEST_TIMEOUT).major == "1"
    assert client.CoreApi(ac).get_api_versions(_request_timeout=REQUEST_TIMEOUT).versions == ["v1"]
    resources = v1.get_api_resources(_request_timeout=REQUEST_TIMEOUT).resources
    pods = next(r for r in resources if r.name == "pods")
    assert pods.namespaced and pods.kind == "Pod" and {"list", "watch"} <= set(pods.verbs)
    assert client.ApisApi(ac).get_api_versions(_request_timeout=REQUEST_TIMEOUT).groups == []


def test_wrong_token_is_401(api):
    bad = core(api, token="not-the-token")
    with pytest.raises(ApiException) as e:
        bad.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT)
    assert e.value.status == 401
    assert json.loads(e.value.body) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                        "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    # A watch is refused before it starts, with the same exception.
    with pytest.raises(ApiException) as e:
        next(watch.Watch().stream(bad.list_pod_for_all_namespaces, timeout_seconds=5,
                                  _request_timeout=REQUEST_TIMEOUT))
    assert e.value.status == 401
    assert [(r["path"], r["watch"], r["status"]) for r in api.requests] == [
        ("/api/v1/pods", False, 401), ("/api/v1/pods", True, 401)]


def test_forbid_is_403(api, v1):
    add_three(api)
    api.forbid(True)
    with pytest.raises(ApiException) as e:
        v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a", _request_timeout=REQUEST_TIMEOUT)
    assert e.value.status == 403
    body = json.loads(e.value.body)
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "Forbidden", 403)
    assert body["message"] == ('pods is forbidden: User "system:serviceaccount:warden:warden" cannot list '
                               'resource "pods" in API group "" at the cluster scope')
    with pytest.raises(ApiException) as e:
        next(watch.Watch().stream(v1.list_namespaced_pod, "shop", timeout_seconds=5,
                                  _request_timeout=REQUEST_TIMEOUT))
    assert e.value.status == 403
    assert 'cannot watch resource "pods" in API group "" in the namespace "shop"' in json.loads(e.value.body)["message"]

    api.forbid(False)
    assert len(v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).items) == 3


def test_watch_from_list_sees_add_modify_delete_in_order(api, v1):
    add_three(api)
    listed = v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a", _request_timeout=REQUEST_TIMEOUT)
    s = Stream(v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=node-a",
               resource_version=listed.metadata.resource_version, timeout_seconds=30)
    wait_until(lambda: api.open_watches == 1, what="the watch to open")

    api.add_pod("shop", "elsewhere", "uid-elsewhere", "node-b")
    added = api.add_pod("shop", "web-2", "uid-web-2", "node-a", labels={"app": "web"})
    api.set_labels("uid-elsewhere", {"x": "y"})
    api.set_labels("uid-web-2", {"app": "web", "version": "2"})
    api.delete_pod("uid-elsewhere")
    api.delete_pod("uid-web-2")

    events = [s.next() for _ in range(3)]
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert all(isinstance(e["object"], client.V1Pod) for e in events)
    assert {e["object"].metadata.uid for e in events} == {"uid-web-2"}
    assert events[0]["object"].metadata.resource_version == added["metadata"]["resourceVersion"]
    assert events[1]["object"].metadata.labels == {"app": "web", "version": "2"}
    assert events[2]["object"].metadata.resource_version == api.resource_version
    rvs = [int(e["object"].metadata.resource_version) for e in events]
    assert rvs == sorted(rvs) and int(listed.metadata.resource_version) < rvs[0]

    api.end_watches()  # with timeout_seconds the client does not re-watch, so the stream ends
    assert s.next() is None and s.error is None
    s.join()
    assert [(r["path"], r["query"]["resourceVersion"], r["query"]["fieldSelector"], r["status"])
            for r in watch_requests(api)] == [
        ("/api/v1/pods", listed.metadata.resource_version, "spec.nodeName=node-a", 200)]


def test_changes_between_list_and_watch_are_replayed(api, v1):
    add_three(api)
    listed = v1.list_namespaced_pod("shop", _request_timeout=REQUEST_TIMEOUT)
    api.add_pod("shop", "web-2", "uid-web-2", "node-a")
    api.add_pod("billing", "db-1", "uid-db-1", "node-a")  # another namespace: not this watch's
    api.set_labels("uid-web-0", {"app": "web", "tier": "back"})
    api.delete_pod("uid-web-1")

    w = watch.Watch()
    seen = []
    for event in w.stream(v1.list_namespaced_pod, "shop", resource_version=listed.metadata.resource_version,
                          timeout_seconds=10, _request_timeout=REQUEST_TIMEOUT):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3:
            w.stop()
    assert seen == [("ADDED", "web-2"), ("MODIFIED", "web-0"), ("DELETED", "web-1")]
    assert w.resource_version == api.resource_version


def test_watch_without_resource_version_starts_with_current_pods(api, v1):
    add_three(api)
    w = watch.Watch()
    seen = []
    for event in w.stream(v1.list_pod_for_all_namespaces, label_selector="app=web", timeout_seconds=10,
                          _request_timeout=REQUEST_TIMEOUT):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            w.stop()
    assert sorted(seen) == [("ADDED", "web-0"), ("ADDED", "web-1")]


def test_label_changes_move_pods_in_and_out_of_a_selector(api, v1):
    add_three(api)
    listed = v1.list_pod_for_all_namespaces(label_selector="app=web", _request_timeout=REQUEST_TIMEOUT)
    s = Stream(v1.list_pod_for_all_namespaces, label_selector="app=web",
               resource_version=listed.metadata.resource_version, timeout_seconds=30)
    api.set_labels("uid-web-0", {"app": "cache"})
    left = s.next()
    # As kube-apiserver does: DELETED, carrying the object as it was when it
    # last matched, at the resourceVersion of the change.
    assert left["type"] == "DELETED"
    assert left["object"].metadata.name == "web-0"
    assert left["object"].metadata.labels == {"app": "web", "tier": "front"}
    assert left["object"].metadata.resource_version == api.resource_version

    api.set_labels("uid-db-0", {"app": "web"})
    joined = s.next()
    assert (joined["type"], joined["object"].metadata.name) == ("ADDED", "db-0")
    assert joined["object"].metadata.labels == {"app": "web"}
    api.end_watches()
    assert s.next() is None and s.error is None


def test_compaction_ends_an_open_watch_with_410(api, v1):
    add_three(api)
    listed = v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT)
    s = Stream(v1.list_pod_for_all_namespaces, resource_version=listed.metadata.resource_version,
               timeout_seconds=30)
    api.set_labels("uid-web-0", {"app": "web"})
    assert s.next()["type"] == "MODIFIED"
    api.compact()
    # The client turns an ERROR event into ApiException; with timeout_seconds
    # set it does not retry first.
    assert s.next() is None
    assert isinstance(s.error, ApiException)
    assert s.error.status == 410
    assert s.error.reason == "Expired: The resourceVersion for the provided watch is too old."
    assert len(watch_requests(api)) == 1


def test_watch_from_before_compaction_gets_410(api, v1):
    add_three(api)
    old = v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).metadata.resource_version
    api.delete_pod("uid-web-1")
    api.compact()

    # Without timeout_seconds the client retries a 410 once, from the same
    # resourceVersion (it saw no event to advance it), then raises.
    with pytest.raises(ApiException) as e:
        for _ in watch.Watch().stream(v1.list_pod_for_all_namespaces, resource_version=old,
                                      _request_timeout=REQUEST_TIMEOUT):
            pass
    assert e.value.status == 410
    assert e.value.reason == f"Expired: too old resource version: {old} ({api.resource_version})"
    assert [(r["query"]["resourceVersion"], r["status"]) for r in watch_requests(api)] == [(old, 200), (old, 200)]

    # From the list after the compaction, watching works again.
    fresh = v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).metadata.resource_version
    s = Stream(v1.list_pod_for_all_namespaces, resource_version=fresh, timeout_seconds=30)
    api.set_labels("uid-db-0", {"app": "db", "v": "2"})
    event = s.next()
    assert (event["type"], event["object"].metadata.name) == ("MODIFIED", "db-0")
    api.end_watches()
    assert s.next() is None and s.error is None


def test_bookmarks_carry_the_current_resource_version(api, v1):
    add_three(api)
    listed = v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a",
                                            _request_timeout=REQUEST_TIMEOUT)
    s = Stream(v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=node-a",
               resource_version=listed.metadata.resource_version, allow_watch_bookmarks=True, timeout_seconds=30)
    first = s.next()
    assert first["type"] == "BOOKMARK"
    assert first["object"]["metadata"]["resourceVersion"] == listed.metadata.resource_version
    assert first["object"]["kind"] == "Pod"

    # A change this watch does not see still moves its bookmarks on, so a
    # re-watch from the bookmark need not replay it.
    api.set_labels("uid-web-1", {"app": "web", "v": "2"})
    current = api.resource_version
    while (event := s.next())["type"] == "BOOKMARK" and event["raw_object"]["metadata"]["resourceVersion"] != current:
        pass
    assert event["type"] == "BOOKMARK"
    assert s.watch.resource_version == current
    api.end_watches()
    assert s.next() is None
    assert watch_requests(api)[0]["query"]["allowWatchBookmarks"] == "true"


def test_timeout_seconds_ends_the_stream(api, v1):
    add_three(api)
    rv = v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).metadata.resource_version
    start = time.monotonic()
    events = list(watch.Watch().stream(v1.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1,
                                       _request_timeout=REQUEST_TIMEOUT))
    elapsed = time.monotonic() - start
    # No changes, and no bookmarks because none were asked for.
    assert events == []
    assert 0.9 <= elapsed < 3
    assert [r["query"]["timeoutSeconds"] for r in watch_requests(api)] == ["1"]
    wait_until(lambda: api.open_watches == 0, what="the server to close the watch")


def test_client_hanging_up_a_watch_leaves_the_server_serving(api, v1):
    add_three(api)
    s = Stream(v1.list_pod_for_all_namespaces, timeout_seconds=30)
    assert s.next()["type"] == "ADDED"
    s.watch.stop()  # shuts the socket down under the reading thread
    s.join()
    wait_until(lambda: api.open_watches == 0, what="the server to notice the hang-up")
    assert len(v1.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).items) == 3


def test_rotated_token_replaces_the_old_one(api):
    old = core(api)
    assert api.token_file.read_text() == api.token
    old.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT)

    new_token = api.rotate_token()
    assert new_token == api.token == api.token_file.read_text()
    with pytest.raises(ApiException) as e:
        old.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT)
    assert e.value.status == 401

    new = core(api, token=api.token_file.read_text())
    assert new.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).items == []
    assert [r["status"] for r in api.requests] == [200, 401, 200]
