"""Tracing end to end: two traced proxies (client -> books) export OTLP/HTTP JSON to a small
collector in this process; the spans must link up across the hops. A second pair points at a
collector that is not running: requests must not notice.

caller span S --> client proxy CLIENT span --> books proxy SERVER span --> app (traceparent
naming the SERVER span as its parent)
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from microproxy.otlp import Client
from tests.harness import (HOST, AppProc, Conn, Mesh, ProxyProc, identity_of, metric_sum, running_mesh,
                           wait_until)

T = "4bf92f3577b34da6a3ce929d0e0e4736"
S = "00f067aa0ba902b7"
SPAN_WAIT = 10.0   # spans are exported every second


class Collector:
    """An OTLP/HTTP JSON receiver on loopback, served by a thread; keeps every span with its
    resource attributes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[dict[str, Any]] = []
        self.posts = 0
        self.connections = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as a real collector

            def setup(self) -> None:
                super().setup()
                with collector.lock:
                    collector.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                ok = self.path == "/v1/traces" and self.headers["content-type"] == "application/json"
                if ok:
                    collector.add(json.loads(body))
                reply = b"{}" if ok else b'{"error": "want application/json on /v1/traces"}'
                try:
                    self.send_response(200 if ok else 400)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the proxy gave up waiting (its export timeout) or is shutting down

            def log_message(self, *args: Any) -> None:
                pass  # quiet

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/v1/traces"

    def add(self, req: dict[str, Any]) -> None:
        with self.lock:
            self.posts += 1
            for rs in req["resourceSpans"]:
                resource = {a["key"]: _value(a["value"]) for a in rs["resource"]["attributes"]}
                for ss in rs["scopeSpans"]:
                    for span in ss["spans"]:
                        self.spans.append({**span, "resource": resource,
                                           "attrs": {a["key"]: _value(a["value"]) for a in span["attributes"]}})

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["traceId"] == trace_id]

    def wait_trace(self, trace_id: str, n: int) -> list[dict[str, Any]]:
        return wait_until(lambda: len(self.trace(trace_id)) >= n and self.trace(trace_id), SPAN_WAIT,
                          f"{n} spans of trace {trace_id}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(v: dict[str, Any]) -> Any:
    if "intValue" in v:
        return int(v["intValue"])
    return v.get("stringValue", v.get("boolValue"))


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


@dataclass
class Traced:
    mesh: Mesh
    collector: Collector
    app: AppProc
    books: ProxyProc
    client: ProxyProc
    dark_books: ProxyProc      # exports to a collector that is not running
    dark_client: ProxyProc

    def authority(self, workload: str = "books") -> str:
        return f"{workload}.default:{self.app.http}"


@pytest.fixture(scope="module")
def traced() -> Iterator[Traced]:
    collector = Collector()
    nowhere = f"http://{HOST}:{free_port()}/v1/traces"
    try:
        with running_mesh() as mesh:
            app = mesh.start_app()
            on = {"MESH_TRACE_COLLECTOR": collector.url}
            off = {"MESH_TRACE_COLLECTOR": nowhere}
            procs = [mesh.start_proxy("books", app_port=app.http, wait=False, **on),
                     mesh.start_proxy("client", wait=False, **on),
                     mesh.start_proxy("darkbooks", app_port=app.http, wait=False, **off),
                     mesh.start_proxy("darkclient", wait=False, **off)]
            for p in procs:
                p.wait_ready()
            yield Traced(mesh, collector, app, *procs)
            tracebacks = mesh.logs_with("Traceback")
            assert not tracebacks, f"tracebacks in {tracebacks}"
    finally:
        collector.close()


def get(t: Traced, path: str, headers: dict[str, str] | None = None, workload: str = "books",
        via: ProxyProc | None = None) -> tuple[int, dict[str, list[str]]]:
    """A request through the client proxy; returns the status and the headers the app saw."""
    with Conn((via or t.client).outbound) as c:
        r = c.request("GET", path, {"Host": t.authority(workload), **(headers or {})})
    seen = r.json()["headers"] if r.headers.get("content-type", "").startswith("application/json") else {}
    return r.status, seen


def by_kind(spans: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (client,) = [s for s in spans if s["kind"] == 3]
    (server,) = [s for s in spans if s["kind"] == 2]
    return client, server


def test_two_hops_link_up(traced: Traced) -> None:
    status, seen = get(traced, "/traced?q=1", {"traceparent": f"00-{T}-{S}-01", "tracestate": "vendor=x"})
    assert status == 200
    client, server = by_kind(traced.collector.wait_trace(T, 2))
    # the client proxy's span is a child of the caller's, the server proxy's a child of that
    assert client["parentSpanId"] == S
    assert server["parentSpanId"] == client["spanId"]
    assert client["resource"]["service.name"] == "client" and server["resource"]["service.name"] == "books"
    assert server["resource"]["k8s.namespace.name"] == "default"
    # the app's parent is the server proxy's span; tracestate is untouched
    assert seen["traceparent"] == [f"00-{T}-{server['spanId']}-01"]
    assert seen["tracestate"] == ["vendor=x"]
    for span in (client, server):
        assert span["name"] == "GET /traced"
        assert span["attrs"]["http.method"] == "GET" and span["attrs"]["http.status_code"] == 200
        assert span["attrs"]["http.target"] == "/traced?q=1"
        assert span["attrs"]["authority"].startswith("books.default")
        assert span["status"] == {}
        assert int(span["startTimeUnixNano"]) <= int(span["endTimeUnixNano"])
        assert abs(int(span["startTimeUnixNano"]) / 1e9 - time.time()) < 60
    assert client["attrs"]["direction"] == "outbound" and server["attrs"]["direction"] == "inbound"
    assert client["attrs"]["server_id"] == identity_of("books")
    assert client["attrs"]["dst_workload"] == "books"
    assert server["attrs"]["client_id"] == identity_of("client") and server["attrs"]["tls"] == "true"


def test_new_root_when_the_caller_sends_no_context(traced: Traced) -> None:
    status, seen = get(traced, "/root")
    assert status == 200
    (tp,) = seen["traceparent"]
    _, trace_id, parent, flags = tp.split("-")
    assert flags == "01"
    client, server = by_kind(traced.collector.wait_trace(trace_id, 2))
    assert "parentSpanId" not in client
    assert server["parentSpanId"] == client["spanId"] and parent == server["spanId"]


def test_b3_multi_is_rewritten(traced: Traced) -> None:
    trace = "80f198ee56343ba864fe8b2a57d3eff7"
    status, seen = get(traced, "/b3", {"X-B3-TraceId": trace, "X-B3-SpanId": S, "X-B3-Sampled": "1"})
    assert status == 200
    client, server = by_kind(traced.collector.wait_trace(trace, 2))
    assert client["parentSpanId"] == S and server["parentSpanId"] == client["spanId"]
    assert seen["x-b3-traceid"] == [trace]
    assert seen["x-b3-spanid"] == [server["spanId"]]
    assert seen["x-b3-parentspanid"] == [client["spanId"]]
    assert seen["x-b3-sampled"] == ["1"]
    assert seen["traceparent"] == [f"00-{trace}-{server['spanId']}-01"]


def test_b3_single_is_rewritten(traced: Traced) -> None:
    trace = "e457b5a2e4d86bd1"   # 64 bits: written back as 64 bits
    status, seen = get(traced, "/b3single", {"b3": f"{trace}-{S}-1"})
    assert status == 200
    client, server = by_kind(traced.collector.wait_trace("0" * 16 + trace, 2))
    assert client["parentSpanId"] == S
    assert seen["b3"] == [f"{trace}-{server['spanId']}-1-{client['spanId']}"]


def test_unsampled_caller_is_forwarded_untouched(traced: Traced) -> None:
    quiet = "0af7651916cd43dd8448eb211c80319c"
    tp = f"00-{quiet}-{S}-00"
    status, seen = get(traced, "/quiet", {"traceparent": tp})
    assert status == 200 and seen["traceparent"] == [tp]
    # spans are exported in order: once a later trace has arrived from both proxies, an
    # unsampled span would have too
    later = "1af7651916cd43dd8448eb211c80319c"
    get(traced, "/later", {"traceparent": f"00-{later}-{S}-01"})
    traced.collector.wait_trace(later, 2)
    assert traced.collector.trace(quiet) == []


def test_server_error_marks_both_spans(traced: Traced) -> None:
    trace = "2af7651916cd43dd8448eb211c80319c"
    status, _ = get(traced, "/status/500", {"traceparent": f"00-{trace}-{S}-01"})
    assert status == 500
    for span in by_kind(traced.collector.wait_trace(trace, 2)):
        assert span["status"]["code"] == 2 and span["attrs"]["http.status_code"] == 500


def test_proxy_made_error_is_traced(traced: Traced) -> None:
    trace = "3af7651916cd43dd8448eb211c80319c"
    with Conn(traced.client.outbound) as c:
        r = c.request("GET", "/", {"Host": "nosuch.default:7002", "traceparent": f"00-{trace}-{S}-01"})
    assert r.status == 503
    (span,) = traced.collector.wait_trace(trace, 1)
    assert span["kind"] == 3 and span["status"]["code"] == 2 and span["attrs"]["response_flag"] == "NR"


def test_exported_spans_are_counted(traced: Traced) -> None:
    get(traced, "/count")
    wait_until(lambda: metric_sum(traced.client.metrics(), "trace_spans_exported_total") >= 1, SPAN_WAIT,
               "trace_spans_exported_total on the client proxy")


def test_collector_down_requests_unaffected(traced: Traced) -> None:
    t0 = time.monotonic()
    for i in range(30):
        status, seen = get(traced, f"/dark/{i}", {"traceparent": f"00-{T}-{S}-01"},
                           workload="darkbooks", via=traced.dark_client)
        assert status == 200 and seen["traceparent"][0].startswith(f"00-{T}-")
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, f"30 requests took {elapsed:.2f}s with the collector down"
    # the failure is visible in the metrics, not on the requests
    for p in (traced.dark_client, traced.dark_books):
        wait_until(lambda p=p: metric_sum(p.metrics(), "trace_export_errors_total") >= 1, SPAN_WAIT,
                   f"{p.name}: trace_export_errors_total")
        assert metric_sum(p.metrics(), "trace_spans_dropped_total", reason="export_failed") >= 1
        assert "trace export failed" in p.log_text()


def test_shutdown_flushes_spans(traced: Traced) -> None:
    mesh = traced.mesh
    proxy = mesh.start_proxy("client-term", MESH_TRACE_COLLECTOR=traced.collector.url)
    trace = "4af7651916cd43dd8448eb211c80319c"
    assert get(traced, "/bye", {"traceparent": f"00-{trace}-{S}-01"}, via=proxy)[0] == 200
    proxy.send(signal.SIGTERM)
    assert proxy.wait(10) == 0
    spans = [s for s in traced.collector.trace(trace) if s["resource"]["service.name"] == "client-term"]
    assert len(spans) == 1, traced.collector.trace(trace)


# --- the exporter's HTTP client against loopback servers (no proxies)

def test_client_keeps_its_connection() -> None:
    collector = Collector()
    try:
        client = Client(HOST, collector.server.server_address[1], "/v1/traces", timeout=5.0)

        async def main() -> list[int]:
            body = b'{"resourceSpans":[]}'
            statuses = [(await client.post(body))[0] for _ in range(3)]
            # overlapping posts (the exporter task and the shutdown flush) take turns
            statuses += [s for s, _ in await asyncio.gather(client.post(body), client.post(body))]
            await client.close()
            return statuses

        assert asyncio.run(main()) == [200] * 5
        assert collector.posts == 5 and collector.connections == 1
    finally:
        collector.close()


def test_client_refused_fails_fast() -> None:
    client = Client(HOST, free_port(), "/v1/traces", timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(OSError):
        asyncio.run(client.post(b"{}"))
    assert time.monotonic() - t0 < 1.0


def test_client_times_out_on_a_silent_collector() -> None:
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(8)   # connections complete in the backlog; nothing ever answers
    try:
        client = Client(HOST, lsock.getsockname()[1], "/v1/traces", timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            asyncio.run(client.post(b"{}"))
        assert time.monotonic() - t0 < 2.0
    finally:
        lsock.close()


def test_client_retries_a_connection_the_collector_dropped() -> None:
    """The collector answers one request per connection and then closes it without saying so:
    the next post finds the kept-alive connection dead and is sent again on a new one."""
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(8)
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # the listener was closed: the test is over
            accepted.append(1)
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                head, _, body = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = Client(HOST, lsock.getsockname()[1], "/v1/traces", timeout=5.0)

        async def main() -> list[int]:
            first = (await client.post(b"{}"))[0]
            second = (await client.post(b"{}"))[0]
            await client.close()
            return [first, second]

        assert asyncio.run(main()) == [200, 200]
        assert len(accepted) == 2
    finally:
        lsock.close()
