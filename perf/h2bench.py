"""HTTP/2 through the mesh against direct, and HTTP/1.1 vs HTTP/2 between proxies, in one run.

    python -m perf.h2bench [--duration 5] [--quick] [--only h2-direct,h2-meshed,h1-meshed,h1-meshed-wrk]

Routes (all on 127.0.0.1; the apps are nginx, 1 worker, ``return 200 "ok"``):

- h2-direct:      h2load -> h2c app (nginx ``listen ... http2``: prior knowledge)
- h2-meshed:      h2load -> client proxy outbound (h2c, ``:authority``) -> mTLS, ALPN h2 -> server proxy -> h2c app
- h1-meshed:      h2load --h1 -> client proxy outbound -> pooled HTTP/1.1 over mTLS -> server proxy -> HTTP/1 app
- h1-meshed-wrk:  wrk -t1 -c40 over the same HTTP/1 path (the bench's meshed row, at this run's concurrency)

All at the same concurrency (40 requests in flight: h2load ``-c4 -m10``; HTTP/1: 40
connections), the same request (``GET /``) and response (``ok``). For each route: a warm-up,
max throughput for ``--duration`` seconds, then a fixed-rate run (h2load ``--rps``, or
perf/fixed_rate.py for the wrk row) for latency; proxy CPU µs/request from /proc, RSS
sampled every 0.25 s. Percentiles come from h2load's ``--log-file`` (one line per request).
The HTTP/1 and HTTP/2 meshed rows decide whether HTTP/1 traffic should ride HTTP/2 between
proxies (Linkerd's ``l5d-orig-proto`` upgrade): the cheaper protocol per request wins.

Writes perf/RESULTS-h2.md (``--out``) and the raw JSON (``--json``, default
perf/results/h2bench-<time>.json). Every process started is stopped at the end, also on
Ctrl-C, SIGTERM or an error.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from perf import loadgen, measure, mesh, nginx, procs, report, sysinfo
from perf.bench import Interrupted, _on_signal, _shown, guarded   # noqa: F401  (Interrupted: raised by _on_signal)

HERE = Path(__file__).resolve().parent
ROUTES = ("h2-direct", "h2-meshed", "h1-meshed", "h1-meshed-wrk")
TITLES = {
    "h2-direct": "h2 direct (h2load → h2c app)",
    "h2-meshed": "h2 meshed (h2load → proxy → mTLS h2 → proxy → h2c app)",
    "h1-meshed": "h1 meshed (h2load --h1 → proxy → mTLS HTTP/1.1 pooled → proxy → app)",
    "h1-meshed-wrk": "h1 meshed, wrk (wrk → proxy → mTLS HTTP/1.1 pooled → proxy → app)",
}
BETWEEN = {"h2-direct": "–", "h2-meshed": "HTTP/2", "h1-meshed": "HTTP/1.1", "h1-meshed-wrk": "HTTP/1.1"}
H2_CONNS, H2_STREAMS = 4, 10          # h2load -c4 -m10: 40 requests in flight
H1_CONNS = H2_CONNS * H2_STREAMS      # HTTP/1: the same 40 in flight, one per connection
MARGIN_S = 30.0
IDLE_SETTLE_S = 1.0
PCTS = (50, 90, 99, 99.9)


def log(msg: str) -> None:
    print(f"[h2bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m perf.h2bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per load run (default 5)")
    ap.add_argument("--quick", action="store_true", help="1 s runs: a smoke test, not a measurement")
    ap.add_argument("--only", default=",".join(ROUTES), help="comma-separated routes: " + ",".join(ROUTES))
    ap.add_argument("--rate", type=float, default=500.0,
                    help="fixed rate for latency, all connections together (default 500 rps: below "
                         "the HTTP/2 meshed path's capacity on 2 vCPUs)")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS-h2.md", help="markdown report")
    ap.add_argument("--json", type=Path, default=None, help="raw results (default perf/results/h2bench-<time>.json)")
    ap.add_argument("--rounds", type=int, default=1, help="throughput runs per route, interleaved (median)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--app", choices=("nginx", "nghttpd"), default="nginx",
                    help="the h2c app (nghttpd --no-tls serving a 2-byte file; used when nginx is missing)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep configs, certs, logs and h2load logs")
    a = ap.parse_args(argv)
    a.only = [r.strip() for r in a.only.split(",") if r.strip()]
    bad = [r for r in a.only if r not in ROUTES]
    if bad or not a.only:
        ap.error(f"--only takes some of {','.join(ROUTES)}; got {bad or 'nothing'}")
    if a.duration <= 0 or a.rounds < 1 or a.rate <= 0:
        ap.error("--duration, --rounds and --rate must be positive")
    return a


# === h2load ===

_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNIT_US[m.group(2)] if m else float("nan")


def parse_h2load(stdout: str) -> dict:
    """The numbers of h2load's summary (requests, status codes, rps, time for request)."""
    out: dict = {}
    m = re.search(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", stdout, re.M)
    if m:
        out["duration_s"] = _us(m.group(1) + m.group(2)) / 1e6
        out["rps"] = float(m.group(3))
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", stdout, re.M)
    if m:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        out.update({f"req_{k}": int(v) for k, v in zip(keys, m.groups())})
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout, re.M)
    if m:
        out["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups())))
    m = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", stdout, re.M)
    if m:
        out["h2load_latency_us"] = dict(zip(("min", "max", "mean", "sd"), map(_us, m.groups())))
    return out


def percentiles(log_file: Path) -> dict:
    """p50/p90/p99/p99.9, mean and max (µs) over the successful requests of a --log-file."""
    lat = []
    failed = 0
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if parts[1] == "-1":
            failed += 1
            continue
        lat.append(int(parts[2]))
    if not lat:
        return {"n": 0, "failed": failed}
    lat.sort()
    out = {f"p{p:g}": lat[min(len(lat) - 1, int(len(lat) * p / 100))] for p in PCTS}
    out.update(n=len(lat), failed=failed, mean=statistics.fmean(lat), max=lat[-1])
    return out


def h2load(url: str, authority: str | None, duration: float, *, h1: bool = False,
           rate: float | None = None, log_file: Path | None = None, prefix: list[str] | None = None) -> dict:
    """One bounded h2load run: -c4 -m10 (h2) or --h1 -c40 (HTTP/1.1), for ``duration`` s."""
    conns, streams = (H1_CONNS, 1) if h1 else (H2_CONNS, H2_STREAMS)
    argv = [*(prefix or []), "h2load", "-t1", f"-c{conns}", f"-m{streams}", "-D", f"{max(1, round(duration * 1000))}ms"]
    if h1:
        argv.append("--h1")
    if rate:
        argv.append(f"--rps={rate / conns:g}")
    if authority:
        argv += ["-H", f":authority: {authority}"]
    if log_file:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + MARGIN_S, check=False)
    except subprocess.TimeoutExpired:
        raise loadgen.LoadError(f"h2load overran {duration:g}s by {MARGIN_S}s and was killed") from None
    out = parse_h2load(r.stdout)
    if r.returncode != 0 or "req_done" not in out:
        raise loadgen.LoadError(f"h2load failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    out["requests"] = out["req_succeeded"]
    out["errors"] = {k: out[f"req_{k}"] for k in ("failed", "errored", "timeout")}
    out["non_2xx"] = sum(v for k, v in out.get("status", {}).items() if k != "2xx")
    if log_file:
        out["latency_us"] = percentiles(log_file)
    out["argv"] = " ".join(argv)
    return out


def h2load_version() -> str:
    r = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False)
    return r.stdout.strip().removeprefix("h2load ") or "unknown"


