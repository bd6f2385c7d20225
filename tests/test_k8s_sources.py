"""Kubernetes sources: recorded API objects (tests/testdata/k8s-api) -> endpoint snapshots
(destination/k8s.py, pure), and the list+watch client against a fake HTTPS API server
(destination/k8s_watch.py): watch events, resourceVersion resume, 410 Gone re-list.

No API server ran here (ENVIRONMENT.md): the JSON is shaped as the API returns it.
"""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from destination import k8s
from destination.k8s import Gone, Settings, Store, WatchError, meshed, workload_of
from destination.k8s_watch import KIND_PATHS, APIClient, ClusterConfig, ConfigError, Watcher
from tests.k8s_fake_api import HOLD, Events, FakeAPI, Status, load

LISTS = {"Namespace": "namespaces.json", "Service": "services.json",
         "EndpointSlice": "endpointslices.json", "Pod": "pods.json"}
WEB_ID = "web.shop.serviceaccount.identity.cluster.local"
DB_ID = "db.shop.serviceaccount.identity.cluster.local"


def loaded(settings: Settings | None = None) -> Store:
    store = Store(settings or Settings())
    for kind, name in LISTS.items():
        data = load(name)
        store.replace(kind, data["items"], data["metadata"]["resourceVersion"])
    return store


def snap(store: Store, authority: str, namespace: str | None = None) -> dict[str, Any]:
    return store.snapshot(store.parse(authority, namespace))


def web_ep(ip: str, pod: str, zone: str, port: int = 8080, hint: str | None = "http/1") -> dict[str, Any]:
    return {"address": f"{ip}:{port}", "weight": 10000, "identity": WEB_ID, "protocol_hint": hint,
            "labels": {"namespace": "shop", "zone": zone, "workload": "web", "workload_kind": "deployment",
                       "pod": pod, "service_account": "web"}}


UNMESHED_WEB = {"address": "10.244.4.2:8080", "weight": 10000, "identity": None, "protocol_hint": None,
                "labels": {"namespace": "shop", "zone": "zone-c", "workload": "web",
                           "workload_kind": "deployment", "pod": "web-5d4f7b8c9-abcde",
                           "service_account": "web"}}

# (authority, namespace param, exists, endpoints)
SNAPSHOT_CASES: list[tuple[str, str | None, bool, list[dict[str, Any]]]] = [
    # ready endpoints of both slices; the terminating pod (ready false) is left out; the
    # named targetPort "http" is 8080 per the slice's port; the old pod without a proxy is plaintext
    ("web.shop.svc.cluster.local:80", None, True, [
        web_ep("10.244.1.5", "web-7c9f8d6b5-x2k4q", "zone-a"),
        web_ep("10.244.2.7", "web-7c9f8d6b5-p9zzm", "zone-b"),
        UNMESHED_WEB]),
    # the same service by its short forms
    ("web.shop:80", None, True, [
        web_ep("10.244.1.5", "web-7c9f8d6b5-x2k4q", "zone-a"),
        web_ep("10.244.2.7", "web-7c9f8d6b5-p9zzm", "zone-b"), UNMESHED_WEB]),
    ("web", "shop", True, [
        web_ep("10.244.1.5", "web-7c9f8d6b5-x2k4q", "zone-a"),
        web_ep("10.244.2.7", "web-7c9f8d6b5-p9zzm", "zone-b"), UNMESHED_WEB]),
    # a second named port: matched by name to the slice's "metrics" port
    ("web.shop.svc:9090", None, True, [
        web_ep("10.244.1.5", "web-7c9f8d6b5-x2k4q", "zone-a", 9090),
        web_ep("10.244.2.7", "web-7c9f8d6b5-p9zzm", "zone-b", 9090),
        {**UNMESHED_WEB, "address": "10.244.4.2:9090"}]),
    # a StatefulSet pod behind a headless service; 5432 is a default opaque port
    ("db.shop.svc.cluster.local:5432", None, True, [
        {"address": "10.244.1.20:5432", "weight": 10000, "identity": DB_ID, "protocol_hint": "opaque",
         "labels": {"namespace": "shop", "zone": "zone-a", "workload": "db", "workload_kind": "statefulset",
                    "pod": "db-0", "service_account": "db"}}]),
    # an unnamed port; an unmeshed namespace: plaintext
    ("legacy-api.legacy.svc.cluster.local:8080", None, True, [
        {"address": "10.244.5.3:8080", "weight": 10000, "identity": None, "protocol_hint": None,
         "labels": {"namespace": "legacy", "zone": "zone-b", "workload": "legacy-api",
                    "workload_kind": "deployment", "pod": "legacy-api-6b8d9c7f4-hjk2l",
                    "service_account": "default"}}]),
    # no targetRef (the API server's own endpoints): plaintext, no pod labels
    ("kubernetes.default.svc.cluster.local:443", None, True, [
        {"address": "172.18.0.2:6443", "weight": 10000, "identity": None, "protocol_hint": None,
         "labels": {"namespace": "default"}}]),
    # a service whose slice has no endpoints at all
    ("empty.shop.svc.cluster.local:8080", None, True, []),
    # not services of the mesh
    ("ext.shop.svc.cluster.local:443", None, False, []),       # ExternalName
    ("web.shop.svc.cluster.local:81", None, False, []),        # not a port of the service
    ("nope.shop.svc.cluster.local:80", None, False, []),       # no such service
    ("web.other.svc.cluster.local:80", None, False, []),       # wrong namespace
    ("api.example.com:443", None, False, []),                  # not a cluster name
]


