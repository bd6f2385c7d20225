"""Kubernetes mode end to end, against the fake API server (tests/k8s_fake_api.py) — no
live cluster ran here.

- ``python -m destination --source kubernetes --kube-api ...`` lists and watches a
  Service/EndpointSlice/Pod set built here in the API's JSON shape, whose pod addresses are
  loopback listeners: ``books`` (a meshed pod: its podIP:port is a real proxy's inbound
  listener) and ``legacy`` (an unmeshed pod: the plain test app);
- ``python -m identity --token-validator tokenreview ...`` certifies proxies whose tokens
  the fake API authenticates (TokenReview), refuses others (401) and answers 503 when the
  API cannot review;
- a client proxy resolving through that destination reaches books over mTLS and legacy
  over plaintext (tls="no_identity");
- watch events pushed through the fake API (MODIFIED pod, DELETED/ADDED slice) reach
  ``/v1/endpoints?watch=1`` streams.
"""
from __future__ import annotations

import asyncio
import copy
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from identity import ca
from microproxy import ctlhttp, tls
from tests.controlplane_helpers import leaf_for, server_name
from tests.harness import HOST, Conn, Mesh, Proc, clean_env, metric_sum, wait_until
from tests.k8s_fake_api import FakeAPI, load

SVC_PORT = 80
BOOKS = "books.default.svc.cluster.local"
LEGACY = "legacy.default.svc.cluster.local"
BOOKS_ID = ca.identity_name("books", "default", ca.DEFAULT_TRUST_DOMAIN)
CLIENT_ID = ca.identity_name("client", "default", ca.DEFAULT_TRUST_DOMAIN)
PATHS = {"Namespace": "/api/v1/namespaces", "Service": "/api/v1/services",
         "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices", "Pod": "/api/v1/pods"}
# bearer tokens the fake API authenticates (TokenReview) -> service account (namespace default)
TOKENS = {"tok-books": "books", "tok-client": "client", "tok-probe": "probe"}


# --- the fake API server, on a loop of its own (the processes under test are subprocesses)

