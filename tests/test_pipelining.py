"""HTTP/1.1 pipelining between our own proxies (microproxy/upstream.py, downstream.py, proxy.py).

Outbound, a meshed ``Pool`` built with ``Pipelining(depth, after, max_age)`` sends a bodiless
GET behind the exchange in flight on a busy ``UpstreamConn`` (heads of one loop iteration in
one write); responses are handed out in order, one write per client per read. Inbound, a TLS
``ServerConn`` dispatches pipelined GETs at once and writes their responses in request order.

Most tests drive the real ``ServerConn`` / ``UpstreamConn`` / ``Pool`` objects over fake
transports (no sockets) with a small router that routes like ``Outbound.send`` /
``Inbound.dispatch``; each runs on uvloop so ``call_soon`` batching is the production one.
The last test runs a real mesh (control plane, two proxies, the test app) and checks that
~200 GETs over 16 keep-alive connections each get their own response while the client proxy
really pipelines.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import pytest
import uvloop

from microproxy.downstream import ServerConn
from microproxy.http1 import ERROR_HEADER, HIGH_WATER, MAX_CONCURRENT, Exchange
from microproxy.upstream import Pipelining, Pool, UpstreamConn
from microproxy.metrics import Metrics, labels
from microproxy.outbound import PIPELINED
from tests.harness import Conn, identity_of, metric_sum, running_mesh
from tests.mesh_app import pattern_block

CLIENT_ID = identity_of("client")              # client.default.serviceaccount.identity.cluster.local
HOST = b"books.default:7002"
KEY = labels(direction="outbound", authority="books.default:7002")   # the endpoint's metric key
ON = Pipelining(depth=16, after=1, max_age=10.0)   # pipeline as soon as one connection is busy


# --- fakes

class FakeSSL:
    """What ``peer_identity`` reads from a verified TLS connection."""

    def getpeercert(self) -> dict[str, Any]:
        return {"subjectAltName": (("DNS", CLIENT_ID),)}


class FakeT:
    """A transport that records writes and flow-control calls."""

    def __init__(self, ssl_object: Any = None) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.paused = False
        self.ssl_object = ssl_object

    def write(self, d: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(d))

    def set_write_buffer_limits(self, *a: Any) -> None:
        pass

    def get_extra_info(self, k: str, d: Any = None) -> Any:
        return self.ssl_object if k == "ssl_object" else d

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def data(self) -> bytes:
        return b"".join(self.writes)


class FakeRS:
    """A ``resilience.ReqState`` stand-in: only what the HTTP/1 layer touches."""

    def __init__(self, policy: Any = None) -> None:
        self.policy = policy

    def finish(self, ex: Exchange) -> None:
        pass

    def on_head(self, ex: Exchange, status: int, up: Any) -> bool:
        return False

    def keep_body(self, ex: Exchange, data: bytes) -> None:
        pass


class Rig:
    """A pool of fake upstream connections and a router that routes like ``Outbound.send``
    (pipeline when the pool allows it and the exchange is pipelinable, else an idle
    connection, else a new one) — or, with no pipelining, like ``Inbound.dispatch``.

    ``prepare(ex)`` runs before routing (to give an exchange a retry policy, an age, ...);
    targets in ``deny`` are answered 403 by the router itself (as authz does);
    ``retried`` collects what the pool handed to ``router_retry``."""

    def __init__(self, pipelining: Pipelining | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.metrics = Metrics(labels(namespace="default", workload="x"))
        self.pool = Pool(self.loop, self._connect, self._retry, pipelining=pipelining)
        self.registry: set[ServerConn] = set()
        self.ups: list[UpstreamConn] = []            # every upstream connection opened, in order
        self.retried: list[tuple[ServerConn, Exchange]] = []
        self.prepare: Callable[[Exchange], None] | None = None
        self.deny: set[bytes] = set()

    # Router
    def dispatch(self, conn: ServerConn, ex: Exchange) -> None:
        ex.metric_key = KEY
        if ex.target in self.deny:
            conn.respond_error(ex, 403, "denied by policy", "DENY")
            return
        if self.prepare is not None:
            self.prepare(ex)
        ex.wire_head = ex.head(ex.target, ex.host)
        pool = self.pool
        if pool.depth > 1 and ex.pipelinable():
            up = pool.pipeline_target()
            if up is not None:
                self.metrics.inc(PIPELINED, KEY)
                up.pipeline(ex, conn, ex.wire_head)
                return
        up = pool.take() or self.new_up()
        up.attach(ex, conn, ex.wire_head)

    def tunnel(self, conn: ServerConn, ex: Exchange, rest: bytes) -> None:
        raise AssertionError("no CONNECT here")

    def new_up(self) -> UpstreamConn:
        up = UpstreamConn(self.pool)
        up.connection_made(FakeT())
        self.ups.append(up)
        return up

    async def _connect(self, pool: Pool) -> UpstreamConn:
        return self.new_up()

    def _retry(self, server: ServerConn, ex: Exchange) -> None:
        self.retried.append((server, ex))

    # clients
    def client(self) -> ServerConn:
        """An app's plaintext connection to the outbound listener."""
        conn = ServerConn(self, self.metrics, self.registry, self.loop)
        conn.connection_made(FakeT())
        return conn

    def peer(self) -> ServerConn:
        """A peer proxy's mTLS connection to the inbound listener."""
        conn = ServerConn(self, self.metrics, self.registry, self.loop, direction="inbound", tls=True)
        conn.connection_made(FakeT(FakeSSL()))
        return conn

    def pipelined(self) -> float:
        return self.metrics.counter(PIPELINED, KEY)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run one scenario on uvloop (the proxy's loop), with a deadline."""
    async def main() -> None:
        await asyncio.wait_for(scenario(), 5)
    uvloop.run(main())


async def turn() -> None:
    """Let the loop run the callbacks scheduled with ``call_soon`` (head and response flushes)."""
    await asyncio.sleep(0)


def get(path: str, host: bytes = HOST) -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: %s\r\n\r\n" % (path.encode(), host)


def wire_get(path: str) -> bytes:
    """The head a GET from ``get()`` is sent upstream with."""
    return b"GET %s HTTP/1.1\r\nhost: %s\r\n\r\n" % (path.encode(), HOST)


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class Resp:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def responses(data: bytes) -> list[Resp]:
    """Split a byte stream into content-length-framed responses (strict: no leftovers)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {data[:200]!r}"
        status_line, *lines = head.split(b"\r\n")
        m = re.fullmatch(rb"HTTP/1\.1 (\d{3}) .*", status_line)
        assert m, status_line
        headers = {}
        for line in lines:
            name, colon, value = line.partition(b": ")
            assert colon, line
            headers[name.lower()] = value
        n = int(headers[b"content-length"])
        assert len(rest) >= n, f"body cut short: {rest!r}"
        out.append(Resp(int(m.group(1)), headers, rest[:n]))
        data = rest[n:]
    return out


def active(conn: ServerConn) -> Exchange:
    """The exchange a client connection has in flight."""
    ex = conn.active
    assert ex is not None
    return ex


def carried(up: UpstreamConn) -> Exchange:
    """The exchange in flight on an upstream connection."""
    ex = up.ex
    assert ex is not None
    return ex


def bodies(t: FakeT) -> list[bytes]:
    return [r.body for r in responses(t.data())]


def bodies_of(data: bytes) -> list[bytes]:
    return [r.body for r in responses(data)]



async def on_one_connection(*paths: str) -> tuple["Rig", list[ServerConn], UpstreamConn]:
    """Pipelining on; one client per path sends its GET, in order: the first is in flight
    and the others are pipelined behind it, all heads written. (rig, clients, connection)"""
    rig = Rig(ON)
    clients = [rig.client() for _ in paths]
    for client, path in zip(clients, paths):
        client.data_received(get(path))
    await turn()
    return rig, clients, rig.ups[0]


def three_gets_from_a_peer() -> tuple["Rig", ServerConn, list[UpstreamConn]]:
    """Inbound: a peer proxy pipelines GET /1, /2, /3 in one read; all three are forwarded
    at once, each on its own app connection. (rig, the peer's connection, app connections)"""
    rig = Rig()
    peer = rig.peer()
    peer.data_received(get("/1") + get("/2") + get("/3"))
    return rig, peer, list(rig.ups)


async def two_on_one_connection() -> tuple["Rig", ServerConn, ServerConn, UpstreamConn]:
    """Client a's GET /a in flight and client b's GET /b pipelined behind it."""
    rig, (a, b), up = await on_one_connection("/a", "/b")
    return rig, a, b, up

# --- a. outbound: GETs share one connection

def test_outbound_gets_ride_one_connection_and_get_their_own_responses() -> None:
    """Three clients' GETs while one is in flight: the 2nd and 3rd are pipelined on the same
    upstream connection, the three heads leave in ONE write once the loop runs its callbacks,
    three responses in ONE read reach the right clients in order (one write each), and the
    connection then goes back to the idle pool (out of ``busy``)."""
    async def scenario() -> None:
        rig = Rig(ON)
        clients = [rig.client() for _ in range(3)]
        for i, c in enumerate(clients, 1):
            c.data_received(get(f"/r{i}"))
        assert len(rig.ups) == 1
        up = rig.ups[0]
        exs = [active(c) for c in clients]
        assert up.ex is exs[0] and up.server is clients[0]
        assert list(up.pipe) == [(exs[1], clients[1]), (exs[2], clients[2])]
        assert all(ex.upstream is up for ex in exs)
        assert rig.pool.busy == [up]
        assert up.transport.writes == []          # heads wait for the end of the loop iteration
        await turn()
        assert up.transport.writes == [wire_get("/r1") + wire_get("/r2") + wire_get("/r3")]
        assert rig.pipelined() == 2

        up.data_received(ok(b"one") + ok(b"two") + ok(b"three"))
        for c, body in zip(clients, (b"one", b"two", b"three")):
            assert len(c.transport.writes) == 1, c.transport.writes   # one write per client per read
            (r,) = responses(c.transport.data())
            assert (r.status, r.body) == (200, body)
            assert c.active is None and not c.transport.closed
        assert all(ex.done for ex in exs)
        assert up.ex is None and not up.pipe and not up.closed
        assert rig.pool.idle == [up] and rig.pool.busy == []
    run(scenario)


def test_outbound_responses_split_across_reads() -> None:
    """Pipelined responses cut at arbitrary points across reads still reach the right
    client, byte for byte (a body straddling two reads, the next head starting mid-read)."""
    async def scenario() -> None:
        rig = Rig(ON)
        clients = [rig.client() for _ in range(3)]
        for i, c in enumerate(clients, 1):
            c.data_received(get(f"/r{i}"))
        await turn()
        up = rig.ups[0]
        wanted = [b"a" * 1000, b"b" * 7, b"c" * 3000]
        stream = b"".join(ok(b) for b in wanted)
        for i in range(0, len(stream), 333):
            up.data_received(stream[i:i + 333])
        assert [bodies(c.transport) for c in clients] == [[b] for b in wanted]
        assert rig.pool.idle == [up]
    run(scenario)


# --- b. what is (not) pipelined

def _ex(method: bytes = b"GET", chunked: bool = False, length: int | None = None, **attrs: Any) -> Exchange:
    ex = Exchange(method, b"/", "1.1", [(b"host", HOST)], HOST, True, chunked, length)
    for k, v in attrs.items():
        setattr(ex, k, v)
    return ex


PIPELINABLE = [
    ("bodiless GET", _ex, True),
    ("GET, content-length 0", lambda: _ex(length=0), True),
    ("GET, ReqState without retry policy", lambda: _ex(rs=FakeRS(policy=None)), True),
    ("POST with a body", lambda: _ex(b"POST", length=5), False),
    ("bodiless POST", lambda: _ex(b"POST"), False),
    ("HEAD", lambda: _ex(b"HEAD"), False),
    ("GET with a content-length body", lambda: _ex(length=3), False),
    ("chunked GET", lambda: _ex(chunked=True), False),
    ("GET with a retry policy", lambda: _ex(rs=FakeRS(policy=object())), False),
    ("GET with a route timer", lambda: _ex(timer=object()), False),
    ("GET with a backend timeout", lambda: _ex(backend_timeout=1.0), False),
    ("GET mirrored (tee)", lambda: _ex(tee=object()), False),
]


@pytest.mark.parametrize("make,want", [p[1:] for p in PIPELINABLE], ids=[p[0] for p in PIPELINABLE])
def test_pipelinable(make: Callable[[], Exchange], want: bool) -> None:
    """Only a bodiless GET with no timer, backend timeout, retry policy or mirror may share
    a connection with requests ahead of it."""
    assert make().pipelinable() is want


def test_post_and_retry_policy_gets_are_never_pipelined() -> None:
    """A POST with a body and a GET with a retry policy each get their own connection, even
    while a young pipelinable GET is in flight on another."""
    async def scenario() -> None:
        rig = Rig(ON)
        rig.prepare = lambda ex: setattr(ex, "rs", FakeRS(policy=object())) \
            if ex.target == b"/retry" else None
        a, b, c = rig.client(), rig.client(), rig.client()
        a.data_received(get("/plain"))
        b.data_received(b"POST /p HTTP/1.1\r\nhost: %s\r\ncontent-length: 5\r\n\r\nhello" % HOST)
        c.data_received(get("/retry"))
        assert len(rig.ups) == 3
        assert [up.ex for up in rig.ups] == [a.active, b.active, c.active]
        assert all(not up.pipe for up in rig.ups)
        assert rig.pipelined() == 0
        # the POST went out at once (head, then its body as it was read), not batched
        assert rig.ups[1].transport.data() == \
            b"POST /p HTTP/1.1\r\nhost: %s\r\ncontent-length: 5\r\n\r\nhello" % HOST
    run(scenario)


@pytest.mark.parametrize("first", ["post", "retry"])
def test_nothing_behind_an_unpipelinable_exchange(first: str) -> None:
    """A connection whose exchange in flight is not pipelinable (a POST, a GET with a retry
    policy) gets no GET behind it: the GET opens a second connection."""
    async def scenario() -> None:
        rig = Rig(ON)
        rig.prepare = lambda ex: setattr(ex, "rs", FakeRS(policy=object())) \
            if ex.target == b"/retry" else None
        a, b = rig.client(), rig.client()
        if first == "post":
            a.data_received(b"POST /p HTTP/1.1\r\nhost: %s\r\ncontent-length: 2\r\n\r\nhi" % HOST)
        else:
            a.data_received(get("/retry"))
        assert rig.pool.busy == rig.ups and not rig.ups[0].pipelinable
        b.data_received(get("/g"))
        assert len(rig.ups) == 2 and not rig.ups[0].pipe and rig.ups[1].ex is b.active
        assert rig.pipelined() == 0
    run(scenario)


def test_nothing_behind_a_head_older_than_max_age() -> None:
    """An exchange in flight for longer than ``max_age`` (maybe a slow one) gets nothing
    pipelined behind it: the next GET opens a new connection."""
    async def scenario() -> None:
        rig = Rig(Pipelining(depth=16, after=1, max_age=0.010))
        rig.prepare = lambda ex: setattr(ex, "start", perf_counter() - 1.0) \
            if ex.target == b"/old" else None
        a, b = rig.client(), rig.client()
        a.data_received(get("/old"))
        b.data_received(get("/new"))
        assert len(rig.ups) == 2 and not rig.ups[0].pipe
        assert rig.pipelined() == 0
    run(scenario)


def test_after_depth_and_least_deep() -> None:
    """Pipelining starts only once ``after`` connections are busy; a connection holds at
    most ``depth`` exchanges; heads join a connection that still has heads to write in this
    loop iteration, else the least deep busy connection is picked."""
    async def scenario() -> None:
        rig = Rig(Pipelining(depth=3, after=2, max_age=10.0))
        cs = [rig.client() for _ in range(7)]
        cs[0].data_received(get("/0"))          # busy: 1 < after -> a new connection, written at once
        assert rig.ups[0].transport.writes == [wire_get("/0")]
        cs[1].data_received(get("/1"))          # busy: 1 < after -> another one; now 2 busy:
        assert len(rig.ups) == 2                # its head waits for the ones pipelined behind it
        A, B = rig.ups
        assert B.transport.writes == []
        cs[2].data_received(get("/2"))          # B has heads waiting: joins them (A is as deep)
        assert [e for e, _ in B.pipe] == [cs[2].active] and not A.pipe
        await turn()                            # heads written: no preference by pending heads
        assert B.transport.writes == [wire_get("/1") + wire_get("/2")]
        cs[3].data_received(get("/3"))          # least deep: A (0) over B (1)
        assert [e for e, _ in A.pipe] == [cs[3].active]
        cs[4].data_received(get("/4"))          # A has heads pending: joins them
        assert [e for e, _ in A.pipe] == [cs[3].active, cs[4].active]
        cs[5].data_received(get("/5"))          # A full (depth 3 = 1 in flight + 2): B
        assert len(B.pipe) == 2
        cs[6].data_received(get("/6"))          # both full: a new connection
        assert len(rig.ups) == 3 and rig.ups[2].ex is cs[6].active
        assert rig.pipelined() == 4
    run(scenario)


def test_depth_1_disables_pipelining() -> None:
    """``depth=1`` (MESH_PIPELINE_DEPTH=1, also the default of a Pool): every GET gets its
    own connection, its head written at once, and no ``busy`` bookkeeping."""
    async def scenario() -> None:
        for p in (Pipelining(depth=1, after=1), None):
            rig = Rig(p)
            a, b = rig.client(), rig.client()
            a.data_received(get("/a"))
            b.data_received(get("/b"))
            assert len(rig.ups) == 2
            assert [up.transport.writes for up in rig.ups] == [[wire_get("/a")], [wire_get("/b")]]
            assert rig.pool.busy == [] and rig.pipelined() == 0
    run(scenario)


# --- c. a client leaves

def test_leaver_in_flight_follower_still_served() -> None:
    """The client of the exchange in flight leaves while another GET is pipelined behind it:
    the connection is kept, the leaver's response is read and discarded, the follower gets
    its full response, and the connection goes back to the pool."""
    async def scenario() -> None:
        rig, a, b, up = await two_on_one_connection()
        a.transport.close()
        a.connection_lost(None)
        assert not up.closed and not up.transport.closed
        up.data_received(ok(b"for a, discarded") + ok(b"for b"))
        assert a.transport.writes == []
        assert len(b.transport.writes) == 1 and bodies(b.transport) == [b"for b"]
        assert up.ex is None and rig.pool.idle == [up] and rig.pool.busy == []
    run(scenario)


def test_leaver_in_flight_follower_served_across_reads() -> None:
    """As above, with the discarded response arriving in pieces before the follower's."""
    async def scenario() -> None:
        rig, a, b, up = await two_on_one_connection()
        up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
        assert a.transport.data() == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234"
        n = len(a.transport.writes)
        a.connection_lost(None)
        up.data_received(b"56789" + ok(b"for b")[:20])
        up.data_received(ok(b"for b")[20:])
        assert len(a.transport.writes) == n
        assert bodies(b.transport) == [b"for b"]
        assert rig.pool.idle == [up]
    run(scenario)


def test_leaver_pipelined_behind() -> None:
    """The client of a pipelined (not yet answered) GET leaves: the exchange in flight is
    answered, the leaver's response is discarded, the connection goes back to the pool."""
    async def scenario() -> None:
        rig, a, b, up = await two_on_one_connection()
        b.connection_lost(None)
        assert list(up.pipe) == [(up.pipe[0][0], None)]
        up.data_received(ok(b"for a") + ok(b"for b, discarded"))
        assert bodies(a.transport) == [b"for a"] and b.transport.writes == []
        assert rig.pool.idle == [up]
    run(scenario)


def test_leaver_alone_aborts() -> None:
    """The client of the only exchange on a connection leaves: the connection is aborted
    and leaves the pool (nothing else needs its response)."""
    async def scenario() -> None:
        rig = Rig(ON)
        a = rig.client()
        a.data_received(get("/a"))
        await turn()
        up = rig.ups[0]
        a.connection_lost(None)
        assert up.closed and up.transport.aborted
        assert rig.pool.busy == [] and rig.pool.idle == []
    run(scenario)


def test_leaver_that_paused_the_connection_resumes_it() -> None:
    """Backpressure from the leaver must not outlive it. The client of the exchange in flight
    is slow (its write buffer passes the high-water mark, so the shared upstream connection
    stops reading), then leaves while another GET is pipelined behind. The connection must
    read again: the rest of the discarded response and the follower's response are behind it
    (pipelinable GETs have no timer: a connection left paused would hold the follower forever).

    Regression guard: at commit 8fcf660 ``drop`` only set ``server = None`` / ``draining`` and
    the connection stayed paused (only ``_end`` cleared ``paused``)."""
    async def scenario() -> None:
        rig = Rig(ON)
        a, b = rig.client(), rig.client()
        a.data_received(get("/big"))
        b.data_received(get("/b"))
        await turn()
        up = rig.ups[0]
        up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n" + b"x" * 100000)
        a.pause_writing()                   # a's socket buffer is full
        assert up.transport.paused and up.paused == {"downstream"}
        a.connection_lost(None)             # ... and a gives up
        assert not up.transport.paused, "the upstream connection is still paused after drop()"
        up.data_received(b"x" * 100000 + ok(b"for b"))
        assert bodies(b.transport) == [b"for b"]
    run(scenario)


# --- d. the upstream connection is lost

def test_connection_lost_retries_pipelined_once_then_502() -> None:
    """The connection dies with two GETs pipelined behind the one in flight: both go to
    ``router_retry`` once (``attempts`` 1, detached). The one in flight on a fresh
    connection is answered 502 UC (unchanged rule: only a reused connection's is retried).
    Lost again (the retries on one connection, one in flight and one pipelined), neither is
    retried a second time: both are answered 502 with ``x-mesh-proxy-error``."""
    async def scenario() -> None:
        rig, (a, b, c), up = await on_one_connection("/a", "/b", "/c")
        ea, eb, ec = active(a), active(b), active(c)
        up.connection_lost(ConnectionResetError())
        assert rig.retried == [(b, eb), (c, ec)]
        for ex in (eb, ec):
            assert ex.attempts == 1 and ex.upstream is None and not ex.body_sent and not ex.done
        assert not up.pipe and up.closed and rig.pool.busy == []
        assert b.transport.writes == [] and c.transport.writes == []
        (ra,) = responses(a.transport.data())
        assert ra.status == 502 and ra.headers[ERROR_HEADER] == b"upstream connection lost"
        assert ea.flag == "UC"

        # the retries (router_retry sends them again): one in flight, one pipelined behind
        up2 = rig.new_up()
        up2.attach(eb, b, eb.wire_head)
        up2.pipeline(ec, c, ec.wire_head)
        await turn()
        assert up2.transport.writes == [wire_get("/b") + wire_get("/c")]
        up2.connection_lost(ConnectionResetError())
        assert len(rig.retried) == 2                  # no second retry
        for cl, ex in ((b, eb), (c, ec)):
            (r,) = responses(cl.transport.data())
            assert r.status == 502, r
            assert r.headers[ERROR_HEADER] == b"upstream connection lost"
            assert ex.flag == "UC" and ex.done
            assert not cl.transport.closed            # a bodiless keep-alive GET: the client stays
    run(scenario)


def test_malformed_response_fails_in_flight_and_retries_pipelined() -> None:
    """A malformed response on a pipelined connection: the exchange in flight is answered
    502 UPE, the connection is aborted, and (once the loop reports the loss) the GETs
    pipelined behind are retried."""
    async def scenario() -> None:
        rig, a, b, up = await two_on_one_connection()
        up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n")
        (r,) = responses(a.transport.data())
        assert r.status == 502 and r.headers[ERROR_HEADER].startswith(b"malformed response")
        assert a.active is None and up.transport.aborted
        up.connection_lost(None)                  # what the loop does after abort()
        assert rig.retried == [(b, b.active)] and b.transport.writes == []
    run(scenario)


def test_connection_lost_skips_leavers() -> None:
    """On a lost connection a pipelined exchange whose client already left is neither
    retried nor answered."""
    async def scenario() -> None:
        rig, (a, b, c), up = await on_one_connection("/a", "/b", "/c")
        b.connection_lost(None)
        up.connection_lost(None)
        assert rig.retried == [(c, c.active)]
        assert b.transport.writes == []
    run(scenario)


# --- e. inbound: pipelined GETs dispatched at once, answered in order

def test_inbound_dispatches_pipelined_gets_at_once_and_answers_in_order() -> None:
    """Three pipelined GETs from a peer proxy in one read are all dispatched at once (three
    app connections). Answered last-first, nothing is written until the first is answered;
    then the three leave in request order, in ONE write."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        assert peer.peer_id == CLIENT_ID and peer.concurrent
        peer.data_received(get("/1") + get("/2") + get("/3"))
        assert len(rig.ups) == 3
        assert [up.transport.writes for up in rig.ups] == [[wire_get(f"/{i}")] for i in (1, 2, 3)]
        ex1, ex2, ex3 = (carried(up) for up in rig.ups)
        assert peer.active is ex1 and list(peer.queue) == [ex2, ex3]
        assert ex2.dispatched and ex3.dispatched and not ex1.dispatched
        assert not peer.transport.paused

        rig.ups[2].data_received(ok(b"three"))
        await turn()
        rig.ups[1].data_received(ok(b"two"))
        await turn()
        assert ex3.done and ex2.done and not ex1.done
        assert peer.transport.writes == []            # waiting for the first
        assert rig.pool.idle == [rig.ups[2], rig.ups[1]]   # answered: app connections reusable
        rig.ups[0].data_received(ok(b"one"))
        await turn()
        assert len(peer.transport.writes) == 1
        assert bodies(peer.transport) == [b"one", b"two", b"three"]
        assert peer.active is None and not peer.queue and not peer.transport.closed
    run(scenario)


def test_inbound_answers_while_others_queued_leave_in_one_write() -> None:
    """While pipelined exchanges are still queued, responses ending in one loop iteration are
    not written one by one: ``uncork`` defers to one ``call_soon`` flush. Four GETs; the first
    two are answered in order before the loop turns: nothing is written until the turn, then
    both leave in one write."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        peer.data_received(b"".join(get(f"/{i}") for i in (1, 2, 3, 4)))
        rig.ups[0].data_received(ok(b"one"))
        rig.ups[1].data_received(ok(b"two"))
        assert peer.transport.writes == [] and peer.flush_due
        await turn()
        assert [bodies_of(w) for w in peer.transport.writes] == [[b"one", b"two"]]
        rig.ups[2].data_received(ok(b"three"))
        rig.ups[3].data_received(ok(b"four"))
        await turn()
        assert bodies(peer.transport) == [b"one", b"two", b"three", b"four"]
    run(scenario)


def test_inbound_router_answer_at_dispatch_is_ordered() -> None:
    """A dispatched GET the router answers itself at once (a proxy-made 403, as authz does)
    is held like any early response: the peer gets it in its turn, not ahead of the first."""
    async def scenario() -> None:
        rig = Rig()
        rig.deny.add(b"/deny")
        peer = rig.peer()
        peer.data_received(get("/1") + get("/deny") + get("/3"))
        assert len(rig.ups) == 2 and peer.transport.writes == []
        rig.ups[1].data_received(ok(b"three"))
        rig.ups[0].data_received(ok(b"one"))
        await turn()
        rs = responses(peer.transport.data())
        assert [r.status for r in rs] == [200, 403, 200]
        assert rs[1].headers[ERROR_HEADER] == b"denied by policy"
        assert [rs[0].body, rs[2].body] == [b"one", b"three"]
        assert len(peer.transport.writes) == 1 and not peer.transport.closed
    run(scenario)


def test_inbound_partial_responses_interleaved() -> None:
    """A later response streams in pieces while the earlier is still open: bytes never
    interleave; the later one is held until the earlier ends, then flows directly."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        peer.data_received(get("/1") + get("/2"))
        up1, up2 = rig.ups
        r1, r2 = ok(b"1" * 50), ok(b"2" * 50)
        up2.data_received(r2[:30])
        up1.data_received(r1[:30])
        up2.data_received(r2[30:60])
        up1.data_received(r1[30:])
        up2.data_received(r2[60:])
        await turn()
        assert bodies(peer.transport) == [b"1" * 50, b"2" * 50]
    run(scenario)


def two_gets_the_second_answered_big_first() -> tuple[ServerConn, UpstreamConn, UpstreamConn, bytes]:
    """Inbound: a peer pipelines GET /1 and /2; /2's app answers first with all but the last
    byte of a body over the high-water mark, so it is held and its app connection paused.
    (the peer's connection, /1's and /2's app connections, the body so far)"""
    rig = Rig()
    peer = rig.peer()
    peer.data_received(get("/1") + get("/2"))
    up1, up2 = rig.ups
    big = b"z" * (2 * HIGH_WATER)
    up2.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(big) + 1) + big)
    assert up2.transport.paused
    return peer, up1, up2, big


def test_inbound_buffered_response_over_high_water_pauses_its_app_connection() -> None:
    """A response answered before its turn is buffered; past the high-water mark its app
    connection stops reading, and reads again once it is that response's turn."""
    async def scenario() -> None:
        peer, up1, up2, big = two_gets_the_second_answered_big_first()
        up1.data_received(ok(b"one"))
        await turn()
        assert not up2.transport.paused
        up2.data_received(b"!")
        await turn()
        assert bodies(peer.transport) == [b"one", big + b"!"]
    run(scenario)


def test_inbound_nothing_dispatched_after_connection_close() -> None:
    """A GET pipelined after a ``Connection: close`` request is neither dispatched nor
    queued (RFC 9112 §9.6)."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        peer.data_received(b"GET /1 HTTP/1.1\r\nhost: %s\r\nconnection: close\r\n\r\n" % HOST + get("/2"))
        assert len(rig.ups) == 1 and not peer.queue
        rig.ups[0].data_received(ok(b"one"))
        assert bodies(peer.transport) == [b"one"] and peer.transport.closed
    run(scenario)


# --- e'. inbound: an app connection fails mid-response

def test_inbound_failure_mid_response_keeps_finished_responses() -> None:
    """Three pipelined GETs. In one loop iteration: the first is answered in full (its write
    deferred: the third is still queued), then the second's app connection dies after the
    head and part of the body. The connection must be cut (the second cannot be completed),
    but not before the first, complete, response has been written."""
    async def scenario() -> None:
        rig, peer, (up1, up2, _) = three_gets_from_a_peer()
        up1.data_received(ok(b"one"))
        assert peer.transport.writes == [] and peer.flush_due   # deferred to the end of the turn
        up2.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        up2.connection_lost(ConnectionResetError())
        await turn()
        assert peer.transport.aborted
        assert peer.transport.data().startswith(ok(b"one")), peer.transport.writes
    run(scenario)


def test_inbound_failure_before_its_turn_does_not_cut_the_active_response() -> None:
    """The second of two pipelined GETs fails mid-response (its app connection dies) while
    the first is still streaming. The first response must still be delivered in full; the
    connection is cut only when it is the failed one's turn (its partial response cannot be
    completed). Before concurrent dispatch the second request was not even sent yet."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        peer.data_received(get("/1") + get("/2"))
        up1, up2 = rig.ups
        r1 = ok(b"1" * 100)
        up1.data_received(r1[:60])
        up2.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        up2.connection_lost(ConnectionResetError())
        await turn()
        assert not peer.transport.closed, "the peer connection was cut while /1 was streaming"
        up1.data_received(r1[60:])
        await turn()
        assert peer.transport.data().startswith(r1)
        assert peer.transport.closed
    run(scenario)