@pytest.mark.parametrize("authority, namespace, exists, endpoints", SNAPSHOT_CASES,
                         ids=[c[0] + (f"@{c[1]}" if c[1] else "") for c in SNAPSHOT_CASES])
def test_snapshots_from_recorded_objects(authority: str, namespace: str | None, exists: bool,
                                         endpoints: list[dict[str, Any]]) -> None:
    store = loaded()
    got = snap(store, authority, namespace)
    assert set(got) == {"version", "authority", "service", "port", "exists", "endpoints"}
    assert got["exists"] is exists
    assert got["endpoints"] == endpoints


def test_snapshot_contract_fields() -> None:
    store = loaded()
    got = snap(store, "web.shop:80")
    assert got["authority"] == "web.shop.svc.cluster.local:80"
    assert got["service"] == "web.shop" and got["port"] == 80
    assert isinstance(got["version"], int) and 0 < got["version"] <= store.version
    unknown = snap(store, "api.example.com:443")
    assert unknown["service"] is None and unknown["version"] == store.version
    assert snap(store, "nope.shop:80")["version"] == store.version


def test_resource_versions_from_lists() -> None:
    assert loaded().resource_versions == {"Namespace": "5000", "Service": "5001",
                                          "EndpointSlice": "5002", "Pod": "5003"}


# === meshed / workload rules ===

def _pod(name: str) -> dict[str, Any]:
    return copy.deepcopy(next(p for p in load("pods.json")["items"] if p["metadata"]["name"] == name))


def _meshed_variant(change: str) -> dict[str, Any]:
    pod = _pod("web-7c9f8d6b5-x2k4q")
    if change == "proxy as a plain container":
        proxy = pod["spec"]["initContainers"].pop(1)
        del proxy["restartPolicy"]
        pod["spec"]["containers"].append(proxy)
    elif change == "no proxy container":
        pod["spec"]["initContainers"] = pod["spec"]["initContainers"][:1]
    elif change == "opted out":
        pod["metadata"]["annotations"]["micromesh.io/inject"] = "disabled"
    elif change == "another control plane":
        pod["metadata"]["labels"]["micromesh.io/control-plane-ns"] = "other-mesh"
    elif change == "no control-plane label":
        del pod["metadata"]["labels"]["micromesh.io/control-plane-ns"]
    elif change == "no annotations at all":
        del pod["metadata"]["annotations"]
    return pod


@pytest.mark.parametrize("change, want", [
    ("as injected", True),
    ("proxy as a plain container", True),
    ("no control-plane label", True),
    ("no annotations at all", True),
    ("no proxy container", False),
    ("opted out", False),
    ("another control plane", False),
])
def test_meshed(change: str, want: bool) -> None:
    assert meshed(_meshed_variant(change), Settings()) is want


def test_meshed_by_another_trust_root() -> None:
    pod = _pod("web-7c9f8d6b5-x2k4q")
    ours = pod["metadata"]["annotations"]["micromesh.io/trust-root-sha256"]
    assert meshed(pod, Settings(trust_root_sha256=ours))
    assert not meshed(pod, Settings(trust_root_sha256="0" * 64))
    assert meshed(pod, Settings(control_plane_namespace="other")) is False


