"""Prometheus integration: the scrape config `mesh prometheus-config` prints, proxies'
/metrics under `promtool check metrics`, and a real Prometheus scraping a real mesh whose
numbers must agree with the traffic the test sent.

The e2e part: a tmp mesh with two workloads, ``srv`` (a stdlib app answering every GET
after DELAY_MS) and ``drv`` (a client-only workload whose app, on a control port of its
own, sends N requests at R per second through its proxy when asked). Prometheus scrapes
both proxies every second. The test waits by polling Prometheus' API with deadlines.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli import local, promconfig
from identity.store import MeshHome, write_json
from tests.test_cli_local import mesh, needs_proxy, sweep

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt: prometheus)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt: prometheus)")

DELAY_MS = 25           # every srv response waits this long
WARMUP = 5              # requests that create the series before the measured traffic
N, RPS = 150, 25.0      # the measured traffic: 6 s

SRV_APP = """\
import http.server, os, sys, time
DELAY = float(sys.argv[1]) / 1000

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go out as two writes

    def do_GET(self):
        time.sleep(DELAY)
        body = b"ok\\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

DRV_APP = """\
import http.client, http.server, json, os, sys, time, urllib.parse
PROXY = urllib.parse.urlsplit(os.environ["http_proxy"])

def connect():
    return http.client.HTTPConnection(PROXY.hostname, PROXY.port, timeout=10)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        n, rps, host = int(q["n"][0]), float(q["rps"][0]), q["host"][0]
        conn, ok, latencies = connect(), 0, []
        start = time.monotonic()
        for i in range(n):
            pause = start + i / rps - time.monotonic()   # a fixed schedule: R per second
            if pause > 0:
                time.sleep(pause)
            t = time.monotonic()
            try:
                conn.request("GET", f"http://{host}/", headers={"Host": host})
                resp = conn.getresponse()
                resp.read()
                ok += resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = connect()
            latencies.append((time.monotonic() - t) * 1000)
        body = json.dumps({"sent": n, "ok": ok, "seconds": time.monotonic() - start,
                           "latencies_ms": latencies}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


# === the scrape config ===

def record(name: str, instance: str, admin: int, alive: bool = True, ns: str = "default") -> dict[str, Any]:
    return {"name": name, "namespace": ns, "instance": instance, "admin_port": admin, "alive": alive}


def test_targets_one_group_per_live_proxy_sorted() -> None:
    groups = promconfig.targets([record("web", "web-2", 4002), record("books", "books-1", 4001),
                                 record("gone", "gone-1", 4003, alive=False),
                                 record("authors", "authors-1", 4004, ns="lib")])
    assert groups == [
        {"targets": ["127.0.0.1:4001"], "labels": {"namespace": "default", "workload": "books", "pod": "books-1"}},
        {"targets": ["127.0.0.1:4002"], "labels": {"namespace": "default", "workload": "web", "pod": "web-2"}},
        {"targets": ["127.0.0.1:4004"], "labels": {"namespace": "lib", "workload": "authors", "pod": "authors-1"}},
    ]


def test_config_static_and_file_sd() -> None:
    groups = promconfig.targets([record("books", "books-1", 4001)])
    cfg = yaml.safe_load(promconfig.render(promconfig.config(groups, "2s")))
    assert cfg["global"]["scrape_interval"] == "2s"
    [job] = cfg["scrape_configs"]
    assert job["job_name"] == "micromesh-proxy" and job["honor_labels"] is True
    assert job["static_configs"] == groups
    cfg = yaml.safe_load(promconfig.render(promconfig.config(groups, "1s", Path("/tmp/t.json"))))
    assert cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["/tmp/t.json"]
    assert "static_configs" not in cfg["scrape_configs"][0]


@pytest.mark.parametrize("text, valid", [("1s", True), ("500ms", True), ("1m30s", True), ("1", False),
                                         ("1 s", False), ("", False), ("-1s", False)])
def test_valid_duration(text: str, valid: bool) -> None:
    assert promconfig.valid_duration(text) is valid


def fake_workloads(home: Path, ports: list[int]) -> None:
    """Workload records that look alive (their supervisor is this test process)."""
    me = {"supervisor_pid": os.getpid(), "supervisor_start": local.start_time(os.getpid())}
    for i, port in enumerate(ports):
        write_json(home / "workloads" / f"books-{i}.json",
                   {"name": "books", "namespace": "default", "instance": f"books-{i}", "admin_port": port, **me})


def test_cli_prints_a_config_promtool_accepts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fake_workloads(home, [4001, 4002])
    r = mesh(home, "prometheus-config", "--interval", "5s")
    cfg = yaml.safe_load(r.stdout)
    assert cfg["global"]["scrape_interval"] == "5s"
    assert [g["targets"] for g in cfg["scrape_configs"][0]["static_configs"]] == [["127.0.0.1:4001"],
                                                                                  ["127.0.0.1:4002"]]
    if PROMTOOL:
        (tmp_path / "prometheus.yml").write_text(r.stdout)
        check = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_cli_file_sd_writes_targets_and_is_refreshed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fake_workloads(home, [4001])
    sd = tmp_path / "sd" / "targets.json"
    cfg = yaml.safe_load(mesh(home, "prometheus-config", "--file-sd", str(sd)).stdout)
    assert cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(sd)]
    assert [g["targets"] for g in json.loads(sd.read_text())] == [["127.0.0.1:4001"]]
    fake_workloads(home, [4001, 4002])          # a new replica: running it again refreshes the file
    mesh(home, "prometheus-config", "--file-sd", str(sd))
    assert [g["targets"] for g in json.loads(sd.read_text())] == [["127.0.0.1:4001"], ["127.0.0.1:4002"]]


def test_cli_rejects_a_bad_interval_and_warns_without_workloads(tmp_path: Path) -> None:
    r = mesh(tmp_path / "home", "prometheus-config", "--interval", "soon", check=False)
    assert r.returncode == 2 and "not a Prometheus duration" in r.stderr
    r = mesh(tmp_path / "home", "prometheus-config")
    assert yaml.safe_load(r.stdout)["scrape_configs"][0]["static_configs"] == []
    assert "no workloads are running" in r.stderr


# === a real mesh ===

@dataclass
class Mesh:
    home: MeshHome
    srv: dict[str, Any]
    drv: dict[str, Any]
    drv_port: int
    tmp: Path

    def drive(self, n: int, rps: float) -> dict[str, Any]:
        """Have drv send ``n`` requests at ``rps`` to srv through the mesh; returns its report."""
        query = urllib.parse.urlencode({"n": n, "rps": rps, "host": f"srv.default:{self.srv['service_port']}"})
        with no_proxy_opener().open(f"http://127.0.0.1:{self.drv_port}/?{query}", timeout=60) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]


def no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str) -> bool | None:
    try:
        with no_proxy_opener().open(url, timeout=1) as resp:
            return True if resp.status == 200 else None
    except OSError:
        return None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    if importlib_missing_proxy():
        pytest.skip("the proxy (python -m microproxy) is not in this tree")
    tmp = tmp_path_factory.mktemp("prom")
    home = MeshHome(tmp / "mesh-home")
    (tmp / "srv.py").write_text(SRV_APP)
    (tmp / "drv.py").write_text(DRV_APP)
    try:
        local.up(home)
        srv = local.run_detached(home, local.WorkloadSpec(
            name="srv", cmd=(sys.executable, str(tmp / "srv.py"), str(DELAY_MS)), port=local.free_port(), cwd=str(tmp)))
        drv_port = local.free_port()
        drv = local.run_detached(home, local.WorkloadSpec(
            name="drv", cmd=(sys.executable, str(tmp / "drv.py"), str(drv_port)), cwd=str(tmp)))
        assert local.wait_for(lambda: True if not local.port_free(drv_port) else None, 10), \
            "drv's app never listened"
        yield Mesh(home, srv, drv, drv_port, tmp)
    finally:
        local.down(home)
        sweep(home.root)


def importlib_missing_proxy() -> bool:
    import importlib.util
    return importlib.util.find_spec("microproxy.__main__") is None


# --- Prometheus itself

class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path) -> None:
        assert PROMETHEUS is not None
        self.port = local.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with no_proxy_opener().open(url, timeout=5) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, float]:
        """An instant query: {labels rendered as text: value}."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in data["result"]}

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        values = list(self.query(expr, at).values())
        return values[0] if len(values) == 1 and not math.isnan(values[0]) else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def prometheus(live: Mesh) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (apt: prometheus)")
    config = live.tmp / "prometheus.yml"
    groups = promconfig.targets(local.list_workloads(live.home, probe=False))
    config.write_text(promconfig.render(promconfig.config(groups, "1s")))
    prom = Prometheus(config, live.tmp / "tsdb", live.tmp / "prometheus.log")
    try:
        ready = local.wait_for(lambda: http_ok(f"{prom.url}/-/ready"), 15)
        assert ready, f"prometheus not ready: {local.log_tail(prom.log)}"

        def both_up() -> bool | None:
            active = prom.api("targets")["activeTargets"]
            return True if len(active) == 2 and all(t["health"] == "up" for t in active) else None
        assert local.wait_for(both_up, 15, 0.2), prom.api("targets")
        yield prom
    finally:
        prom.stop()


