"""Tracing without sockets: trace-context parsing and formatting (W3C, B3 single and multi),
sampling decisions, span -> OTLP JSON, and the tracer's queue and exporter driven by fakes.
Table-driven; the exporter tests run a loop with ``asyncio.run`` and never sleep."""
from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from microproxy.config import Config, split_url
from microproxy.discovery import Endpoint
from microproxy.http1 import Exchange
from microproxy.metrics import Metrics
from microproxy.otlp import Encoder, export_request, span_json
from microproxy.tracecontext import (NO_CONTEXT, TRACE_HEADERS, Context, Decision, decide, extract, inject,
                                     new_span_id, new_trace_id, parse_b3_multi, parse_b3_single,
                                     parse_traceparent)
from microproxy.tracing import CLIENT, SERVER, Span, Tracer, span_error, span_name

T = b"4bf92f3577b34da6a3ce929d0e0e4736"
S = b"00f067aa0ba902b7"
T64 = b"a3ce929d0e0e4736"
P = b"1111111111111111"


# --- W3C traceparent

TRACEPARENT_OK = [
    ("sampled", b"00-%s-%s-01" % (T, S), Context(T, S, True)),
    ("not sampled", b"00-%s-%s-00" % (T, S), Context(T, S, False)),
    ("other flag bits ignored", b"00-%s-%s-02" % (T, S), Context(T, S, False)),
    ("sampled among other bits", b"00-%s-%s-ff" % (T, S), Context(T, S, True)),
    ("padded with OWS", b" 00-%s-%s-01\t" % (T, S), Context(T, S, True)),
    ("future version", b"01-%s-%s-01" % (T, S), Context(T, S, True)),
    ("future version, more fields", b"cc-%s-%s-01-what-the-future-holds" % (T, S), Context(T, S, True)),
]


@pytest.mark.parametrize("value,want", [c[1:] for c in TRACEPARENT_OK], ids=[c[0] for c in TRACEPARENT_OK])
def test_parse_traceparent_valid(value: bytes, want: Context) -> None:
    assert parse_traceparent(value) == want


TRACEPARENT_BAD = [
    ("version ff", b"ff-%s-%s-01" % (T, S)),
    ("version 00 with more fields", b"00-%s-%s-01-extra" % (T, S)),
    ("future version, junk after flags", b"01-%s-%s-01x" % (T, S)),
    ("version not hex", b"0g-%s-%s-01" % (T, S)),
    ("version upper-case hex", b"0A-%s-%s-01" % (T, S)),
    ("all-zero trace id", b"00-%s-%s-01" % (b"0" * 32, S)),
    ("all-zero span id", b"00-%s-%s-01" % (T, b"0" * 16)),
    ("upper-case trace id", b"00-%s-%s-01" % (T.upper(), S)),
    ("short trace id", b"00-%s-%s-01" % (T[:-1], S)),
    ("long span id", b"00-%s-%s0-01" % (T, S)),
    ("flags not hex", b"00-%s-%s-0x" % (T, S)),
    ("one-digit flags", b"00-%s-%s-1" % (T, S)),
    ("wrong separators", b"00_%s_%s_01" % (T, S)),
    ("empty", b""),
    ("garbage", b"hello"),
]


@pytest.mark.parametrize("value", [c[1] for c in TRACEPARENT_BAD], ids=[c[0] for c in TRACEPARENT_BAD])
def test_parse_traceparent_invalid(value: bytes) -> None:
    assert parse_traceparent(value) is None


# --- B3

