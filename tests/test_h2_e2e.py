"""HTTP/2 and gRPC end to end: a real grpcio client and real grpcio servers through two
proxies over mTLS (ALPN h2).

grpc client --h2c, :authority greeter.default:P--> client proxy (outbound)
    --mTLS h2, per-request P2C--> greeter proxy 0|1|2 (inbound) --h2c--> grpcio server 0|1|2

The three greeter replicas answer their own name, which shows that calls on ONE client
channel (one HTTP/2 connection) are balanced per request. The servers run in this process
(grpc.server threads); the control plane and proxies are subprocesses (tests/harness.py).
"""
from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from tests.test_tracing_e2e import Collector, by_kind  # noqa: E402
from tests.harness import (HOST, Mesh, ProxyProc, metric_sum, running_mesh,  # noqa: E402
                           wait_until)

SERVICE = "mesh.Greeter"
N_REPLICAS = 3


def _ident(b: bytes) -> bytes:
    return b


class Greeter:
    """Generic handlers (no protoc): messages are raw bytes."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.seen_client_ids: list[str] = []

    def who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        self.seen_client_ids.append(md.get("x-mesh-client-id", ""))
        return self.name

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request or b"0")):
            yield b"%s:%d" % (self.name, i)

    def big(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        n, size = (int(v) for v in request.split(b"x"))
        block = bytes(range(256)) * (size // 256)
        for _ in range(n):
            yield block

    def sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = n = 0
        for r in requests:
            total += len(r)
            n += 1
        return b"%d/%d" % (n, total)

    def echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield self.name + b"|" + r

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNAVAILABLE, "replica says no")
        return b""  # not reached

    def handler(self) -> grpc.GenericRpcHandler:
        kw = {"request_deserializer": _ident, "response_serializer": _ident}
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Who": grpc.unary_unary_rpc_method_handler(self.who, **kw),
            "Count": grpc.unary_stream_rpc_method_handler(self.count, **kw),
            "Big": grpc.unary_stream_rpc_method_handler(self.big, **kw),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum, **kw),
            "Echo": grpc.stream_stream_rpc_method_handler(self.echo, **kw),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail, **kw),
        })


@dataclass
class World:
    mesh: Mesh
    servers: list[grpc.Server]
    greeters: list[Greeter]
    proxies: list[ProxyProc]
    client: ProxyProc
    port: int

    @property
    def authority(self) -> str:
        return f"greeter.default:{self.port}"

    def channel(self, authority: str | None = None) -> grpc.Channel:
        return grpc.insecure_channel(f"{HOST}:{self.client.outbound}", options=[
            ("grpc.default_authority", authority or self.authority), ("grpc.enable_http_proxy", 0)])


def _resolved(proxy: ProxyProc, authority: str) -> int:
    status, body = proxy.admin_get("/config")
    if status != 200:
        return 0
    r = json.loads(body)["resolutions"].get(authority)
    return len(r["endpoints"]) if r else 0


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    servers, greeters, ports = [], [], []
    for i in range(N_REPLICAS):
        g = Greeter(f"greeter-{i}")
        s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        s.add_generic_rpc_handlers((g.handler(),))
        ports.append(s.add_insecure_port(f"{HOST}:0"))
        s.start()
        servers.append(s)
        greeters.append(g)
    try:
        with running_mesh() as mesh:
            proxies = [mesh.start_proxy("greeter", app_port=p, wait=False, MESH_SERVICE_PORT=str(ports[0]),
                                        MESH_INSTANCE=f"greeter-{i}") for i, p in enumerate(ports)]
            client = mesh.start_proxy("client", wait=False, MESH_FAILFAST_TIMEOUT="1")
            for p in (*proxies, client):
                p.wait_ready()
            w = World(mesh, servers, greeters, proxies, client, ports[0])
            # the client proxy learns every replica (a first call starts the watch)
            with w.channel() as ch:
                ch.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10)
            wait_until(lambda: _resolved(client, w.authority) == N_REPLICAS, 10, "greeter endpoints")
            yield w
            tracebacks = mesh.logs_with("Traceback")
            assert not tracebacks, f"tracebacks in {tracebacks}"
    finally:
        for s in servers:
            s.stop(0)


def test_unary_balanced_per_request_on_one_connection(world: World) -> None:
    with world.channel() as ch:
        who = ch.unary_unary(f"/{SERVICE}/Who")
        names = Counter(who(b"", timeout=10).decode() for _ in range(60))
    # Sequential calls on one connection go to more than one replica: balanced per request.
    # (Not necessarily all three: P2C over peak-EWMA keeps preferring the replicas already
    # measured fast over one still at the 30 ms default; concurrency spreads them, below.)
    # (Each unmeasured replica is probed once, so a count of 1 is the probe: what shows
    # per-request balancing is that at least two replicas carry real traffic.)
    assert len(names) >= 2 and sorted(names.values())[-2] >= 3, \
        (names, json.loads(world.client.admin_get("/config")[1])["balancer"])
    # the client's identity reached the apps (inbound adds x-mesh-client-id over mTLS)
    ids = {i for g in world.greeters for i in g.seen_client_ids}
    assert "client.default.serviceaccount.identity.cluster.local" in ids


def test_server_streaming(world: World) -> None:
    with world.channel() as ch:
        msgs = list(ch.unary_stream(f"/{SERVICE}/Count")(b"50", timeout=10))
    assert len(msgs) == 50
    name = msgs[0].split(b":")[0]
    assert msgs == [b"%s:%d" % (name, i) for i in range(50)]


def test_server_streaming_large_through_flow_control(world: World) -> None:
    """64 MiB in 1 MiB messages: far beyond every HTTP/2 window on the path."""
    with world.channel() as ch:
        total = 0
        for m in ch.unary_stream(f"/{SERVICE}/Big")(b"64x1048576", timeout=60):
            assert m[:4] == bytes(range(4))
            total += len(m)
    assert total == 64 * 1048576


def test_client_streaming(world: World) -> None:
    def gen() -> Iterator[bytes]:
        for i in range(200):
            yield b"x" * (i * 100)
    with world.channel() as ch:
        out = ch.stream_unary(f"/{SERVICE}/Sum")(gen(), timeout=20)
    assert out == b"200/%d" % sum(i * 100 for i in range(200))


def test_bidi_streaming(world: World) -> None:
    with world.channel() as ch:
        replies = list(ch.stream_stream(f"/{SERVICE}/Echo")(iter([b"a", b"b" * 70000, b"c"]), timeout=10))
    assert [r.split(b"|", 1)[1] for r in replies] == [b"a", b"b" * 70000, b"c"]
    assert len({r.split(b"|", 1)[0] for r in replies}) == 1  # one stream, one replica


def test_bidi_interleaved(world: World) -> None:
    """Each reply is read before the next request is sent: nothing waits for END_STREAM."""
    import queue
    q: queue.Queue[bytes | None] = queue.Queue()

    def gen() -> Iterator[bytes]:
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    with world.channel() as ch:
        call = ch.stream_stream(f"/{SERVICE}/Echo")(gen(), timeout=20)
        for i in range(20):
            q.put(b"m%d" % i)
            assert next(call).endswith(b"|m%d" % i)
        q.put(None)
        assert list(call) == []


def test_grpc_status_failure_is_counted(world: World) -> None:
    with world.channel() as ch:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == "replica says no"
    text = world.client.metrics()
    # HTTP 200 with grpc-status 14: a failure, and grpc_status is a label
    assert metric_sum(text, "response_total", direction="outbound", authority=world.authority,
                      status_code="200", grpc_status="14", classification="failure") >= 5
    assert metric_sum(text, "response_total", direction="outbound", authority=world.authority,
                      grpc_status="0", classification="success") >= 1
    inbound = sum(metric_sum(p.metrics(), "response_total", direction="inbound", grpc_status="14",
                             classification="failure") for p in world.proxies)
    assert inbound >= 5

    def stat_failures() -> int:   # /stats (what `mesh stat` reads) counts whole seconds only
        status, body = world.client.admin_get("/stats?window=60")
        rows = [r for r in json.loads(body)["outbound"] if r.get("authority") == world.authority]
        return sum(r["failure"] for r in rows)
    wait_until(lambda: stat_failures() >= 5, 5, "failures in /stats")


def test_proxy_made_unavailable_for_unknown_service(world: World) -> None:
    with world.channel("nosuch.default:9999") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nosuch.default:9999" in e.value.details()


def test_many_concurrent_calls_one_channel(world: World) -> None:
    """More streams in flight than one connection's 100 concurrent streams."""
    with world.channel() as ch:
        who = ch.unary_unary(f"/{SERVICE}/Who")
        calls = [who.future(b"", timeout=20) for _ in range(300)]
        names = Counter(c.result().decode() for c in calls)
    assert sum(names.values()) == 300 and len(names) == N_REPLICAS, names


