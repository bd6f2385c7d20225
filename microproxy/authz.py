"""Inbound authorization in the proxy: the policy watch and enforcement (the decisions are
made by the pure core in policy.py).

- ``run()`` watches ``/v1/policy?workload=..&namespace=..&watch=1`` on destination, like the
  endpoint watches: capped exponential backoff, and the last policy stays in force while
  destination is away. Each new snapshot is compiled once (``policy.compile_policies``).
- Before the first policy ever arrives, every inbound request is denied (fail closed:
  ``403 policy not yet known``); ``Proxy.ready()`` waits for it, and registration with
  destination waits for it (``after_first_policy``), so normal startup denies nothing.
- ``allow_http`` / ``allow_tunnel`` are called by the inbound router for every request /
  CONNECT tunnel. A denied HTTP request gets 403 with ``x-mesh-proxy-error`` and the
  response flag DENY; a request that looks like gRPC gets a trailers-only
  PERMISSION_DENIED (grpc-status 7); a denied tunnel is answered 403 and closed before a
  byte reaches the app.
- Metrics: ``inbound_http_authz_allow_total`` / ``inbound_http_authz_deny_total`` (and the
  ``inbound_tcp_authz_*`` pair for tunnels) labelled ``authz_kind`` and ``authz_name``.
  AUDIT decisions are logged at INFO with the policy name.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from . import ctlhttp
from .config import Config
from .downstream import ServerConn
from .http1 import ERROR_HEADER, Exchange, error_response
from .metrics import Metrics
from .policy import NOT_KNOWN, Compiled, Decision, PolicyError, compile_policies

log = logging.getLogger(__name__)

T = TypeVar("T")
GRPC_PERMISSION_DENIED = 7
HTTP_ALLOW, HTTP_DENY = "inbound_http_authz_allow_total", "inbound_http_authz_deny_total"
TCP_ALLOW, TCP_DENY = "inbound_tcp_authz_allow_total", "inbound_tcp_authz_deny_total"


def is_grpc(ex: Exchange) -> bool:
    for name, value in ex.headers:
        if name == b"content-type":
            return value[:16].lower() == b"application/grpc"
    return False


def grpc_denied(reason: str, close: bool) -> bytes:
    """A trailers-only gRPC response: HTTP 200, grpc-status 7 in the headers, no body."""
    msg = quote(reason, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~").encode("ascii")
    head = [b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n",
            b"grpc-status: %d\r\ngrpc-message: %s\r\n" % (GRPC_PERMISSION_DENIED, msg),
            ERROR_HEADER + b": " + reason.encode("ascii", "replace") + b"\r\n",
            b"content-length: 0\r\n"]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head)


class Authorizer:
    """The policy in force for this proxy's workload, and its enforcement."""

    def __init__(self, cfg: Config, client_factory: Callable[[], ctlhttp.Client],
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.client_factory = client_factory
        self.metrics = metrics
        self.port = cfg.service_port or cfg.app_port
        self.compiled: Compiled | None = None
        self.policies: list[dict[str, Any]] = []
        self.connected = False
        self.first = asyncio.Event()

    @property
    def known(self) -> bool:
        return self.compiled is not None

    # --- the watch

    def apply(self, snap: dict[str, Any]) -> None:
        """Compile a snapshot from destination; a bad one leaves the last policy in force."""
        try:
            policies = list(snap.get("policies") or [])
            compiled = compile_policies(policies, self.cfg.default_inbound_policy,
                                        self.cfg.trust_domain, self.port, int(snap.get("version", 0)))
        except (PolicyError, TypeError, ValueError) as e:
            log.error("ignoring a policy update that does not compile; keeping the last one",
                      extra={"error": str(e)})
            return
        if self.compiled is None:
            log.info("authorization policy known", extra={
                "version": compiled.version, "policies": len(policies),
                "default": self.cfg.default_inbound_policy})
        elif compiled.version != self.compiled.version:
            log.info("authorization policy updated", extra={
                "version": compiled.version, "policies": ",".join(p["name"] for p in policies) or "-"})
        self.compiled = compiled
        self.policies = policies
        self.first.set()

    async def run(self) -> None:
        cfg = self.cfg
        path = (f"/v1/policy?workload={quote(cfg.workload)}&namespace={quote(cfg.namespace)}"
                + (f"&port={self.port}" if self.port else "") + "&watch=1")

        def connected(up: bool) -> None:
            self.connected = up

        def refused(e: ctlhttp.HTTPError) -> bool:
            log.warning("policy watch refused", extra={"status": e.status, "body": e.body[:200]})
            return False

        def lost(e: Exception) -> None:
            log.info("policy watch interrupted; keeping the last policy",
                     extra={"error": repr(e), "known": self.known})

        await ctlhttp.keep_watching(self.client_factory, path, self.apply, connected, refused, lost)

    async def after_first_policy(self, then: Callable[[], Awaitable[T]]) -> T:
        """Run ``then()`` once a policy is known (registration waits: no traffic is routed
        here before this proxy can authorize it)."""
        await self.first.wait()
        return await then()

    # --- enforcement

    def decide(self, conn: ServerConn, method: bytes | None, target: bytes) -> Decision:
        c = self.compiled
        return NOT_KNOWN if c is None else c.decide(conn.peer_id, method, target)

    def _audit(self, d: Decision, conn: ServerConn, what: str, authority: str) -> None:
        log.info("audit", extra={"authz": d.audit, "decided_by": d.authz, "allowed": d.allowed,
                                 "request": what, "authority": authority,
                                 "client_id": conn.peer_id or "-"})

    def allow_http(self, conn: ServerConn, ex: Exchange) -> bool:
        """True: go on to the app. False: the request was answered (denied)."""
        d = self.decide(conn, ex.method, ex.target)
        if d.audit is not None:
            self._audit(d, conn, f"{ex.method.decode('latin-1')} {ex.target.decode('latin-1')}",
                        ex.authority)
        if d.allowed:
            self.metrics.inc(HTTP_ALLOW, d.metric_key)
            return True
        self.metrics.inc(HTTP_DENY, d.metric_key)
        if is_grpc(ex):
            if ex.done:
                return False
            ex.flag = "DENY"
            ex.status = 200
            log.warning("proxy error", extra={"status": 200, "grpc_status": GRPC_PERMISSION_DENIED,
                                              "reason": d.reason, "flag": "DENY",
                                              "authority": ex.authority})
            close = not ex.body_done or not ex.keep_alive or conn.closing
            conn.send(ex, grpc_denied(d.reason, close))
            conn.finish(ex, reusable=False, close=close)
        else:
            conn.respond_error(ex, 403, d.reason, "DENY")
        return False

    def allow_tunnel(self, conn: ServerConn, ex: Exchange) -> bool:
        """An opaque TCP tunnel (CONNECT): denied ones are closed before reaching the app."""
        d = self.decide(conn, None, b"")
        if d.audit is not None:
            self._audit(d, conn, "CONNECT", ex.target.decode("latin-1"))
        if d.allowed:
            self.metrics.inc(TCP_ALLOW, d.metric_key)
            return True
        self.metrics.inc(TCP_DENY, d.metric_key)
        log.warning("tunnel denied", extra={"reason": d.reason, "flag": "DENY",
                                            "client_id": conn.peer_id or "-"})
        conn.write(error_response(403, d.reason, close=True))
        conn.transport.close()
        return False

    def describe(self) -> dict[str, Any]:
        c = self.compiled
        return {"default": self.cfg.default_inbound_policy, "known": c is not None,
                "connected": self.connected, "port": self.port,
                "version": c.version if c is not None else None,
                "policies": [{"name": p.get("name"), "action": p.get("action")} for p in self.policies]}