@pytest.mark.parametrize("pod, want", [
    ("web-7c9f8d6b5-x2k4q", ("deployment", "web")),
    ("db-0", ("statefulset", "db")),
    ("report-28934520-7xkqp", ("job", "report-28934520")),
    ("legacy-api-6b8d9c7f4-hjk2l", ("deployment", "legacy-api")),
])
def test_workload_of_recorded_pods(pod: str, want: tuple[str, str]) -> None:
    assert workload_of(_pod(pod)) == want


@pytest.mark.parametrize("meta, want", [
    ({"name": "p", "labels": {"pod-template-hash": "abc"},
      "ownerReferences": [{"kind": "ReplicaSet", "name": "rs-xyz", "controller": True}]}, ("replicaset", "rs-xyz")),
    ({"name": "p", "ownerReferences": [{"kind": "DaemonSet", "name": "agent"}]}, ("daemonset", "agent")),
    ({"name": "p", "labels": {"app": "web", "app.kubernetes.io/name": "webapp"}}, ("app", "webapp")),
    ({"name": "p", "labels": {"app": "web"}}, ("app", "web")),
    ({"name": "bare"}, ("pod", "bare")),
])
def test_workload_of_rules(meta: dict[str, Any], want: tuple[str, str]) -> None:
    assert workload_of({"metadata": meta}) == want


# === watch events ===

