"""The destination service: wires the pure ``Registry`` to HTTPS, watches, leases and disk.

- Handlers: ``POST /v1/register``, ``POST /v1/deregister``, ``GET /v1/endpoints``
  (``watch=1`` streams NDJSON snapshots; a service's virtual IP or a pod IP works as the
  authority's host too), ``GET /v1/workloads``, ``GET /v1/services`` (ports and virtual
  IPs), ``GET /ready``; resources
  (AuthorizationPolicy) and ``GET /v1/policy`` are served by ``resource_api.py``.
- Watches: every watcher holds one ``asyncio.Event`` under its service key; a change sets
  it, and the watcher then renders the *latest* snapshot — nothing queues up behind a
  slow client. A watcher unsubscribes in ``finally``, so one whose client went away
  (ctlhttp cancels or closes the stream) leaves nothing behind.
- The reaper sleeps until the next lease expiry and drops what ran out.
- Persistence: the table is saved after every change (not after mere renewals) and
  loaded at start with every lease extended, so a restarted destination answers with
  the same endpoints before the proxies re-register.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from identity import store
from microproxy.ctlhttp import Request, Response, Stream

from .registry import AuthorityError, Registration, Registry, RegistryError
from .resource_api import ResourceAPI, load_store, resources_path
from .watch import watch_lines

if TYPE_CHECKING:
    from . import k8s

log = logging.getLogger(__name__)

SECONDS = 1.0
DEFAULT_LEASE_TTL = 3 * SECONDS
RESTORE_LEASE = 10 * SECONDS        # leases of a loaded table run this long from start
REAP_MAX_INTERVAL = 0.5 * SECONDS   # the reaper also looks at least this often


@dataclass(frozen=True, slots=True)
class Settings:
    lease_ttl: float = DEFAULT_LEASE_TTL
    state_path: Path | None = None


def load_registry(path: Path | None, now: float, trust_domain: str) -> Registry:
    """The saved table if there is one (leases run RESTORE_LEASE from ``now``), else empty."""
    if path is None or not path.exists():
        return Registry(trust_domain)
    try:
        reg = Registry.from_dict(store.read_json(path), now, RESTORE_LEASE, trust_domain)
    except (OSError, ValueError) as e:
        log.error("ignoring unreadable registry state %s: %s", path, e)
        return Registry(trust_domain)
    log.info("restored %d workloads at version %d from %s", len(reg), reg.version, path)
    return reg


class _Watcher:
    __slots__ = ("key", "changed")

    def __init__(self, key: str) -> None:
        self.key = key
        self.changed = asyncio.Event()


class WatchHub:
    """Who watches which service key; wakes them on change, ends them all on close."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[_Watcher]] = {}
        self.closed = False

    def __len__(self) -> int:
        return sum(len(ws) for ws in self._by_key.values())

    def subscribe(self, key: str) -> _Watcher:
        w = _Watcher(key)
        self._by_key.setdefault(key, set()).add(w)
        return w

    def unsubscribe(self, w: _Watcher) -> None:
        ws = self._by_key.get(w.key)
        if ws is not None:
            ws.discard(w)
            if not ws:
                del self._by_key[w.key]

    def notify(self, keys: frozenset[str]) -> None:
        for key in keys:
            for w in self._by_key.get(key, ()):
                w.changed.set()

    def close(self) -> None:
        self.closed = True
        for ws in self._by_key.values():
            for w in ws:
                w.changed.set()


def serve_endpoints(req: Request, source: "Registry | k8s.Store", hub: WatchHub) -> Response | Stream:
    """``GET /v1/endpoints``: ``source``'s snapshot for the authority, or with ``watch=1``
    an NDJSON stream of them."""
    authority = req.query.get("authority")
    if not authority:
        raise AuthorityError("missing query parameter 'authority'")
    target = source.parse(authority, req.query.get("namespace") or None)
    if req.query.get("watch", "0").lower() in ("1", "true", "yes"):
        return Stream(watch_lines(hub, lambda: source.watch_key(target), lambda: source.snapshot(target)))
    return Response.json(source.snapshot(target))


def _body(req: Request) -> dict[str, Any]:
    try:
        body = req.json()
    except ValueError:
        raise RegistryError("body is not JSON") from None
    if not isinstance(body, dict):
        raise RegistryError("body must be a JSON object")
    return body


