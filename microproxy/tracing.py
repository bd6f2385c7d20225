"""Distributed tracing: one span per proxied request on each side (outbound CLIENT, inbound
SERVER), exported to an OTLP/HTTP collector.

Theory of operation
-------------------
Tracing is off unless ``MESH_TRACE_COLLECTOR`` is set: then ``Proxy.tracer`` is a ``Tracer``,
otherwise None, and the data path costs one attribute check per request.

When a router builds the upstream request head it calls ``Tracer.begin``, which extracts the
caller's context, decides, and returns the rewritten trace headers as ``extra``/``drop`` for
``Exchange.head`` (the rules are in ``tracecontext``). A sampled request gets a ``Span`` on
``Exchange.span``; ``ServerConn.finish`` (or the loss of the client's connection) calls
``Span.finish``, which adds the attributes and puts the span on a bounded queue (full: the
span is dropped and counted in ``trace_spans_dropped_total{reason="queue_full"}``). HTTP/2
streams (``h2stream.H2Exchange``, gRPC calls) are traced the same way by ``h2proxy``; a gRPC
call's span carries ``rpc.grpc.status_code`` and fails when the status is not OK.

``Tracer.run`` exports the queue every ``FLUSH_INTERVAL``, or as soon as a batch is full,
POSTing OTLP JSON (``otlp``) with a short timeout. An export error drops its batch (counted,
``reason="export_failed"``) and is logged at info, once per distinct error and minute; it never
touches a request. ``Tracer.close`` makes a bounded last flush at shutdown.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

import h11

from . import clock, otlp
from .config import split_url
from .tracecontext import TRACE_HEADERS, Decision, decide, extract, inject

if TYPE_CHECKING:
    from .config import Config
    from .downstream import ServerConn
    from .http1 import Exchange
    from .metrics import Metrics

log = logging.getLogger(__name__)

# Span kinds (the OTLP enum)
SERVER = 2
CLIENT = 3

MAX_QUEUE = 2048
BATCH = 256
FLUSH_INTERVAL = 1.0
EXPORT_TIMEOUT = 2.0
SHUTDOWN_FLUSH = 2.0
ERROR_LOG_EVERY = 60.0

Attr = tuple[str, "str | int | bool"]


def span_name(method: bytes, target: bytes) -> str:
    """``GET /books`` (the query is left out: span names should not be unique per request)."""
    cut = len(target)
    for sep in (b"?", b"#"):
        i = target.find(sep)
        if 0 <= i < cut:
            cut = i
    return (method + b" " + target[:cut]).decode("latin-1")


# --- spans

class Span:
    """One proxy span, from request head to response end. Times are ``perf_counter()``."""

    __slots__ = ("tracer", "trace_id", "span_id", "parent_id", "kind", "name", "target", "start",
                 "end", "attrs", "error")

    def __init__(self, tracer: "Tracer | None", d: Decision, kind: int, method: bytes,
                 target: bytes, start: float) -> None:
        self.tracer = tracer
        self.trace_id = d.trace_id
        self.span_id = d.span_id
        self.parent_id = d.parent_id
        self.kind = kind
        self.name = span_name(method, target)
        self.target = target
        self.start = start
        self.end = start
        self.attrs: list[Attr] = []
        self.error: str | None = None   # status message when the span failed

    def finish(self, ex: "Exchange", conn: "ServerConn") -> None:
        """Called by ``ServerConn`` when the exchange ends."""
        ex.span = None
        if self.tracer is not None:
            self.tracer.end(self, ex, conn)


def resource_attrs(cfg: "Config") -> list[Attr]:
    return [("service.name", cfg.workload), ("service.namespace", cfg.namespace),
            ("service.instance.id", cfg.instance), ("k8s.namespace.name", cfg.namespace),
            ("k8s.deployment.name", cfg.workload), ("k8s.pod.name", cfg.instance),
            ("mesh.identity", cfg.identity), ("telemetry.sdk.name", "micromesh"),
            ("telemetry.sdk.language", "python"), ("process.pid", os.getpid())]


def request_attrs(ex: "Exchange", direction: str, target: bytes, peer: tuple[Any, ...] | None,
                  tls: bool, peer_id: str | None) -> list[Attr]:
    """The attributes of a finished exchange (outbound: ``ex.endpoint`` is the server)."""
    attrs: list[Attr] = [("direction", direction), ("http.method", ex.method.decode("latin-1")),
                         ("http.target", target.decode("latin-1")), ("authority", ex.authority)]
    if ex.status:
        attrs.append(("http.status_code", ex.status))
    ep = ex.endpoint
    if direction == "outbound" and ep is not None:
        peer = ep.addr
        attrs.append(("server_id", ep.identity))
        attrs += [(f"dst_{k}", v) for k, v in ep.labels.items() if k in ("workload", "namespace")]
    if peer:
        attrs += [("net.peer.ip", str(peer[0])), ("net.peer.port", int(peer[1]))]
    if direction == "inbound":
        attrs.append(("tls", "true" if tls else "no_identity"))
        if peer_id:
            attrs.append(("client_id", peer_id))
    if ex.flag:
        attrs.append(("response_flag", ex.flag))
    return attrs


def span_error(status: int, flag: str) -> str | None:
    """The span's error status: 5xx, or no response at all."""
    if status >= 500:
        return f"HTTP {status}" + (f" ({flag})" if flag else "")
    if status == 0:
        return "no response: " + (flag or "connection closed")
    return None