def _events(name: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = load(name)
    return events


def test_watch_events_update_the_store_and_report_changed_services() -> None:
    store = loaded()
    v0 = snap(store, "web.shop:80")["version"]

    pods = _events("watch-pods.json")
    # a new pod no slice names yet: no service changes
    assert store.apply("Pod", pods[0]) == frozenset()
    assert store.resource_versions["Pod"] == "5101"
    # its status turning Running/Ready is not something discovery reads: no change, no version
    before = store.version
    assert store.apply("Pod", pods[1]) == frozenset() and store.version == before
    assert store.resource_versions["Pod"] == "5103"

    slices = _events("watch-endpointslices.json")
    # the slice drops the terminating pod and lists the new one, not ready yet
    assert store.apply("EndpointSlice", slices[0]) == {"web.shop"}
    assert [e["address"] for e in snap(store, "web.shop:80")["endpoints"]] == [
        "10.244.1.5:8080", "10.244.2.7:8080", "10.244.4.2:8080"]
    # ... then ready
    assert store.apply("EndpointSlice", slices[1]) == {"web.shop"}
    got = snap(store, "web.shop:80")
    assert got["endpoints"][2] == web_ep("10.244.2.9", "web-7c9f8d6b5-n3w4p", "zone-b")
    assert got["version"] > v0
    # the terminating pod is deleted: no slice names it any more, so nothing changes
    assert store.apply("Pod", pods[2]) == frozenset()
    # the old ReplicaSet's slice goes
    assert store.apply("EndpointSlice", slices[2]) == {"web.shop"}
    assert store.resource_versions["EndpointSlice"] == "5106"
    # bookmarks move only the resourceVersion
    before = store.version
    assert store.apply("Pod", pods[3]) == frozenset() and store.apply("EndpointSlice", slices[3]) == frozenset()
    assert store.version == before
    assert store.resource_versions["Pod"] == "5110" and store.resource_versions["EndpointSlice"] == "5111"

    services = _events("watch-services.json")
    assert store.apply("Service", services[0]) == {"ext.shop"}
    assert snap(store, "ext.shop:443")["exists"] is False
    # the opaque-ports annotation on the service makes 9090 opaque for meshed endpoints
    assert store.apply("Service", services[1]) == {"web.shop"}
    assert [e["protocol_hint"] for e in snap(store, "web.shop:9090")["endpoints"]] == ["opaque"] * 3
    assert [e["protocol_hint"] for e in snap(store, "web.shop:80")["endpoints"]] == ["http/1"] * 3
    assert store.resource_versions["Service"] == "5108"

    # a new namespace without services changes nothing but its resourceVersion
    assert store.apply("Namespace", _events("watch-namespaces.json")[0]) == frozenset()
    assert store.resource_versions["Namespace"] == "5109"


def test_pod_changes_reach_the_services_that_list_it() -> None:
    store = loaded()
    pod = _pod("web-5d4f7b8c9-abcde")  # the unmeshed one: now it gets a proxy (re-created meshed)
    injected = _pod("web-7c9f8d6b5-x2k4q")
    pod["spec"]["initContainers"] = injected["spec"]["initContainers"]
    pod["metadata"]["resourceVersion"] = "5200"
    assert store.apply("Pod", {"type": "MODIFIED", "object": pod}) == {"web.shop"}
    ep = next(e for e in snap(store, "web.shop:80")["endpoints"] if e["address"] == "10.244.4.2:8080")
    assert ep["identity"] == WEB_ID and ep["protocol_hint"] == "http/1"
    # a pod deleted while its slice still names it: left out (not downgraded to plaintext)
    assert store.apply("Pod", {"type": "DELETED", "object": pod}) == {"web.shop"}
    assert "10.244.4.2:8080" not in [e["address"] for e in snap(store, "web.shop:80")["endpoints"]]
    # ... and back when the pod is known again
    assert store.apply("Pod", {"type": "ADDED", "object": pod}) == {"web.shop"}
    assert "10.244.4.2:8080" in [e["address"] for e in snap(store, "web.shop:80")["endpoints"]]


def test_namespace_opaque_ports_default() -> None:
    store = loaded()
    ns = copy.deepcopy(next(n for n in load("namespaces.json")["items"] if n["metadata"]["name"] == "shop"))
    ns["metadata"]["annotations"]["config.micromesh.io/opaque-ports"] = "9000-9100"
    assert store.apply("Namespace", {"type": "MODIFIED", "object": ns}) == {
        "web.shop", "db.shop", "empty.shop", "ext.shop"}
    assert {e["protocol_hint"] for e in snap(store, "web.shop:9090")["endpoints"] if e["identity"]} == {"opaque"}
    # the namespace's list replaces the defaults: 5432 is no longer opaque
    assert snap(store, "db.shop:5432")["endpoints"][0]["protocol_hint"] == "http/1"
    # a pod's own annotation wins over its namespace's
    db = _pod("db-0")
    db["metadata"]["annotations"]["config.micromesh.io/opaque-ports"] = "5432"
    assert store.apply("Pod", {"type": "MODIFIED", "object": db}) == {"db.shop"}
    assert snap(store, "db.shop:5432")["endpoints"][0]["protocol_hint"] == "opaque"
    # a malformed annotation is ignored (the defaults apply)
    ns["metadata"]["annotations"]["config.micromesh.io/opaque-ports"] = "lots"
    store.apply("Namespace", {"type": "MODIFIED", "object": ns})
    assert snap(store, "web.shop:9090")["endpoints"][0]["protocol_hint"] == "http/1"


def test_error_events() -> None:
    store = loaded()
    with pytest.raises(Gone, match="too old resource version"):
        store.apply("EndpointSlice", _events("watch-error-410.json")[0])
    with pytest.raises(WatchError) as e:
        store.apply("Pod", {"type": "ERROR", "object": {"kind": "Status", "code": 500,
                                                        "message": "etcdserver: request timed out"}})
    assert e.value.code == 500
    assert store.resource_versions["EndpointSlice"] == "5002"  # errors move nothing
    bad: dict[str, Any]
    for bad in ({"type": "ADDED"}, {"type": "SYNC", "object": {}}, {"object": {"metadata": {}}}):
        with pytest.raises(ValueError):
            store.apply("Pod", bad)
    with pytest.raises(ValueError, match="unknown kind"):
        store.apply("Deployment", {"type": "ADDED", "object": {"metadata": {"name": "x"}}})


def test_relist_replaces_what_the_watch_missed() -> None:
    store = loaded()
    for ev in _events("watch-pods.json"):
        store.apply("Pod", ev)
    relist = load("endpointslices-relist.json")
    changed = store.replace("EndpointSlice", relist["items"], relist["metadata"]["resourceVersion"])
    assert changed == {"web.shop"}  # web-abc12 changed, web-def34 is gone; the rest is as it was
    assert [e["address"] for e in snap(store, "web.shop:80")["endpoints"]] == ["10.244.1.5:8080", "10.244.2.9:8080"]
    assert store.resource_versions["EndpointSlice"] == "5190"
    assert store.replace("EndpointSlice", relist["items"], "5191") == frozenset()  # same again: no change


def test_malformed_objects_are_skipped() -> None:
    store = Store()
    assert store.replace("Service", [{"metadata": {}}, {"spec": {}}], "1") == frozenset()
    assert store.apply("Service", {"type": "ADDED", "object": {"metadata": {"name": "s", "namespace": "n"},
                                                                 "spec": {"ports": "nope"}}}) == {"s.n"}


def _slice(name: str, family: str, addresses: list[str], svc: str = "dual") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "labels": {k8s.SERVICE_NAME_LABEL: svc}},
            "addressType": family,
            "endpoints": [{"addresses": [a], "conditions": {}} for a in addresses],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