SRV_IN = 'direction="inbound",workload="srv"'
DRV_OUT = 'direction="outbound",workload="drv"'


def wait_total(prom: Prometheus, expected: int, timeout: float = 15.0) -> float:
    """Poll until Prometheus holds ``expected`` requests on both sides; returns that time."""
    def seen() -> float | None:
        inbound = prom.scalar(f"sum(request_total{{{SRV_IN}}})")
        outbound = prom.scalar(f"sum(request_total{{{DRV_OUT}}})")
        return local.wall() if inbound == expected and outbound == expected else None
    at = local.wait_for(seen, timeout, 0.2)
    assert at is not None, (prom.query("request_total"), expected)
    return at


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return math.nan


def samples(prom: Prometheus, selector: str, at: float) -> list[tuple[float, float]]:
    """(timestamp, value summed over the selected series) of the last minute's scrapes."""
    data = prom.api("query", query=f"{selector}[60s]", time=f"{at:.3f}")
    totals: dict[float, float] = {}
    for series in data["result"]:
        for ts, value in series["values"]:
            totals[float(ts)] = totals.get(float(ts), 0.0) + float(value)
    return sorted(totals.items())


def srv_buckets(live: Mesh) -> dict[float, float]:
    """srv proxy's inbound latency buckets straight from its /metrics, summed over label sets."""
    _, body = local.admin_get(live.srv["admin_port"], "/metrics")
    out: dict[float, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("response_latency_ms_bucket{") and 'direction="inbound"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = out.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@needs_proxy
@needs_prometheus
def test_prometheus_agrees_with_the_traffic_sent(live: Mesh, prometheus: Prometheus) -> None:
    prom = prometheus
    # warm-up: create the series, and wait until Prometheus has them
    assert live.drive(WARMUP, 50)["ok"] == WARMUP
    wait_total(prom, WARMUP)
    before = srv_buckets(live)

    t0 = local.wall()
    report = live.drive(N, RPS)
    assert report["ok"] == N, report
    assert report["seconds"] == pytest.approx((N - 1) / RPS, abs=1.0)   # the schedule was kept
    t_end = wait_total(prom, WARMUP + N)

    # the exact count, and increase() over a window holding all the traffic (increase
    # extrapolates to the window's edges, so it may only exceed the truth, by a few %)
    assert prom.scalar(f"sum(request_total{{{SRV_IN}}})", t_end) == WARMUP + N
    window = math.ceil(t_end - t0) + 2
    for side in (SRV_IN, DRV_OUT):
        inc = prom.scalar(f"sum(increase(request_total{{{side}}}[{window}s]))", t_end)
        assert inc is not None and N <= inc <= 1.25 * N, (side, inc)

    # the rate in the middle of the traffic: R per second on each side
    t_mid = t0 + (N / RPS) * 0.75
    rates = prom.query(f"sum by (direction) (rate(request_total{{workload=~\"srv|drv\"}}[3s]))", t_mid)
    assert {json.loads(k)["direction"]: v for k, v in rates.items()} == {
        "inbound": pytest.approx(RPS, rel=0.15), "outbound": pytest.approx(RPS, rel=0.15)}

    # A window whose edges are scrapes of srv's proxy (the last one before the traffic,
    # the first one holding all of it): no extrapolation, so Prometheus must see exactly
    # what the proxy counted: N requests, and the same p99 as its own buckets give.
    series = samples(prom, f"request_total{{{SRV_IN}}}", t_end)
    t_a = max(ts for ts, v in series if v == WARMUP)
    t_b = min(ts for ts, v in series if v == WARMUP + N)
    exact = f"{round((t_b - t_a) * 1000)}ms"
    assert prom.scalar(f"sum(increase(request_total{{{SRV_IN}}}[{exact}]))", t_b) == pytest.approx(N)
    after = srv_buckets(live)
    expected = quantile(0.99, [(le, after[le] - before.get(le, 0.0)) for le in after])
    p99 = prom.scalar(f"histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{SRV_IN}}}"
                      f"[{exact}])) by (le))", t_b)
    assert p99 == pytest.approx(expected, rel=1e-6), (p99, expected, after, before)
    assert DELAY_MS <= p99 <= DELAY_MS + 75      # every response waited DELAY_MS in the app
    # over the realistic window too, p99 stays in the range the traffic allows
    p99_window = prom.scalar(f"histogram_quantile(0.99, sum(rate(response_latency_ms_bucket{{{SRV_IN}}}"
                             f"[{window}s])) by (le))", t_end)
    assert p99_window is not None and DELAY_MS <= p99_window <= DELAY_MS + 75
    client_p99 = sorted(report["latencies_ms"])[math.ceil(0.99 * N) - 1]
    assert client_p99 >= DELAY_MS

    # the labels the scrape config adds
    pods = prom.query(f"count by (namespace, workload, pod) (request_total{{{SRV_IN}}})")
    assert [json.loads(k) for k in pods] == [{"namespace": "default", "workload": "srv",
                                             "pod": live.srv["instance"]}]


@needs_proxy
@needs_promtool
def test_proxy_metrics_pass_promtool(live: Mesh) -> None:
    """Every family of both proxies, after traffic: only the known unit lint about Linkerd's
    response_latency_ms name is allowed."""
    live.drive(3, 50)
    assert PROMTOOL is not None
    for rec in (live.srv, live.drv):
        status, body = local.admin_get(rec["admin_port"], "/metrics")
        assert status == 200 and b"response_latency_ms_bucket" in body
        r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True)
        problems = [line for line in (r.stdout + r.stderr).decode().splitlines()
                    if line.strip() and "response_latency_ms" not in line]
        assert problems == [], (rec["name"], problems)
        assert r.returncode in (0, 3), r   # 3: lint warnings only