# --- f. inbound: requests with a body stay sequential

def test_inbound_post_behind_get_waits_and_pauses_reading() -> None:
    """A POST with a Content-Length behind an active GET is not dispatched (a GET behind the
    POST neither) and reading is paused, until the GET's response ends; then the POST is
    dispatched with its body and reading resumes once nothing undispatched is queued."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        post = b"POST /p HTTP/1.1\r\nhost: %s\r\ncontent-length: 5\r\n\r\nhello" % HOST
        peer.data_received(get("/1") + post + get("/3"))
        assert len(rig.ups) == 1
        ex1 = carried(rig.ups[0])
        ex_post, ex3 = peer.queue
        assert ex_post.method == b"POST" and not ex_post.dispatched and ex_post.upstream is None
        assert not ex3.dispatched and ex3.buf is None
        assert ex_post.body == [b"hello"]
        assert peer.transport.paused

        rig.ups[0].data_received(ok(b"one"))
        await turn()
        assert ex1.done and peer.active is ex_post
        assert rig.ups[0].ex is ex_post                  # the app connection, reused
        assert rig.ups[0].transport.writes[-1] == post
        assert peer.transport.paused                     # the GET behind it is still queued
        rig.ups[0].data_received(ok(b"posted"))
        await turn()
        assert peer.active is ex3 and not peer.transport.paused
        rig.ups[0].data_received(ok(b"three"))
        await turn()
        assert bodies(peer.transport) == [b"one", b"posted", b"three"]
    run(scenario)


def test_inbound_plaintext_is_sequential() -> None:
    """Only a TLS (peer proxy) inbound connection is concurrent: plaintext inbound and
    outbound connections keep one request in flight."""
    async def scenario() -> None:
        rig = Rig()
        plain = ServerConn(rig, rig.metrics, rig.registry, rig.loop, direction="inbound", tls=False)
        plain.connection_made(FakeT())
        out = rig.client()
        for conn in (plain, out):
            assert not conn.concurrent
            conn.data_received(get("/1") + get("/2"))
            assert len(conn.queue) == 1 and not conn.queue[0].dispatched and conn.transport.paused
        assert len(rig.ups) == 2
    run(scenario)


def test_inbound_at_most_max_concurrent_dispatched() -> None:
    """At most MAX_CONCURRENT pipelined GETs are dispatched beyond the active one; the next
    ones wait (reading paused) and are served in order afterwards."""
    async def scenario() -> None:
        rig = Rig()
        peer = rig.peer()
        n = MAX_CONCURRENT + 3
        peer.data_received(b"".join(get(f"/{i}") for i in range(n)))
        assert len(rig.ups) == MAX_CONCURRENT + 1 and peer.transport.paused
        assert sum(q.dispatched for q in peer.queue) == MAX_CONCURRENT
        for _ in range(n):
            up = next(u for u in rig.ups if u.ex is not None)
            up.data_received(ok(carried(up).target))
            await turn()
        assert bodies(peer.transport) == [f"/{i}".encode() for i in range(n)]
        assert not peer.transport.paused
    run(scenario)


# --- g. inbound: the peer leaves

def test_inbound_connection_lost_drops_dispatched_upstreams() -> None:
    """The peer proxy's connection is lost with dispatched exchanges: each unanswered one's
    app connection is aborted (its response has nowhere to go); an already answered one's
    app connection stays in the pool."""
    async def scenario() -> None:
        rig, peer, (up1, up2, up3) = three_gets_from_a_peer()
        ex1, ex2, ex3 = carried(up1), carried(up2), carried(up3)
        up3.data_received(ok(b"three"))                  # answered, buffered, app conn idle
        assert rig.pool.idle == [up3]
        peer.connection_lost(ConnectionResetError())
        assert up1.transport.aborted and up2.transport.aborted and up1.closed and up2.closed
        assert not up3.transport.closed and rig.pool.idle == [up3]
        assert ex1.done and ex2.done and ex3.done
        assert peer.active is ex1 and not peer.queue
        assert rig.pool.busy == []
        assert peer.transport.writes == []
    run(scenario)


# --- h. configuration

def test_from_env_defaults() -> None:
    """No MESH_PIPELINE_* (or empty values): depth 16, after 2, max_age 10 ms."""
    for env in ({}, {"MESH_PIPELINE_DEPTH": "", "MESH_PIPELINE_AFTER": "", "MESH_PIPELINE_MAX_AGE_MS": ""}):
        p = Pipelining.from_env(env)
        assert (p.depth, p.after, p.max_age) == (16, 2, pytest.approx(0.010))


def test_from_env_custom() -> None:
    """Custom values are taken (max age in milliseconds -> seconds); depth 1 disables."""
    p = Pipelining.from_env({"MESH_PIPELINE_DEPTH": "4", "MESH_PIPELINE_AFTER": "1",
                             "MESH_PIPELINE_MAX_AGE_MS": "25"})
    assert (p.depth, p.after, p.max_age) == (4, 1, pytest.approx(0.025))
    assert Pipelining.from_env({"MESH_PIPELINE_DEPTH": "1"}).depth == 1


BAD_ENV = [
    ("MESH_PIPELINE_DEPTH", "many"),
    ("MESH_PIPELINE_DEPTH", "1.5"),
    ("MESH_PIPELINE_DEPTH", "0"),
    ("MESH_PIPELINE_DEPTH", "-3"),
    ("MESH_PIPELINE_AFTER", "x"),
    ("MESH_PIPELINE_AFTER", "0"),
    ("MESH_PIPELINE_MAX_AGE_MS", "soon"),
    ("MESH_PIPELINE_MAX_AGE_MS", "0"),
    ("MESH_PIPELINE_MAX_AGE_MS", "-1"),
    ("MESH_PIPELINE_MAX_AGE_MS", "nan"),      # float() takes it; it would silently disable pipelining
    ("MESH_PIPELINE_MAX_AGE_MS", "inf"),
]


@pytest.mark.parametrize("name,value", BAD_ENV, ids=[f"{n}={v}" for n, v in BAD_ENV])
def test_from_env_rejects(name: str, value: str) -> None:
    """A bad value raises ValueError whose message names the variable at fault."""
    env = {"MESH_PIPELINE_DEPTH": "8", "MESH_PIPELINE_AFTER": "2", "MESH_PIPELINE_MAX_AGE_MS": "10",
           name: value}
    with pytest.raises(ValueError) as ei:
        Pipelining.from_env(env)
    assert name in str(ei.value)


# --- end to end

@dataclass
class PipeMesh:
    app: Any
    books: Any
    client: Any


@pytest.fixture(scope="module")
def pipe_mesh() -> Iterator[PipeMesh]:
    """Control plane, the test app behind a ``books`` proxy, and a client-only proxy that
    pipelines as soon as one connection to an endpoint is busy."""
    with running_mesh() as mesh:
        app = mesh.start_app()
        books = mesh.start_proxy("books", app_port=app.http, wait=False)
        # MAX_AGE a little above the default: a loaded CI box must not keep every exchange
        # in flight "too old" to pipeline behind
        client = mesh.start_proxy("client", wait=False, MESH_PIPELINE_AFTER="1",
                                  MESH_PIPELINE_MAX_AGE_MS="100")
        for p in (books, client):
            p.wait_ready()
        yield PipeMesh(app, books, client)
        tracebacks = mesh.logs_with("Traceback")
        assert not tracebacks, f"tracebacks in {tracebacks}"


@pytest.mark.timeout(60)
def test_e2e_concurrent_keepalive_gets_each_get_their_own_response(pipe_mesh: PipeMesh) -> None:
    """~200 GETs over 16 concurrent keep-alive connections through the client proxy to a
    meshed app that echoes each request's path (every 10th a download of a distinct size,
    over the inbound high-water mark): every response is its own request's, and the client
    proxy did pipeline (``outbound_http_pipelined_total`` > 0)."""
    authority = f"books.default:{pipe_mesh.app.http}"
    n_conns, per_conn = 16, 13
    start = threading.Barrier(n_conns)
    errors: list[str] = []
    done = [0] * n_conns
    block = pattern_block() * 3

    def worker(k: int) -> None:
        try:
            with Conn(pipe_mesh.client.outbound) as c:
                start.wait(10)
                for i in range(per_conn):
                    if i % 10 == 9:
                        size = 70_000 + 131 * k + i
                        r = c.request("GET", f"/download?bytes={size}", {"Host": authority})
                        if r.status != 200 or r.body != block[:size]:
                            errors.append(f"conn {k} #{i}: download {size}: {r.status}, {len(r.body)} bytes")
                    else:
                        target = f"/pipe/{k}/{i}?q={k * 1000 + i}"
                        r = c.request("GET", target, {"Host": authority})
                        got = r.json().get("path") if r.status == 200 else None
                        if got != target:
                            errors.append(f"conn {k} #{i}: asked {target}, got {r.status} {got}")
                    done[k] += 1
        except Exception as e:  # noqa: BLE001 - reported below with the others
            errors.append(f"conn {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    assert not errors, errors[:10]
    assert sum(done) == n_conns * per_conn

    pipelined = metric_sum(pipe_mesh.client.metrics(), PIPELINED)
    assert pipelined > 0, "the client proxy never pipelined"

    # /config shows the settings in force and what each busy connection carries
    status, body = pipe_mesh.client.admin_get("/config")
    assert status == 200
    cfg = json.loads(body)
    assert cfg["pipelining"] == {"depth": 16, "after": 1, "max_age_ms": 100.0}
    assert all(all(1 <= n <= 16 for n in depths) for depths in cfg["pools_busy"].values())


# --- found in review: each failed before its fix

def test_a_clients_malformed_request_does_not_cut_the_shared_connection() -> None:
    """Client B's GET is in flight on a connection with client A's GET pipelined behind it;
    A then sends a malformed request: A is answered 400 and closed, but the shared
    connection lives on and B still gets its response."""
    async def scenario() -> None:
        rig, (b, a), up = await on_one_connection("/b", "/a")
        eb = active(b)
        a.data_received(b"GET /x HTTP/1.1\r\nhost: bad host\r\n\r\n")
        assert a.transport.data().startswith(b"HTTP/1.1 400 ") and a.transport.closed
        assert not up.closed and up.ex is eb
        up.data_received(ok(b"bee") + ok(b"ay"))   # A's response is read and discarded
        assert responses(b.transport.data())[0].body == b"bee" and eb.done
        assert rig.pool.idle == [up]
    run(scenario)


def test_a_pipelined_get_that_became_the_one_in_flight_is_resent_when_the_connection_dies() -> None:
    """On a fresh connection /b rides behind /a; /a is answered, then the peer closes before
    answering /b: /b was never answered, so it is sent once more (not a 502)."""
    async def scenario() -> None:
        rig, (a, b), up = await on_one_connection("/a", "/b")
        eb = active(b)
        up.data_received(ok(b"one"))
        up.connection_lost(None)
        assert rig.retried == [(b, eb)] and b.transport.data() == b""
    run(scenario)


@pytest.mark.parametrize("how", ["graceful_close", "malformed"])
def test_held_responses_are_written_before_the_connection_closes(how: str) -> None:
    """Inbound: three pipelined GETs answered in one loop iteration wait for one deferred
    write; a shutdown (graceful_close) or a malformed request from the peer closing the
    connection first must not lose them."""
    async def scenario() -> None:
        rig, p, (u1, u2, u3) = three_gets_from_a_peer()
        for up, body in ((u1, b"one"), (u2, b"two"), (u3, b"3")):
            up.data_received(ok(body))
        assert p.flush_due and p.transport.writes == []
        if how == "graceful_close":
            p.graceful_close()
        else:
            p.data_received(b"BOGUS\r\n\r\n")
        await turn()
        got = responses(p.transport.data())
        assert [r.body for r in got[:3]] == [b"one", b"two", b"3"] and p.transport.closed
    run(scenario)


def test_a_client_paused_for_a_full_upstream_is_resumed_after_its_turn() -> None:
    """The shared connection's write buffer fills while A's GET is in flight (A is paused),
    A's response ends and B's is in flight when the buffer drains: A is resumed."""
    async def scenario() -> None:
        rig, (a, b), up = await on_one_connection("/a", "/b")
        up.pause_writing()
        assert "upstream" in a.paused
        up.data_received(ok(b"one"))
        up.resume_writing()
        assert not a.paused and not a.transport.paused
    run(scenario)


def test_a_slow_client_behind_does_not_stall_the_response_ahead_of_it() -> None:
    """B's GET is pipelined behind A's on one connection, and B stops reading (its write
    buffer passes the high-water mark). A's response, ahead of B's, must keep flowing: the
    shared connection is paused only when B's response is the one being read, and resumed
    when B reads again.

    Regression guard: ``pause_writing`` used to pause the upstream of B's exchange at once,
    so A waited for B to read."""
    async def scenario() -> None:
        rig, a, b, up = await two_on_one_connection()
        b.pause_writing()
        assert not up.transport.paused and not up.paused, "A's response is held for B's sake"
        up.data_received(ok(b"for a"))
        assert bodies(a.transport) == [b"for a"]
        assert up.ex is active(b) and up.transport.paused and up.paused == {"downstream"}
        b.resume_writing()
        assert not up.transport.paused and not up.paused
        up.data_received(ok(b"for b"))
        assert bodies(b.transport) == [b"for b"] and rig.pool.idle == [up]
    run(scenario)


def test_a_client_not_reading_pauses_the_connection_its_next_request_gets() -> None:
    """A client whose write buffer is full sends another request: the connection that
    carries it does not read the response until the client reads again (before, the pause
    ended with the previous exchange, and the next response piled up in the buffer)."""
    async def scenario() -> None:
        rig = Rig(ON)
        a = rig.client()
        a.data_received(get("/1"))
        await turn()
        up = rig.ups[0]
        up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n12")
        a.pause_writing()
        assert up.transport.paused
        up.data_received(b"345")          # (already read from the socket)
        assert rig.pool.idle == [up] and not up.transport.paused
        a.data_received(get("/2"))
        await turn()
        assert up.ex is active(a) and up.transport.paused and up.paused == {"downstream"}
        a.resume_writing()
        assert not up.transport.paused
        up.data_received(ok(b"two"))
        assert bodies(a.transport) == [b"12345", b"two"]
    run(scenario)


def test_inbound_held_response_stays_paused_when_its_turn_comes_and_the_peer_is_not_reading() -> None:
    """As above, but the peer stops reading while the first response is written: when the
    held response's turn comes its app connection stays paused (its bytes would only pile
    up in our buffer), and reads again once the peer reads."""
    async def scenario() -> None:
        peer, up1, up2, big = two_gets_the_second_answered_big_first()
        peer.pause_writing()
        up1.data_received(ok(b"one"))
        await turn()
        assert active(peer) is carried(up2) and up2.transport.paused
        peer.resume_writing()
        assert not up2.transport.paused
        up2.data_received(b"!")
        await turn()
        assert bodies(peer.transport) == [b"one", big + b"!"]
    run(scenario)


def test_no_get_is_pipelined_behind_a_connection_paused_for_a_client_not_reading() -> None:
    """Client A is not reading and sends a GET: its connection starts paused. Client C's
    GET must not be pipelined behind it (it would wait for A to read, forever if A never
    does: pipelinable GETs have no timer); it gets a connection of its own. (Found in review.)"""
    async def scenario() -> None:
        rig = Rig(ON)
        a, c = rig.client(), rig.client()
        a.pause_writing()
        a.data_received(get("/a"))
        await turn()
        up = rig.ups[0]
        assert up.transport.paused and up.paused == {"downstream"}
        c.data_received(get("/c"))
        await turn()
        assert len(rig.ups) == 2 and not up.pipe
        rig.ups[1].data_received(ok(b"for c"))
        assert bodies(c.transport) == [b"for c"]
    run(scenario)


class RetryOnce(FakeRS):
    """Retries the first response it sees (the HTTP/1 layer then drains it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def on_head(self, ex: Exchange, status: int, up: Any) -> bool:
        self.seen += 1
        return self.seen == 1


def test_a_drained_retried_response_does_not_leave_its_connection_paused() -> None:
    """The client stops reading while its response is read; that response is then retried
    (drained, not forwarded). The connection goes back to the pool reading again: the next
    request on it must not hang. (Found in review: the drain path kept the pause.)"""
    async def scenario() -> None:
        rig = Rig()
        a = rig.client()
        rig.prepare = lambda ex: setattr(ex, "rs", RetryOnce())
        a.data_received(get("/a"))
        await turn()
        up = rig.ups[0]
        up.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
        a.pause_writing()
        assert up.transport.paused
        up.data_received(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno")
        assert rig.pool.idle == [up] and not up.transport.paused and not up.paused
    run(scenario)
