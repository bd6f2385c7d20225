"""Shared by the HTTP/1 forwarding tests: a transport that keeps what is written, and
``relay``, which drives a real UpstreamConn and ServerConn over such transports (no sockets,
no sleeps) to show what the proxy's client receives for the upstream's answers."""
from __future__ import annotations

import asyncio
from typing import Any

from microproxy.downstream import ServerConn
from microproxy.http1 import Exchange
from microproxy.metrics import Metrics
from microproxy.upstream import Pool, UpstreamConn


class RecordingTransport:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, d: bytes) -> None:
        self.data += bytes(d)

    def set_write_buffer_limits(self, *a: object) -> None:
        pass

    def get_extra_info(self, *a: object) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading


def get(headers: list[tuple[bytes, bytes]] | None = None, chunked: bool = False) -> Exchange:
    return Exchange(b"GET", b"/p", "1.1", headers or [(b"host", b"h")], b"h", True, chunked, None)


def relay(raws: list[bytes], route: Any = None) -> list[bytes]:
    """What the proxy's client receives for each of ``raws``, the upstream's answers to GETs
    sent one after the other on one pooled upstream connection."""
    loop = asyncio.new_event_loop()
    try:
        server = ServerConn(None, Metrics(), set(), loop)   # type: ignore[arg-type]
        down = RecordingTransport()
        server.connection_made(down)
        pool = Pool(loop, None, None)
        up = UpstreamConn(pool)
        up.connection_made(RecordingTransport())
        out = []
        for raw in raws:
            ex = get()
            ex.route = route
            server.active = ex
            assert (pool.take() or up) is up   # the same connection, reused
            up.attach(ex, server, ex.head(b"/p", b"h"))
            up.data_received(raw)
            assert ex.done
            out.append(down.data)
            down.data = b""
        return out
    finally:
        loop.close()
