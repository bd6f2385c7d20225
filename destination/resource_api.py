"""Destination's resource API: the HTTP side of ``resources.Store``, wired by server.py.

- ``POST /v1/resources`` (body: one resource as JSON) validates and applies it: 201 when
  created, 200 when configured or unchanged; ``{"result", "resource", "version"}``.
- ``DELETE /v1/resources/<kind>/<namespace>/<name>``: 200 ``{"deleted": ...}`` or 404.
- ``GET /v1/resources[?kind=K][&namespace=NS]``: ``{"version", "items"}``.
- ``GET /v1/policy?workload=W&namespace=NS[&port=P][&watch=1]``: ``{"version", "workload",
  "namespace", "policies"}``; with ``watch=1`` a new line whenever that list changes
  (same watch machinery as endpoints: a ``WatchHub`` event per namespace key).
- ``GET /v1/profile?authority=HOST:PORT[&namespace=NS][&watch=1]``: ``{"version",
  "authority", "service", "port", "routes"}`` where ``routes`` is the service's
  ``core.routing.RouteTable.to_json()`` (the HTTPRoutes whose parentRef names that Service
  and port; empty for a host that is not a mesh service). Watchers wake on any HTTPRoute
  change (key ``route:*``: a route's parentRef may name another namespace) and get a line
  when their table changed. HTTPRoutes get ``metadata.creationTimestamp`` when first
  created (kept on updates): routing precedence goes by age.

Only the CLI's identity (``mesh-cli.micromesh.serviceaccount.identity.<td>``) may write;
anyone with a mesh certificate may read. The store is saved after every change, to
``destination-resources.json`` beside the registry state.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from identity import ca, store as disk
from identity.tokens import valid_name
from microproxy.ctlhttp import Request, Response, Stream

from microproxy.core.grpcroute import KIND as GRPCROUTE, parse_grpcroute
from microproxy.core.httproute import KIND as HTTPROUTE, parse_httproute
from microproxy.core.routing import RouteTable

from .registry import AuthorityError, parse_authority
from .resources import KINDS, Resource, ResourceError, Store, kind_named, validate
from .watch import watch_lines

if TYPE_CHECKING:
    from .server import WatchHub

log = logging.getLogger(__name__)

RESOURCES_FILE = "destination-resources.json"
WRITER = "mesh-cli"          # service account (namespace "micromesh") allowed to write


def resources_path(state_path: Path | None) -> Path | None:
    return None if state_path is None else state_path.with_name(RESOURCES_FILE)


def load_store(path: Path | None) -> Store:
    if path is None or not path.exists():
        return Store()
    try:
        st = Store.from_dict(disk.read_json(path))
    except (OSError, ValueError) as e:
        log.error("ignoring unreadable resources %s: %s", path, e)
        return Store()
    log.info("restored %d resources at version %d from %s", len(st), st.version, path)
    return st


def _truthy(text: str | None) -> bool:
    return (text or "0").lower() in ("1", "true", "yes")


class ResourceAPI:
    def __init__(self, store: Store, hub: "WatchHub", path: Path | None, trust_domain: str) -> None:
        self.store = store
        self.hub = hub
        self.path = path
        self.writer = ca.identity_name(WRITER, "micromesh", trust_domain)
        self.trust_domain = trust_domain

    def _changed(self, keys: frozenset[str]) -> None:
        if not keys:
            return
        if self.path is not None:
            try:
                disk.write_json(self.path, self.store.to_dict())
            except OSError as e:
                log.error("cannot save resources to %s: %s", self.path, e)
        if any(k.startswith("route:") for k in keys):
            keys = keys | {ROUTES_KEY}
        self.hub.notify(keys)

    def _may_write(self, req: Request) -> Response | None:
        if req.peer_identity != self.writer:
            return Response.error(403, f"client identity {req.peer_identity!r} may not change "
                                       f"resources (only {self.writer})")
        return None

    async def handle(self, req: Request) -> Response | Stream:
        try:
            if req.path == "/v1/policy":
                if req.method != "GET":
                    return Response.error(405, "use GET")
                return self.policy(req)
            if req.path == "/v1/profile":
                if req.method != "GET":
                    return Response.error(405, "use GET")
                return self.profile(req)
            if req.path == "/v1/resources":
                if req.method == "GET":
                    return self.list(req)
                if req.method == "POST":
                    return self.apply(req)
                return Response.error(405, "use GET or POST")
            if req.method != "DELETE":
                return Response.error(405, "use DELETE")
            return self.delete(req)
        except ResourceError as e:
            return Response.error(e.status, str(e))

    def apply(self, req: Request) -> Response:
        denied = self._may_write(req)
        if denied is not None:
            return denied
        try:
            obj = req.json()
        except ValueError:
            raise ResourceError("body is not JSON") from None
        done = self.store.apply(self._stamped(validate(obj)))
        if done.changed:
            meta = done.resource["metadata"]
            log.info("%s %s/%s/%s", done.result, done.resource["kind"], meta["namespace"], meta["name"])
        self._changed(done.changed)
        return Response.json({"result": done.result, "resource": done.resource,
                              "version": self.store.version},
                             201 if done.result == "created" else 200)

    def _stamped(self, res: Resource) -> Resource:
        """A route keeps the creationTimestamp of its first apply (now, when new)."""
        if res.kind not in (HTTPROUTE, GRPCROUTE):
            return res
        old = next((b for b in self.store.list(res.kind, res.namespace)
                    if b["metadata"]["name"] == res.name), None)
        stamp = (old or {}).get("metadata", {}).get("creationTimestamp") \
            or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {**res.body, "metadata": {**res.body["metadata"], "creationTimestamp": stamp}}
        return Resource(res.kind, res.namespace, res.name, body)

    def delete(self, req: Request) -> Response:
        parts = [unquote(p) for p in req.path.split("/")[3:]]   # /v1/resources/<k>/<ns>/<name>
        if len(parts) != 3 or not all(parts):
            return Response.error(404, "want /v1/resources/<kind>/<namespace>/<name>")
        denied = self._may_write(req)
        if denied is not None:
            return denied
        kind = kind_named(parts[0])
        changed = self.store.delete(kind.name, parts[1], parts[2])
        log.info("deleted %s/%s/%s", kind.name, parts[1], parts[2])
        self._changed(changed)
        return Response.json({"deleted": {"kind": kind.name, "namespace": parts[1], "name": parts[2]},
                              "version": self.store.version})

    def list(self, req: Request) -> Response:
        kind = req.query.get("kind")
        ns = req.query.get("namespace") or None
        return Response.json({"version": self.store.version,
                              "kinds": sorted(KINDS),
                              "items": self.store.list(kind_named(kind).name if kind else None, ns)})

    # --- policy for one workload

    def _policy_args(self, req: Request) -> tuple[str, str, int | None]:
        workload = req.query.get("workload", "")
        namespace = req.query.get("namespace") or "default"
        if not valid_name(workload):
            raise ResourceError("query parameter 'workload' must be a DNS-1123 label")
        if not valid_name(namespace):
            raise ResourceError("query parameter 'namespace' must be a DNS-1123 label")
        port_text = req.query.get("port")
        port = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ResourceError("query parameter 'port' must be 1..65535")
            port = int(port_text)
        return workload, namespace, port

    def snapshot(self, workload: str, namespace: str, port: int | None) -> dict[str, Any]:
        return {"version": self.store.version, "workload": workload, "namespace": namespace,
                "port": port, "policies": self.store.policies_for(workload, namespace, port)}

    def policy(self, req: Request) -> Response | Stream:
        workload, namespace, port = self._policy_args(req)
        if _truthy(req.query.get("watch")):
            return Stream(watch_lines(self.hub, f"policy:{namespace}",
                                      lambda: self.snapshot(workload, namespace, port), compare="policies"))
        return Response.json(self.snapshot(workload, namespace, port))


    # --- profile (routes) for one service authority

    def _profile_args(self, req: Request) -> tuple[str, str | None, int]:
        authority = req.query.get("authority")
        if not authority:
            raise ResourceError("missing query parameter 'authority'")
        try:
            t = parse_authority(authority, req.query.get("namespace") or None, self.trust_domain)
        except AuthorityError as e:
            raise ResourceError(str(e)) from None
        return (t.name or t.host), t.namespace, t.port

    def profile_snapshot(self, service: str, namespace: str | None, port: int) -> dict[str, Any]:
        http, grpc = [], []
        if namespace is not None:
            for body in self.store.routes():
                try:
                    if body["kind"] == GRPCROUTE:
                        grpc.append(parse_grpcroute(body))
                    else:
                        http.append(parse_httproute(body))
                except ValueError as e:   # validated when applied; never expected
                    log.error("skipping a stored %s that does not parse: %s", body["kind"], e)
        # GRPCRoutes and HTTPRoutes are not merged (Gateway API): when GRPCRoutes attach to
        # the service they are its routes, as in Linkerd
        grpc = [r for r in grpc if r.attaches_to(service, namespace or "", port)]
        table = RouteTable(service, namespace or "", port, grpc or http)
        return {"version": self.store.version,
                "authority": f"{service}.{namespace}:{port}" if namespace else f"{service}:{port}",
                "service": f"{service}.{namespace}" if namespace else None, "port": port,
                "routes": table.to_json()}

    def profile(self, req: Request) -> Response | Stream:
        args = self._profile_args(req)
        if _truthy(req.query.get("watch")):
            return Stream(watch_lines(self.hub, ROUTES_KEY, lambda: self.profile_snapshot(*args), compare="routes"))
        return Response.json(self.profile_snapshot(*args))


ROUTES_KEY = "route:*"