def test_http1_still_served_on_the_outbound_listener(world: World) -> None:
    """The HTTP/2 detection leaves HTTP/1 alone: an HTTP/1 request to an h2-only app gets
    the proxies' usual answer path (here: the app rejects HTTP/1, so a 502/503-class error)."""
    with socket.create_connection((HOST, world.client.outbound), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: nosuch.default:9999\r\n\r\n")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 503"), data


def test_h2c_straight_to_inbound(world: World) -> None:
    """A plaintext (non-meshed) gRPC client on the inbound port: h2c detected there too."""
    p = world.proxies[1]
    with grpc.insecure_channel(f"{HOST}:{p.inbound}", options=[
            ("grpc.default_authority", world.authority), ("grpc.enable_http_proxy", 0)]) as ch:
        assert ch.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10) == b"greeter-1"
    text = p.metrics()
    assert metric_sum(text, "request_total", direction="inbound", tls="no_identity") >= 1


def test_slow_reader_keeps_proxy_memory_flat(world: World) -> None:
    """A client that reads a 64 MiB stream slowly: the proxies hold at most their windows."""
    from tests.harness import RssSampler
    with RssSampler([world.client, *world.proxies]) as rss, world.channel() as ch:
        it = ch.unary_stream(f"/{SERVICE}/Big")(b"64x1048576", timeout=60)
        total = 0
        for i, m in enumerate(it):
            total += len(m)
            if i < 8:
                time.sleep(0.25)   # the slow reader is the point of this test
    assert total == 64 * 1048576
    growth = rss.growth_kb()
    assert all(g < 30 * 1024 for g in growth.values()), growth