def wait_h2(url: str, authority: str | None, timeout: float) -> None:
    """Until one HTTP/2 request (prior knowledge) answers 2xx."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        argv = ["h2load", "-n1", "-c1"] + (["-H", f":authority: {authority}"] if authority else []) + [url]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
        if "status codes: 1 2xx" in r.stdout:
            return
        last = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
        last = last[0]
        time.sleep(0.25)
    raise RuntimeError(f"no HTTP/2 2xx from {url} (:authority {authority}) within {timeout} s: {last}")


# === routes ===

@dataclass(frozen=True, slots=True)
class H2Route:
    route: measure.Route
    kind: str           # h2 | h1 | wrk


@dataclass(frozen=True, slots=True)
class Settings:
    duration: float
    warmup: float
    rate: float
    drain: float = 2.0


def _h2c_app(b: "Builder", port: int, name: str) -> list[str]:
    if b.app_kind == "nginx":
        prefix = b.work / name
        return nginx.command(b.nginx_bin, prefix, nginx.write_conf(prefix, nginx.h2c_app_conf(prefix, port)))
    docroot = b.work / "docroot"
    docroot.mkdir(exist_ok=True)
    (docroot / "index.html").write_bytes(b"ok")
    return [shutil.which("nghttpd") or "nghttpd", "--no-tls", "-d", str(docroot), "-a", "127.0.0.1", str(port)]


def _h1_app(b: "Builder", port: int, name: str) -> list[str]:
    if b.nginx_bin:
        prefix = b.work / name
        return nginx.command(b.nginx_bin, prefix, nginx.write_conf(prefix, nginx.app_conf(prefix, port)))
    return [sys.executable, "-m", "perf.app", str(port)]


class Builder:
    def __init__(self, sup: procs.Supervisor, work: Path, nginx_bin: str | None, app_kind: str) -> None:
        self.sup, self.work, self.nginx_bin = sup, work, nginx_bin
        self.app_kind = app_kind if (app_kind == "nghttpd" or nginx_bin) else "nghttpd"
        self._mesh: mesh.Mesh | None = None

    def direct(self) -> H2Route:
        port = procs.free_port()
        p = self.sup.start(_h2c_app(self, port, "h2-app"), log=self.work / "h2-app.log", cwd=HERE.parent)
        procs.wait_port(port, 10, p)
        url = f"http://127.0.0.1:{port}/"
        wait_h2(url, None, 10)
        r = measure.Route("h2-direct", TITLES["h2-direct"], url, None, [p.pid, *procs.descendants(p.pid)])
        return H2Route(r, "h2")

    def mesh(self) -> mesh.Mesh:
        if self._mesh is None:
            self._mesh = mesh.start(self.sup, self.work, lambda port: _h1_app(self, port, "mesh-app"),
                                    more_apps={"app-h2": lambda port: _h2c_app(self, port, "mesh-app-h2")})
        return self._mesh

    def h2_meshed(self) -> H2Route:
        m = self.mesh()
        svc = m.services["app-h2"]
        wait_h2(m.url, svc.host, 30)
        r = measure.Route("h2-meshed", TITLES["h2-meshed"], m.url, svc.host, svc.app_pids,
                          {"outbound": m.outbound_pids, "inbound": svc.inbound_pids}, svc.counters)
        return H2Route(r, "h2")

    def h1_meshed(self, key: str = "h1-meshed") -> H2Route:
        m = self.mesh()
        r = measure.Route(key, TITLES[key], m.url, m.host, m.app_pids,
                          {"outbound": m.outbound_pids, "inbound": m.inbound_pids}, m.counters)
        return H2Route(r, "h1" if key == "h1-meshed" else "wrk")


# === measuring ===

def _throughput(hr: H2Route, s: Settings, pinning: procs.Pinning, sampler: procs.RssSampler,
                logdir: Path, tag: str) -> dict:
    r = hr.route
    pre = pinning.prefix(pinning.load_cpu)
    before = measure._snapshot(r)
    if hr.kind == "wrk":
        run = loadgen.wrk(r.url, r.host, s.duration, conns=H1_CONNS, prefix=pre)
    else:
        run = h2load(r.url, r.host, s.duration, h1=hr.kind == "h1", prefix=pre,
                     log_file=logdir / f"{r.key}-{tag}.log")
    run.update(measure._account(before, measure._snapshot(r), run["requests"]))
    sampler.sample()
    return run


def _latency(hr: H2Route, s: Settings, pinning: procs.Pinning, logdir: Path) -> dict:
    r = hr.route
    pre = pinning.prefix(pinning.load_cpu)
    before = measure._snapshot(r)
    if hr.kind == "wrk":
        run = loadgen.fixed_rate(r.url, r.host, s.rate, s.duration, conns=16, prefix=pre, drain=s.drain)
        run["requests"] = run["completed"]
        run["rps"] = run["achieved_rps"]
    else:
        run = h2load(r.url, r.host, s.duration, h1=hr.kind == "h1", rate=s.rate, prefix=pre,
                     log_file=logdir / f"{r.key}-rate.log")
    run.update(measure._account(before, measure._snapshot(r), run["requests"]))
    return run


def measure_route(hr: H2Route, s: Settings, pinning: procs.Pinning, logdir: Path) -> dict:
    r = hr.route
    measure.pin(r, pinning)
    sampler = procs.RssSampler(r.proxies)
    idle = sampler.sample()
    c0 = r.counters() if r.counters else {}
    pre = pinning.prefix(pinning.load_cpu)
    if hr.kind == "wrk":
        loadgen.wrk(r.url, r.host, s.warmup, conns=H1_CONNS, prefix=pre)
    else:
        h2load(r.url, r.host, s.warmup, h1=hr.kind == "h1", prefix=pre)
    with sampler:
        tput = _throughput(hr, s, pinning, sampler, logdir, "max1")
        lat = _latency(hr, s, pinning, logdir)
    return {
        "key": r.key, "title": r.title, "kind": hr.kind, "url": r.url, "authority": r.host,
        "throughput": [tput], "latency": lat,
        "rss_kb": {label: {"idle": idle[label], "peak": sampler.peak_kb[label]} for label in r.proxies},
        "counters": measure.counter_delta(c0, r.counters() if r.counters else {}),
        "proxy_pids": r.proxies,
    }


def summarize(route: dict) -> dict:
    runs = route["throughput"]
    lat = route["latency"]
    cpu = [r["proxy_cpu_us_per_req"] for r in runs]
    labels = [k for k in cpu[0] if k != "total"]
    best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]       # the median run's latency
    lmax = best.get("latency_us") or {}
    llat = lat.get("latency_us") or {}
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "rps_runs": [r["rps"] for r in runs],
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(sum(r["errors"].values()) + r.get("non_2xx", 0) for r in runs),
        "max_mean_us": lmax.get("mean"), "max_p50_us": lmax.get("p50"), "max_p99_us": lmax.get("p99"),
        "rate_rps": lat.get("rps"),
        "rate_requests": lat["requests"],
        "rate_errors": sum(lat["errors"].values()) + lat.get("non_2xx", 0),
        "rate_mean_us": llat.get("mean"), "rate_p50_us": llat.get("p50"),
        "rate_p90_us": llat.get("p90"), "rate_p99_us": llat.get("p99"), "rate_p999_us": llat.get("p99.9"),
        "proxy_labels": labels,
        "cpu_us_max": {k: statistics.median(c[k] for c in cpu) for k in cpu[0]} if labels else {},
        "cpu_us_rate": lat["proxy_cpu_us_per_req"],
        "cpu_split_max": runs[0].get("proxy_user_kernel_us_per_req", {}),
        "rss_idle_mb": {k: v["idle"] / report.MB for k, v in route["rss_kb"].items()},
        "rss_peak_mb": {k: v["peak"] / report.MB for k, v in route["rss_kb"].items()},
        "cpu_util": runs[0].get("cpu_util", {}), "proxy_cpu_util": runs[0].get("proxy_cpu_util", {}),
        "other_cpu": max(r.get("other_cpu", 0.0) for r in [*runs, lat]),
    }


def compare(summary: dict[str, dict]) -> tuple[dict, dict]:
    """Ratios, and the HTTP/1-over-HTTP/2 decision (None when a needed row is missing)."""
    def get(key: str, field: str):
        return summary[key][field] if key in summary else None

    def cpu(key: str, field: str = "cpu_us_max"):
        return (get(key, field) or {}).get("total")

    r = report._ratio
    ratios = {
        "h2 meshed/direct throughput": r(get("h2-meshed", "rps"), get("h2-direct", "rps")),
        "h2 meshed/direct p50 at max": r(get("h2-meshed", "max_p50_us"), get("h2-direct", "max_p50_us")),
        "h2 meshed/direct p99 at max": r(get("h2-meshed", "max_p99_us"), get("h2-direct", "max_p99_us")),
        "h2 meshed/direct p50 at fixed rate": r(get("h2-meshed", "rate_p50_us"), get("h2-direct", "rate_p50_us")),
        "h2 meshed/direct p99 at fixed rate": r(get("h2-meshed", "rate_p99_us"), get("h2-direct", "rate_p99_us")),
        "h2/h1 meshed throughput (h2load both)": r(get("h2-meshed", "rps"), get("h1-meshed", "rps")),
        "h2/h1 meshed throughput (h1 by wrk)": r(get("h2-meshed", "rps"), get("h1-meshed-wrk", "rps")),
        "h2/h1 proxy CPU µs/req at max (h2load both)": r(cpu("h2-meshed"), cpu("h1-meshed")),
        "h2/h1 proxy CPU µs/req at max (h1 by wrk)": r(cpu("h2-meshed"), cpu("h1-meshed-wrk")),
        "h2/h1 proxy CPU µs/req at fixed rate (h2load both)": r(cpu("h2-meshed", "cpu_us_rate"),
                                                                cpu("h1-meshed", "cpu_us_rate")),
    }
    h1_key = "h1-meshed" if "h1-meshed" in summary else "h1-meshed-wrk"
    decision: dict = {"h1_row": h1_key}
    if "h2-meshed" in summary and h1_key in summary:
        h2c, h1c = cpu("h2-meshed"), cpu(h1_key)
        decision.update(h2_cpu_us=h2c, h1_cpu_us=h1c, h2_rps=get("h2-meshed", "rps"), h1_rps=get(h1_key, "rps"),
                        faster="HTTP/1.1" if h1c <= h2c else "HTTP/2")
    return ratios, decision


# === rendering ===

def _lat(v: float | None) -> str:
    return report._f(v)


def render(res: dict) -> str:
    s = res["settings"]
    m, v = res["machine"], res["versions"]
    lines = ["# micromesh HTTP/2 benchmark results", "",
             f"Generated by `{res['command']}` on {res['date']}. Raw data: `{res['json']}`."]
    if s["quick"]:
        lines += ["", "> **Quick mode** (smoke test): runs are too short to be representative."]
    lines += [
        "", "## Machine and software", "",
        f"- {m.get('cpus')} vCPUs ({m.get('cpu_model', '?')}{', virtualised' if m.get('hypervisor') else ''}), "
        f"{m.get('ram_gb', '?')} GB RAM, {m.get('os', '?')}, kernel {m.get('kernel')}",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- CPU pinning: {res['pinning']}",
        f"- h2c app: {res['app']}",
        "- The machine is shared and noisy: compare rows of one run (the ratios), not numbers across runs.",
    ]
    d = res["decision"]
    lines += ["", "## Decision: HTTP/1 between proxies stays pooled HTTP/1.1", ""]
    if "faster" in d:
        ratio = d["h2_cpu_us"] / d["h1_cpu_us"] if d["h1_cpu_us"] else float("nan")
        lines += [
            f"Measured in this run, at the same concurrency (40 requests in flight) and request "
            f"(`GET /` → `ok`): the two proxies together spend **{d['h1_cpu_us']:.0f} µs per request** carrying "
            f"it as pooled HTTP/1.1 ({d['h1_row']}) and **{d['h2_cpu_us']:.0f} µs** as HTTP/2 (h2-meshed), "
            f"**{ratio:.1f}×**; max throughput {d['h1_rps']:,.0f} vs {d['h2_rps']:,.0f} rps. "
            f"The cheaper protocol between proxies on this machine is **{d['faster']}**.",
            "",
        ]
        if d["faster"] == "HTTP/1.1":
            lines.append("So micromesh does **not** do Linkerd's `l5d-orig-proto` upgrade: HTTP/1 requests "
                         "travel between proxies as HTTP/1.1 over the pooled mTLS connections; HTTP/2 is used "
                         "between proxies only for traffic that is HTTP/2 already (gRPC, h2c clients). In Python "
                         "the `h2` state machine (HPACK, frame parsing, flow-control bookkeeping, per-stream "
                         "objects) costs far more per request than httptools' HTTP/1 parser, and multiplexing "
                         "saves nothing that pooling does not already save (connections are reused either way).")
        else:
            lines.append("**This run contradicts the documented decision** (keep pooled HTTP/1.1): "
                         "rerun on a quiet machine before changing anything.")
    else:
        lines.append("Not measured in this run (needs the h2-meshed row and an h1-meshed row).")
    lines += [
        "", "## Results", "",
        f"Max throughput: h2load `-c{H2_CONNS} -m{H2_STREAMS} -D {s['duration']:g}s` (HTTP/2), "
        f"h2load `--h1 -c{H1_CONNS}` or `wrk -t1 -c{H1_CONNS} -d{max(1, round(s['duration']))}s` (HTTP/1.1), "
        f"after a {s['warmup']:g} s warm-up"
        + (f"; median of {s['rounds']} runs, routes interleaved" if s["rounds"] > 1 else "") + ". "
        f"Fixed rate: h2load `--rps` ({s['rate']:,.0f} rps over all connections, for {s['duration']:g} s; "
        "h2load measures from when a request is sent, so this is not coordinated-omission corrected, and "
        "each connection fires on its own timer, all started together, so requests come in bursts of up to "
        "one per connection: 4 for the h2 rows, 40 for h2load --h1), "
        f"the wrk row with `perf/fixed_rate.py` (open loop, corrected, 16 connections). Latencies in µs; "
        "h2load percentiles from `--log-file` (time until end of response, per request). Proxy CPU = "
        "utime+stime from /proc/PID/stat over the run / requests served (outbound + inbound = total).",
        "",
        "| path | between proxies | max rps | mean @max | p50 @max | p99 @max | mean @rate | p50 @rate "
        "| p99 @rate | proxy CPU µs/req @max | proxy CPU µs/req @rate | proxy RSS idle (MB) | peak (MB) | CPU util @max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ROUTES:
        if key in res["skipped"]:
            lines.append(f"| {TITLES[key]} | | skipped: {res['skipped'][key]} |" + " |" * 11)
            continue
        if key not in res["summary"]:
            continue
        r = res["summary"][key]
        lb = r["proxy_labels"]
        util = ", ".join(f"{k} {val:.0%}" for k, val in {**r["cpu_util"], **r["proxy_cpu_util"]}.items())
        util += f"; other work ≤ {r['other_cpu']:.0%}"
        rps = report._f(r["rps"])
        if len(r["rps_runs"]) > 1:
            rps += " (" + "–".join(report._f(x) for x in (min(r["rps_runs"]), max(r["rps_runs"]))) + ")"
        lines.append(
            f"| {TITLES[key]} | {BETWEEN[key]} | {rps} | {_lat(r['max_mean_us'])} | {_lat(r['max_p50_us'])} "
            f"| {_lat(r['max_p99_us'])} | {_lat(r['rate_mean_us'])} | {_lat(r['rate_p50_us'])} "
            f"| {_lat(r['rate_p99_us'])} | {report._per_proxy(r['cpu_us_max'], lb, '{:.1f}')} "
            f"| {report._per_proxy(r['cpu_us_rate'], lb, '{:.0f}')} | {report._mb(r['rss_idle_mb'], lb)} "
            f"| {report._mb(r['rss_peak_mb'], lb)} | {util} |")
    split = [(k, label, uk) for k in ROUTES if k in res["summary"]
             for label, uk in res["summary"][k]["cpu_split_max"].items()]
    if split:
        lines += ["", "Where the proxy CPU goes at max throughput (first run), µs per request:", "",
                  "| path | proxy | user | kernel | total |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {label} | {u:.1f} | {kk:.1f} | {u + kk:.1f} |" for k, label, (u, kk) in split]
    lines += ["", "## Ratios (same run, back to back)", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {report._f(val, '{:.2f}')} |" for name, val in res["ratios"].items()]
    notes = list(res["notes"]) + list(res["problems"])
    for key, route in res["routes"].items():
        c = route.get("counters") or {}
        if "mtls_requests" in c:
            sent = sum(t["requests"] for t in route["throughput"]) + route["latency"]["requests"]
            notes.append(f"{key}: the inbound proxy counted {c['mtls_requests']:,.0f} requests over mTLS "
                         f"(tls=\"true\") on {c['mtls_connections']:,.0f} new connections, for {sent:,} "
                         "measured requests plus the warm-up")
    for key, r in res["summary"].items():
        if r["other_cpu"] > report.NOISY_OTHER_CPU:
            notes.append(f"{key}: other processes used up to {r['other_cpu']:.0%} of a CPU during its runs: "
                         "disturbed, rerun on a quiet machine")
        if r["errors"] or r["rate_errors"]:
            notes.append(f"{key}: {r['errors']} failed/non-2xx requests at max, {r['rate_errors']} at the fixed rate")
    lines += ["", "## Notes", ""] + ([f"- {n}" for n in notes] or ["- none"])
    return "\n".join(lines) + "\n"


# === the run ===

def run(a: argparse.Namespace) -> int:
    if shutil.which("h2load") is None:
        log("h2load is not installed (apt-get install nghttp2-client): nothing can be measured")
        return 2
    nginx_bin = nginx.nginx_binary()
    if a.app == "nginx" and not nginx_bin and not shutil.which("nghttpd"):
        log("neither nginx nor nghttpd (apt-get install nghttp2-server) is installed: no h2c app")
        return 2
    if a.app == "nghttpd" and not shutil.which("nghttpd"):
        log("nghttpd is not installed (apt-get install nghttp2-server)")
        return 2
    s = (Settings(duration=1.0, warmup=0.5, rate=a.rate) if a.quick
         else Settings(duration=a.duration, warmup=2.0, rate=a.rate))
    pinning = procs.Pinning.detect(not a.no_pin)
    started = dt.datetime.now(dt.timezone.utc)
    versions = sysinfo.versions(nginx_bin)
    versions["h2load"] = h2load_version()
    try:
        import h2   # the proxy's HTTP/2 library
        versions["h2"] = h2.__version__
    except ImportError:
        versions["h2"] = "not installed"
    res: dict = {
        "schema": 1,
        "command": "python -m perf.h2bench" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": sysinfo.machine(), "versions": versions, "pinning": pinning.describe(),
        "loadavg_at_start": sysinfo.loadavg(),
        "settings": {"quick": a.quick, "duration": s.duration, "warmup": s.warmup, "rate": s.rate,
                     "rounds": a.rounds, "only": a.only, "h2_conns": H2_CONNS, "h2_streams": H2_STREAMS,
                     "h1_conns": H1_CONNS},
        "titles": TITLES, "routes": {}, "skipped": {}, "problems": [], "notes": [],
    }
    json_path = a.json or HERE / "results" / f"h2bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
    res["json"] = _shown(json_path)
    failed = False
    work = Path(tempfile.mkdtemp(prefix="micromesh-h2bench-"))
    logdir = work / "h2load-logs"
    logdir.mkdir()
    sup = procs.Supervisor()
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        b = Builder(sup, work, nginx_bin, a.app)
        res["app"] = ("nginx (1 worker, `listen ... http2` cleartext: h2c prior knowledge, `return 200 \"ok\"`)"
                      if b.app_kind == "nginx" else "nghttpd --no-tls serving a 2-byte file (`ok`)")
        routes: list[H2Route] = []
        mesh_why = mesh.unavailable() if any(k != "h2-direct" for k in a.only) else None
        if any(k.startswith("h1") for k in a.only) and not nginx_bin:
            res["notes"].append("HTTP/1 app: perf/app.py (nginx is not installed)")
        for key in ROUTES:
            if key not in a.only:
                continue
            if key == "h1-meshed-wrk" and shutil.which("wrk") is None:
                res["skipped"][key] = "wrk is not installed"
                continue
            if key != "h2-direct" and mesh_why:
                res["skipped"][key] = mesh_why
                continue
            log(f"starting {key}")
            try:
                routes.append({"h2-direct": b.direct, "h2-meshed": b.h2_meshed,
                               "h1-meshed": b.h1_meshed,
                               "h1-meshed-wrk": lambda: b.h1_meshed("h1-meshed-wrk")}[key]())
            except (RuntimeError, OSError, TimeoutError, ValueError, KeyError) as e:
                log(f"{key} failed to start: {e}")
                res["skipped"][key] = f"failed to start: {e}"
                failed = True
        time.sleep(IDLE_SETTLE_S)
        for hr in routes:
            log(f"measuring {hr.route.key}: warm-up {s.warmup:g}s, max {s.duration:g}s, "
                f"{s.rate:g} rps for {s.duration:g}s")
            try:
                res["routes"][hr.route.key] = measure_route(hr, s, pinning, logdir)
            except Exception as e:   # one broken route must not lose the others' numbers
                log(f"{hr.route.key} failed: {e}")
                res["skipped"][hr.route.key] = f"failed while measuring: {e}"
                failed = True
        for rnd in range(2, a.rounds + 1):
            for hr in routes:
                key = hr.route.key
                if key not in res["routes"]:
                    continue
                log(f"round {rnd}/{a.rounds}: {key} throughput")
                measure.pin(hr.route, pinning)
                try:
                    c0 = hr.route.counters() if hr.route.counters else {}
                    with procs.RssSampler(hr.route.proxies) as sampler:
                        run_ = _throughput(hr, s, pinning, sampler, logdir, f"max{rnd}")
                    c1 = hr.route.counters() if hr.route.counters else {}
                except Exception as e:
                    res["problems"].append(f"{key}: throughput round {rnd} failed: {e}")
                    failed = True
                    continue
                r = res["routes"][key]
                r["throughput"].append(run_)
                for k, v in measure.counter_delta(c0, c1).items():
                    r["counters"][k] = r["counters"].get(k, 0.0) + v
                for label, kb in sampler.peak_kb.items():
                    r["rss_kb"][label]["peak"] = max(r["rss_kb"][label]["peak"], kb)
    finally:
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        log("stopping everything")
        res["problems"] += [f"cleanup: {p}" for p in sup.close()]
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if a.keep_workdir:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res["summary"] = {k: summarize(v) for k, v in res["routes"].items()}
    res["ratios"], res["decision"] = compare(res["summary"])
    for key, r in res["summary"].items():
        if r["errors"] or r["rate_errors"]:
            failed = True
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(render(res))
    log(f"wrote {_shown(a.out)} and {_shown(json_path)}")
    print(render(res))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return guarded(run, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