# --- the tracer

class Exporter(Protocol):
    """Sends an encoded export request; ``otlp.Client`` in production."""
    async def post(self, body: bytes) -> tuple[int, bytes]: ...
    async def close(self) -> None: ...


class Tracer:
    """Decides, records and exports the spans of one proxy."""

    def __init__(self, exporter: Exporter, metrics: "Metrics",
                 resource: Sequence[Attr], rate: float = 1.0, rand: random.Random | None = None,
                 wall: Callable[[], float] = clock.now, max_queue: int = MAX_QUEUE,
                 batch: int = BATCH, interval: float = FLUSH_INTERVAL) -> None:
        self.exporter = exporter
        self.metrics = metrics
        self.encoder = otlp.Encoder(resource)
        self.rate = rate
        self.rand = rand or random.Random()
        self.wall = wall
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.queue: deque[Span] = deque()
        self.wake = asyncio.Event()
        self._drops: dict[frozenset[bytes], frozenset[bytes]] = {}
        self._last_error = ""
        self._last_error_at = float("-inf")

    # --- the data path
    def begin(self, ex: "Exchange", kind: int, target: bytes,
              extra: Sequence[tuple[bytes, bytes]] = (), drop: frozenset[bytes] = frozenset()
              ) -> tuple[list[tuple[bytes, bytes]], frozenset[bytes]]:
        """Start ``ex``'s span (if sampled); returns the ``extra``/``drop`` for ``Exchange.head``."""
        ctx = extract(ex.headers)
        d = decide(ctx, self.rate, self.rand)
        if d is None:
            return list(extra), drop
        if d.sampled:
            ex.span = Span(self, d, kind, ex.method, target, ex.start)
        dropped = self._drops.get(drop)
        if dropped is None:
            dropped = self._drops[drop] = drop | TRACE_HEADERS
        return [*extra, *inject(d, ctx)], dropped

    def end(self, span: Span, ex: "Exchange", conn: "ServerConn") -> None:
        span.end = perf_counter()
        peer = None
        if conn.direction == "inbound" and conn.transport is not None:
            peer = conn.transport.get_extra_info("peername")
        span.attrs = request_attrs(ex, conn.direction, span.target, peer, conn.tls, conn.peer_id)
        span.error = span_error(ex.status, ex.flag)
        gs = getattr(ex, "grpc_status", None) if getattr(ex, "grpc", False) else None
        if gs is not None:   # an HTTP/2 gRPC call: its status, and a failure when not OK
            span.attrs.append(("rpc.grpc.status_code", gs))
            if gs != 0 and span.error is None:
                span.error = f"grpc-status {gs}"
        span.tracer = None
        self.record(span)

    def record(self, span: Span) -> None:
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.metrics.inc("trace_spans_dropped_total", 'reason="queue_full"')
            return
        queue.append(span)
        if len(queue) >= self.batch:
            self.wake.set()

    # --- export
    async def run(self) -> None:
        """The exporter task: flush every ``interval``, or when a batch is full."""
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass  # the interval is up: flush what there is
            self.wake.clear()
            try:
                await self.flush()
            except Exception:
                # the task boundary: an exporter bug must not end tracing for good
                log.exception("trace export failed")

    async def flush(self) -> None:
        """Export the queue in batches; stop at the first failure (its batch is dropped)."""
        while self.queue:
            n = min(self.batch, len(self.queue))
            spans = [self.queue.popleft() for _ in range(n)]
            if not await self.export(spans):
                return

    async def export(self, spans: list[Span]) -> bool:
        offset_ns = int(self.wall() * 1e9) - int(perf_counter() * 1e9)
        body = self.encoder.encode(spans, offset_ns)
        try:
            status, reply = await self.exporter.post(body)
        except (OSError, asyncio.TimeoutError, h11.ProtocolError, asyncio.IncompleteReadError) as e:
            return self._failed(len(spans), f"{type(e).__name__}: {e}")
        if not 200 <= status < 300:
            return self._failed(len(spans), f"HTTP {status}: {reply[:200]!r}")
        self.metrics.inc("trace_spans_exported_total", by=len(spans))
        if self._last_error:
            log.info("trace export recovered")
            self._last_error = ""
        return True

    def _failed(self, n: int, error: str) -> bool:
        self.metrics.inc("trace_spans_dropped_total", 'reason="export_failed"', n)
        self.metrics.inc("trace_export_errors_total")
        now = clock.monotonic()
        if error != self._last_error or now - self._last_error_at >= ERROR_LOG_EVERY:
            log.info("trace export failed", extra={"error": error, "spans": n})
            self._last_error, self._last_error_at = error, now
        return False

    async def close(self, timeout: float = SHUTDOWN_FLUSH) -> None:
        """A last flush, bounded by ``timeout``; then the exporter's connection is closed."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except asyncio.TimeoutError:
            log.info("trace flush at shutdown timed out", extra={"left": len(self.queue)})
        await self.exporter.close()


def build_tracer(cfg: "Config", metrics: "Metrics") -> Tracer | None:
    """The proxy's tracer, or None when no collector is configured (tracing off)."""
    if not cfg.trace_collector:
        return None
    host, port, path = split_url(cfg.trace_collector)
    client = otlp.Client(host, port, path, timeout=EXPORT_TIMEOUT)
    return Tracer(client, metrics, resource_attrs(cfg), cfg.trace_sample)
