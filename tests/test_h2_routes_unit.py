"""HTTPRoutes on HTTP/2 streams, in process (tests/h2_rig.py: a real h2 client and server
around a real Outbound2): deadlines, what a timeout tells the balancer, a route's Host, and
that every way a stream ends gives back its admission slot and balancer pending count.
(These were found by a review of the first version; each failed before its fix.)"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import h2.events
import pytest
from h2.errors import ErrorCodes

from microproxy import resilience
from tests.h2_rig import Rig, httproute, run

ROUTE = {"backendRefs": [{"name": "g", "port": 8080}]}
ROUTES_KEY = resilience.ROUTES.key("g.default:8080", "g-split")


@pytest.fixture(autouse=True)
def pending_limit_one() -> Iterator[None]:
    """MESH_MAX_PENDING_REQUESTS=1 for the rigs built in a test; the environment's after."""
    resilience.configure(resilience.Settings({"MESH_MAX_PENDING_REQUESTS": "1"}))
    yield
    resilience.configure(resilience.Settings({}))


def answers(rig: Rig) -> list[dict[bytes, bytes]]:
    return [dict(e.headers) for e in rig.client_events
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived))]


def body(rig: Rig) -> bytes:
    return b"".join(e.data for e in rig.client_of(h2.events.DataReceived))


