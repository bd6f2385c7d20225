"""``destination --source kubernetes``: the mesh's own resources from the API server.

The resources `mesh apply` stores locally (resources.py: AuthorizationPolicy and Gateway API
HTTPRoute) are, in Kubernetes, objects of the cluster: ``kubectl apply`` writes them, and
destination list+watches them cluster-wide through the same ``k8s_watch.Watcher`` that
follows Services/EndpointSlices/Pods, into the same ``resources.Store`` that `/v1/policy`
and `/v1/profile` (resource_api.py) serve and watch. So the answers — and the watch
streams — are exactly the local mesh's.

- ``ResourceMirror``: the Watcher's store protocol (``apply`` / ``replace`` /
  ``resource_versions``) over a ``resources.Store``. Each object is checked with
  ``resources.validate`` (the API server's CRD schema is looser than our validation, and a
  Gateway API HTTPRoute may use filters we do not implement): an invalid one is logged and
  skipped, never fatal. If an earlier version of it was valid, that version stays in force
  (a typo in an update must not silently drop a DENY policy); DELETED removes it.
  ERROR events raise ``k8s.Gone`` / ``k8s.WatchError`` as k8s.Store's do.
- ``OptionalCRDs``: an API wrapper for which a 404 on a list (the CRD is not installed —
  Gateway API's CRDs are the cluster's, not ours) is an empty list; its watch then asks
  for a re-list (``k8s.Gone``), which the Watcher retries with backoff, so a CRD installed
  later is picked up within BACKOFF_MAX (30 s).
- ``KubeResourceAPI``: resource_api.ResourceAPI for this mode: nothing persisted (the API
  server is the store), ``POST`` / ``DELETE /v1/resources`` refused with 409 (use kubectl),
  and reads answered 503 until the resource kinds have been listed once (a proxy keeps
  failing closed rather than take an empty policy list for the truth).

RBAC needed: get/list/watch on authorizationpolicies (policy.micromesh.io), httproutes and
grpcroutes (gateway.networking.k8s.io) — cli/install.py's ClusterRole.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from microproxy import ctlhttp
from microproxy.core.grpcroute import API_VERSIONS as GRPCROUTE_VERSIONS, KIND as GRPCROUTE
from microproxy.core.httproute import API_VERSIONS as HTTPROUTE_VERSIONS, KIND as HTTPROUTE
from microproxy.ctlhttp import Request, Response, Stream

from . import k8s
from .k8s_watch import RESOURCE_KIND_PATHS, Watcher
from .resource_api import ResourceAPI
from .resources import API_VERSION, NotFound, ResourceError, Store, validate

log = logging.getLogger(__name__)

# kind -> collection path (cluster-wide); the versions are the ones we validate against
KIND_PATHS = RESOURCE_KIND_PATHS   # k8s_watch's APIClient knows them too
API_VERSIONS = {"AuthorizationPolicy": API_VERSION, HTTPROUTE: HTTPROUTE_VERSIONS[0],
                GRPCROUTE: GRPCROUTE_VERSIONS[0]}
assert all(f"/apis/{API_VERSIONS[k]}/" in p for k, p in KIND_PATHS.items())
KINDS = tuple(KIND_PATHS)
REFUSED = ("resources come from the Kubernetes API in kubernetes mode (--source kubernetes): "
           "use kubectl apply -f (or kubectl delete -f) instead")
NOT_SYNCED = "not yet synced with the Kubernetes API (AuthorizationPolicies, HTTPRoutes, GRPCRoutes)"


def _ref(obj: Mapping[str, Any]) -> str:
    meta: Mapping[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    return f"{meta.get('namespace') or '?'}/{meta.get('name') or '?'}"


class ResourceMirror:
    """A resources.Store in step with the API server's objects of ``kinds``."""

    def __init__(self, store: Store, kinds: Iterable[str] = KINDS) -> None:
        self.store = store
        self.resource_versions: dict[str, str | None] = dict.fromkeys(kinds)
        self.skipped: dict[tuple[str, str, str], str] = {}   # (kind, ns, name) -> why (invalid)

    def _check_kind(self, kind: str) -> None:
        if kind not in self.resource_versions:
            raise ValueError(f"unknown kind {kind!r}")

    def apply(self, kind: str, event: Mapping[str, Any]) -> frozenset[str]:
        """One watch event -> the resource watch keys it changed. Raises Gone / WatchError
        for ERROR events, ValueError for what is not a watch event."""
        etype, obj = k8s.watch_event(event)
        self._check_kind(kind)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            changed: frozenset[str] = frozenset()
        elif etype in ("ADDED", "MODIFIED"):
            changed = self._set(kind, obj)
        elif etype == "DELETED":
            changed = self._delete(kind, obj)
        else:
            raise ValueError(f"unknown watch event type {etype!r}")
        if isinstance(rv, str) and rv:
            self.resource_versions[kind] = rv
        return changed

    def replace(self, kind: str, items: Iterable[Mapping[str, Any]],
                resource_version: str | None) -> frozenset[str]:
        """A full list: what is absent from it is deleted (an invalid listed object keeps
        its last valid version, as an invalid MODIFIED does)."""
        self._check_kind(kind)
        changed: set[str] = set()
        seen: set[tuple[str, str]] = set()
        for obj in items:
            meta = obj.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                seen.add((str(meta.get("namespace") or "default"), meta["name"]))
            changed |= self._set(kind, obj)
        for body in self.store.list(kind):
            meta = body["metadata"]
            if (meta["namespace"], meta["name"]) not in seen:
                changed |= self.store.delete(kind, meta["namespace"], meta["name"])
                log.info("%s %s/%s is gone from the API server", kind, meta["namespace"], meta["name"])
        self.skipped = {k: v for k, v in self.skipped.items() if k[0] != kind or k[1:] in seen}
        self.resource_versions[kind] = resource_version
        return frozenset(changed)

    def _set(self, kind: str, obj: Mapping[str, Any]) -> frozenset[str]:
        # list items of custom resources carry apiVersion/kind; be lenient if one does not
        full = {"apiVersion": API_VERSIONS[kind], "kind": kind, **obj}
        try:
            if full["kind"] != kind:
                raise ResourceError(f"kind: {full['kind']!r} in the {kind} collection")
            res = validate(full)
        except ResourceError as e:
            meta: Mapping[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
            key = (kind, str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
            kept = any(b["metadata"]["name"] == key[2] for b in self.store.list(kind, key[1]))
            self.skipped[key] = str(e)
            log.warning("skipping invalid %s %s (resourceVersion %s): %s%s", kind, _ref(obj),
                        meta.get("resourceVersion"), e,
                        "; its last valid version stays in force" if kept else "")
            return frozenset()
        self.skipped.pop(res.key, None)
        done = self.store.apply(res)
        if done.changed:
            log.info("%s %s %s/%s from the Kubernetes API", done.result, kind, res.namespace, res.name)
        return done.changed

    def _delete(self, kind: str, obj: Mapping[str, Any]) -> frozenset[str]:
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise ValueError(f"DELETED {kind} without metadata.name")
        ns = str(meta.get("namespace") or "default")
        self.skipped.pop((kind, ns, meta["name"]), None)
        try:
            changed = self.store.delete(kind, ns, meta["name"])
        except NotFound:
            return frozenset()   # never stored (it was invalid) or already gone
        log.info("deleted %s %s/%s (Kubernetes API)", kind, ns, meta["name"])
        return changed


class OptionalCRDs:
    """Wraps a k8s_watch API: a kind whose collection is 404 (CRD not installed) lists as
    empty, and its watch asks for a re-list until the CRD appears."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.missing: set[str] = set()

    async def list(self, kind: str) -> tuple[list[dict[str, Any]], str | None]:
        try:
            items, rv = await self.api.list(kind)
        except ctlhttp.HTTPError as e:
            if e.status != 404:
                raise
            if kind not in self.missing:
                log.warning("the API server does not serve %s (%s): is its CRD installed? Serving "
                            "none and looking again", kind, KIND_PATHS.get(kind))
            self.missing.add(kind)
            return [], None
        if kind in self.missing:
            log.info("the API server serves %s now", kind)
            self.missing.discard(kind)
        return items, rv

    def watch(self, kind: str, resource_version: str | None,
              timeout_seconds: float) -> AsyncGenerator[dict[str, Any], None]:
        if kind in self.missing:
            return _gone(kind)
        return self.api.watch(kind, resource_version, timeout_seconds)


async def _gone(kind: str) -> AsyncGenerator[dict[str, Any], None]:
    raise k8s.Gone(f"{kind} is not served (CRD not installed?)")
    yield {}  # pragma: no cover - makes this an async generator


def resource_watcher(api: Any, mirror: ResourceMirror, on_change: Callable[[frozenset[str]], None],
                     sleep: Callable[[float], Awaitable[None]], **kw: Any) -> Watcher:
    """A Watcher over the resource kinds (the Watcher only needs the store protocol)."""
    return Watcher(OptionalCRDs(api), mirror, on_change=on_change, sleep=sleep,  # type: ignore[arg-type]
                   kinds=tuple(mirror.resource_versions), **kw)


class KubeResourceAPI(ResourceAPI):
    """resource_api.ResourceAPI fed by the API server: read-only, nothing saved to disk."""

    def __init__(self, hub: Any, trust_domain: str) -> None:
        super().__init__(Store(), hub, None, trust_domain)
        self.mirror = ResourceMirror(self.store)
        self.synced = asyncio.Event()

    def changed(self, keys: frozenset[str]) -> None:
        self._changed(keys)   # path is None: only wakes the watchers (route keys -> route:*)

    async def handle(self, req: Request) -> Response | Stream:
        if req.path == "/v1/resources" and req.method == "POST" \
                or req.path.startswith("/v1/resources/") and req.method == "DELETE":
            return Response.error(409, REFUSED)
        if req.method == "GET" and not self.synced.is_set():
            return Response.error(503, NOT_SYNCED)
        return await super().handle(req)