@pytest.mark.parametrize("families, want", [
    (["IPv4", "IPv6"], ["10.0.0.1:8080"]),
    (["IPv6", "IPv4"], ["[fd00::1]:8080"]),
    (None, ["10.0.0.1:8080"]),
])
def test_the_primary_ip_family_picks_the_slices(families: list[str] | None, want: list[str]) -> None:
    store = Store()
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    if families:
        spec["ipFamilies"] = families
    store.apply("Service", {"type": "ADDED", "object": {"metadata": {"name": "dual", "namespace": "ns"}, "spec": spec}})
    store.apply("EndpointSlice", {"type": "ADDED", "object": _slice("dual-v4", "IPv4", ["10.0.0.1"])})
    store.apply("EndpointSlice", {"type": "ADDED", "object": _slice("dual-v6", "IPv6", ["fd00::1"])})
    # the same address in two slices (a pod moving between them) is listed once
    store.apply("EndpointSlice", {"type": "ADDED", "object": _slice("dual-v4b", "IPv4", ["10.0.0.1"])})
    assert [e["address"] for e in snap(store, "dual.ns:80")["endpoints"]] == want


def test_versions_only_grow() -> None:
    store = loaded()
    seen = [snap(store, "web.shop:80")["version"]]
    for ev in _events("watch-endpointslices.json")[:3]:
        store.apply("EndpointSlice", ev)
        seen.append(snap(store, "web.shop:80")["version"])
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    deleted = store.apply("Service", {"type": "DELETED", "object": load("services.json")["items"][1]})
    assert deleted == {"web.shop"}
    assert snap(store, "web.shop:80")["version"] > seen[-1]


# === the API client against a fake API server ===

def test_cluster_config(tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    with pytest.raises(ConfigError, match="not running in a cluster"):
        ClusterConfig.in_cluster({}, sa)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ConfigError, match="missing .*token"):
        ClusterConfig.in_cluster(env, sa)
    (sa / "token").write_text("")
    (sa / "ca.crt").write_text("")
    cfg = ClusterConfig.in_cluster(env, sa)
    assert (cfg.host, cfg.port, cfg.namespace) == ("10.96.0.1", 443, "default")
    with pytest.raises(ConfigError, match="is empty"):
        cfg.bearer()
    with pytest.raises(ConfigError, match="bad KUBERNETES_SERVICE_PORT"):
        ClusterConfig.in_cluster({**env, "KUBERNETES_SERVICE_PORT": "https"}, sa)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def _watch_rvs(api: FakeAPI, kind: str) -> list[str | None]:
    return [r.query.get("resourceVersion") for r in api.requests(KIND_PATHS[kind], watch=True)]