B3_SINGLE = [
    ("ids only", b"%s-%s" % (T, S), Context(T, S, None, b3_single=True)),
    ("sampled", b"%s-%s-1" % (T, S), Context(T, S, True, b3_single=True)),
    ("not sampled", b"%s-%s-0" % (T, S), Context(T, S, False, b3_single=True)),
    ("debug", b"%s-%s-d" % (T, S), Context(T, S, True, True, b3_single=True)),
    ("with parent", b"%s-%s-1-%s" % (T, S, P), Context(T, S, True, b3_single=True)),
    ("64-bit trace id", b"%s-%s-1" % (T64, S), Context(b"0" * 16 + T64, S, True, b3_single=True, b3_short=True)),
    ("upper case accepted", b"%s-%s-1" % (T.upper(), S.upper()), Context(T, S, True, b3_single=True)),
    ("deny only", b"0", Context(sampled=False, b3_single=True)),
    ("accept only", b"1", Context(sampled=True, b3_single=True)),
    ("debug only", b"d", Context(sampled=True, debug=True, b3_single=True)),
    ("all-zero trace id", b"%s-%s-1" % (b"0" * 32, S), None),
    ("all-zero span id", b"%s-%s-1" % (T, b"0" * 16), None),
    ("trace id of 20 digits", b"%s-%s-1" % (T[:20], S), None),
    ("bad sampling state", b"%s-%s-2" % (T, S), None),
    ("bad parent", b"%s-%s-1-xyz" % (T, S), None),
    ("too many fields", b"%s-%s-1-%s-9" % (T, S, P), None),
    ("trace id only", T, None),
    ("empty", b"", None),
]


@pytest.mark.parametrize("value,want", [c[1:] for c in B3_SINGLE], ids=[c[0] for c in B3_SINGLE])
def test_parse_b3_single(value: bytes, want: Context | None) -> None:
    assert parse_b3_single(value) == want


B3_MULTI = [
    ("ids and sampled", {b"x-b3-traceid": T, b"x-b3-spanid": S, b"x-b3-sampled": b"1"},
     Context(T, S, True, b3_multi=True)),
    ("not sampled", {b"x-b3-traceid": T, b"x-b3-spanid": S, b"x-b3-sampled": b"0"},
     Context(T, S, False, b3_multi=True)),
    ("legacy true", {b"x-b3-traceid": T, b"x-b3-spanid": S, b"x-b3-sampled": b"true"},
     Context(T, S, True, b3_multi=True)),
    ("deferred", {b"x-b3-traceid": T, b"x-b3-spanid": S, b"x-b3-parentspanid": P},
     Context(T, S, None, b3_multi=True)),
    ("debug flag", {b"x-b3-traceid": T, b"x-b3-spanid": S, b"x-b3-flags": b"1"},
     Context(T, S, True, True, b3_multi=True)),
    ("64-bit trace id", {b"x-b3-traceid": T64, b"x-b3-spanid": S},
     Context(b"0" * 16 + T64, S, None, b3_multi=True, b3_short=True)),
    ("sampled only", {b"x-b3-sampled": b"0"}, Context(sampled=False, b3_multi=True)),
    ("no span id", {b"x-b3-traceid": T, b"x-b3-sampled": b"1"}, None),
    ("bad sampled", {b"x-b3-traceid": T, b"x-b3-spanid": S, b"x-b3-sampled": b"yes"}, None),
    ("all-zero span id", {b"x-b3-traceid": T, b"x-b3-spanid": b"0" * 16}, None),
    ("parent only", {b"x-b3-parentspanid": P}, None),
]


@pytest.mark.parametrize("found,want", [c[1:] for c in B3_MULTI], ids=[c[0] for c in B3_MULTI])
def test_parse_b3_multi(found: dict[bytes, bytes], want: Context | None) -> None:
    assert parse_b3_multi(found) == want


# --- extract: which header wins

