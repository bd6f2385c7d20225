"""The in-process cost of a meshed request: the real outbound and inbound proxies' Python
path, with no sockets, no TLS and no kernel in the way.

    python -m perf.inproc [--requests 100000] [--concurrency 32] [--rounds 5]
    python -m perf.inproc --calls | --bytecodes | --profile [--sort tottime --top 40]

Two real ``Proxy`` objects (a client's and an app's) are wired over fake transports:
client connections -> the client proxy's outbound listener (``ServerConn`` + ``Outbound``)
-> its pooled upstream connections -> the app proxy's inbound ``ServerConn`` (as if over
mTLS: the peer identity is the client's) -> ``Inbound`` -> pooled app connections -> a fake
app answering like nginx ``return 200 "ok"``. The bytes each side writes are delivered to
the other side's ``data_received`` by a pump that also lets the loop run its ``call_soon``
callbacks, so batching and HTTP/1.1 pipelining between the proxies happen as in production
(``--concurrency`` client connections each keep one request in flight, like ``wrk -c``).

It reports the time per request for both proxies together (the Python path only: what the
bench's "user" CPU column holds minus uvloop's and OpenSSL's share), the function calls per
request (``--calls``), the bytecodes executed per request by function (``--bytecodes``), or a
cProfile of the run (``--profile``). Times are as noisy as the machine; for a before/after
comparison that is not, count instructions with valgrind (perf/README.md shows how).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections import deque
from typing import Any

import uvloop

from microproxy.config import Config
from microproxy.discovery import Resolution
from microproxy.downstream import ServerConn
from microproxy.profiles import Profile, _empty
from microproxy.proxy import Proxy
from microproxy.upstream import UpstreamConn

APP_PORT = 18080
AUTH = f"app.default:{APP_PORT}"
CLIENT_ID = "loadgen.default.serviceaccount.identity.cluster.local"
SERVER_ID = "app.default.serviceaccount.identity.cluster.local"
REQUEST = b"GET / HTTP/1.1\r\nHost: " + AUTH.encode() + b"\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 08 Dec 2026 00:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class FakeSSL:
    def getpeercert(self) -> dict[str, Any]:
        return {"subjectAltName": (("DNS", CLIENT_ID),)}


class Wire:
    """Bytes written on one side, waiting for ``Pump.run`` to hand them to the other."""

    def __init__(self, pump: "Pump", ssl_object: Any = None) -> None:
        self.pump = pump
        self.peer: Any = None          # the protocol (or FakeApp) that reads what we write
        self.ssl_object = ssl_object
        self.closed = False

    # the asyncio.Transport surface the proxy uses
    def write(self, data: bytes) -> None:
        self.pump.pending.append((self.peer, bytes(data)))

    def set_write_buffer_limits(self, *a: Any) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl_object
        if name == "peername":
            return ("127.0.0.1", 40000)
        return default

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeApp:
    """nginx ``return 200 "ok"``: one response per request head (requests have no body)."""

    def __init__(self, pump: "Pump") -> None:
        self.pump = pump
        self.conn: Any = None
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.pump.pending.append((self.conn, RESPONSE * n))


class Client:
    """One wrk connection: one request in flight, the next sent when its response is in."""

    def __init__(self, rig: "Rig") -> None:
        self.rig = rig
        self.conn: Any = None
        self.got = 0

    def data_received(self, data: bytes) -> None:
        n = data.count(b"HTTP/1.1 200 ")
        if n != 1 or not data.endswith(b"ok"):
            raise AssertionError(f"unexpected response: {data[:200]!r}")
        self.got += 1
        self.rig.done += 1
        if self.rig.sent < self.rig.total:
            self.rig.sent += 1
            self.rig.pump.pending.append((self.conn, REQUEST))


class Pump:
    def __init__(self) -> None:
        self.pending: deque[tuple[Any, bytes]] = deque()

    async def run(self, until: Any) -> None:
        pending = self.pending
        while not until():
            while pending:
                proto, data = pending.popleft()
                proto.data_received(data)
            await asyncio.sleep(0)   # call_soon work: pipelined heads, deferred flushes
            if not pending and not until():
                await asyncio.sleep(0)
                if not pending:
                    raise RuntimeError("stalled: nothing in flight")


def config(**kw: Any) -> Config:
    return Config(identity_addr=("127.0.0.1", 1), destination_addr=("127.0.0.1", 2), trust_pem=b"",
                  token="", **kw)


class Rig:
    def __init__(self, loop: asyncio.AbstractEventLoop, total: int, concurrency: int) -> None:
        self.loop, self.total, self.concurrency = loop, total, concurrency
        self.sent = self.done = 0
        self.pump = Pump()
        self.client_proxy = cp = Proxy(config(workload="loadgen", service_account="loadgen",
                                              instance="loadgen-0", register=False), loop)
        self.app_proxy = ap = Proxy(config(workload="app", service_account="app", instance="app-0",
                                           app_port=APP_PORT, register=False), loop)
        # the client proxy knows the service, its (empty) routes and its one endpoint
        res = cp.discovery.resolutions[AUTH] = Resolution(AUTH, loop)
        res.apply({"version": 1, "exists": True, "authority": AUTH, "endpoints": [
            {"address": "127.0.0.2:4143", "identity": SERVER_ID,
             "labels": {"workload": "app", "namespace": "default", "pod": "app-0"}}]})
        prof = cp.profiles.profiles[AUTH] = Profile(AUTH, loop)
        prof.install(_empty(AUTH), 1, "app.default")
        ap.authz.apply({"version": 1, "policies": []})
        # the peer connection between the proxies and the app connections are fakes
        pool = cp.outbound.pool(res.endpoints[0])
        pool._connect = self._connect_peer
        assert ap.inbound.app_pool is not None
        ap.inbound.app_pool._connect = self._connect_app
        self.peer_conns = 0
        self.clients = [self._client() for _ in range(concurrency)]

    def _client(self) -> Client:
        c = Client(self)
        t = Wire(self.pump)
        t.peer = c
        conn = ServerConn(self.client_proxy.outbound, self.client_proxy.metrics, self.client_proxy.conns,
                          self.loop, "outbound")
        conn.connection_made(t)
        c.conn = conn
        return c

    async def _connect_peer(self, pool: Any) -> UpstreamConn:
        self.peer_conns += 1
        up = UpstreamConn(pool)
        down = ServerConn(self.app_proxy.inbound, self.app_proxy.metrics, self.app_proxy.conns,
                          self.loop, "inbound", tls=True)
        t_up, t_down = Wire(self.pump), Wire(self.pump, FakeSSL())
        t_up.peer, t_down.peer = down, up
        up.connection_made(t_up)
        down.connection_made(t_down)
        return up

    async def _connect_app(self, pool: Any) -> UpstreamConn:
        up = UpstreamConn(pool)
        app = FakeApp(self.pump)
        t = Wire(self.pump)
        t.peer, app.conn = app, up
        up.connection_made(t)
        return up

    async def run(self, n: int) -> float:
        """Send ``n`` more requests (``concurrency`` at a time); returns the seconds taken."""
        self.total = self.sent + n
        target = self.done + n
        t0 = time.perf_counter()
        for c in self.clients:
            if self.sent < self.total:
                self.sent += 1
                self.pump.pending.append((c.conn, REQUEST))
        await self.pump.run(lambda: self.done >= target)
        return time.perf_counter() - t0


    def counts(self) -> dict[str, float]:
        """What the two proxies counted: requests out, pipelined, requests in over "mTLS"."""
        cm, am = self.client_proxy.metrics, self.app_proxy.metrics
        return {
            "outbound_requests": sum(c[0] for c in cm.requests.values()),
            "pipelined": sum(c[0] for (name, _), c in cm.counters.items()
                             if name == "outbound_http_pipelined_total"),
            "inbound_mtls_requests": sum(c[0] for k, c in am.requests.items()
                                         if 'tls="true"' in k and f'client_id="{CLIENT_ID}"' in k),
            "inbound_responses": sum(r.count for (k, _, _), r in am.responses.items()),
            "peer_connections": self.peer_conns,
        }


class CallCounter:
    def __init__(self) -> None:
        self.py = 0
        self.c = 0

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.py += 1
        elif event == "c_call":
            self.c += 1


class BytecodeCounter:
    """A tracer counting the bytecodes each function executes."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            co = frame.f_code
            k = ("/".join(co.co_filename.rsplit("/", 2)[-2:]), co.co_name)
            self.counts[k] = self.counts.get(k, 0) + 1
        return self


