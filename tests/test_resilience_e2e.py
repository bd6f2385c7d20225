"""Resilience end to end on a real local mesh (control plane, proxies, apps as subprocesses):

- P2C peak-EWMA: one slow replica (+50 ms) of three gets clearly less traffic;
- failure accrual: a replica failing every request is ejected after ~7 failures, /config
  and the balancer gauge show it open, the others take its traffic; when every replica
  fails, the caller gets a fast 503 with ``x-mesh-proxy-error`` and flag UO;
- retries with budgets: a replica failing 20 % looks >= 99 % successful; a replica failing
  100 % gets at most 1.2x the requests plus the budget's minimum (no retry storm).

Retry policy: HTTPRoute support lands separately; these tests use the proxy's test/ops
default policy ``MESH_DEFAULT_RETRY=5xx:2`` (applied to requests no HTTPRoute rule matched),
which is parsed exactly like Linkerd's ``retry.linkerd.io/http`` + ``limit`` annotations.
Apps are ``tests/resilience_app.py``: failure rate and latency set at run time through
their ``/_control`` endpoint. Every wait polls against a deadline.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microproxy.resilience import CIRCUIT_OPEN
from tests.harness import PY, AppProc, Mesh, ProxyProc, clean_env, metric_sum, running_mesh, wait_until

pytestmark = pytest.mark.timeout(180)


@dataclass
class Service:
    name: str
    apps: list[AppProc]
    proxies: list[ProxyProc]

    @property
    def authority(self) -> str:
        return f"{self.name}.default:{self.apps[0].http}"

    def app_get(self, i: int, path: str) -> bytes:
        c = http.client.HTTPConnection("127.0.0.1", self.apps[i].http, timeout=5)
        try:
            c.request("GET", path)
            return c.getresponse().read()
        finally:
            c.close()

    def hits(self) -> list[int]:
        return [json.loads(self.app_get(i, "/_count"))["hits"] for i in range(len(self.apps))]

    def control(self, i: int, **kv: int) -> None:
        self.app_get(i, "/_control?" + "&".join(f"{k}={v}" for k, v in kv.items()))


def start_app(mesh: Mesh, name: str) -> AppProc:
    ports_file = mesh._ports_file(name)
    app: AppProc = mesh._spawn(AppProc, name, [PY, "-m", "tests.resilience_app", "--name", name,
                                               "--ports-file", str(ports_file)], clean_env(), ports_file)
    app.wait_ports(("http",))
    return app


def start_service(mesh: Mesh, name: str, n: int) -> Service:
    apps = [start_app(mesh, f"{name}{i}") for i in range(n)]
    port = str(apps[0].http)
    proxies = [mesh.start_proxy(name, app_port=a.http, wait=False, MESH_SERVICE_PORT=port,
                                MESH_INSTANCE=f"{name}-{i}") for i, a in enumerate(apps)]
    return Service(name, apps, proxies)


@dataclass
class World:
    mesh: Mesh
    lb: Service
    cb: Service
    flaky: Service
    dead: Service
    client: ProxyProc      # failure accrual on (the default), no retries
    rclient: ProxyProc     # MESH_DEFAULT_RETRY=5xx:2, failure accrual off (to see the budget alone)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_mesh() as mesh:
        lb, cb = start_service(mesh, "lb", 3), start_service(mesh, "cb", 3)
        flaky, dead = start_service(mesh, "flaky", 1), start_service(mesh, "dead", 1)
        client = mesh.start_proxy("client", wait=False)
        rclient = mesh.start_proxy("rclient", wait=False, MESH_DEFAULT_RETRY="5xx:2",
                                   MESH_FAILURE_ACCRUAL="off")
        for s in (lb, cb, flaky, dead):
            for p in s.proxies:
                p.wait_ready()
        client.wait_ready()
        rclient.wait_ready()
        w = World(mesh, lb, cb, flaky, dead, client, rclient)
        for s in (lb, cb):   # every replica known to the client before the measurements
            wait_until(lambda s=s: len(resolution(client, s.authority)) == len(s.apps), 10,
                       f"{s.name} endpoints")
        yield w
        tracebacks = mesh.logs_with("Traceback")
        assert not tracebacks, f"tracebacks in {tracebacks}"


def resolution(proxy: ProxyProc, authority: str) -> list[dict]:
    status, body = proxy.admin_get("/config")
    if status != 200:
        return []
    r = json.loads(body)["resolutions"].get(authority)
    if r is None:
        get(proxy, authority)   # start the watch
        return []
    return r["endpoints"]


def balancer(proxy: ProxyProc, authority: str) -> dict:
    return json.loads(proxy.admin_get("/config")[1])["balancer"][authority]


class Client:
    """Keep-alive requests to a proxy's outbound listener."""

    def __init__(self, proxy: ProxyProc) -> None:
        self.port = proxy.outbound
        self.c: http.client.HTTPConnection | None = None

    def get(self, authority: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        for _ in range(2):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.c.request("GET", path, headers={"Host": authority})
                r = self.c.getresponse()
                body = r.read()
                if r.will_close:
                    self.c.close()
                    self.c = None
                return r.status, {k.lower(): v for k, v in r.getheaders()}, body
            except (ConnectionError, http.client.HTTPException):
                self.c.close()
                self.c = None
        raise AssertionError("request failed twice")


def get(proxy: ProxyProc, authority: str) -> int:
    return Client(proxy).get(authority)[0]


def run_parallel(proxy: ProxyProc, authority: str, n: int, threads: int = 4) -> list[int]:
    out: list[int] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        c = Client(proxy)
        for _ in range(k):
            s = c.get(authority)[0]
            with lock:
                out.append(s)
    ts = [threading.Thread(target=work, args=(n // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_slow_endpoint_gets_less_traffic(world: World) -> None:
    s = world.lb
    s.control(2, delay_ms=50)
    before = s.hits()
    c = Client(world.client)
    statuses = [c.get(s.authority)[0] for _ in range(300)]
    assert statuses.count(200) == 300
    fast0, fast1, slow = (a - b for a, b in zip(s.hits(), before))
    assert slow < 0.25 * min(fast0, fast1), (fast0, fast1, slow)
    eps = {e["address"]: e for e in balancer(world.client, s.authority)["endpoints"]}
    # /config shows each endpoint's latency estimate. (Not asserted: that the slow one's
    # estimate is still high at the end. P2C may never pick it after it once looked slower,
    # and an unpicked estimate decays towards 0 with a 10 s time constant.)
    assert len(eps) == 3 and all(isinstance(e["ewma_ms"], (int, float)) for e in eps.values())


def test_failing_endpoint_is_ejected_then_all_open_fails_fast(world: World) -> None:
    s, client = world.cb, world.client
    # The classic trap the breaker exists for: a replica failing fast looks cheapest to a
    # latency balancer (the others answer in 40 ms), so P2C keeps choosing it until its
    # breaker opens. (Also deterministic: new endpoints start at peak-EWMA's 30 ms default.)
    s.control(0, fail_every=1)
    s.control(1, delay_ms=40)
    s.control(2, delay_ms=40)
    before = s.hits()
    c = Client(client)
    statuses = [c.get(s.authority)[0] for _ in range(60)]
    bad, good0, good1 = (a - b for a, b in zip(s.hits(), before))
    # 7 consecutive failures trip it; a probe after each 1-2 s backoff may fail once more
    assert 7 <= bad <= 10, bad
    assert statuses.count(500) == bad and good0 + good1 == 60 - bad
    bad_addr = f"127.0.0.1:{s.proxies[0].inbound}"

    def is_open() -> bool:
        eps = {e["address"]: e for e in balancer(client, s.authority)["endpoints"]}
        return eps[bad_addr]["breaker"] == "open"
    wait_until(is_open, 5, "breaker open in /config")
    m = client.metrics()
    assert metric_sum(m, "outbound_http_endpoint_breaker_open", authority=s.authority) >= 1

    # every endpoint failing: each trips after its 7 failures, then fast 503 UO
    s.control(1, fail_every=1, delay_ms=0)
    s.control(2, fail_every=1, delay_ms=0)
    deadline = time.monotonic() + 10
    while True:
        status, headers, _ = c.get(s.authority)
        if status == 503:
            break
        assert status == 500 and time.monotonic() < deadline
    assert headers["x-mesh-proxy-error"] == CIRCUIT_OPEN
    t0 = time.perf_counter()
    status, headers, _ = c.get(s.authority)
    assert status == 503 and time.perf_counter() - t0 < 0.1
    states = [e["state"] for e in balancer(client, s.authority)["endpoints"]]
    assert states.count("ready") == 0, states
    assert metric_sum(client.metrics(), "outbound_http_balancer_endpoints", authority=s.authority,
                      endpoint_state="ready") == 0
    wait_until(lambda: "UO" in client.log_text() and CIRCUIT_OPEN in client.log_text(), 5,
               "the access log's UO flag")
    for i in range(3):
        s.control(i, fail_every=0)


def test_retries_hide_a_flaky_backend(world: World) -> None:
    s = world.flaky
    s.control(0, fail_every=5)   # 20 % of the calls fail
    before = s.hits()[0]
    statuses = run_parallel(world.rclient, s.authority, 300)
    ok = statuses.count(200) / len(statuses)
    assert ok >= 0.99, statuses.count(500)
    attempts = s.hits()[0] - before
    assert attempts > 300   # retries happened
    assert metric_sum(world.rclient.metrics(), "route_retry_total") >= attempts - 300

    def row_of() -> dict | None:   # /routes counts whole seconds: the current one shows next second
        routes = json.loads(world.rclient.admin_get("/routes?window=60")[1])["routes"]
        rows = [r for r in routes if r["authority"] == s.authority]
        return rows[0] if rows and rows[0]["effective"]["requests"] == 300 else None
    row = wait_until(row_of, 3, "the route's row in /routes")
    assert row["route"] == "[DEFAULT]"
    assert row["actual"]["requests"] > row["effective"]["requests"]


def test_no_retry_storm_on_a_dead_backend(world: World) -> None:
    s = world.dead
    s.control(0, fail_every=1)
    before = s.hits()[0]
    n = 400
    statuses = run_parallel(world.rclient, s.authority, n, threads=8)
    assert statuses.count(500) == n
    attempts = s.hits()[0] - before
    # budget: retries <= 0.2 * requests + 10/s * 10 s
    assert attempts <= 1.2 * n + 100, attempts
    m = world.rclient.metrics()
    assert metric_sum(m, "retry_budget_exhausted_total") > 0
    wait_until(lambda: "URX" in world.rclient.log_text(), 5, "URX in the access log")


# --- the CLI on a `mesh up` mesh: `mesh routes` (effective vs actual) and `mesh proxy-status`

def test_mesh_routes_and_proxy_status(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cli import local
    from tests.test_cli_local import mesh, ps, sweep
    home = tmp_path / "mesh-home"
    try:
        mesh(home, "up")
        port = local.free_port()
        mesh(home, "run", "--name", "shop", "--port", str(port), "--detach", "--",
             PY, "-m", "tests.resilience_app", "--name", "shop", FAIL_EVERY="5", PYTHONPATH=str(Path.cwd()))
        mesh(home, "run", "--name", "buyer", "--detach", "--", "sleep", "120", MESH_DEFAULT_RETRY="5xx:2")
        [buyer] = [w for w in ps(home) if w["name"] == "buyer"]
        authority = f"shop.default:{port}"
        c = http.client.HTTPConnection("127.0.0.1", buyer["outbound_port"], timeout=10)
        statuses = []
        for _ in range(100):
            c.request("GET", "/", headers={"Host": authority})
            r = c.getresponse()
            r.read()
            statuses.append(r.status)
        assert statuses.count(200) >= 99

        def default_row() -> dict | None:   # /routes counts whole seconds
            rows = json.loads(mesh(home, "routes", "shop", "-o", "json").stdout)
            [row] = [r for r in rows if r["route"] == "[DEFAULT]"]
            return row if row["effective_requests"] == 100 else None
        row = wait_until(default_row, 5, "mesh routes' [DEFAULT] row")
        assert row["effective_requests"] == 100 and row["actual_requests"] > 100, row
        assert row["effective_success"] >= 0.99 and row["actual_success"] < 0.9
        wide = mesh(home, "routes", "shop", "-o", "wide").stdout
        assert wide.split("\n")[0].split() == ["ROUTE", "SERVICE", "SUCCESS", "RPS", "LATENCY_P50",
                                               "LATENCY_P95", "LATENCY_P99", "EFFECTIVE_SUCCESS",
                                               "EFFECTIVE_RPS", "ACTUAL_SUCCESS", "ACTUAL_RPS"]
        status = json.loads(mesh(home, "proxy-status", "-o", "json").stdout)
        by_name = {r["name"]: r for r in status}
        assert by_name["buyer"]["endpoints"] == "SYNCED", status
        assert by_name["shop"]["policy"] == "SYNCED", status
        print(mesh(home, "proxy-status").stdout)
    finally:
        mesh(home, "down", check=False)
        sweep(home)