TP = (b"traceparent", b"00-%s-%s-01" % (T, S))
OTHER_T = b"0af7651916cd43dd8448eb211c80319c"
EXTRACT = [
    ("nothing", [(b"host", b"x")], NO_CONTEXT),
    ("traceparent", [TP, (b"tracestate", b"k=v")], Context(T, S, True)),
    ("traceparent wins over b3", [(b"b3", b"%s-%s-0" % (OTHER_T, P)), TP], Context(T, S, True, b3_single=True)),
    ("invalid traceparent, b3 used", [(b"traceparent", b"00-bad"), (b"b3", b"%s-%s-1" % (T, S))],
     Context(T, S, True, b3_single=True)),
    ("b3 single wins over multi", [(b"b3", b"%s-%s-1" % (T, S)), (b"x-b3-traceid", OTHER_T), (b"x-b3-spanid", P)],
     Context(T, S, True, b3_single=True, b3_multi=True)),
    ("multi", [(b"x-b3-traceid", T), (b"x-b3-spanid", S), (b"x-b3-sampled", b"1")],
     Context(T, S, True, b3_multi=True)),
    ("traceparent wins, 64-bit b3 form remembered",
     [(b"traceparent", b"00-%s%s-%s-01" % (b"0" * 16, T64, S)), (b"b3", b"%s-%s-1" % (T64, S))],
     Context(b"0" * 16 + T64, S, True, b3_single=True, b3_short=True)),
    ("repeated traceparent ignored", [TP, TP], NO_CONTEXT),
    ("repeated traceparent, b3 used", [TP, TP, (b"b3", b"%s-%s" % (T, S))], Context(T, S, None, b3_single=True)),
    ("invalid everything: new root, b3 forms remembered", [(b"traceparent", b"x"), (b"x-b3-spanid", S)],
     Context(b3_multi=True)),
]


@pytest.mark.parametrize("headers,want", [c[1:] for c in EXTRACT], ids=[c[0] for c in EXTRACT])
def test_extract(headers: list[tuple[bytes, bytes]], want: Context) -> None:
    assert extract(headers) == want


# --- ids and sampling

class Dice(random.Random):
    """getrandbits yields the given values in turn; random() always ``roll``."""

    def __init__(self, bits: list[int], roll: float = 0.5) -> None:
        super().__init__(0)
        self.bits = list(bits)
        self.roll = roll

    def getrandbits(self, k: int) -> int:
        return self.bits.pop(0)

    def random(self) -> float:
        return self.roll


def test_ids_are_never_zero() -> None:
    assert new_trace_id(Dice([0, 0, 0xAB])) == b"0" * 30 + b"ab"
    assert new_span_id(Dice([0, 1])) == b"0" * 15 + b"1"
    r = random.Random(7)
    ids = {new_trace_id(r) for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 for i in ids)


NEW_T, NEW_S = b"%032x" % 0xAAA, b"%016x" % 0xBBB
DECIDE = [
    ("caller sampled: child", Context(T, S, True), 0.0, Decision(T, NEW_S, S, True)),
    ("caller not sampled: untouched", Context(T, S, False), 1.0, None),
    ("b3 deny only: untouched", Context(sampled=False, b3_single=True), 1.0, None),
    ("no context, rate 1: sampled root", NO_CONTEXT, 1.0, Decision(NEW_T, NEW_S, None, True)),
    ("no context, lost the roll: unsampled root", NO_CONTEXT, 0.4, Decision(NEW_T, NEW_S, None, False)),
    ("no context, won the roll", NO_CONTEXT, 0.6, Decision(NEW_T, NEW_S, None, True)),
    ("deferred b3, rate 0: unsampled child", Context(T, S, None, b3_multi=True), 0.0, Decision(T, NEW_S, S, False)),
    ("b3 accept only: sampled root", Context(sampled=True, b3_single=True), 0.0, Decision(NEW_T, NEW_S, None, True)),
]


@pytest.mark.parametrize("ctx,rate,want", [c[1:] for c in DECIDE], ids=[c[0] for c in DECIDE])
def test_decide(ctx: Context, rate: float, want: Decision | None) -> None:
    trace_bits = [0xAAA] if ctx.trace_id is None else []
    assert decide(ctx, rate, Dice(trace_bits + [0xBBB], roll=0.5)) == want


