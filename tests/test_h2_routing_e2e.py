"""HTTPRoutes for gRPC calls (HTTP/2 streams) end to end, on a real local mesh (`mesh up`,
`mesh run --detach`, routes applied with `mesh apply -f`).

Services (service port 8080): ``g`` (the parent Service the client calls), ``g-v1`` and
``g-v2``, each a grpcio server answering ``/mesh.Greeter/Who`` with its name and the
``x-route-tag`` metadata it got; ``/mesh.Greeter/Slow`` answers after 3 s. The client is a
client-only workload; a grpcio channel sends h2c to its outbound port with the service's
authority, as in tests/test_h2_e2e.py.

Shown: a header match sends a call to ``g-v2`` with the rule's RequestHeaderModifier and
ResponseHeaderModifier applied, other calls take the catch-all rule to ``g-v1``;
``timeouts.request`` ends a slow call with DEADLINE_EXCEEDED naming the timeout; a fault
abort answers UNAVAILABLE without reaching an app; route metrics count the calls; a client
with ``MESH_MAX_PENDING_REQUESTS=1`` refuses a second call while one is in flight; with
``retry.linkerd.io/grpc: unavailable`` a backend failing every other call looks healthy.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from cli import local  # noqa: E402
from tests.harness import HOST, metric_sum, wait_until  # noqa: E402
from tests.test_cli_local import mesh, needs_proxy, ps, sweep  # noqa: E402
from tests.test_routing_e2e import SVC, route as http_route  # noqa: E402

pytestmark = [pytest.mark.timeout(180), needs_proxy]

SERVICE = "mesh.Greeter"

APP = """\
import os, sys, time
from concurrent import futures
import grpc
NAME = sys.argv[1]
def ident(b):
    return b
def who(request, context):
    md = dict(context.invocation_metadata())
    return f"{NAME} {md.get('x-route-tag', '-')}".encode()
def slow(request, context):
    time.sleep(3)
    return NAME.encode()
calls = {"n": 0}
def flaky(request, context):   # every other call: UNAVAILABLE
    calls["n"] += 1
    if calls["n"] % 2:
        context.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
    return NAME.encode() + b" " + request