def test_no_tracebacks_yet(world: World) -> None:
    assert not world.mesh.logs_with("Traceback"), [p.log_tail() for p in (world.client, *world.proxies)]


if os.environ.get("MESH_H2_DEBUG"):  # pragma: no cover - local debugging aid
    print("h2 e2e debug on")


# --- limits, with a raw HTTP/2 client (the h2 library on a socket)

def _raw_h2(port: int) -> tuple[socket.socket, "Any"]:
    import h2.config
    import h2.connection
    s = socket.create_connection((HOST, port), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def _events_until(s: socket.socket, c: "Any", want: type, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    seen: list = []
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        seen += c.receive_data(data)
        out = c.data_to_send()
        if out:
            try:
                s.sendall(out)
            except OSError:
                break
        if any(isinstance(e, want) for e in seen):
            break
    return seen


def _req(w: World, method: str = "Who") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", f"/{SERVICE}/{method}".encode()),
            (b":authority", w.authority.encode()), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")]


def test_limits_are_advertised(world: World) -> None:
    from h2.events import RemoteSettingsChanged
    from h2.settings import SettingCodes
    s, c = _raw_h2(world.client.outbound)
    with s:
        ev = [e for e in _events_until(s, c, RemoteSettingsChanged) if isinstance(e, RemoteSettingsChanged)]
    assert ev
    changed = ev[0].changed_settings
    assert changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 100
    assert changed[SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 60 * 1024


def test_rapid_reset_closes_the_connection(world: World) -> None:
    from h2.errors import ErrorCodes
    from h2.events import ConnectionTerminated
    s, c = _raw_h2(world.client.outbound)
    with s:
        for _ in range(150):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, _req(world))
            c.reset_stream(sid, ErrorCodes.CANCEL)
            s.sendall(c.data_to_send())
        ev = [e for e in _events_until(s, c, ConnectionTerminated) if isinstance(e, ConnectionTerminated)]
    assert ev and ev[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM, (ev, world.client.log_tail(15))
    assert "rapid reset" in world.client.log_text()


def test_ping_flood_closes_the_connection(world: World) -> None:
    from h2.errors import ErrorCodes
    from h2.events import ConnectionTerminated
    s, c = _raw_h2(world.client.outbound)
    with s:
        for i in range(1000):
            c.ping(b"%08d" % i)
        s.sendall(c.data_to_send())
        ev = [e for e in _events_until(s, c, ConnectionTerminated) if isinstance(e, ConnectionTerminated)]
    assert ev and ev[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM, ev


def test_reader_that_never_reads_holds_only_a_window(world: World) -> None:
    """A client opens a 64 MiB stream and never grants window: the proxies hold at most their
    windows (the server is stopped by withheld WINDOW_UPDATEs), not the stream."""
    from h2.events import DataReceived
    from tests.harness import RssSampler
    body = b"64x1048576"
    msg = b"\x00" + len(body).to_bytes(4, "big") + body
    with RssSampler([world.client, *world.proxies]) as rss:
        s, c = _raw_h2(world.client.outbound)
        with s:
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, _req(world, "Big"))
            c.send_data(sid, msg, end_stream=True)
            s.sendall(c.data_to_send())
            got = sum(len(e.data) for e in _events_until(s, c, type(None), timeout=2.0)
                      if isinstance(e, DataReceived))
    assert got <= 65535, got   # our window (never acknowledged)
    growth = rss.growth_kb()
    assert all(g < 8 * 1024 for g in growth.values()), growth


def test_h2load_many_streams_through_the_mesh(world: World, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """h2load (nghttp2-client): 4 connections x 10 streams each, unary gRPC calls."""
    import shutil
    import subprocess
    if shutil.which("h2load") is None:
        pytest.skip("h2load (apt nghttp2-client) is not installed")
    body = tmp_path / "empty.grpc"
    body.write_bytes(b"\x00\x00\x00\x00\x00")   # one gRPC message of 0 bytes
    r = subprocess.run(["h2load", "-n", "3000", "-c", "4", "-m", "10", "-d", str(body),
                        "-H", f":authority: {world.authority}", "-H", "content-type: application/grpc",
                        "-H", "te: trailers", f"http://{HOST}:{world.client.outbound}/{SERVICE}/Who"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3000 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
    assert "status codes: 3000 2xx" in r.stdout, r.stdout


class TapStream:
    """A streamed ``/tap`` subscription on a proxy's admin port (what ``mesh tap`` reads);
    a thread reads its JSON lines into a queue."""

    def __init__(self, proxy: ProxyProc, path: str) -> None:
        self.conn = http.client.HTTPConnection(HOST, proxy.admin, timeout=30)
        self.conn.request("GET", f"/tap?max_rps=1000&path={path}")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while line := self.resp.readline():
                self.lines.put(line)
        except (OSError, ValueError, http.client.HTTPException):
            pass   # closed by the test

    def events(self, until: Callable[[list[dict]], bool], poke: Callable[[], None]) -> list[dict]:
        """Events until ``until(events)``; ``poke()`` makes traffic, again whenever a second
        passes with nothing (the subscription may not have been registered yet)."""
        got: list[dict] = []
        deadline = time.monotonic() + 15
        while not until(got):
            assert time.monotonic() < deadline, got
            poke()
            try:
                while not until(got):
                    got.append(json.loads(self.lines.get(timeout=1.0)))
            except queue.Empty:
                continue
        return got

    def close(self) -> None:
        self.conn.close()


def test_tap_sees_grpc_calls_both_ways(world: World) -> None:
    """``/tap`` (``mesh tap``) shows HTTP/2 streams as it shows HTTP/1 requests: a req, rsp
    and end event per gRPC call, with method, :path, the peers and the grpc-status, on the
    client's proxy (outbound) and on the server's (inbound)."""
    taps = [TapStream(world.client, f"/{SERVICE}/Fail")] + \
        [TapStream(p, f"/{SERVICE}/Fail") for p in world.proxies]

    def call() -> None:
        with world.channel() as ch:
            with pytest.raises(grpc.RpcError):
                ch.unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10)

    def ended(events: list[dict]) -> bool:
        return any(e["type"] == "end" for e in events)

    try:
        out = taps[0].events(ended, call)
        req = next(e for e in out if e["type"] == "req")
        assert req["direction"] == "outbound" and req["method"] == "POST"
        assert req["path"] == f"/{SERVICE}/Fail" and req["authority"] == world.authority
        assert req["dst"]["workload"] == "greeter" and req["tls"] is True
        rsp = next(e for e in out if e["type"] == "rsp" and e["id"] == req["id"])
        end = next(e for e in out if e["type"] == "end" and e["id"] == req["id"])
        assert rsp["status"] == 200 and end["grpc_status"] == 14
        # inbound: the replica that served the next call saw it, from the client's identity
        seen: list[dict] = []
        deadline = time.monotonic() + 15
        while not ended(seen):
            assert time.monotonic() < deadline, seen
            call()
            for tap in taps[1:]:
                try:
                    while True:
                        seen.append(json.loads(tap.lines.get(timeout=0.5)))
                except queue.Empty:
                    pass
        inbound = next(e for e in seen if e["type"] == "req")
        assert inbound["direction"] == "inbound"
        assert inbound["src"]["identity"] == "client.default.serviceaccount.identity.cluster.local"
        assert next(e for e in seen if e["type"] == "end")["grpc_status"] == 14
    finally:
        for tap in taps:
            tap.close()


# --- tracing of gRPC calls

TRACE = "5bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def traced_grpc() -> Iterator[tuple[Collector, ProxyProc, str]]:
    """One greeter behind a proxy and a client proxy, both exporting spans to a collector."""
    collector = Collector()
    g = Greeter("traced")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((g.handler(),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        with running_mesh() as mesh:
            on = {"MESH_TRACE_COLLECTOR": collector.url}
            procs = [mesh.start_proxy("tgreeter", app_port=port, wait=False, **on),
                     mesh.start_proxy("tclient", wait=False, **on)]
            for p in procs:
                p.wait_ready()
            yield collector, procs[1], f"tgreeter.default:{port}"
            tracebacks = mesh.logs_with("Traceback")
            assert not tracebacks, f"tracebacks in {tracebacks}"
    finally:
        server.stop(0)
        collector.close()


def test_grpc_calls_are_traced_across_both_proxies(traced_grpc: tuple[Collector, ProxyProc, str]) -> None:
    """A gRPC call with a W3C traceparent gets a CLIENT span on the client's proxy and a
    SERVER span (its child) on the server's, named after the method and :path; a call that
    fails with a gRPC status marks both spans as failed and records the status."""
    collector, client, authority = traced_grpc
    with grpc.insecure_channel(f"{HOST}:{client.outbound}", options=[
            ("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]) as ch:
        ch.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10,
                                         metadata=(("traceparent", f"00-{TRACE}-{PARENT}-01"),))
        failing = "6bf92f3577b34da6a3ce929d0e0e4736"
        with pytest.raises(grpc.RpcError):
            ch.unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10,
                                              metadata=(("traceparent", f"00-{failing}-{PARENT}-01"),))
    out, inb = by_kind(collector.wait_trace(TRACE, 2))
    assert out["parentSpanId"] == PARENT and inb["parentSpanId"] == out["spanId"]
    for span in (out, inb):
        assert span["name"] == f"POST /{SERVICE}/Who"
        assert span["attrs"]["http.status_code"] == 200 and span["attrs"]["rpc.grpc.status_code"] == 0
        assert span["status"] == {}
    assert out["attrs"]["dst_workload"] == "tgreeter" and inb["attrs"]["client_id"].startswith("tclient.")
    for span in by_kind(collector.wait_trace(failing, 2)):
        assert span["attrs"]["rpc.grpc.status_code"] == 14 and span["status"]["code"] == 2