N = b"2222222222222222"
INJECT = [
    ("w3c only", Decision(T, N, S, True), Context(T, S, True),
     [(b"traceparent", b"00-%s-%s-01" % (T, N))]),
    ("unsampled root", Decision(T, N, None, False), NO_CONTEXT,
     [(b"traceparent", b"00-%s-%s-00" % (T, N))]),
    ("b3 single", Decision(T, N, S, True), Context(T, S, True, b3_single=True),
     [(b"traceparent", b"00-%s-%s-01" % (T, N)), (b"b3", b"%s-%s-1-%s" % (T, N, S))]),
    ("b3 single root", Decision(T, N, None, True), Context(sampled=True, b3_single=True),
     [(b"traceparent", b"00-%s-%s-01" % (T, N)), (b"b3", b"%s-%s-1" % (T, N))]),
    ("b3 single debug", Decision(T, N, S, True), Context(T, S, True, True, b3_single=True),
     [(b"traceparent", b"00-%s-%s-01" % (T, N)), (b"b3", b"%s-%s-d-%s" % (T, N, S))]),
    ("b3 multi", Decision(T, N, S, True), Context(T, S, True, b3_multi=True),
     [(b"traceparent", b"00-%s-%s-01" % (T, N)), (b"x-b3-traceid", T), (b"x-b3-spanid", N),
      (b"x-b3-parentspanid", S), (b"x-b3-sampled", b"1")]),
    ("b3 multi unsampled", Decision(T, N, S, False), Context(T, S, None, b3_multi=True),
     [(b"traceparent", b"00-%s-%s-00" % (T, N)), (b"x-b3-traceid", T), (b"x-b3-spanid", N),
      (b"x-b3-parentspanid", S), (b"x-b3-sampled", b"0")]),
    ("b3 multi debug", Decision(T, N, S, True), Context(T, S, True, True, b3_multi=True),
     [(b"traceparent", b"00-%s-%s-01" % (T, N)), (b"x-b3-traceid", T), (b"x-b3-spanid", N),
      (b"x-b3-parentspanid", S), (b"x-b3-flags", b"1")]),
    ("b3 64-bit trace id kept short", Decision(b"0" * 16 + T64, N, S, True),
     Context(b"0" * 16 + T64, S, True, b3_single=True, b3_short=True),
     [(b"traceparent", b"00-%s%s-%s-01" % (b"0" * 16, T64, N)), (b"b3", b"%s-%s-1-%s" % (T64, N, S))]),
]


@pytest.mark.parametrize("d,ctx,want", [c[1:] for c in INJECT], ids=[c[0] for c in INJECT])
def test_inject(d: Decision, ctx: Context, want: list[tuple[bytes, bytes]]) -> None:
    got = inject(d, ctx)
    assert got == want
    assert {n for n, _ in got} <= TRACE_HEADERS
    assert parse_traceparent(got[0][1]) == Context(d.trace_id, d.span_id, d.sampled)


def test_inject_then_extract_round_trips() -> None:
    d = Decision(T, N, S, True)
    for ctx in (Context(T, S, True, b3_single=True), Context(T, S, True, b3_multi=True)):
        back = extract(inject(d, ctx))
        assert (back.trace_id, back.span_id, back.sampled) == (T, N, True)


@pytest.mark.parametrize("method,target,want", [
    (b"GET", b"/books", "GET /books"),
    (b"POST", b"/books?id=1", "POST /books"),
    (b"GET", b"/a#frag", "GET /a"),
    (b"GET", b"/", "GET /"),
])
def test_span_name(method: bytes, target: bytes, want: str) -> None:
    assert span_name(method, target) == want


@pytest.mark.parametrize("status,flag,want", [
    (200, "", None), (404, "", None), (500, "", "HTTP 500"), (502, "UF", "HTTP 502 (UF)"),
    (0, "", "no response: connection closed"),
])
def test_span_error(status: int, flag: str, want: str | None) -> None:
    assert span_error(status, flag) == want


# --- OTLP JSON

def _span(parent: bytes | None, kind: int = CLIENT) -> Span:
    span = Span(None, Decision(T, N, parent, True), kind, b"GET", b"/books?x=1", start=10.0)
    span.end = 10.25
    span.attrs = [("http.method", "GET"), ("http.status_code", 200), ("tls", "true")]
    return span


def test_span_json() -> None:
    got = span_json(_span(S), offset_ns=1_700_000_000 * 10**9)
    assert got == {
        "traceId": T.decode(), "spanId": N.decode(), "parentSpanId": S.decode(),
        "name": "GET /books", "kind": 3,
        "startTimeUnixNano": "1700000010000000000", "endTimeUnixNano": "1700000010250000000",
        "attributes": [{"key": "http.method", "value": {"stringValue": "GET"}},
                       {"key": "http.status_code", "value": {"intValue": "200"}},
                       {"key": "tls", "value": {"stringValue": "true"}}],
        "status": {},
    }


