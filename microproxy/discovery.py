"""The proxy's view of destination: endpoint watches (cached, surviving outages) and the
local-mode registration lease.

Each authority the app calls gets a ``Resolution`` fed by a ``/v1/endpoints?watch=1``
stream. If destination goes away, the last snapshot keeps serving and the watch reconnects
with capped exponential backoff; the first snapshot after reconnecting replaces the old
one. Unused resolutions are dropped after ``IDLE_TTL`` seconds.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from time import monotonic

from . import ctlhttp, resilience
from .config import Config, split_addr
from .core import balance
from .core.breaker import CLOSED
from .metrics import labels

log = logging.getLogger(__name__)

IDLE_TTL = 300.0
MAX_RESOLUTIONS = 1000
BACKOFF_MIN, BACKOFF_MAX = ctlhttp.BACKOFF_MIN, ctlhttp.BACKOFF_MAX   # the lease renewals too


@dataclass(slots=True)
class Endpoint:
    addr: tuple[str, int]
    identity: str | None      # None: an unmeshed endpoint, reached over plaintext
    labels: dict[str, str]
    metric_key: str
    weight: int = 10000
    lb: Any = None            # its core.balance.Endpoint (EWMA, pending, breaker), kept across snapshots
    pool: Any = None          # the outbound's connection pool to it (a cache: Outbound.pool)
    cells: Any = None         # (request_total, outbound_http_pipelined_total) cells (Outbound.send)


class Resolution:
    """What we know of one authority. ``exists`` is None until the first snapshot."""

    def __init__(self, authority: str, loop: asyncio.AbstractEventLoop,
                 rand: Any = random.random) -> None:
        self.authority = authority
        self.rand = rand                              # random source for P2C (injectable)
        self.lb: list[balance.Endpoint] = []          # parallel to endpoints
        self.svc = resilience.Service(authority)      # pool limits and retry budget
        self.canonical = authority
        self.exists: bool | None = None
        self.endpoints: list[Endpoint] = []
        self.version = -1
        self.changed = asyncio.Event()
        self.last_used = loop.time()
        self.task: asyncio.Task[None] | None = None
        self.connected = False

    def pick(self) -> Endpoint | None:
        """P2C over peak-EWMA (core.balance.pick); None when no endpoint is ready (all open)."""
        lb = self.lb
        if not lb:
            return None
        if len(lb) == 1:   # nothing to choose: no random draws
            e = lb[0]
            b = e.breaker
            ok = b is None or b.state is CLOSED or b.ready(monotonic())
            return e.key if ok else None  # type: ignore[no-any-return]
        rand = self.rand
        e = balance.pick(lb, monotonic(), rand(), rand())
        return None if e is None else e.key  # type: ignore[no-any-return]

    def apply(self, snap: dict[str, Any]) -> None:
        self.version = int(snap.get("version", 0))
        self.exists = bool(snap.get("exists"))
        self.canonical = str(snap.get("authority") or self.authority)
        eps = []
        for e in snap.get("endpoints") or ():
            try:
                addr = split_addr(e["address"])
                lab = e.get("labels") or {}
                ident = None if e["identity"] is None else str(e["identity"])  # None: plaintext
                key = labels(direction="outbound", authority=self.authority,
                             tls="true" if ident is not None else "no_identity",
                             no_tls_reason=None if ident is not None else "not_provided_by_service_discovery",
                             server_id=ident, dst_namespace=lab.get("namespace"),
                             dst_workload=lab.get("workload"), dst_pod=lab.get("pod"))
                eps.append(Endpoint(addr, ident, lab, key, int(e.get("weight", 10000))))
            except (KeyError, ValueError, TypeError):
                log.warning("ignoring malformed endpoint", extra={"endpoint": e})
        old = {e.key.addr: e for e in self.lb}
        now = monotonic()
        # A new replica starts at the mean latency of the ones we know, not at the 30 ms
        # default: on a fast local service the default would keep it unpicked by P2C for
        # tens of seconds while the others answer in 1 ms.
        known = [e.ewma.get(now) for e in self.lb]
        start = sum(known) / len(known) if known else None
        lb = []
        for ep in eps:
            e = old.get(ep.addr)
            if e is None:
                e = resilience.new_endpoint(now)
                if start is not None:
                    e.ewma.value, e.ewma.stamp = start, now
            e.key, ep.lb = ep, e
            lb.append(e)
        self.endpoints = eps
        self.lb = lb
        self.changed.set()
        self.changed = asyncio.Event()


class Discovery:
    def __init__(self, cfg: Config, client_factory: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.client_factory = client_factory   # () -> ctlhttp.Client for destination
        self.loop = loop
        self.resolutions: dict[str, Resolution] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.reachable = False
        self.registered = False
        self.lease_ttl = 3.0
        self._client: ctlhttp.Client | None = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    # --- resolution
    def get(self, authority: str) -> Resolution:
        res = self.resolutions.get(authority)
        if res is None:
            if len(self.resolutions) >= MAX_RESOLUTIONS:
                self.evict(force=True)
            res = self.resolutions[authority] = Resolution(authority, self.loop)
            res.task = self._spawn(self._watch(res))
        res.last_used = self.loop.time()
        return res

    def evict(self, force: bool = False) -> None:
        now = self.loop.time()
        items = sorted(self.resolutions.items(), key=lambda kv: kv[1].last_used)
        for auth, res in items:
            if now - res.last_used > IDLE_TTL or force:
                del self.resolutions[auth]
                if res.task is not None:
                    res.task.cancel()
                force = False

    async def _watch(self, res: Resolution) -> None:
        path = (f"/v1/endpoints?authority={quote(res.authority, safe=':')}"
                f"&namespace={quote(self.cfg.namespace)}&watch=1")

        def connected(up: bool) -> None:
            res.connected = up
            if up:
                self.reachable = True

        def refused(e: ctlhttp.HTTPError) -> bool:
            if e.status == 400:
                res.apply({"exists": False, "endpoints": [], "version": res.version})
                log.warning("destination refused authority", extra={"authority": res.authority})
                return True
            log.warning("endpoint watch failed", extra={"authority": res.authority, "error": str(e)})
            return False

        def lost(e: Exception) -> None:
            log.info("endpoint watch interrupted; keeping last snapshot",
                     extra={"authority": res.authority, "error": repr(e)})

        await ctlhttp.keep_watching(self.client_factory, path, res.apply, connected, refused, lost)

    # --- registration (local mode)
    def client(self) -> ctlhttp.Client:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def reset_client(self) -> None:
        """Credentials changed: the next call opens a connection with the new certificate."""
        old, self._client = self._client, None
        if old is not None:
            self._spawn(old.close())

    def registration(self, inbound_port: int) -> dict[str, Any]:
        cfg = self.cfg
        return {"name": cfg.workload, "namespace": cfg.namespace, "identity": cfg.identity,
                "service_account": cfg.service_account,
                "address": f"{cfg.advertise_host}:{inbound_port}", "app_port": cfg.app_port,
                "service_port": cfg.service_port, "instance": cfg.instance,
                **({"service": cfg.service} if cfg.service else {})}

    async def app_listening(self) -> None:
        """Wait until the app's port accepts connections."""
        assert self.cfg.app_port is not None
        delay = 0.02
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.cfg.app_port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)

    async def run_lease(self, inbound_port: int) -> None:
        """Reach destination; register once the app listens; renew until cancelled."""
        backoff = BACKOFF_MIN
        body = self.registration(inbound_port)
        while not self.reachable:
            try:
                await self.client().json("GET", "/ready")
                self.reachable = True
            except (OSError, asyncio.TimeoutError, ctlhttp.HTTPError, Exception) as e:  # noqa: BLE001
                log.info("destination not reachable yet", extra={"error": repr(e)})
                self.reset_client()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        if not (self.cfg.register and self.cfg.app_port):
            return
        await self.app_listening()
        while True:
            try:
                ans = await self.client().json("POST", "/v1/register", body)
                self.lease_ttl = float(ans.get("lease_ttl", 3.0))
                if not self.registered:
                    log.info("registered", extra={"service": ans.get("service"), "port": ans.get("port")})
                self.registered = True
                await asyncio.sleep(self.lease_ttl / 3)
            except asyncio.CancelledError:
                raise
            except ctlhttp.HTTPError as e:
                log.error("registration refused", extra={"status": e.status, "body": e.body[:200]})
                await asyncio.sleep(1.0)
            except (OSError, asyncio.TimeoutError, Exception) as e:  # noqa: BLE001 - keep trying
                log.info("lease renewal failed", extra={"error": repr(e)})
                self.reset_client()
                await asyncio.sleep(0.3)

    async def deregister(self) -> None:
        if not self.registered:
            return
        try:
            await asyncio.wait_for(self.client().json("POST", "/v1/deregister",
                                                      {"instance": self.cfg.instance}), 2.0)
        except (OSError, asyncio.TimeoutError, ctlhttp.HTTPError, Exception) as e:  # noqa: BLE001
            log.info("deregistration failed; the lease will expire", extra={"error": repr(e)})

    def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