async def until(rig: Rig, pred: Any, timeout: float = 2.0) -> None:
    """Pump the rig until ``pred()`` holds (timers run in between)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
        rig.pump()


def test_a_route_timeout_also_cuts_a_response_that_has_begun() -> None:
    """timeouts.request bounds the whole response, as for HTTP/1: headers came at once,
    then the body stalled; at the timeout both streams are reset and the slot is free."""
    async def scenario() -> None:
        rig = Rig([httproute([{**ROUTE, "timeouts": {"request": "100ms"}}])])
        rig.request(1, grpc=False, path="/slow")
        (req,) = rig.upstream_requests()
        rig.server.send_headers(req.stream_id, [(":status", "200")])
        rig.server.send_data(req.stream_id, b"part")
        rig.pump()
        await until(rig, lambda: rig.client_of(h2.events.StreamReset))
        assert [e for e in rig.server_events if isinstance(e, h2.events.StreamReset)]
        assert rig.pending() == 0 and rig.ep.lb.pending == 0
    run(scenario)


def test_route_timeouts_do_not_open_a_healthy_endpoints_breaker() -> None:
    """A route timeout is the caller's limit: the attempt is cancelled for the balancer, not
    counted as the endpoint's failure (as for HTTP/1). Eight slow calls past a 50 ms route
    timeout leave the breaker closed and the next call is served."""
    async def scenario() -> None:
        rig = Rig([httproute([{"matches": [{"path": {"type": "Exact", "value": "/slow"}}],
                               "timeouts": {"request": "50ms"}, **ROUTE}, ROUTE])])
        sid = 1
        for _ in range(8):
            rig.request(sid, grpc=False, path="/slow")
            await until(rig, lambda: len(answers(rig)) == (sid + 1) // 2)
            sid += 2
        assert [a[b":status"] for a in answers(rig)] == [b"504"] * 8
        b = rig.ep.lb.breaker
        assert b is None or b.state == "closed"
        rig.request(sid, grpc=False, path="/fast")
        assert b"circuit open" not in body(rig)
        assert len(rig.upstream_requests()) == 9
    run(scenario)


def test_grpc_timeout_runs_from_the_calls_arrival_through_a_fault_delay() -> None:
    """grpc-timeout 100m on a route with a 500 ms fault delay: DEADLINE_EXCEEDED at ~100 ms,
    and the call never reaches the backend."""
    async def scenario() -> None:
        rig = Rig([httproute([ROUTE], annotations={
            "fault.micromesh.io/http": '{"delay": {"percentage": 100, "fixedDelay": "500ms"}}'})])
        t0 = time.monotonic()
        rig.request(1, extra=[("grpc-timeout", "100m")])
        await until(rig, lambda: answers(rig))
        assert time.monotonic() - t0 < 0.4
        assert answers(rig)[0].get(b"grpc-status") == b"4"
        await asyncio.sleep(0.5)
        rig.pump()
        assert rig.upstream_requests() == [] and rig.pending() == 0
    run(scenario)


def test_grpc_timeout_runs_while_the_routes_are_awaited() -> None:
    """The service's routes never arrive (the proxy waits up to the fail-fast timeout,
    0.5 s here): a 100 ms grpc-timeout is still answered at ~100 ms."""
    async def scenario() -> None:
        rig = Rig(None)
        t0 = time.monotonic()
        rig.request(1, extra=[("grpc-timeout", "100m")])
        await until(rig, lambda: answers(rig))
        assert time.monotonic() - t0 < 0.4
        assert answers(rig)[0].get(b"grpc-status") == b"4"
    run(scenario)


def test_a_shorter_route_timeout_wins_over_grpc_timeout_and_a_longer_one_does_not() -> None:
    async def scenario() -> None:
        rig = Rig([httproute([{**ROUTE, "timeouts": {"request": "50ms"}}])])
        rig.request(1, extra=[("grpc-timeout", "5S")])
        await until(rig, lambda: answers(rig))
        assert b"timeouts.request 50ms" in answers(rig)[0][b"grpc-message"]
        rig = Rig([httproute([{**ROUTE, "timeouts": {"request": "5s"}}])])
        rig.request(1, extra=[("grpc-timeout", "50m")])
        await until(rig, lambda: answers(rig))
        assert answers(rig)[0][b"grpc-message"] == b"deadline exceeded"
    run(scenario)


def test_a_route_that_sets_host_sets_the_authority() -> None:
    """RequestHeaderModifier ``set: host`` becomes the upstream ``:authority`` (HTTP/2 would
    refuse a host header that disagrees with it)."""
    async def scenario() -> None:
        rig = Rig([httproute([{**ROUTE, "filters": [{"type": "RequestHeaderModifier",
                                                      "requestHeaderModifier": {
                                                          "set": [{"name": "host", "value": "other.example"}]}}]}])])
        rig.request(1, grpc=False, path="/x")
        (req,) = rig.upstream_requests()
        headers = dict(req.headers)
        assert headers[b":authority"] == b"other.example" and b"host" not in headers
    run(scenario)


@pytest.mark.parametrize("how", ["ok", "client_reset", "upstream_reset", "route_timeout", "goaway",
                                 "client_gone", "client_gone_in_delay", "upstream_lost", "over_limit"])
def test_every_end_gives_back_the_slot_and_the_pending_count(how: str) -> None:
    async def scenario() -> None:
        rules = [{**ROUTE, "timeouts": {"request": "50ms"}}] if how == "route_timeout" else [ROUTE]
        ann = {"fault.micromesh.io/http": '{"delay": {"percentage": 100, "fixedDelay": "200ms"}}'} \
            if how == "client_gone_in_delay" else None
        rig = Rig([httproute(rules, annotations=ann)])
        rig.request(1, grpc=False, path="/x")
        if how == "client_gone_in_delay":
            rig.srv.connection_lost(None)
            await asyncio.sleep(0.3)
        else:
            (req,) = rig.upstream_requests()
            sid = req.stream_id
            assert rig.pending() == 1 and rig.ep.lb.pending == 1
            if how == "ok":
                rig.server.send_headers(sid, [(":status", "200")], end_stream=True)
            elif how == "client_reset":
                rig.client.reset_stream(1, ErrorCodes.CANCEL)
            elif how == "upstream_reset":
                rig.server.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            elif how == "route_timeout":
                await asyncio.sleep(0.1)
            elif how == "goaway":
                rig.server.close_connection()
            elif how == "client_gone":
                rig.srv.connection_lost(None)
            elif how == "upstream_lost":
                rig.up.connection_lost(None)
            elif how == "over_limit":
                rig.request(3, grpc=False, path="/y")
                assert b"max pending requests (1) reached" in body(rig)
                rig.server.send_headers(sid, [(":status", "200")], end_stream=True)
            rig.pump()
        await asyncio.sleep(0)
        assert rig.pending() == 0 and rig.ep.lb.pending == 0
    run(scenario)


def test_header_changes_take_host_out_of_the_added_headers() -> None:
    """For HTTP/1 too: a route's Host replaces the request's instead of being sent twice."""
    from microproxy.routes import header_changes
    (route,) = httproute([{**ROUTE, "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "Host", "value": "other.example"}, {"name": "x-a", "value": "1"}],
        "add": [{"name": "x-b", "value": "2"}], "remove": ["x-c"]}}]}]).rules
    extra, drop, host = header_changes(route)
    assert extra == [(b"x-a", b"1"), (b"x-b", b"2")] and host == b"other.example"
    assert drop == {b"host", b"x-a", b"x-c"}


# --- retries (the route's policy, as for HTTP/1: core/retry.py decides)

GRPC_RETRY = {"retry.linkerd.io/grpc": "unavailable", "retry.linkerd.io/limit": "2"}


def upstream_ids(rig: Rig) -> list[int]:
    return [e.stream_id for e in rig.upstream_requests()]


def upstream_body(rig: Rig, sid: int) -> bytes:
    return b"".join(e.data for e in rig.server_events
                    if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)


def grpc_answer(rig: Rig, sid: int, code: int, trailers_only: bool = True) -> None:
    if trailers_only:
        rig.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                      ("grpc-status", str(code))], end_stream=True)
    else:
        rig.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        rig.server.send_data(sid, b"\0\0\0\0\2hi")
        rig.server.send_headers(sid, [("grpc-status", str(code))], end_stream=True)
    rig.pump()


def grpc_call(rig: Rig, body: bytes = b"\0\0\0\0\3abc", end: bool = True) -> None:
    rig.request(1, end=False)
    rig.client.send_data(1, body, end_stream=end)
    rig.pump()


def final_status(rig: Rig) -> bytes | None:
    for h in reversed(answers(rig)):
        if b"grpc-status" in h:
            return h[b"grpc-status"]
    return None


def test_a_grpc_call_answered_unavailable_is_retried_with_its_body() -> None:
    """retry.linkerd.io/grpc: unavailable. The first attempt's trailers-only UNAVAILABLE is
    not forwarded; the call is sent again, body and all, and the caller sees only the OK."""
    async def scenario() -> None:
        rig = Rig([httproute([ROUTE], annotations=GRPC_RETRY)])
        grpc_call(rig)
        (first,) = upstream_ids(rig)
        grpc_answer(rig, first, 14)
        assert answers(rig) == []
        await until(rig, lambda: len(upstream_ids(rig)) == 2)
        second = upstream_ids(rig)[1]
        assert upstream_body(rig, second) == upstream_body(rig, first) == b"\0\0\0\0\3abc"
        grpc_answer(rig, second, 0, trailers_only=False)
        assert final_status(rig) == b"0" and len(answers(rig)) == 2   # headers + trailers
        assert rig.metrics.counter("route_retry_total", ROUTES_KEY) == 1
        assert rig.pending() == 0 and rig.ep.lb.pending == 0
    run(scenario)


def test_retries_stop_at_the_limit_and_the_last_failure_is_forwarded() -> None:
    async def scenario() -> None:
        rig = Rig([httproute([ROUTE], annotations=GRPC_RETRY)])
        grpc_call(rig)
        for n in range(1, 4):
            await until(rig, lambda: len(upstream_ids(rig)) == n)
            grpc_answer(rig, upstream_ids(rig)[-1], 14)
        assert final_status(rig) == b"14" and len(upstream_ids(rig)) == 3   # 1 + limit 2
        assert rig.pending() == 0 and rig.ep.lb.pending == 0
    run(scenario)


def test_what_cannot_be_retried_is_forwarded() -> None:
    """Not retried: a failure after the response began (its head was forwarded), a status
    the policy does not list, and a call whose body the caller has not finished sending."""
    async def scenario() -> None:
        rig = Rig([httproute([ROUTE], annotations=GRPC_RETRY)])
        grpc_call(rig)
        grpc_answer(rig, upstream_ids(rig)[0], 14, trailers_only=False)
        assert final_status(rig) == b"14" and len(upstream_ids(rig)) == 1

        rig = Rig([httproute([ROUTE], annotations=GRPC_RETRY)])
        grpc_call(rig)
        grpc_answer(rig, upstream_ids(rig)[0], 13)   # INTERNAL: not listed
        assert final_status(rig) == b"13" and len(upstream_ids(rig)) == 1

        rig = Rig([httproute([ROUTE], annotations=GRPC_RETRY)])
        grpc_call(rig, end=False)                    # a client stream still open
        grpc_answer(rig, upstream_ids(rig)[0], 14)
        assert final_status(rig) == b"14" and len(upstream_ids(rig)) == 1
    run(scenario)


def test_a_body_over_64_kib_is_not_kept_and_not_retried() -> None:
    async def scenario() -> None:
        rig = Rig([httproute([ROUTE], annotations=GRPC_RETRY)])
        rig.request(1, end=False)
        body = b"x" * (64 * 1024 + 1)
        sent = 0
        while sent < len(body):   # the caller sends as the windows allow; the backend reads
            n = min(rig.client.local_flow_control_window(1), len(body) - sent, 16384)
            if n:
                rig.client.send_data(1, body[sent:sent + n], end_stream=sent + n == len(body))
                sent += n
            rig.pump()
            for e in [e for e in rig.server_events if isinstance(e, h2.events.DataReceived)]:
                rig.server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            rig.server_events = [e for e in rig.server_events if not isinstance(e, h2.events.DataReceived)]
            rig.pump()
            await asyncio.sleep(0)
        grpc_answer(rig, upstream_ids(rig)[0], 14)
        assert final_status(rig) == b"14" and len(upstream_ids(rig)) == 1
    run(scenario)


def test_an_http_status_listed_by_rules_retry_and_an_upstream_reset_are_retried() -> None:
    """Gateway API ``rules[].retry`` (codes: [503]) for a plain HTTP/2 request; and a stream
    the backend resets before answering is retried like a connection error."""
    async def scenario() -> None:
        rig = Rig([httproute([{**ROUTE, "retry": {"attempts": 2, "codes": [503]}}])])
        rig.request(1, grpc=False, path="/x")
        rig.server.send_headers(upstream_ids(rig)[0], [(":status", "503")], end_stream=True)
        rig.pump()
        await until(rig, lambda: len(upstream_ids(rig)) == 2)
        rig.server.reset_stream(upstream_ids(rig)[1], ErrorCodes.REFUSED_STREAM)
        rig.pump()
        await until(rig, lambda: len(upstream_ids(rig)) == 3)
        rig.server.send_headers(upstream_ids(rig)[2], [(":status", "200")], end_stream=True)
        rig.pump()
        assert [a[b":status"] for a in answers(rig)] == [b"200"]
        assert rig.pending() == 0 and rig.ep.lb.pending == 0
    run(scenario)


def test_new_connections_count_against_the_services_connection_limit() -> None:
    """MESH_MAX_CONNECTIONS_PER_SERVICE holds for HTTP/2 too: a dial over the limit is
    refused with 503 naming it; a connection that closes gives its slot back."""
    from tests.test_h2_retries_unit import redialable

    async def scenario() -> None:
        resilience.configure(resilience.Settings({"MESH_MAX_CONNECTIONS_PER_SERVICE": "1"}))
        rig = Rig([httproute([ROUTE])])
        adm = rig.resolve("g.default:8080").svc.admission
        dials = redialable(rig)
        rig.up.goaway = True                      # the rig's own connection is not usable
        rig.request(1, grpc=False, path="/a")
        await until(rig, lambda: dials[0] == 1 and len(rig.upstream_requests()) == 1)
        assert adm.connections == 1
        first = rig.up
        first.goaway = True                       # full (as if retired): another dial is needed
        rig.request(3, grpc=False, path="/b")
        await until(rig, lambda: answers(rig))
        assert answers(rig)[0][b":status"] == b"503"
        assert b"max connections (1) reached" in body(rig) and dials[0] == 1
        first.connection_lost(None)               # its slot comes back
        assert adm.connections == 0
        rig.request(5, grpc=False, path="/c")
        await until(rig, lambda: dials[0] == 2)
        assert adm.connections == 1
    run(scenario)