def test_span_json_root_and_error() -> None:
    span = _span(None, SERVER)
    span.error = "HTTP 503"
    got = span_json(span, 0)
    assert "parentSpanId" not in got and got["kind"] == 2
    assert got["status"] == {"code": 2, "message": "HTTP 503"}


def test_export_request_shape() -> None:
    resource: list[tuple[str, str | int]] = [("service.name", "books"), ("process.pid", 42)]
    body = export_request(resource, [_span(S), _span(None)], 0)
    json.dumps(body)  # JSON-serialisable as is
    assert json.loads(Encoder(resource).encode([_span(S), _span(None)], 0)) == body
    (rs,) = body["resourceSpans"]
    assert rs["resource"]["attributes"] == [{"key": "service.name", "value": {"stringValue": "books"}},
                                            {"key": "process.pid", "value": {"intValue": "42"}}]
    (ss,) = rs["scopeSpans"]
    assert ss["scope"]["name"] == "micromesh.proxy"
    assert [s["spanId"] for s in ss["spans"]] == [N.decode(), N.decode()]


def test_encode_matches_the_reference_encoding() -> None:
    odd = _span(S)
    odd.name = 'GET /caf\u00e9 "quoted" \\ back\nslash'
    odd.attrs = [("http.target", "/caf\u00e9?a=\"1\"&b=\\"), ("flag", True), ("off", False), ("n", -3),
                 ("big", 2**62)]
    odd.error = "no response: \u2603"
    spans = [_span(S), _span(None, SERVER), odd]
    resource = [("service.name", "b\u00f6oks"), ("process.pid", 42)]
    encoder = Encoder(resource, max_cache=3)
    want = export_request(resource, spans, offset_ns=1_700_000_000 * 10**9)
    for _ in range(2):   # a cold cache, then a warm one (cleared when full on the way)
        raw = encoder.encode(spans, offset_ns=1_700_000_000 * 10**9)
        raw.decode("ascii")  # compact and ASCII-only
        assert json.loads(raw) == want
    assert 0 < len(encoder.cache) <= 3
    assert not any(k == "http.target" for k, _, _ in encoder.cache)


