"""micromesh's benchmark: direct vs nginx two-hop mTLS vs the mesh, in one run.

    python -m perf.bench [--duration 10] [--quick] [--only direct,nginx,meshed] [--out perf/RESULTS.md]

Routes (all on 127.0.0.1; the app is nginx, 1 worker, ``return 200 "ok"``):

- direct:  client -> app
- nginx:   client -> outbound nginx -> mTLS (TLS 1.3, pooled) -> inbound nginx -> app
- meshed:  client -> outbound proxy -> mTLS -> inbound proxy -> app  (the real `mesh` CLI)

For each: max throughput (wrk -t1 -c32), p50/p99 at a fixed 2,000 rps (open loop,
coordinated-omission corrected, perf/fixed_rate.py), proxy CPU µs/request and RSS.
Writes a markdown report (``--out``) and the raw JSON (``--json``, default
perf/results/bench-<time>.json). Every process started is stopped at the end, also on
Ctrl-C, SIGTERM or an error.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from perf import measure, mesh, nginx, procs, report, sysinfo

HERE = Path(__file__).resolve().parent
ROUTES = report.ORDER
TITLES = {
    "direct": "direct (client → app)",
    "nginx": "nginx two-hop mTLS",
    "meshed": "meshed (client → proxy → mTLS → proxy → app)",
}
IDLE_SETTLE_S = 1.0
QUIET_CPUS = 0.05


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP, handled like Ctrl-C: unwind and clean up."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load run (default 10)")
    ap.add_argument("--quick", action="store_true", help="1 s runs: a smoke test, not a measurement")
    ap.add_argument("--only", default=",".join(ROUTES), help="comma-separated routes: direct,nginx,meshed")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown report")
    ap.add_argument("--json", type=Path, default=None, help="raw results (default perf/results/bench-<time>.json)")
    ap.add_argument("--rounds", type=int, default=1, help="throughput runs per route, interleaved (median)")
    ap.add_argument("--rate", type=float, default=2000.0, help="fixed rate for latency (default 2000 rps)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--app", choices=("nginx", "python"), default="nginx",
                    help="the app (python = perf/app.py; used automatically when nginx is missing)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for the (shared) machine to be idle")
    ap.add_argument("--keep-workdir", action="store_true", help="keep configs, certs and logs")
    ap.add_argument("--proxy-env", action="append", default=[], metavar="MESH_X=V",
                    help="environment for the meshed proxies, e.g. MESH_PIPELINE_DEPTH=1 (repeatable)")
    a = ap.parse_args(argv)
    env = {}
    for item in a.proxy_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("MESH_"):
            ap.error(f"--proxy-env takes MESH_NAME=VALUE; got {item!r}")
        env[name] = value
    a.proxy_env = env
    a.only = [r.strip() for r in a.only.split(",") if r.strip()]
    bad = [r for r in a.only if r not in ROUTES]
    if bad or not a.only:
        ap.error(f"--only takes some of {','.join(ROUTES)}; got {bad or 'nothing'}")
    if a.duration <= 0 or a.rounds < 1 or a.rate <= 0:
        ap.error("--duration, --rounds and --rate must be positive")
    return a


def settings(a: argparse.Namespace) -> measure.Settings:
    if a.quick:
        return measure.Settings(duration=1.0, warmup=1.0, rate=a.rate, drain=2.0)
    return measure.Settings(duration=a.duration, warmup=2.0, rate=a.rate)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# === setting up the routes ===

class Builder:
    """Starts the app and each route's proxies under one Supervisor."""

    def __init__(self, sup: procs.Supervisor, work: Path, nginx_bin: str | None, app_kind: str,
                 proxy_env: dict[str, str] | None = None) -> None:
        self.sup, self.work, self.nginx_bin = sup, work, nginx_bin
        self.proxy_env = proxy_env or {}
        self.app_kind = app_kind if nginx_bin else "python"
        self._app: tuple[int, list[int]] | None = None

    def app_command(self, port: int, name: str) -> list[str]:
        if self.app_kind == "nginx":
            prefix = self.work / name
            conf = nginx.write_conf(prefix, nginx.app_conf(prefix, port))
            return nginx.command(self.nginx_bin, prefix, conf)
        return [sys.executable, "-m", "perf.app", str(port)]

    def app(self) -> tuple[int, list[int]]:
        """The standalone app shared by the direct and nginx routes: (port, pids)."""
        if self._app is None:
            port = procs.free_port()
            p = self.sup.start(self.app_command(port, "app"), log=self.work / "app.log", cwd=HERE.parent)
            procs.wait_port(port, 10, p)
            time.sleep(0.1)
            self._app = (port, [p.pid, *procs.descendants(p.pid)])
        return self._app

    def direct(self) -> measure.Route:
        port, pids = self.app()
        return measure.Route("direct", TITLES["direct"], f"http://127.0.0.1:{port}/", None, pids)

    def nginx_two_hop(self) -> measure.Route:
        app_port, app_pids = self.app()
        certs = nginx.make_certs(self.work / "certs")
        in_port, out_port = procs.free_port(), procs.free_port()
        _, in_workers = nginx.start(self.sup, self.nginx_bin, self.work / "nginx-in",
                                    nginx.inbound_conf(self.work / "nginx-in", in_port, app_port, certs), in_port)
        _, out_workers = nginx.start(self.sup, self.nginx_bin, self.work / "nginx-out",
                                     nginx.outbound_conf(self.work / "nginx-out", out_port, in_port, certs), out_port)
        return measure.Route("nginx", TITLES["nginx"], f"http://127.0.0.1:{out_port}/", None, app_pids,
                             {"outbound": out_workers, "inbound": in_workers})

    def meshed(self) -> measure.Route:
        m = mesh.start(self.sup, self.work, lambda port: self.app_command(port, "mesh-app"),
                       proxy_env=self.proxy_env)
        return measure.Route("meshed", TITLES["meshed"], m.url, m.host, m.app_pids,
                             {"outbound": m.outbound_pids, "inbound": m.inbound_pids}, m.counters)


