"""What `mesh stat` and `mesh tap`/`top` read from a proxy: rolling windows and a tap hub.

Rolling window: one slot per second for the last ``SECONDS`` seconds; each slot maps a
metric key (the pre-rendered label string of a route: direction, authority, peer identity)
to ``[requests, success, failure, latency bucket counts]``. ``/stats?window=60`` sums the
slots of the last 60 s, so an answer needs no Prometheus and no waiting; the CLI merges
the histograms of several proxies before computing percentiles.

Tap: subscribers register filters and a rate; a request is tapped only when some
subscriber wants it (and has a token), so with no subscriber the cost is one truthiness
check. Events carry metadata only, never bodies.
"""
from __future__ import annotations

import asyncio
import itertools
import json
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from .metrics import BUCKETS

SECONDS = 600
_NB = len(BUCKETS) + 1


class Window:
    def __init__(self, seconds: int = SECONDS) -> None:
        self.seconds = seconds
        self.slots: deque[tuple[int, dict[str, list[Any]]]] = deque()
        self.cur_sec = -1
        self.cur: dict[str, list[Any]] = {}
        self.info: dict[str, dict[str, Any]] = {}     # metric key -> descriptive fields
        self.tcp: deque[tuple[int, tuple[int, int, int, int]]] = deque()  # cumulative bytes per second

    def describe(self, key: str, **fields: Any) -> None:
        if key not in self.info:
            self.info[key] = fields

    def add(self, key: str, failure: bool, latency_ms: float, now: float, bucket: int = -1) -> None:
        """Count one response; ``bucket`` is ``bisect_left(BUCKETS, latency_ms)`` when the
        caller has it already."""
        sec = int(now)
        if sec != self.cur_sec:
            self._advance(sec)
        row = self.cur.get(key)
        if row is None:
            row = self.cur[key] = [0, 0, 0, [0] * _NB]
        row[0] += 1
        row[2 if failure else 1] += 1
        row[3][bisect_left(BUCKETS, latency_ms) if bucket < 0 else bucket] += 1

    def _advance(self, sec: int) -> None:
        self.cur_sec = sec
        self.cur = {}
        self.slots.append((sec, self.cur))
        while self.slots and self.slots[0][0] <= sec - self.seconds:
            self.slots.popleft()

    def tick_tcp(self, now: float, totals: tuple[int, int, int, int]) -> None:
        sec = int(now)
        self.tcp.append((sec, totals))
        while self.tcp and self.tcp[0][0] <= sec - self.seconds - 1:
            self.tcp.popleft()

    def summary(self, window: int, now: float) -> dict[str, list[dict[str, Any]]]:
        """Sum the last ``window`` whole seconds per key (the current, partial second is
        left out so that counts and the covered time agree), split by direction."""
        until = int(now)
        since = until - window
        acc: dict[str, list[Any]] = {}
        for sec, slot in self.slots:
            if sec < since or sec >= until:
                continue
            for key, row in slot.items():
                a = acc.get(key)
                if a is None:
                    a = acc[key] = [0, 0, 0, [0] * _NB]
                a[0] += row[0]
                a[1] += row[1]
                a[2] += row[2]
                b = a[3]
                for i, n in enumerate(row[3]):
                    if n:
                        b[i] += n
        out: dict[str, list[dict[str, Any]]] = {"inbound": [], "outbound": []}
        for key, (req, ok, fail, buckets) in acc.items():
            info = dict(self.info.get(key, {}))
            direction = info.pop("direction", "outbound")
            out.setdefault(direction, []).append(
                {**info, "requests": req, "success": ok, "failure": fail, "latency_ms_buckets": buckets})
        return out

    def tcp_bytes(self, window: int, now: float, current: tuple[int, int, int, int]) -> tuple[int, ...]:
        since = int(now) - window
        base = None
        for sec, totals in self.tcp:
            if sec >= since:
                base = totals
                break
        if base is None:
            base = (0, 0, 0, 0) if not self.tcp else self.tcp[-1][1]
        return tuple(max(c - b, 0) for c, b in zip(current, base))


class Subscriber:
    def __init__(self, max_rps: float, method: str | None, path: str | None,
                 authority: str | None, now: float) -> None:
        self.rate = max(0.1, max_rps)
        self.tokens = min(self.rate, 10.0)
        self.stamp = now
        self.method = method.upper().encode() if method else None
        self.path = path.encode() if path else None
        self.authority = authority
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2000)
        self.dropped = 0

    def wants(self, method: bytes, path: bytes, authority: str, now: float) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path is not None and not path.startswith(self.path):
            return False
        if self.authority is not None and authority != self.authority:
            return False
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def push(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        except asyncio.QueueFull:
            self.dropped += 1


class TapHub:
    def __init__(self, prefix: str) -> None:
        self.subs: list[Subscriber] = []
        self.ids = itertools.count()
        self.prefix = prefix

    def request(self, method: bytes, path: bytes, authority: str, now: float,
                event: dict[str, Any]) -> tuple[str, list[Subscriber]] | None:
        """If anyone wants this request, emit its req event; returns the tap handle."""
        subs = [s for s in self.subs if s.wants(method, path, authority, now)]
        if not subs:
            return None
        tap_id = f"{self.prefix}:{next(self.ids)}"
        event["type"] = "req"
        event["id"] = tap_id
        for s in subs:
            s.push(event)
        return tap_id, subs

    @staticmethod
    def finish(handle: tuple[str, list[Subscriber]], status: int, latency_us: int,
               duration_us: int, response_bytes: int, error: str | None,
               grpc_status: int | None = None) -> None:
        tap_id, subs = handle
        rsp = {"type": "rsp", "id": tap_id, "status": status, "latency_us": latency_us}
        end = {"type": "end", "id": tap_id, "duration_us": duration_us,
               "response_bytes": response_bytes, "grpc_status": grpc_status, "error": error}
        for s in subs:
            s.push(rsp)
            s.push(end)

    async def stream(self, sub: Subscriber) -> AsyncIterator[bytes]:
        self.subs.append(sub)
        try:
            while True:
                yield await sub.queue.get()
        finally:
            self.subs.remove(sub)
