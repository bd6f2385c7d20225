"""The mesh's own resources in Kubernetes mode, end to end against the fake API server
(tests/k8s_fake_api.py via test_k8s_e2e's LiveAPI) — no live cluster ran here.

``python -m destination --source kubernetes`` lists and watches AuthorizationPolicies
(policy.micromesh.io/v1alpha1) and HTTPRoutes (gateway.networking.k8s.io/v1) cluster-wide
(destination/k8s_resources.py), shaped as the API server returns them (uid, generation,
managedFields, the CRD's defaults, status). Shown here:

- the listed objects are served by ``/v1/policy`` and ``/v1/profile`` exactly as after
  ``mesh apply`` locally; an invalid listed object is skipped with a log line naming it and
  the field, and the rest is served;
- MODIFIED and DELETED events pushed through the fake API reach open ``?watch=1`` streams;
- an invalid MODIFIED is skipped (logged) and the last valid version stays in force;
- ``POST`` / ``DELETE /v1/resources`` are refused with 409 (use kubectl).
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from destination.k8s_watch import RESOURCE_KIND_PATHS
from tests.harness import HOST, Mesh, Proc, clean_env, wait_until
from tests.test_k8s_e2e import PATHS, APIThread, NDJSONReader, a_list, dest_get, service

BOOKS = "books.default.svc.cluster.local"
AP, HR = RESOURCE_KIND_PATHS["AuthorizationPolicy"], RESOURCE_KIND_PATHS["HTTPRoute"]

_rv = iter(range(9000, 100_000))


def _meta(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": "default", "uid": f"uid-{name}", "resourceVersion": str(next(_rv)),
            "generation": 1, "creationTimestamp": "2026-11-20T09:14:20Z",
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                               "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {}}], **extra}


def policy(name: str, action: str = "ALLOW", sas: list[str] | None = None,
           methods: list[str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"from": {"serviceAccounts": sas or ["payment"]}}
    if methods:
        rule["to"] = {"methods": methods}
    return {"apiVersion": "policy.micromesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": _meta(name, annotations={
                "kubectl.kubernetes.io/last-applied-configuration": "{}"}),
            "spec": {"targetRef": {"kind": "Workload", "name": "billing"}, "action": action,
                     "rules": [rule]}}


def httproute(name: str, v1: int, v2: int) -> dict[str, Any]:
    # as the API server stores it: Gateway API's CRD defaults filled in, a status
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": _meta(name),
            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "books", "port": 80}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [
                                    {"group": "", "kind": "Service", "name": "books-v1", "port": 80, "weight": v1},
                                    {"group": "", "kind": "Service", "name": "books-v2", "port": 80, "weight": v2}]}]},
            "status": {"parents": []}}


class Scene:
    def __init__(self) -> None:
        self.mesh = Mesh.create("micromesh-k8sres-")
        self.api = APIThread(self.mesh.root / "kube")

    def push(self, path: str, etype: str, obj: dict[str, Any]) -> None:
        self.api.run(lambda: self.api.api.queue(path).put_nowait({"type": etype, "object": obj}))

    def start_destination(self) -> Proc:
        ports_file = self.mesh._ports_file("destination")
        argv = [sys.executable, "-m", "destination", "--home", str(self.mesh.home.root), "--host", HOST,
                "--port", "0", "--ports-file", str(ports_file), "--log-level", "info",
                "--source", "kubernetes", *self.api.kube_flags()]
        proc: Proc = self.mesh._spawn(Proc, "destination", argv, clean_env(), ports_file)
        proc.wait_ports(("port",))
        self.mesh.destination = proc
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


def _policies(snap: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    return [(p["name"], p["action"], p["rules"]) for p in snap["policies"]]


def _weights(snap: dict[str, Any]) -> list[tuple[str, int]]:
    """(backend name, weight) of every backend in the profile's route table."""
    out: list[tuple[str, int]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "weight" in node and "name" in node and "port" in node:
                out.append((node["name"], node["weight"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(snap["routes"])
    return sorted(out)


def test_resources_from_the_kubernetes_api(scene: Scene) -> None:
    mesh, api = scene.mesh, scene.api
    invalid = policy("typo-action", action="MAYBE")
    api.run(lambda: api.api.lists.update({
        PATHS["Namespace"]: [a_list("Namespace", [{"kind": "Namespace", "apiVersion": "v1", "metadata": {
            "name": "default", "uid": "uid-ns-default", "resourceVersion": "7"}}])],
        PATHS["Service"]: [a_list("Service", [service("books")])],
        PATHS["EndpointSlice"]: [a_list("EndpointSlice", [])],
        PATHS["Pod"]: [a_list("Pod", [])],
        AP: [{"apiVersion": "policy.micromesh.io/v1alpha1", "kind": "AuthorizationPolicyList",
              "metadata": {"resourceVersion": "8000"},
              "items": [policy("billing-from-payment", methods=["get", "POST"]), invalid]}],
        HR: [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRouteList",
              "metadata": {"resourceVersion": "8001"}, "items": [httproute("books-canary", 90, 10)]}],
    }))
    dest = scene.start_destination()
    port = mesh.destination_port
    wait_until(lambda: dest_get(mesh, port, "/ready")[0] == 200, 15, "destination synced", dest)
    status, ready = dest_get(mesh, port, "/ready")
    assert ready["resources"] == 2 and ready["invalid_resources"] == [
        "AuthorizationPolicy/default/typo-action"], ready
    assert ready["resource_versions"]["AuthorizationPolicy"] == "8000"
    # the invalid listed object: skipped, with a log line naming it and the field
    wait_until(lambda: "skipping invalid AuthorizationPolicy default/typo-action" in dest.log_text(),
               5, "a log line about the invalid policy", dest)
    assert "spec.action: must be ALLOW, DENY or AUDIT" in dest.log_text()

    # local writes are refused: the cluster is the source of truth
    status, body = dest_get(mesh, port, "/v1/resources", policy("x"), "POST")
    assert status == 409 and "use kubectl apply" in body["error"], body
    status, body = dest_get(mesh, port, "/v1/resources/authorizationpolicy/default/billing-from-payment",
                            None, "DELETE")
    assert status == 409 and "kubectl" in body["error"], body
    status, listed = dest_get(mesh, port, "/v1/resources?kind=AuthorizationPolicy")
    assert status == 200 and [i["metadata"]["name"] for i in listed["items"]] == ["billing-from-payment"]

    pw = NDJSONReader(mesh, port, "/v1/policy?workload=billing&namespace=default&watch=1")
    rw = NDJSONReader(mesh, port, f"/v1/profile?authority={BOOKS}:80&watch=1")
    try:
        first = pw.next()
        assert _policies(first) == [("billing-from-payment", "ALLOW", [{
            "from": {"serviceAccounts": ["default/payment"], "unauthenticated": False},
            "to": {"methods": ["GET", "POST"]}}])]   # normalized exactly as `mesh apply` does
        # the same answer a local `mesh apply` gives: one GET equals the watch's first line
        assert dest_get(mesh, port, "/v1/policy?workload=billing&namespace=default")[1] == first
        assert _policies(dest_get(mesh, port, "/v1/policy?workload=other&namespace=default")[1]) == []
        prof = rw.next()
        assert prof["service"] == "books.default" and _weights(prof) == [("books-v1", 90), ("books-v2", 10)]

        # MODIFIED: the policy becomes a DENY, the canary goes 50/50
        scene.push(AP, "MODIFIED", policy("billing-from-payment", action="DENY"))
        snap = pw.next()
        assert _policies(snap)[0][1] == "DENY" and snap["version"] > first["version"]
        scene.push(HR, "MODIFIED", httproute("books-canary", 50, 50))
        assert _weights(rw.next()) == [("books-v1", 50), ("books-v2", 50)]

        # an invalid MODIFIED is skipped; the last valid version stays in force
        bad = httproute("books-canary", 50, 50)
        bad["spec"]["rules"][0]["filters"] = [{"type": "URLRewrite", "urlRewrite": {}}]
        scene.push(HR, "MODIFIED", bad)
        wait_until(lambda: "skipping invalid HTTPRoute default/books-canary" in dest.log_text(), 5,
                   "a log line about the invalid route", dest)
        assert "its last valid version stays in force" in dest.log_text()
        assert _weights(dest_get(mesh, port, f"/v1/profile?authority={BOOKS}:80")[1]) == \
            [("books-v1", 50), ("books-v2", 50)]
        assert rw.quiet(0.5)

        # DELETED: gone from both answers
        scene.push(AP, "DELETED", policy("billing-from-payment", action="DENY"))
        assert _policies(pw.next()) == []
        scene.push(HR, "DELETED", httproute("books-canary", 50, 50))
        assert rw.next()["routes"] != prof["routes"]
        assert _weights(dest_get(mesh, port, f"/v1/profile?authority={BOOKS}:80")[1]) == []
        # deleting the never-stored invalid object is a no-op, not an error
        scene.push(AP, "DELETED", invalid)
        scene.push(AP, "ADDED", policy("late", methods=["GET"]))
        assert [p[0] for p in _policies(pw.next())] == ["late"]
    finally:
        pw.close()
        rw.close()
    status, ready = dest_get(mesh, port, "/ready")
    assert ready["invalid_resources"] == [], ready
    assert not mesh.logs_with("Traceback")


# --- in process: a CRD that is not installed (Gateway API's, typically) is "no objects"

def test_missing_crd_is_empty_and_picked_up_later(tmp_path: Any) -> None:
    from destination import k8s_resources
    from destination.k8s_watch import APIClient, ClusterConfig
    from destination.resources import Store
    from tests.k8s_fake_api import HOLD, FakeAPI

    async def scenario() -> None:
        api = FakeAPI(tmp_path)
        api.lists = {AP: [{"metadata": {"resourceVersion": "1"}, "items": [policy("p1")]}]}
        api.watches = {AP: [HOLD]}
        await api.start()
        client = APIClient(ClusterConfig.in_cluster(api.env(), api.sa_dir))
        mirror = k8s_resources.ResourceMirror(Store())
        sleeps: list[float] = []
        woken: list[frozenset[str]] = []

        async def sleep(d: float) -> None:
            sleeps.append(d)
            await asyncio.sleep(0.01)
        watcher = k8s_resources.resource_watcher(client, mirror, woken.append, sleep)
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.wait_for(watcher.synced.wait(), 5)   # HTTPRoute's 404 counts as listed
            assert [b["metadata"]["name"] for b in mirror.store.list()] == ["p1"]
            assert woken == [frozenset({"policy:default"})]
            # Gateway API's CRDs get installed: the re-list (with backoff) finds the route
            api.lists[HR] = [{"metadata": {"resourceVersion": "2"}, "items": [httproute("r", 1, 1)]}]
            for _ in range(500):
                if mirror.store.httproutes():
                    break
                await asyncio.sleep(0.01)
            assert [b["metadata"]["name"] for b in mirror.store.httproutes()] == ["r"]
            assert mirror.resource_versions == {"AuthorizationPolicy": "1", "HTTPRoute": "2",
                                                "GRPCRoute": None}   # (its CRD still missing)
            assert all(d <= 30.0 for d in sleeps)   # backoff capped at k8s_watch.BACKOFF_MAX
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await api.stop()
            await client.close()
    asyncio.run(scenario())
