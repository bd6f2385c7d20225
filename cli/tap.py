"""`mesh tap`: a live stream of the requests the selected proxies see, as Linkerd prints it.

Each proxy serves ``GET /tap?max_rps=N[&method=M][&path=PREFIX][&authority=A]`` on its
admin port: a chunked NDJSON stream of ``req``, ``rsp`` and ``end`` events (metadata only,
never bodies; at most N sampled requests per second per subscriber; a sampled request's
``rsp``/``end`` always follow). The CLI opens one stream per proxy, concurrently, and
renders each event as ``linkerd viz tap`` does (``viz/cmd/tap.go``)::

    req id=1:0 proxy=out src=127.0.0.1:50312 dst=127.0.0.1:4143 tls=true :method=GET :authority=books.default:7002 :path=/books
    rsp id=1:0 proxy=out src=127.0.0.1:50312 dst=127.0.0.1:4143 tls=true :status=200 latency=2331µs
    end id=1:0 proxy=out src=127.0.0.1:50312 dst=127.0.0.1:4143 tls=true duration=2410µs response-length=231B

``id=P:N``: P numbers the tapped proxies (1, 2, ...), N is the proxy's own request number.
A ``rsp``/``end`` line repeats its request's flow (src, dst, tls), which the CLI remembers
from the ``req`` event (a bounded map).

``TapFormatter`` is pure; ``stream`` and ``run`` do the I/O. ``top`` reuses both.
"""
from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import h11

from microproxy import ctlhttp

from . import local

DEFAULT_MAX_RPS = 100.0
MAX_PENDING = 10_000        # req events remembered while their rsp/end are outstanding
CONNECT_TIMEOUT = 1.0

OnEvent = Callable[[int, dict[str, Any], dict[str, Any]], None]   # (proxy no, record, event)
OnNote = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TapParams:
    max_rps: float = DEFAULT_MAX_RPS
    method: str | None = None
    path: str | None = None
    authority: str | None = None

    def query_path(self) -> str:
        q: dict[str, str] = {"max_rps": f"{self.max_rps:g}"}
        for k, v in (("method", self.method), ("path", self.path), ("authority", self.authority)):
            if v:
                q[k] = v
        return "/tap?" + urlencode(q)


# === rendering (pure) ===

def event_id(no: int, raw_id: Any) -> str:
    """``P:N`` from the proxy number and the proxy's id (``web-3f7c:12`` -> N = 12)."""
    return f"{no}:{str(raw_id).rpartition(':')[2]}"


def _flow(req: dict[str, Any] | None) -> str:
    if req is None:
        return "proxy=??? src=? dst=? tls="
    proxy = "out" if req.get("direction") == "outbound" else "in "   # `in ` aligns with `out`
    src = (req.get("src") or {}).get("addr") or "?"
    dst = (req.get("dst") or {}).get("addr") or "?"
    return f"proxy={proxy} src={src} dst={dst} tls={'true' if req.get('tls') else 'false'}"


def _resources(req: dict[str, Any] | None) -> str:
    """The `-o wide` suffix: ``src_res=deploy/web src_ns=default dst_res=... dst_ns=...``."""
    if req is None:
        return ""
    out = ""
    for side in ("src", "dst"):
        peer = req.get(side) or {}
        if peer.get("workload"):
            out += f" {side}_res=deploy/{peer['workload']}"
        if peer.get("namespace"):
            out += f" {side}_ns={peer['namespace']}"
    return out


def format_event(no: int, ev: dict[str, Any], req: dict[str, Any] | None, wide: bool = False) -> str:
    """One tap line; ``req`` is the request's ``req`` event (None if it was not seen)."""
    kind = ev.get("type")
    head = f"{kind} id={event_id(no, ev.get('id'))} {_flow(req)}"
    tail = _resources(req) if wide else ""
    if kind == "req":
        return (f"{head} :method={ev.get('method')} :authority={ev.get('authority')} "
                f":path={ev.get('path')}{tail}")
    if kind == "rsp":
        return f"{head} :status={ev.get('status')} latency={ev.get('latency_us')}µs{tail}"
    if kind == "end":
        extra = ""
        if ev.get("grpc_status") is not None:
            extra += f" grpc-status={ev['grpc_status']}"
        if ev.get("error"):
            extra += f" error={ev['error']}"
        return (f"{head}{extra} duration={ev.get('duration_us')}µs "
                f"response-length={ev.get('response_bytes')}B{tail}")
    return f"unknown {_flow(req)}"


class TapFormatter:
    """Events in, tap lines out; remembers each request's ``req`` until its ``end``."""

    def __init__(self, wide: bool = False, max_pending: int = MAX_PENDING) -> None:
        self.wide = wide
        self.max_pending = max_pending
        self.pending: OrderedDict[tuple[int, str], dict[str, Any]] = OrderedDict()

    def line(self, no: int, ev: dict[str, Any]) -> str:
        key = (no, str(ev.get("id")))
        if ev.get("type") == "req":
            self.pending[key] = ev
            while len(self.pending) > self.max_pending:
                self.pending.popitem(last=False)
            req: dict[str, Any] | None = ev
        elif ev.get("type") == "end":
            req = self.pending.pop(key, None)
        else:
            req = self.pending.get(key)
        return format_event(no, ev, req, self.wide)


def json_line(rec: dict[str, Any], ev: dict[str, Any]) -> str:
    """`-o json`: the proxy's event as one JSON line, plus which proxy reported it."""
    head = {"proxy": rec.get("instance"), "type": ev.get("type"), "id": ev.get("id")}
    return json.dumps({**head, **ev}, separators=(",", ":"))


# === streams (I/O) ===

async def stream(no: int, rec: dict[str, Any], params: TapParams, on_event: OnEvent,
                 on_note: OnNote) -> None:
    """Follow one proxy's tap stream until it ends or the task is cancelled."""
    port = rec.get("admin_port")
    where = f"{rec.get('instance')} (admin 127.0.0.1:{port})"
    if not port:
        on_note(f"{rec.get('instance')}: no admin port; not tapped")
        return
    client = ctlhttp.Client(local.LOOPBACK, int(port), timeout=CONNECT_TIMEOUT)
    try:
        async for ev in client.watch(params.query_path()):
            if isinstance(ev, dict):
                on_event(no, rec, ev)
    except ctlhttp.HTTPError as e:
        on_note(f"{where}: tap refused: {e}")
    except (OSError, TimeoutError, h11.ProtocolError, ValueError) as e:
        on_note(f"{where}: tap stream lost: {e or type(e).__name__}")


async def run(records: Sequence[dict[str, Any]], params: TapParams, on_event: OnEvent,
              on_note: OnNote, stop: asyncio.Event, duration: float | None = None) -> None:
    """Tap every record's proxy until ``stop`` is set, ``duration`` passes or all streams end."""
    tasks = [asyncio.create_task(stream(i + 1, rec, params, on_event, on_note))
             for i, rec in enumerate(records)]
    all_done: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*tasks))
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({all_done, stopped}, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (*tasks, stopped):
            t.cancel()
        await asyncio.gather(*tasks, stopped, return_exceptions=True)
        all_done.cancel()
        await asyncio.gather(all_done, return_exceptions=True)