def test_encoder_keeps_true_and_1_apart() -> None:
    a, b = _span(S), _span(S)
    a.attrs, b.attrs = [("x", True)], [("x", 1)]
    got = json.loads(Encoder([]).encode([a, b], 0))["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert [s["attributes"][0]["value"] for s in got] == [{"boolValue": True}, {"intValue": "1"}]


# --- configuration

@pytest.mark.parametrize("url,want", [
    ("http://127.0.0.1:4318/v1/traces", ("127.0.0.1", 4318, "/v1/traces")),
    ("http://collector:4318", ("collector", 4318, "/v1/traces")),
    ("http://collector/", ("collector", 80, "/v1/traces")),
    ("HTTP://[::1]:4318/otlp/v1/traces", ("::1", 4318, "/otlp/v1/traces")),
])
def test_split_url(url: str, want: tuple[str, int, str]) -> None:
    assert split_url(url) == want


@pytest.mark.parametrize("url", ["https://c:4318/v1/traces", "c:4318", "http://:4318/", "http://c:99999/",
                                 "http://c:port/"])
def test_split_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        split_url(url)


BASE_ENV = {"MESH_IDENTITY_ADDR": "127.0.0.1:1", "MESH_DESTINATION_ADDR": "127.0.0.1:2",
            "MESH_TRUST_ANCHORS": "pem", "MESH_TOKEN": "t"}


def test_config_tracing_off_by_default() -> None:
    cfg = Config.from_env(BASE_ENV)
    assert cfg.trace_collector is None and cfg.trace_sample == 1.0


def test_config_tracing_settings() -> None:
    cfg = Config.from_env({**BASE_ENV, "MESH_TRACE_COLLECTOR": "http://127.0.0.1:4318/v1/traces",
                           "MESH_TRACE_SAMPLE": "0.25"})
    assert cfg.trace_collector == "http://127.0.0.1:4318/v1/traces" and cfg.trace_sample == 0.25


@pytest.mark.parametrize("env", [{"MESH_TRACE_SAMPLE": "1.5"}, {"MESH_TRACE_SAMPLE": "-0.1"},
                                 {"MESH_TRACE_SAMPLE": "nan"}, {"MESH_TRACE_COLLECTOR": "https://x/"}])
def test_config_tracing_rejects(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Config.from_env({**BASE_ENV, **env})


# --- the tracer, with a fake exporter and fake connections

class FakeExporter:
    def __init__(self, fail: BaseException | None = None, status: int = 200, hang: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail, self.status, self.hang = fail, status, hang
        self.closed = False

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.hang:
            await asyncio.get_running_loop().create_future()
        if self.fail is not None:
            raise self.fail
        self.bodies.append(json.loads(body))
        return self.status, b"{}"

    async def close(self) -> None:
        self.closed = True

    def spans(self) -> list[dict[str, Any]]:
        return [s for b in self.bodies for rs in b["resourceSpans"] for ss in rs["scopeSpans"]
                for s in ss["spans"]]


class FakeTransport:
    def get_extra_info(self, name: str) -> Any:
        return ("10.0.0.9", 50000) if name == "peername" else None


class FakeConn:
    def __init__(self, direction: str, tls: bool = False, peer_id: str | None = None) -> None:
        self.direction, self.tls, self.peer_id = direction, tls, peer_id
        self.transport = FakeTransport()


def tracer(exporter: FakeExporter | None = None, **kw: Any) -> tuple[Tracer, Metrics]:
    metrics = Metrics()
    t = Tracer(exporter or FakeExporter(), metrics, [("service.name", "books")],
               rand=random.Random(1), wall=lambda: 1_700_000_000.0, **kw)
    return t, metrics


def exchange(*headers: tuple[bytes, bytes], target: bytes = b"/books?id=7") -> Exchange:
    return Exchange(b"GET", target, "1.1", [(b"host", b"books.default:80"), *headers],
                    b"books.default:80", True, False, None)


def test_begin_rewrites_the_head_and_finish_records() -> None:
    t, _ = tracer()
    ex = exchange((b"traceparent", b"00-%s-%s-01" % (T, S)), (b"tracestate", b"k=v"), (b"b3", b"%s-%s-1" % (T, S)))
    extra, drop = t.begin(ex, SERVER, ex.target, [(b"x-mesh-client-id", b"me")], frozenset((b"x-mesh-client-id",)))
    head = ex.head(ex.target, ex.host, extra, drop)
    span = ex.span
    assert isinstance(span, Span) and span.parent_id == S and span.trace_id == T and span.kind == SERVER
    lines = head.split(b"\r\n")
    assert b"traceparent: 00-%s-%s-01" % (T, span.span_id) in lines
    assert b"b3: %s-%s-1-%s" % (T, span.span_id, S) in lines
    assert b"tracestate: k=v" in lines and b"x-mesh-client-id: me" in lines
    assert sum(line.startswith((b"traceparent:", b"b3:")) for line in lines) == 2
    ex.status = 503
    ex.flag = "UF"
    span.finish(ex, FakeConn("inbound", tls=True, peer_id="client.default"))  # type: ignore[arg-type]
    assert ex.span is None and span.tracer is None and list(t.queue) == [span]
    attrs = dict(span.attrs)
    assert attrs["direction"] == "inbound" and attrs["http.status_code"] == 503
    assert attrs["http.target"] == "/books?id=7" and attrs["http.method"] == "GET"
    assert attrs["client_id"] == "client.default" and attrs["tls"] == "true"
    assert attrs["net.peer.ip"] == "10.0.0.9" and attrs["response_flag"] == "UF"
    assert span.error == "HTTP 503 (UF)"


def test_outbound_span_names_the_server() -> None:
    t, _ = tracer()
    ex = exchange()
    ex.head(b"/books", ex.host, *t.begin(ex, CLIENT, b"/books"))
    ex.endpoint = Endpoint(("10.1.2.3", 4143), "books.default.serviceaccount.identity.cluster.local",
                           {"workload": "books", "namespace": "default", "pod": "books-1"}, "")
    ex.status = 200
    span = ex.span
    span.finish(ex, FakeConn("outbound"))  # type: ignore[arg-type]
    attrs = dict(span.attrs)
    assert span.parent_id is None and span.kind == CLIENT and span.error is None
    assert attrs["server_id"].startswith("books.default.") and attrs["dst_workload"] == "books"
    assert attrs["net.peer.ip"] == "10.1.2.3" and attrs["net.peer.port"] == 4143
    assert "dst_pod" not in attrs and "tls" not in attrs


def test_unsampled_caller_passes_through() -> None:
    t, _ = tracer()
    tp = (b"traceparent", b"00-%s-%s-00" % (T, S))
    ex = exchange(tp)
    extra, drop = t.begin(ex, CLIENT, ex.target)
    assert (extra, drop, ex.span) == ([], frozenset(), None)
    assert b"traceparent: 00-%s-%s-00\r\n" % (T, S) in ex.head(ex.target, ex.host, extra, drop)


def test_unsampled_root_propagates_the_decision() -> None:
    t, _ = tracer(rate=0.0)
    ex = exchange()
    extra, drop = t.begin(ex, CLIENT, ex.target)
    assert ex.span is None
    ((name, value),) = extra
    ctx = parse_traceparent(value)
    assert name == b"traceparent" and ctx is not None and ctx.sampled is False


def test_queue_is_bounded_and_drops_are_counted() -> None:
    t, metrics = tracer(max_queue=3, batch=2)
    for _ in range(5):
        t.record(_span(S))
    assert len(t.queue) == 3 and t.wake.is_set()
    assert metrics.counter("trace_spans_dropped_total", 'reason="queue_full"') == 2


def test_flush_exports_in_batches() -> None:
    exporter = FakeExporter()
    t, metrics = tracer(exporter, batch=2)
    for _ in range(5):
        t.record(_span(S))
    asyncio.run(t.flush())
    assert [len(b["resourceSpans"][0]["scopeSpans"][0]["spans"]) for b in exporter.bodies] == [2, 2, 1]
    assert not t.queue and metrics.counter("trace_spans_exported_total") == 5
    start = exporter.spans()[0]["startTimeUnixNano"]
    assert isinstance(start, str) and int(start) > 1_600_000_000 * 10**9  # wall-clock nanoseconds


@pytest.mark.parametrize("exporter", [FakeExporter(fail=ConnectionRefusedError(111, "refused")),
                                      FakeExporter(fail=TimeoutError()), FakeExporter(status=500)],
                         ids=["refused", "timeout", "http 500"])
def test_export_failure_is_counted_not_raised(exporter: FakeExporter, caplog: pytest.LogCaptureFixture) -> None:
    t, metrics = tracer(exporter, batch=2)
    for _ in range(3):
        t.record(_span(S))
    with caplog.at_level("INFO", logger="microproxy.tracing"):
        asyncio.run(t.flush())
        asyncio.run(t.flush())
    assert metrics.counter("trace_export_errors_total") == 2
    assert metrics.counter("trace_spans_dropped_total", 'reason="export_failed"') == 3
    failures = [r for r in caplog.records if r.getMessage() == "trace export failed"]
    assert len(failures) == 1 and failures[0].levelname == "INFO"  # the same error is logged once


def test_close_flushes_within_its_bound() -> None:
    exporter = FakeExporter()
    t, _ = tracer(exporter)
    t.record(_span(S))
    asyncio.run(t.close())
    assert len(exporter.spans()) == 1 and exporter.closed

    hanging = FakeExporter(hang=True)
    t, _ = tracer(hanging)
    t.record(_span(S))
    asyncio.run(asyncio.wait_for(t.close(timeout=0.05), 5))
    assert hanging.closed


def test_run_flushes_when_a_batch_is_full() -> None:
    exporter = FakeExporter()
    t, _ = tracer(exporter, batch=2, interval=3600.0)

    async def main() -> None:
        task = asyncio.create_task(t.run())
        t.record(_span(S))
        t.record(_span(S))   # a full batch wakes the exporter long before the interval
        while not exporter.bodies:
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 5))
    assert len(exporter.spans()) == 2