def test_watcher_lists_watches_resumes_and_relists_after_410(tmp_path: Path) -> None:
    async def scenario() -> None:
        api = FakeAPI(tmp_path)
        relisted = dict(load("endpointslices-relist.json"))
        api.lists = {KIND_PATHS[k]: [load(f)] for k, f in LISTS.items()}
        api.lists[KIND_PATHS["EndpointSlice"]].append(relisted)
        api.watches = {
            # 410 as an HTTP status on the first watch: re-list, then watch again
            KIND_PATHS["Namespace"]: [Status(410, load("status-410.json")),
                                      Events(_events("watch-namespaces.json")), HOLD],
            # the stream ends (the server's timeoutSeconds): resume from the last event's RV
            KIND_PATHS["Service"]: [Events(_events("watch-services.json")), HOLD],
            # events and a bookmark, then an ERROR 410 event: re-list (with the rotated token)
            KIND_PATHS["EndpointSlice"]: [Events(_events("watch-endpointslices.json")),
                                          Events(_events("watch-error-410.json"),
                                                 before=lambda: api.set_token("token-2")),
                                          HOLD],
            KIND_PATHS["Pod"]: [Events(_events("watch-pods.json")), HOLD],
        }
        await api.start()
        client = APIClient(ClusterConfig.in_cluster(api.env(), api.sa_dir))
        store = Store()
        changes: list[frozenset[str]] = []
        sleeps = Sleeps()
        watcher = Watcher(client, store, on_change=changes.append, sleep=sleeps, rand=lambda: 0.0)
        task = asyncio.create_task(watcher.run())
        try:
            await api.wait_for(lambda: all(api.holding.get(p, 0) == 1 for p in KIND_PATHS.values()))
            assert watcher.synced.is_set()
            assert sleeps.delays == []  # nothing needed a backoff

            assert _watch_rvs(api, "Namespace") == ["5000", "5000", "5109"]
            assert _watch_rvs(api, "Service") == ["5001", "5108"]
            assert _watch_rvs(api, "EndpointSlice") == ["5002", "5111", "5190"]
            assert _watch_rvs(api, "Pod") == ["5003", "5110"]
            assert watcher.relists == {"Namespace": 1, "Service": 0, "EndpointSlice": 1, "Pod": 0}
            assert store.resource_versions == {"Namespace": "5109", "Service": "5108",
                                               "EndpointSlice": "5190", "Pod": "5110"}
            first = api.requests(KIND_PATHS["Pod"], watch=True)[0].query
            assert first["allowWatchBookmarks"] == "true" and first["timeoutSeconds"] == "300"
            # lists are paged with limit/continue (the fake pages by the client's limit)
            assert all(r.query.get("limit") == "500" for r in api.requests(KIND_PATHS["Pod"], watch=False))
            # the token file is read per request: the re-list after the rotation used the new one
            slice_lists = api.requests(KIND_PATHS["EndpointSlice"], watch=False)
            assert [r.token for r in slice_lists] == ["token-1", "token-2"]

            # converged: what the relist and the events say
            web = snap(store, "web.shop:80")
            assert web["endpoints"] == [web_ep("10.244.1.5", "web-7c9f8d6b5-x2k4q", "zone-a"),
                                        web_ep("10.244.2.9", "web-7c9f8d6b5-n3w4p", "zone-b")]
            assert [e["protocol_hint"] for e in snap(store, "web.shop:9090")["endpoints"]] == ["opaque"] * 2
            assert snap(store, "ext.shop:443")["exists"] is False
            assert snap(store, "empty.shop:8080")["exists"] is True
            assert snap(store, "db.shop:5432")["endpoints"][0]["identity"] == DB_ID
            assert any("web.shop" in c for c in changes)
            assert any("ext.shop" in c for c in changes)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.stop()
            await client.close()

    asyncio.run(scenario())


def test_list_pages_follow_continue(tmp_path: Path) -> None:
    async def scenario() -> None:
        api = FakeAPI(tmp_path)
        api.lists = {KIND_PATHS["Pod"]: [load("pods.json")]}
        await api.start()
        client = APIClient(ClusterConfig.in_cluster(api.env(), api.sa_dir))
        try:
            import destination.k8s_watch as kw
            old, kw.LIST_PAGE = kw.LIST_PAGE, 3
            try:
                items, rv = await client.list("Pod")
            finally:
                kw.LIST_PAGE = old
            assert rv == "5003"
            assert [p["metadata"]["name"] for p in items] == [p["metadata"]["name"] for p in load("pods.json")["items"]]
            reqs = api.requests(KIND_PATHS["Pod"])
            assert [r.query.get("continue") for r in reqs] == [None, "0:3", "0:6"]
        finally:
            await api.stop()
            await client.close()

    asyncio.run(scenario())


def test_watcher_backs_off_and_resumes_after_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        api = FakeAPI(tmp_path)
        path = KIND_PATHS["Service"]
        api.lists = {path: [load("services.json")]}
        api.watches = {path: [
            Events([{"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "etcd timeout"}}]),
            Status(403, {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "RBAC says no"}),
            Events([]),                                    # ends at once, says nothing
            Events(_events("watch-services.json")[:1]),    # then works
            HOLD]}
        await api.start()
        client = APIClient(ClusterConfig.in_cluster(api.env(), api.sa_dir))
        sleeps = Sleeps()
        watcher = Watcher(client, Store(), on_change=lambda keys: None, sleep=sleeps, rand=lambda: 0.0,
                          kinds=["Service"])
        task = asyncio.create_task(watcher.run())
        try:
            await api.wait_for(lambda: api.holding.get(path, 0) == 1)
            # three failures in a row back off 0.5, 1, 2 s (no jitter with rand 0); none re-lists
            assert sleeps.delays == [0.5, 1.0, 2.0]
            assert _watch_rvs(api, "Service") == ["5001", "5001", "5001", "5001", "5107"]
            assert watcher.relists == {"Service": 0}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.stop()
            await client.close()

    asyncio.run(scenario())
