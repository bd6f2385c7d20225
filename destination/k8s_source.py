"""``python -m destination --source kubernetes``: endpoints from the Kubernetes API server.

``KubeDestination`` is the destination service with its workload table replaced by a
``k8s.Store`` that a ``k8s_watch.Watcher`` keeps in step with the API server (list+watch of
Namespaces, Services, EndpointSlices and Pods). It answers the same contract as the local
registry:

- ``GET /v1/endpoints?authority=A[&namespace=NS][&watch=1]``: ``Store.snapshot`` (the same
  JSON shape as ``Registry.snapshot``); watches are woken through ``server.WatchHub`` by
  the service keys every list/event changes, and send a snapshot only when it differs;
- ``GET /ready``: 503 until every kind has been listed once (``Watcher.synced``), then 200;
- ``POST /v1/register`` / ``/v1/deregister``: 409 — registration is for the local source
  (in Kubernetes the EndpointSlice controller says where pods are);
- ``GET /v1/workloads``: the known services (no leases here); ``GET /v1/services`` (the
  local source's virtual IPs): 404;
- resources (AuthorizationPolicy, HTTPRoute; ``/v1/policy``, ``/v1/profile``): served by
  ``resource_api.py`` as locally, but the store is fed by a second Watcher over the
  cluster's objects (``k8s_resources.py``); ``POST``/``DELETE /v1/resources``: 409 (kubectl
  apply/delete); reads 503 until those kinds are listed; ``/ready`` waits for both.

The background task (``reap_forever``, the name ``__main__`` schedules) runs the watcher
instead of a lease reaper: nothing here expires, the API server deletes.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from identity import ca
from microproxy.ctlhttp import Request, Response, Stream

from . import k8s, k8s_resources
from .k8s_config import add_kube_args, cluster_config
from .k8s_watch import APIClient, ClusterConfig, Watcher
from .registry import Registry
from .server import Destination, Settings, serve_endpoints

log = logging.getLogger(__name__)

SOURCES = ("local", "kubernetes")
NOT_LOCAL = ("registration is for the local source; this destination reads endpoints from "
             "the Kubernetes API (--source kubernetes)")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="local",
                        help="where endpoints come from: proxies' registrations (local, the "
                             "default) or the Kubernetes API's Services/EndpointSlices/Pods")
    parser.add_argument("--trust-root-sha256", default=None,
                        help="kubernetes source: pods annotated micromesh.io/trust-root-sha256 "
                             "with another digest are not meshed by us (default: not checked)")
    add_kube_args(parser)


class KubeDestination(Destination):
    """Destination over a k8s.Store. Not thread-safe; one event loop drives it."""

    def __init__(self, store: k8s.Store, cfg: ClusterConfig, settings: Settings,
                 clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]],
                 api_factory: Callable[[ClusterConfig], Any] = APIClient) -> None:
        # The base class's registry stays empty: it only lends its trust domain to resources.
        super().__init__(Registry(store.trust_domain), settings, clock, sleep)
        self.store = store
        self.cfg = cfg
        self.api_factory = api_factory
        self.watcher: Watcher | None = None
        self.synced = asyncio.Event()
        # AuthorizationPolicy/HTTPRoute from the API server, not from disk or POSTs
        self.kube_resources = k8s_resources.KubeResourceAPI(self.hub, store.trust_domain)
        self.resources = self.kube_resources
        self.resource_watcher: Watcher | None = None

    async def reap_forever(self) -> None:
        """The source's background task: list+watch the API server into the store."""
        api = self.api_factory(self.cfg)   # built here: its client belongs to this loop
        self.watcher = Watcher(api, self.store, on_change=self.hub.notify, sleep=self.sleep)
        self.resource_watcher = k8s_resources.resource_watcher(
            api, self.kube_resources.mirror, on_change=self.kube_resources.changed, sleep=self.sleep)
        synced = asyncio.create_task(self._mark_synced(self.watcher))
        res_synced = asyncio.create_task(self._mark_resources_synced(self.resource_watcher))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.watcher.run())
                tg.create_task(self.resource_watcher.run())
        finally:
            synced.cancel()
            res_synced.cancel()
            await api.close()

    async def _mark_synced(self, watcher: Watcher) -> None:
        await watcher.synced.wait()
        log.info("synced with the Kubernetes API (%d services)", len(self.store.service_keys()))
        if self.resource_watcher is not None:
            await self.kube_resources.synced.wait()
        self.synced.set()

    async def _mark_resources_synced(self, watcher: Watcher) -> None:
        await watcher.synced.wait()
        log.info("synced resources with the Kubernetes API (%d objects)", len(self.resources.store))
        self.kube_resources.synced.set()

    async def handle(self, req: Request) -> Response | Stream:
        return await self.dispatch(req, _ROUTES, super().handle)   # else: resources, and 404s

    async def ready(self, req: Request) -> Response:
        body = {"ok": self.synced.is_set(), "source": "kubernetes",
                "services": len(self.store.service_keys()), "watches": len(self.hub),
                "resource_versions": {**self.store.resource_versions,
                                      **self.kube_resources.mirror.resource_versions},
                "resources": len(self.resources.store),
                "invalid_resources": sorted("/".join(k) for k in self.kube_resources.mirror.skipped)}
        return Response.json(body, 200 if self.synced.is_set() else 503)

    async def not_local(self, req: Request) -> Response:
        return Response.error(409, NOT_LOCAL)

    async def not_served(self, req: Request) -> Response:
        return Response.error(404, f"{req.path} is not served by the kubernetes source")

    async def k8s_workloads(self, req: Request) -> Response:
        return Response.json({"source": "kubernetes", "services": self.store.service_keys()})

    async def k8s_endpoints(self, req: Request) -> Response | Stream:
        return serve_endpoints(req, self.store, self.hub)


_ROUTES: dict[str, tuple[str, Callable[[KubeDestination, Request], Awaitable[Response | Stream]]]] = {
    "/ready": ("GET", KubeDestination.ready),
    "/v1/register": ("POST", KubeDestination.not_local),
    "/v1/deregister": ("POST", KubeDestination.not_local),
    "/v1/endpoints": ("GET", KubeDestination.k8s_endpoints),
    "/v1/workloads": ("GET", KubeDestination.k8s_workloads),
    "/v1/services": ("GET", KubeDestination.not_served),   # local virtual IPs (mesh run --netns)
}


def from_args(args: argparse.Namespace, settings: Settings, clock: Callable[[], float],
              sleep: Callable[[float], Awaitable[None]]) -> KubeDestination:
    """The kubernetes-source destination the flags ask for. Raises OSError (ConfigError)
    when the API server's address, token or CA cannot be had."""
    cfg = cluster_config(args, os.environ)
    # --control-plane-namespace and --cluster-domain are the webhook's flags (webhook.py):
    # pods labelled micromesh.io/control-plane-ns with another namespace are not ours.
    store = k8s.Store(k8s.Settings(
        trust_domain=args.trust_domain or ca.DEFAULT_TRUST_DOMAIN,
        cluster_domain=getattr(args, "cluster_domain", None) or "cluster.local",
        control_plane_namespace=getattr(args, "control_plane_namespace", None) or k8s.DEFAULT_CONTROL_PLANE_NS,
        trust_root_sha256=args.trust_root_sha256))
    log.info("kubernetes source: API server %s:%d", cfg.host, cfg.port)
    return KubeDestination(store, cfg, settings, clock, sleep)
