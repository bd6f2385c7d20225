"""The proxy's route tables: one ``/v1/profile?authority=..&watch=1`` watch per service
authority the app calls, like the endpoint watches in discovery.py.

- ``Profiles.get(authority)`` returns the ``Profile`` (one dict lookup); its ``table`` is a
  compiled ``core.routing.RouteTable`` once the first snapshot arrived (None before).
  ``routed`` is False when no HTTPRoute attaches to the service, so the outbound router
  keeps its fast path (straight to the authority, the ``[DEFAULT]`` route).
- If destination goes away the last table stays in force and the watch reconnects with
  capped exponential backoff; a snapshot that does not compile is logged and ignored
  (the last table stays). Unused profiles are dropped after ``IDLE_TTL`` seconds.
- ``ready`` (an ``asyncio.Event``) is set by the first snapshot, or by a refusal (400: not
  a routable authority -> an empty table), so a first request waits at most until then.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

from . import ctlhttp
from .config import Config
from .core.routing import Route, RouteTable

log = logging.getLogger(__name__)

IDLE_TTL = 300.0
MAX_PROFILES = 1000


def _empty(authority: str) -> RouteTable:
    host, _, port = authority.rpartition(":")
    name, _, ns = host.partition(".")
    return RouteTable(name, ns.split(".")[0] if ns else "", int(port) if port.isdigit() else 80)


class Profile:
    """What we know of one authority's routes."""

    __slots__ = ("authority", "table", "routed", "default", "version", "connected", "ready",
                 "task", "last_used", "service", "namespace", "port")

    def __init__(self, authority: str, loop: asyncio.AbstractEventLoop) -> None:
        self.authority = authority
        self.table: RouteTable | None = None
        self.routed = False
        self.default: Route | None = None
        self.version = -1
        self.connected = False
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.last_used = loop.time()
        self.service: str | None = None      # "name.ns" when the authority is a mesh service
        self.namespace = ""
        self.port = 0

    def install(self, table: RouteTable, version: int, service: str | None) -> None:
        self.table = table
        self.default = table.default
        self.routed = bool(table.routes)
        self.version = version
        self.service = service
        self.namespace, self.port = table.namespace, table.port
        self.ready.set()

    def apply(self, snap: dict[str, Any]) -> None:
        """A snapshot from destination; one that does not compile keeps the last table."""
        try:
            table = RouteTable.from_json(snap["routes"])
            version = int(snap.get("version", 0))
        except (KeyError, TypeError, ValueError) as e:
            log.error("ignoring a route update that does not compile; keeping the last one",
                      extra={"authority": self.authority, "error": str(e)})
            return
        if self.table is not None and table.routes != self.table.routes:
            log.info("routes updated", extra={"authority": self.authority, "version": version,
                                              "routes": ",".join(r.name for r in table.routes) or "-"})
        self.install(table, version, snap.get("service"))

    def describe(self) -> dict[str, Any]:
        t = self.table
        return {"version": self.version, "connected": self.connected, "known": t is not None,
                "routes": [f"{r.namespace}/{r.name}" for r in t.routes] if t is not None else []}


class Profiles:
    def __init__(self, cfg: Config, client_factory: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.client_factory = client_factory   # () -> ctlhttp.Client for destination
        self.loop = loop
        self.profiles: dict[str, Profile] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    def get(self, authority: str) -> Profile:
        prof = self.profiles.get(authority)
        if prof is None:
            if len(self.profiles) >= MAX_PROFILES:
                self.evict(force=True)
            prof = self.profiles[authority] = Profile(authority, self.loop)
            prof.task = self.loop.create_task(self._watch(prof))
            self.tasks.add(prof.task)
            prof.task.add_done_callback(self.tasks.discard)
        prof.last_used = self.loop.time()
        return prof

    def evict(self, force: bool = False) -> None:
        now = self.loop.time()
        for auth, prof in sorted(self.profiles.items(), key=lambda kv: kv[1].last_used):
            if now - prof.last_used > IDLE_TTL or force:
                del self.profiles[auth]
                if prof.task is not None:
                    prof.task.cancel()
                force = False

    async def _watch(self, prof: Profile) -> None:
        path = (f"/v1/profile?authority={quote(prof.authority, safe=':')}"
                f"&namespace={quote(self.cfg.namespace)}&watch=1")

        def connected(up: bool) -> None:
            prof.connected = up

        def refused(e: ctlhttp.HTTPError) -> bool:
            if e.status in (400, 404):   # not routable (or an old destination): no routes
                if prof.table is None:
                    prof.install(_empty(prof.authority), prof.version, None)
                if e.status == 400:
                    return True
            log.warning("profile watch failed", extra={"authority": prof.authority, "error": str(e)})
            return False

        def lost(e: Exception) -> None:
            log.info("profile watch interrupted; keeping the last routes",
                     extra={"authority": prof.authority, "error": repr(e)})

        await ctlhttp.keep_watching(self.client_factory, path, prof.apply, connected, refused, lost)

    def describe(self) -> dict[str, Any]:
        return {a: p.describe() for a, p in self.profiles.items()}

    def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