kw = {"request_deserializer": ident, "response_serializer": ident}
handler = grpc.method_handlers_generic_handler("mesh.Greeter", {
    "Who": grpc.unary_unary_rpc_method_handler(who, **kw),
    "Slow": grpc.unary_unary_rpc_method_handler(slow, **kw),
    "Flaky": grpc.unary_unary_rpc_method_handler(flaky, **kw)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"127.0.0.1:{os.environ['PORT']}")
server.start()
server.wait_for_termination()
"""


@dataclass
class Env:
    home: Path
    tmp: Path
    outbound: int
    admin: int
    limited: int          # a client with MESH_MAX_PENDING_REQUESTS=1: its outbound port
    limited_admin: int    # ... and its admin port

    def channel(self, port: int = 0) -> grpc.Channel:
        return grpc.insecure_channel(f"{HOST}:{port or self.outbound}", options=[
            ("grpc.default_authority", f"g.default:{SVC}"), ("grpc.enable_http_proxy", 0)])

    def who(self, metadata: tuple[tuple[str, str], ...] = ()) -> tuple[str, dict[str, str]]:
        """(reply, the response's initial metadata)"""
        with self.channel() as ch:
            reply, call = ch.unary_unary(f"/{SERVICE}/Who").with_call(b"", timeout=10, metadata=metadata)
            return reply.decode(), dict(call.initial_metadata())

    def apply(self, text: str) -> None:
        path = self.tmp / f"route-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        mesh(self.home, "apply", "-f", str(path))

    def metrics(self) -> str:
        return local.admin_get(self.admin, "/metrics")[1].decode()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("h2routing")
    home = tmp / "mesh-home"
    app = tmp / "app.py"
    app.write_text(APP)
    mesh(home, "up")
    try:
        for name in ("g", "g-v1", "g-v2"):
            mesh(home, "run", "--name", name, "--port", str(local.free_port()), "--service-port", str(SVC),
                 "--detach", "--", sys.executable, str(app), name)
        mesh(home, "run", "--name", "client", "--detach", "--", "sleep", "600")
        mesh(home, "run", "--name", "limited", "--detach", "--", "sleep", "600",
             MESH_MAX_PENDING_REQUESTS="1")
        w = {w["name"]: w for w in ps(home)}
        e = Env(home, tmp, int(w["client"]["outbound_port"]), int(w["client"]["admin_port"]),
                int(w["limited"]["outbound_port"]), int(w["limited"]["admin_port"]))
        assert e.who()[0] == "g -"   # no route yet: the service itself
        yield e
    finally:
        mesh(home, "down", check=False)
        sweep(home)


@pytest.fixture(autouse=True)
def no_routes_left(env: Env) -> Iterator[None]:
    yield
    mesh(env.home, "delete", "httproute", "g-split", "--ignore-not-found")

    def plain() -> bool:
        try:
            return env.who()[0] == "g -"
        except grpc.RpcError:
            return False

    wait_until(plain, 10, "the route to be gone")


def route(name: str, rules: str, annotations: str = "") -> str:
    return http_route(name, rules, annotations, parent="g")


GRPC_ROUTES = route("g-split", f"""\
  - matches: [{{headers: [{{name: x-version, value: v2}}]}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: x-route-tag, value: beta}}]}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{add: [{{name: x-routed-by, value: g-split}}]}}
    backendRefs: [{{name: g-v2, port: {SVC}}}]
  - matches: [{{path: {{type: Exact, value: /{SERVICE}/Slow}}}}]
    timeouts: {{request: 300ms}}
    backendRefs: [{{name: g-v1, port: {SVC}}}]
  - backendRefs: [{{name: g-v1, port: {SVC}}}]
""")


def test_grpc_calls_follow_httproute_rules(env: Env) -> None:
    env.apply(GRPC_ROUTES)
    wait_until(lambda: env.who()[0] == "g-v1 -", 10, "the route to apply")
    reply, md = env.who((("x-version", "v2"),))
    assert reply == "g-v2 beta" and md.get("x-routed-by") == "g-split", (reply, md)
    assert env.who()[0] == "g-v1 -"
    t0 = time.monotonic()
    with env.channel() as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=10)
    assert time.monotonic() - t0 < 2.5
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "request timeout (timeouts.request 300ms)" in err.value.details()
    m = env.metrics()
    assert metric_sum(m, "route_request_total", rt_route="g-split") >= 4
    assert metric_sum(m, "route_response_total", rt_route="g-split", classification="failure") >= 1
    # ... and `mesh routes` sees them (the proxy's /routes windows count whole seconds)

    def split_rows() -> int:
        rows = json.loads(local.admin_get(env.admin, "/routes?window=60")[1])["routes"]
        return sum(r["effective"]["requests"] for r in rows if r["route"] == "g-split")

    wait_until(lambda: split_rows() >= 4, 5, "g-split in /routes")


def test_grpc_fault_abort(env: Env) -> None:
    env.apply(route("g-split", f"""\
  - backendRefs: [{{name: g-v1, port: {SVC}}}]
""", annotations="""{fault.micromesh.io/http: '{"abort": {"percentage": 100, "httpStatus": 503}}'}"""))

    def aborted() -> bool:
        try:
            env.who()
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE and "fault injected: abort" in e.details()
        return False

    wait_until(aborted, 10, "the fault to apply")


def test_grpc_calls_over_the_pending_limit_fail_fast(env: Env) -> None:
    """MESH_MAX_PENDING_REQUESTS holds for HTTP/2 streams too: with one slow call in flight
    a second call is refused at once (UNAVAILABLE, naming the limit); then calls flow again."""
    def pending() -> int:
        cfg = json.loads(local.admin_get(env.limited_admin, "/config")[1])
        return int(cfg["balancer"].get(f"g.default:{SVC}", {}).get("pending_requests", 0))

    with env.channel(env.limited) as ch:
        slow = ch.unary_unary(f"/{SERVICE}/Slow").future(b"", timeout=10)
        wait_until(lambda: pending() == 1, 2, "the slow call in flight")
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "max pending requests (1) reached" in err.value.details()
        assert slow.result() == b"g"
        assert pending() == 0
        assert ch.unary_unary(f"/{SERVICE}/Who")(b"", timeout=10) == b"g -"


def test_grpc_calls_are_retried_by_the_routes_policy(env: Env) -> None:
    """``retry.linkerd.io/grpc: unavailable`` on the route: a backend failing every other
    call with UNAVAILABLE looks healthy to the caller, and each call's body reaches it again
    on the retry; the retries are counted."""
    env.apply(route("g-split", f"""\
  - backendRefs: [{{name: g-v1, port: {SVC}}}]
""", annotations="{retry.linkerd.io/grpc: unavailable, retry.linkerd.io/limit: '2'}"))
    wait_until(lambda: env.who()[0] == "g-v1 -", 10, "the route to apply")
    with env.channel() as ch:
        flaky = ch.unary_unary(f"/{SERVICE}/Flaky")
        replies = [flaky(b"%d" % i, timeout=10) for i in range(20)]
    assert replies == [b"g-v1 %d" % i for i in range(20)]
    assert metric_sum(env.metrics(), "route_retry_total") >= 9


def test_a_grpcroute_routes_by_method(env: Env) -> None:
    """A Gateway API GRPCRoute (`mesh apply`, `mesh get grpcroutes`, `mesh delete`): the
    method match sends Who to g-v2, the catch-all rule sends the rest to g-v1."""
    env.apply(f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: g-grpc}}
spec:
  parentRefs: [{{group: core, kind: Service, name: g, port: {SVC}}}]
  rules:
  - matches: [{{method: {{service: {SERVICE}, method: Who}}}}]
    backendRefs: [{{name: g-v2, port: {SVC}}}]
  - backendRefs: [{{name: g-v1, port: {SVC}}}]
""")
    try:
        wait_until(lambda: env.who()[0] == "g-v2 -", 10, "the GRPCRoute to apply")
        with env.channel() as ch:   # (Flaky fails every other call on its replica)
            flaky, got = ch.unary_unary(f"/{SERVICE}/Flaky"), []
            for _ in range(2):
                try:
                    got.append(flaky(b"x", timeout=10))
                except grpc.RpcError as e:
                    assert e.details() == "flaky", e
            assert got == [b"g-v1 x"]
        listed = mesh(env.home, "get", "grpcroutes").stdout
        assert "g-grpc" in listed and "g-v2" in listed, listed
        assert metric_sum(env.metrics(), "route_request_total", rt_route="g-grpc") >= 2
    finally:
        mesh(env.home, "delete", "grpcroute", "g-grpc", "--ignore-not-found")
