"""HTTP/2 connection handling in-process (h2conn.py, h2ends.py), over a fake transport,
driven by a real ``h2`` client connection: a bug while handling one stream fails that
stream only."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from microproxy.h2ends import H2ClientConn, H2Pool, H2ServerConn
from microproxy.h2stream import H2Exchange, Half
from microproxy.metrics import Metrics, labels
from tests.h2_rig import FakeTransport


class BuggyRouter:
    """Raises on ``/boom``; records the other streams and how exchanges ended."""

    def __init__(self) -> None:
        self.dispatched: list[bytes] = []
        self.finished: list[tuple[bytes, str | None]] = []

    def dispatch(self, conn: Any, x: H2Exchange) -> None:
        path = x.pseudo(b":path")
        if path == b"/boom":
            raise RuntimeError("a bug in the router")
        self.dispatched.append(path)

    def finish(self, x: H2Exchange, error: str | None) -> None:
        x.done = True
        self.finished.append((x.pseudo(b":path"), error))

    def fail(self, x: H2Exchange, status: int, reason: str) -> None:
        self.finish(x, reason)


def request(client: h2.connection.H2Connection, sid: int, path: str) -> None:
    client.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"),
                              (":authority", "books.default:7002")], end_stream=True)


def test_a_bug_in_one_stream_resets_it_and_the_connection_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        old = SimpleNamespace(loop=loop, metrics=Metrics(labels(namespace="default", workload="x")),
                              registry=set(), direction="outbound", tls=False, peer_id=None, tcp_key="")
        router = BuggyRouter()
        srv = H2ServerConn(router, old)
        transport = FakeTransport()
        srv.adopt(transport)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        request(client, 1, "/boom")
        request(client, 3, "/ok")
        srv.data_received(client.data_to_send())
        events = client.receive_data(bytes(transport.data))
        resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert [(e.stream_id, e.error_code) for e in resets] == [(1, ErrorCodes.INTERNAL_ERROR)]
        assert router.dispatched == [b"/ok"]                        # the next stream was served
        assert router.finished == [(b"/boom", "proxy error")]       # metrics/tap/trace closed it
        assert not transport.closed and not srv.closed
        # and the connection still answers
        transport.data.clear()
        client.ping(b"12345678")
        srv.data_received(client.data_to_send())
        assert any(isinstance(e, h2.events.PingAckReceived) for e in client.receive_data(bytes(transport.data)))

    with caplog.at_level(logging.ERROR, logger="microproxy.h2conn"):
        asyncio.run(scenario())
    assert "HTTP/2 event handling failed" in caplog.text


def test_pooled_connections_idle_past_the_timeout_are_closed_with_goaway() -> None:
    """H2Pool.sweep (run by the proxy's sweeper): a pooled connection with no stream for
    longer than its idle timeout leaves the pool with a GOAWAY and is closed; one still
    carrying a stream, or idle for less, stays."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = H2Pool(connect=None, idle_timeout=60.0)
        conns = []
        for _ in range(3):
            c = H2ClientConn(loop, pool)
            c.connection_made(FakeTransport())
            pool.conns.append(c)
            conns.append(c)
        busy, idle, fresh = conns
        busy.open(Half(fresh, 0, None), [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                         (b":authority", b"a:1")], True)
        now = loop.time()
        busy.idle_since = idle.idle_since = now - 61
        pool.sweep(now)
        assert pool.conns == [busy, fresh]
        assert idle.transport.closed and not busy.transport.closed and not fresh.transport.closed
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        events = server.receive_data(bytes(idle.transport.data))
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
        assert pool.take() is busy

    asyncio.run(scenario())