class Destination:
    """The service: one registry, its watchers, its reaper and its state file."""

    def __init__(self, registry: Registry, settings: Settings, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.hub = WatchHub()
        res_path = resources_path(settings.state_path)
        self.resources = ResourceAPI(load_store(res_path), self.hub, res_path, registry.trust_domain)

    # --- changes

    def _changed(self, keys: frozenset[str]) -> None:
        if not keys:
            return
        self._save()
        self.hub.notify(keys)

    def _save(self) -> None:
        if self.settings.state_path is None:
            return
        try:
            store.write_json(self.settings.state_path, self.registry.to_dict())
        except OSError as e:
            log.error("cannot save registry state to %s: %s", self.settings.state_path, e)

    async def reap_forever(self) -> None:
        while True:
            now = self.clock()
            changed = self.registry.expire(now)
            if changed:
                log.info("leases expired in %s", ", ".join(sorted(changed)))
                self._changed(changed)
            nxt = self.registry.next_expiry()
            delay = REAP_MAX_INTERVAL if nxt is None else min(max(nxt - now, 0.0) + 0.01,
                                                               REAP_MAX_INTERVAL)
            await self.sleep(delay)

    def close(self) -> None:
        """End every watch stream (on shutdown)."""
        self.hub.close()

    # --- HTTP

    async def handle(self, req: Request) -> Response | Stream:
        if req.path in ("/v1/policy", "/v1/profile", "/v1/resources") or req.path.startswith("/v1/resources/"):
            return await self.resources.handle(req)  # AuthorizationPolicy & co: resource_api.py
        return await self.dispatch(req, _ROUTES, None)

    async def dispatch(self, req: Request, routes: dict[str, Any],
                       fallback: Callable[[Request], Awaitable[Response | Stream]] | None
                       ) -> Response | Stream:
        """Route ``req`` through a path -> (method, handler) table; errors become statuses.
        A path not in the table goes to ``fallback`` (or gets 404)."""
        route = routes.get(req.path)
        if route is None:
            if fallback is not None:
                return await fallback(req)
            return Response.error(404, f"no such path {req.path!r}")
        method, fn = route
        if req.method != method:
            return Response.error(405, f"use {method}")
        try:
            return await fn(self, req)
        except RegistryError as e:
            return Response.error(e.status, str(e))
        except AuthorityError as e:
            return Response.error(400, str(e))

    async def ready(self, req: Request) -> Response:
        return Response.json({"ok": True, "workloads": len(self.registry), "watches": len(self.hub)})

    async def register(self, req: Request) -> Response:
        reg = Registration.from_json(_body(req), self.registry.trust_domain)
        if reg.identity != req.peer_identity:
            return Response.error(403, f"client identity {req.peer_identity!r} may not register "
                                       f"as {reg.identity!r}")
        done = self.registry.register(reg, self.clock(), self.settings.lease_ttl)
        if done.changed:
            log.info("registered %s in %s at %s (%s)", reg.instance, done.service, reg.address,
                     reg.identity)
        self._changed(done.changed)
        return Response.json({"service": done.service, "port": done.port,
                              "lease_ttl": self.settings.lease_ttl})

    async def deregister(self, req: Request) -> Response:
        instance = _body(req).get("instance")
        if not isinstance(instance, str) or not instance:
            raise RegistryError("field 'instance' must be a string")
        service = self.registry.service_of(instance)
        changed = self.registry.deregister(instance, req.peer_identity)
        log.info("deregistered %s from %s", instance, ", ".join(sorted(changed)))
        self._changed(changed)
        return Response.json({"ok": True, "instance": instance, "service": service})

    async def workloads(self, req: Request) -> Response:
        return Response.json(self.registry.workloads(self.clock()))

    async def endpoints(self, req: Request) -> Response | Stream:
        return serve_endpoints(req, self.registry, self.hub)

    async def services(self, req: Request) -> Response:
        """Every service with its port and virtual IP (`mesh run --netns` writes them to
        each pod's /etc/hosts)."""
        return Response.json({"services": self.registry.services()})


_ROUTES: dict[str, tuple[str, Callable[[Destination, Request], Awaitable[Response | Stream]]]] = {
    "/ready": ("GET", Destination.ready),
    "/v1/register": ("POST", Destination.register),
    "/v1/deregister": ("POST", Destination.deregister),
    "/v1/endpoints": ("GET", Destination.endpoints),
    "/v1/workloads": ("GET", Destination.workloads),
    "/v1/services": ("GET", Destination.services),
}
