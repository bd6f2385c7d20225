"""An in-process rig for Outbound2 (microproxy/h2outbound.py): a real h2 client talks to an
H2ServerConn routed by a real Outbound2 with a real RouteRouter and route table; the
upstream is a pooled H2ClientConn over a fake transport, answered by a real h2 server
connection. Nothing touches a socket; ``pump()`` moves the bytes until all is quiet.
(Written for the review of HTTP/2 routes; tests/test_h2_routes_unit.py uses it.)"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import h2.config
import h2.connection
import h2.events

from microproxy import resilience
from microproxy.core.httproute import parse_httproute
from microproxy.core.routing import RouteTable
from microproxy.h2ends import H2ClientConn, H2Pool, H2ServerConn
from microproxy.h2outbound import Outbound2
from microproxy.metrics import Metrics, labels
from microproxy.profiles import Profile
from microproxy.routes import RouteRouter

AUTH = "g.default:8080"
ADDR = ("10.0.0.1", 4143)


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> bytes:
        d = bytes(self.data)
        self.data.clear()
        return d

    def set_write_buffer_limits(self, *a: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def httproute(rules: list[dict[str, Any]], annotations: dict[str, str] | None = None) -> Any:
    return parse_httproute({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                            "metadata": {"name": "g-split", "namespace": "default",
                                         "annotations": annotations or {}},
                            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "g",
                                                     "port": 8080}], "rules": rules}})


class Res:
    def __init__(self, authority: str, ep: Any) -> None:
        self.authority = authority
        self.exists = True
        self.endpoints = [ep]
        self.svc = resilience.Service(authority)
        self.ep = ep

    def pick(self) -> Any:
        from microproxy import clock
        b = self.ep.lb.breaker
        return self.ep if b is None or b.ready(clock.monotonic()) else None


class Rig:
    """``routes``: the HTTPRoutes of ``g.default:8080`` (None: its profile never arrives).
    The service's settings are resilience.settings() when the rig is built."""

    def __init__(self, routes: list[Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.metrics = Metrics(labels(namespace="default", workload="client"))
        prof = Profile(AUTH, self.loop)
        if routes is not None:   # None: the profile never arrives (table None, not ready)
            prof.install(RouteTable("g", "default", 8080, routes), 1, "g.default")
        self.prof = prof
        self.ep = SimpleNamespace(addr=ADDR, identity="g.default.sa", labels={},
                                  metric_key=labels(direction="outbound", authority=AUTH),
                                  lb=resilience.new_endpoint(0.0))
        self.res: dict[str, Res] = {}
        proxy = self.proxy = SimpleNamespace(
            loop=self.loop, metrics=self.metrics, tracer=None, tap=SimpleNamespace(subs=[]),
            cfg=SimpleNamespace(failfast_timeout=0.5, connect_timeout=1.0),
            profiles=SimpleNamespace(get=lambda auth: prof),
            discovery=SimpleNamespace(get=self.resolve),
            spawn=lambda coro: self.loop.create_task(coro))
        proxy.outbound = SimpleNamespace(proxy=proxy)
        proxy.outbound.routing = RouteRouter(proxy.outbound)
        self.router = Outbound2(proxy)
        # the downstream: a real h2 client -> H2ServerConn
        old = SimpleNamespace(loop=self.loop, metrics=self.metrics, registry=set(), direction="outbound",
                              tls=False, peer_id=None, tcp_key="")
        self.srv = H2ServerConn(self.router, old)
        self.down_t = FakeTransport()
        self.srv.adopt(self.down_t)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        # the upstream: a pooled H2ClientConn <-> a real h2 server
        pool = H2Pool(connect=None)
        self.up = H2ClientConn(self.loop, pool)
        self.up_t = FakeTransport()
        self.up.connection_made(self.up_t)
        pool.conns.append(self.up)
        self.router.pools[(ADDR, self.ep.identity)] = pool
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []
        self.pump()

    def resolve(self, auth: str) -> Res:
        r = self.res.get(auth)
        if r is None:
            r = self.res[auth] = Res(auth, self.ep)
        return r

    def pump(self) -> None:
        for _ in range(10):
            moved = False
            d = self.client.data_to_send()
            if d:
                moved = True
                self.srv.data_received(d)
            d = self.down_t.take()
            if d:
                moved = True
                self.client_events += self.client.receive_data(d)
            d = self.up_t.take()
            if d:
                moved = True
                self.server_events += self.server.receive_data(d)
            d = self.server.data_to_send()
            if d:
                moved = True
                self.up.data_received(d)
            if not moved:
                return

    def request(self, sid: int, path: str = "/mesh.Greeter/Who", grpc: bool = True,
                extra: list[tuple[str, str]] = (), end: bool = True) -> None:
        h = [(":method", "POST" if grpc else "GET"), (":path", path), (":scheme", "http"),
             (":authority", AUTH)]
        if grpc:
            h += [("content-type", "application/grpc"), ("te", "trailers")]
        h += list(extra)
        self.client.send_headers(sid, h, end_stream=end)
        self.pump()

    def upstream_requests(self) -> list[Any]:
        return [e for e in self.server_events if isinstance(e, h2.events.RequestReceived)]

    def client_of(self, cls: type) -> list[Any]:
        return [e for e in self.client_events if isinstance(e, cls)]

    def pending(self, auth: str = AUTH) -> int:
        return self.resolve(auth).svc.admission.pending


def run(scenario: Any) -> None:
    async def main() -> None:
        await asyncio.wait_for(scenario(), 10)
    asyncio.run(main())