class LiveAPI(FakeAPI):
    """FakeAPI whose idle watches deliver events pushed while they are open."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    def queue(self, path: str) -> asyncio.Queue[dict[str, Any]]:
        return self.queues.setdefault(path, asyncio.Queue())

    async def _stream(self, path: str, step: Any) -> Any:
        from tests.k8s_fake_api import Events
        if isinstance(step, Events):
            for ev in step.events:
                yield json.dumps(ev).encode() + b"\n"
            if step.end:
                return
        q = self.queue(path)
        self.holding[path] = self.holding.get(path, 0) + 1
        self._note()
        try:
            while True:
                yield json.dumps(await q.get()).encode() + b"\n"
        finally:
            self.holding[path] -= 1


class APIThread:
    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> LiveAPI:
            api = LiveAPI(root)
            await api.start()
            return api
        self.api = self.call(make())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def run(self, fn: Any) -> Any:
        async def go() -> Any:
            return fn()
        return self.call(go())

    def push(self, kind: str, etype: str, obj: dict[str, Any]) -> None:
        self.run(lambda: self.api.queue(PATHS[kind]).put_nowait({"type": etype, "object": obj}))

    def close(self) -> None:
        self.call(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api.port}"

    def kube_flags(self) -> list[str]:
        return ["--kube-api", self.url, "--kube-token-file", str(self.api.sa_dir / "token"),
                "--kube-ca-file", str(self.api.sa_dir / "ca.crt")]


# --- API objects, shaped as the API server returns them

_rv = iter(range(200, 100_000))


def _meta(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": "default", "uid": f"uid-{name}", "resourceVersion": str(next(_rv)),
            "creationTimestamp": "2026-11-20T09:14:20Z", **extra}


def service(name: str) -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1", "metadata": _meta(name, labels={"app": name}),
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.42", "clusterIPs": ["10.96.0.42"],
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "selector": {"app": name},
                     "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                     "ports": [{"name": "http", "protocol": "TCP", "port": SVC_PORT, "targetPort": "http"}]},
            "status": {"loadBalancer": {}}}


def endpoint_slice(name: str, svc: str, pod: str, port: int, ready: bool = True) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": _meta(name, generateName=f"{svc}-", labels={
                "kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by":
                "endpointslice-controller.k8s.io"}),
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"],
                           "conditions": {"ready": ready, "serving": ready, "terminating": not ready},
                           "targetRef": {"kind": "Pod", "namespace": "default", "name": pod, "uid": f"uid-{pod}"},
                           "nodeName": "node-a", "zone": "zone-a"}],
            "ports": [{"name": "http", "protocol": "TCP", "port": port}]}


def pod(name: str, app: str, sa: str, meshed: bool, port: int) -> dict[str, Any]:
    labels = {"app": app, "pod-template-hash": "5f7d9c6b8"}
    annotations: dict[str, str] = {}
    containers: list[dict[str, Any]] = [{"name": app, "image": f"example/{app}:1",
                                         "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}]
    if meshed:
        labels["micromesh.io/control-plane-ns"] = "micromesh"
        annotations["micromesh.io/inject"] = "enabled"
        containers.append({"name": "micromesh-proxy", "image": "ghcr.io/micromesh/proxy:0.1.0"})
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": _meta(name, labels=labels, annotations=annotations, ownerReferences=[{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-5f7d9c6b8",
                "uid": f"uid-rs-{app}", "controller": True, "blockOwnerDeletion": True}]),
            "spec": {"serviceAccountName": sa, "serviceAccount": sa, "containers": containers,
                     "nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}


def a_list(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {"resourceVersion": "100"}, "items": items}


def review_answer(body: Any) -> tuple[int, Any]:
    token = body["spec"]["token"] if isinstance(body, dict) else None
    sa = TOKENS.get(token) if isinstance(token, str) else None
    if sa is None or body["spec"].get("audiences") != ["identity.micromesh.io"]:
        return 201, load("tokenreview-unauthenticated.json")
    answer = copy.deepcopy(load("tokenreview-authenticated.json"))
    answer["spec"]["token"] = "REDACTED"
    answer["status"]["user"]["username"] = f"system:serviceaccount:default:{sa}"
    return 201, answer


# --- talking to the destination under test

def dest_client(mesh: Mesh, port: int) -> ctlhttp.Client:
    chain, key = leaf_for(mesh.home, "probe", "micromesh")
    return ctlhttp.Client(HOST, port, tls.client_context(mesh.home.trust_pem(), chain, key),
                          server_hostname=server_name("destination"), timeout=5.0)


def dest_get(mesh: Mesh, port: int, path: str, body: Any = None, method: str = "GET") -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        c = dest_client(mesh, port)
        try:
            status, raw = await c.request(method, path, body)
            return status, json.loads(raw) if raw else None
        finally:
            await c.close()
    return asyncio.run(go())


class NDJSONReader:
    """A destination ``?watch=1`` stream in a thread: lines land in a queue."""

    def __init__(self, mesh: Mesh, port: int, path: str) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.path = path
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, args=(mesh, port), daemon=True)
        self.thread.start()

    def _run(self, mesh: Mesh, port: int) -> None:
        async def go() -> None:
            c = dest_client(mesh, port)
            try:
                async for snap in c.watch(self.path):
                    self.q.put(snap)
            except Exception as e:  # noqa: BLE001 - reported to the test through the queue
                self.q.put(e)
            finally:
                await c.close()
        self.task = self.loop.create_task(go())
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        got = self.q.get(timeout=timeout)
        if isinstance(got, Exception):
            raise got
        return got  # type: ignore[no-any-return]

    def quiet(self, seconds: float) -> bool:
        try:
            self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(5)


# --- the scene

class Scene:
    def __init__(self) -> None:
        self.mesh = Mesh.create("micromesh-k8s-")
        self.api = APIThread(self.mesh.root / "kube")
        self.api.api.on_review = review_answer
        self.app = self.mesh.start_app()

    def start_cp(self, module: str, *args: str) -> Proc:
        ports_file = self.mesh._ports_file(module)
        argv = [sys.executable, "-m", module,
                "--home", str(self.mesh.home.root), "--host", HOST, "--port", "0",
                "--ports-file", str(ports_file), "--log-level", "info", *args]
        proc: Proc = self.mesh._spawn(Proc, module, argv, clean_env(), ports_file)
        proc.wait_ports(("port",))
        return proc

    def close(self) -> None:
        self.mesh.close()
        self.api.close()
        self.mesh.remove()


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    s = Scene()
    try:
        yield s
    finally:
        s.close()


def test_destination_kubernetes_source(scene: Scene) -> None:
    mesh, api = scene.mesh, scene.api
    # books' pod address is the books proxy's inbound listener: start that proxy first (it
    # needs identity, in TokenReview mode, and a destination; its pod is listed later).
    mesh.identity = scene.start_cp("identity", "--token-validator", "tokenreview", *api.kube_flags())
    api.run(lambda: api.api.lists.update({
        PATHS["Namespace"]: [a_list("Namespace", [{"kind": "Namespace", "apiVersion": "v1", "metadata": {
            "name": "default", "uid": "uid-ns-default", "resourceVersion": "7"}}])],
        PATHS["Service"]: [a_list("Service", [service("books"), service("legacy")])],
    }))
    # EndpointSlices and Pods are not listable yet: destination must not be ready
    dest = mesh.destination = scene.start_cp("destination", "--source", "kubernetes", *api.kube_flags())
    port = mesh.destination_port
    wait_until(lambda: api.run(lambda: len(api.api.requests(PATHS["Pod"], watch=False))) >= 1, 10,
               "destination asked for pods", dest)  # and was answered 404
    status, body = dest_get(mesh, port, "/ready")
    assert status == 503 and body["ok"] is False, body
    books = mesh.start_proxy("books", app_port=scene.app.http, wait=False, MESH_TOKEN="tok-books",
                             MESH_REGISTER="0")
    client = mesh.start_proxy("client", wait=False, MESH_TOKEN="tok-client", MESH_FAILFAST_TIMEOUT="3")
    books.wait_ports(("outbound", "inbound", "admin"))
    scene.books, scene.client = books, client  # type: ignore[attr-defined]
    api.run(lambda: api.api.lists.update({
        PATHS["EndpointSlice"]: [a_list("EndpointSlice", [
            endpoint_slice("books-x1", "books", "books-5f7d9c6b8-abcde", books.inbound),
            endpoint_slice("legacy-y2", "legacy", "legacy-5f7d9c6b8-fghij", scene.app.http)])],
        PATHS["Pod"]: [a_list("Pod", [
            pod("books-5f7d9c6b8-abcde", "books", "books", True, books.inbound),
            pod("legacy-5f7d9c6b8-fghij", "legacy", "default", False, scene.app.http)])],
    }))
    wait_until(lambda: dest_get(mesh, port, "/ready")[0] == 200, 15, "destination synced", dest)
    books.wait_ready()
    client.wait_ready()

    status, snap = dest_get(mesh, port, f"/v1/endpoints?authority={BOOKS}:{SVC_PORT}")
    assert status == 200
    assert set(snap) == {"version", "authority", "service", "port", "exists", "endpoints"}
    assert (snap["authority"], snap["service"], snap["port"], snap["exists"]) == \
        (f"{BOOKS}:{SVC_PORT}", "books.default", SVC_PORT, True)
    assert snap["endpoints"] == [{
        "address": f"127.0.0.1:{books.inbound}", "weight": 10000, "identity": BOOKS_ID,
        "protocol_hint": "http/1",
        "labels": {"namespace": "default", "zone": "zone-a", "workload": "books",
                   "workload_kind": "deployment", "pod": "books-5f7d9c6b8-abcde", "service_account": "books"}}]
    status, snap = dest_get(mesh, port, f"/v1/endpoints?authority=legacy.default:{SVC_PORT}")
    assert status == 200 and snap["authority"] == f"{LEGACY}:{SVC_PORT}" and snap["exists"] is True
    assert [(e["address"], e["identity"], e["protocol_hint"]) for e in snap["endpoints"]] == \
        [(f"127.0.0.1:{scene.app.http}", None, None)]
    assert dest_get(mesh, port, "/v1/endpoints?authority=nope.default.svc.cluster.local:80")[1]["exists"] is False
    # registration belongs to the local source
    status, body = dest_get(mesh, port, "/v1/register", {"instance": "x"}, "POST")
    assert status == 409 and "local source" in body["error"], body
    status, body = dest_get(mesh, port, "/v1/workloads")
    assert status == 200 and body["services"] == ["books.default", "legacy.default"]
    # destination and identity used their own ServiceAccount token against the API
    assert {r.token for r in api.api.log} == {"token-1"}


def test_client_proxy_reaches_meshed_over_mtls_and_unmeshed_over_plaintext(scene: Scene) -> None:
    books, client = scene.books, scene.client  # type: ignore[attr-defined]
    with Conn(client.outbound) as c:
        r = c.request("GET", f"http://{BOOKS}:{SVC_PORT}/meshed", {"Host": f"{BOOKS}:{SVC_PORT}"})
        assert r.status == 200, r.body
        # the books proxy's inbound saw the client's certificate and told the app who called
        assert r.json()["headers"].get("x-mesh-client-id") == [CLIENT_ID]
        r = c.request("GET", f"http://{LEGACY}:{SVC_PORT}/plain", {"Host": f"{LEGACY}:{SVC_PORT}"})
        assert r.status == 200, r.body
        assert r.json()["path"] == "/plain"
        assert "x-mesh-client-id" not in r.json()["headers"]   # no proxy in between
    out = client.metrics()
    assert metric_sum(out, "response_total", direction="outbound", authority=f"{BOOKS}:{SVC_PORT}",
                      tls="true", server_id=BOOKS_ID) >= 1
    assert metric_sum(out, "response_total", direction="outbound", authority=f"{LEGACY}:{SVC_PORT}",
                      tls="no_identity") >= 1
    assert 'server_id="None"' not in out
    inbound = books.metrics()
    assert metric_sum(inbound, "request_total", direction="inbound", tls="true", client_id=CLIENT_ID) >= 1


def test_identity_tokenreview_certifies_and_refuses(scene: Scene) -> None:
    mesh, api = scene.mesh, scene.api
    ident = mesh.identity
    assert ident is not None

    def certify(token: str, sa: str) -> tuple[int, Any]:
        key = ca.new_key()
        csr = ca.make_csr(key, ca.identity_name(sa, "default", ca.DEFAULT_TRUST_DOMAIN))
        body = {"token": token, "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}

        async def go() -> tuple[int, Any]:
            c = ctlhttp.Client(HOST, mesh.identity_port, tls.client_context(mesh.home.trust_pem()),
                               server_hostname=server_name("identity"), timeout=10.0)
            try:
                status, raw = await c.request("POST", "/v1/certify", body)
                return status, json.loads(raw)
            finally:
                await c.close()
        return asyncio.run(go())

    status, body = certify("tok-probe", "probe")
    assert status == 200, body
    assert body["identity"] == ca.identity_name("probe", "default", ca.DEFAULT_TRUST_DOMAIN)
    reviews = [r for r in api.api.log if r.path.endswith("/tokenreviews") and r.body["spec"]["token"] == "tok-probe"]
    assert reviews and reviews[-1].body["spec"]["audiences"] == ["identity.micromesh.io"]
    # a token the API server does not authenticate
    status, body = certify("tok-stolen", "probe")
    assert status == 401 and "rejected by TokenReview" in body["error"], body
    # an authenticated token for another service account may not ask for probe's identity
    status, body = certify("tok-books", "probe")
    assert status == 403, body
    # the API server cannot review: 503, not the proxy's fault
    api.run(lambda: setattr(api.api, "on_review", lambda b: (500, {"kind": "Status", "code": 500,
                                                                      "message": "etcd timeout"})))
    try:
        status, body = certify("tok-probe", "probe")
        assert status == 503 and "etcd timeout" in body["error"], body
    finally:
        api.run(lambda: setattr(api.api, "on_review", review_answer))


def test_watch_follows_api_events(scene: Scene) -> None:
    mesh, api = scene.mesh, scene.api
    port = mesh.destination_port
    books_inbound = scene.books.inbound  # type: ignore[attr-defined]
    w = NDJSONReader(mesh, port, f"/v1/endpoints?authority={BOOKS}:{SVC_PORT}&watch=1")
    try:
        first = w.next()
        assert [e["identity"] for e in first["endpoints"]] == [BOOKS_ID]
        # the pod opts out of the mesh (MODIFIED): same address, now plaintext
        unmeshed = pod("books-5f7d9c6b8-abcde", "books", "books", True, books_inbound)
        unmeshed["metadata"]["annotations"]["micromesh.io/inject"] = "disabled"
        api.push("Pod", "MODIFIED", unmeshed)
        snap = w.next()
        assert [(e["address"], e["identity"]) for e in snap["endpoints"]] == [(f"127.0.0.1:{books_inbound}", None)]
        assert snap["version"] > first["version"]
        # a pod status heartbeat that changes nothing discovery reads: no snapshot
        api.push("Pod", "MODIFIED", copy.deepcopy(unmeshed) | {"metadata": {
            **unmeshed["metadata"], "resourceVersion": str(next(_rv))}})
        # the slice goes away (DELETED): no endpoints
        sl = endpoint_slice("books-x1", "books", "books-5f7d9c6b8-abcde", books_inbound)
        api.push("EndpointSlice", "DELETED", sl)
        snap = w.next()
        assert snap["exists"] is True and snap["endpoints"] == []
        # back again, and the pod meshed again
        api.push("EndpointSlice", "ADDED", endpoint_slice("books-x1", "books", "books-5f7d9c6b8-abcde",
                                                          books_inbound))
        api.push("Pod", "MODIFIED", pod("books-5f7d9c6b8-abcde", "books", "books", True, books_inbound))
        deadline = time.monotonic() + 10
        while True:
            snap = w.next()
            if [e["identity"] for e in snap["endpoints"]] == [BOOKS_ID] or time.monotonic() > deadline:
                break
        assert [e["identity"] for e in snap["endpoints"]] == [BOOKS_ID]
        # the service is deleted: the authority no longer exists
        api.push("Service", "DELETED", service("books"))
        assert w.next()["exists"] is False
    finally:
        w.close()
    status, snap = dest_get(mesh, port, f"/v1/endpoints?authority={BOOKS}:{SVC_PORT}")
    assert snap["exists"] is False
    tracebacks = mesh.logs_with("Traceback")
    assert not tracebacks, f"tracebacks in {tracebacks}"