async def main(a: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    rig = Rig(loop, 0, a.concurrency)
    await rig.run(max(2000, a.concurrency * 50))   # warm-up: pools, caches, windows
    if a.calls:
        cc = CallCounter()
        sys.setprofile(cc)
        await rig.run(a.requests)
        sys.setprofile(None)
        print(f"{a.requests} requests, concurrency {a.concurrency}: "
              f"{cc.py / a.requests:.1f} Python calls and {cc.c / a.requests:.1f} C calls per request "
              f"(both proxies, plus the rig's own)")
        return 0
    if a.bytecodes:
        bc = BytecodeCounter()
        sys.settrace(bc)
        await rig.run(a.requests)
        sys.settrace(None)
        total = sum(bc.counts.values())
        print(f"{total / a.requests:.0f} bytecodes per request (both proxies, plus the rig's own), by function:")
        for (path, name), n in sorted(bc.counts.items(), key=lambda kv: -kv[1])[:a.top]:
            print(f"{n / a.requests:8.1f}  {path}:{name}")
        return 0
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        await rig.run(a.requests)
        prof.disable()
        st = pstats.Stats(prof)
        st.sort_stats(a.sort).print_stats(a.top)
        return 0
    best = None
    for _ in range(a.rounds):
        secs = await rig.run(a.requests)
        best = secs if best is None else min(best, secs)
    assert best is not None
    c = rig.counts()
    print(f"{best / a.requests * 1e6:.2f} µs per request through both proxies in-process "
          f"(best of {a.rounds} x {a.requests}, concurrency {a.concurrency}; {c['peer_connections']} peer "
          f"connections; {c['outbound_requests']} requests counted, {c['pipelined']:.0f} pipelined)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m perf.inproc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (default tottime)")
    ap.add_argument("--top", type=int, default=40, help="functions shown by --profile and --bytecodes")
    ap.add_argument("--bytecodes", action="store_true", help="count bytecodes per request, by function")
    ap.add_argument("--calls", action="store_true", help="count function calls per request")
    a = ap.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.rounds < 1:
        ap.error("--requests, --concurrency and --rounds must be positive")
    return a


def run(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return uvloop.run(main(a))


if __name__ == "__main__":
    sys.exit(run())