# === the run ===

def run(a: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        log("wrk is not installed (apt-get install wrk): nothing can be measured")
        return 2
    s = settings(a)
    pinning = procs.Pinning.detect(not a.no_pin)
    nginx_bin = nginx.nginx_binary()
    started = dt.datetime.now(dt.timezone.utc)
    res: dict = {
        "schema": 1,
        "command": "python -m perf.bench " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "python -m perf.bench",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": sysinfo.machine(), "versions": sysinfo.versions(nginx_bin),
        "pinning": pinning.describe(), "loadavg_at_start": sysinfo.loadavg(),
        "proxy_env": a.proxy_env,
        "settings": {"quick": a.quick, "duration": s.duration, "warmup": s.warmup, "rate": s.rate,
                     "fixed_conns": s.fixed_conns, "wrk_conns": s.wrk_conns, "rounds": a.rounds,
                     "only": a.only},
        "titles": TITLES, "routes": {}, "skipped": {}, "problems": [], "notes": [],
    }
    json_path = a.json or HERE / "results" / f"bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
    res["json"] = _shown(json_path)
    failed = False

    if a.wait_quiet > 0:
        log(f"waiting up to {a.wait_quiet:g}s for the machine to be idle (< {QUIET_CPUS:g} CPU busy)")
        busy = procs.wait_quiet(QUIET_CPUS, a.wait_quiet)
        res["busy_before_start"] = busy
        if busy >= QUIET_CPUS:
            res["notes"].append(f"the machine never became idle within --wait-quiet {a.wait_quiet:g}s "
                                f"({busy:.0%} of a CPU busy just before the run)")
    work = Path(tempfile.mkdtemp(prefix="micromesh-bench-"))
    sup = procs.Supervisor()
    # SIGINT too: a shell that starts us in the background ignores it otherwise.
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        b = Builder(sup, work, nginx_bin, a.app, a.proxy_env)
        if b.app_kind != "nginx":
            res["notes"].append("app: perf/app.py (uvloop + httptools), "
                                + ("nginx is not installed" if not nginx_bin else "--app python"))
        routes: list[measure.Route] = []
        for key in ROUTES:
            if key not in a.only:
                continue
            why = None
            if key == "nginx" and not nginx_bin:
                why = "nginx is not installed (apt-get install nginx-light)"
            elif key == "meshed":
                why = mesh.unavailable()
            if why:
                log(f"skipping {key}: {why}")
                res["skipped"][key] = why
                continue
            log(f"starting {key}")
            try:
                routes.append(getattr(b, {"nginx": "nginx_two_hop"}.get(key, key))())
            except (RuntimeError, OSError, TimeoutError, ValueError, KeyError) as e:
                log(f"{key} failed to start: {e}")
                res["skipped"][key] = f"failed to start: {e}"
                failed = True
        time.sleep(IDLE_SETTLE_S)
        for route in routes:
            log(f"measuring {route.key}: warm-up {s.warmup:g}s, wrk {s.duration:g}s, "
                f"{s.rate:g} rps for {s.duration:g}s")
            try:
                res["routes"][route.key] = measure.measure(route, s, pinning)
            except Exception as e:   # one broken route must not lose the others' numbers
                log(f"{route.key} failed: {e}")
                res["skipped"][route.key] = f"failed while measuring: {e}"
                failed = True
        for rnd in range(2, a.rounds + 1):
            for route in routes:
                if route.key not in res["routes"]:
                    continue
                log(f"round {rnd}/{a.rounds}: {route.key} throughput")
                measure.pin(route, pinning)
                try:
                    c0 = route.counters() if route.counters else {}
                    with procs.RssSampler(route.proxies) as sampler:
                        run_ = measure.throughput(route, s, pinning, sampler)
                    c1 = route.counters() if route.counters else {}
                except Exception as e:   # keep what was measured so far
                    log(f"{route.key} round {rnd} failed: {e}")
                    res["problems"].append(f"{route.key}: throughput round {rnd} failed: {e}")
                    failed = True
                    continue
                r = res["routes"][route.key]
                r["throughput"].append(run_)
                for k, v in measure.counter_delta(c0, c1).items():
                    r["counters"][k] = r["counters"].get(k, 0.0) + v
                for label, kb in sampler.peak_kb.items():
                    r["rss_kb"][label]["peak"] = max(r["rss_kb"][label]["peak"], kb)
    finally:
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)   # a second Ctrl-C must not cut the cleanup short
        log("stopping everything")
        res["problems"] += [f"cleanup: {p}" for p in sup.close()]
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if a.keep_workdir:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res["summary"] = {k: report.summarize(v) for k, v in res["routes"].items()}
    res["ratios"], res["targets"] = report.compare(res["summary"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(report.render(res))
    log(f"wrote {_shown(a.out)} and {_shown(json_path)}")
    print(report.render(res))
    return 1 if failed else 0


def _shown(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(p)


def guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
            log: Callable[[str], None]) -> int:
    """``run(args)``; Ctrl-C or SIGTERM (``Interrupted``) stop everything it started and
    leave no report (exit 130). Shared with perf/h2bench.py."""
    try:
        return run(args)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}): everything started was stopped; no report written")
        return 130


def main(argv: list[str] | None = None) -> int:
    return guarded(run, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
