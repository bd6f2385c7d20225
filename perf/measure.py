"""Measuring one route: throughput (wrk), latency at a fixed rate, proxy CPU and RSS.

A *route* is one way from the load generator to the app (direct, nginx two-hop,
meshed). For each, in order:

1. pin: proxies on the proxy CPU; the app on the proxy CPU when nothing else is there
   (direct), else on the load CPU (PERF-LAB's layout);
2. idle RSS of each proxy (one sample, before any load of this route);
3. a short wrk warm-up (fills connection pools, pays the TLS handshakes);
4. wrk -t1 -c32 for the duration: rps, proxy CPU µs/request, CPU utilisation;
5. the open-loop client at a fixed rate over 16 connections: p50/p90/p99/p99.9, CPU µs/request.

RSS is sampled every 0.25 s during 4 and 5; the peak is the max over both.
"""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from perf import loadgen, procs, sysinfo


@dataclass(frozen=True, slots=True)
class Route:
    key: str                                   # direct | nginx | meshed
    title: str
    url: str
    host: str | None                           # Host header, when not the URL's
    app_pids: list[int]
    proxies: dict[str, list[int]] = field(default_factory=dict)   # label -> pids counted for it
    counters: Callable[[], dict[str, float]] | None = None      # e.g. the proxy's own metrics

    @property
    def proxied(self) -> bool:
        return bool(self.proxies)


@dataclass(frozen=True, slots=True)
class Settings:
    duration: float            # seconds per wrk run and per fixed-rate run
    warmup: float
    rate: float = 2000.0
    fixed_conns: int = 16
    wrk_conns: int = 32
    drain: float = 5.0


def pin(route: Route, pinning: procs.Pinning) -> None:
    app_cpu = pinning.load_cpu if route.proxied else pinning.proxy_cpu
    pinning.move(route.app_pids, app_cpu)
    for pids in route.proxies.values():
        pinning.move(pids, pinning.proxy_cpu)


def _ticks(route: Route) -> dict[str, tuple[int, int]]:
    """(user, kernel) CPU ticks per proxy label."""
    out = {}
    for label, pids in route.proxies.items():
        splits = [procs.cpu_split(p) for p in pids]
        out[label] = (sum(u for u, _ in splits), sum(k for _, k in splits))
    return out


@dataclass(frozen=True, slots=True)
class _Snapshot:
    proxies: dict[str, tuple[int, int]]   # (user, kernel) CPU ticks per proxy label
    app: int                         # CPU ticks of the app's processes
    loadgen_s: float                 # CPU seconds of our finished children (wrk, fixed_rate)
    cpus: dict[int, tuple[int, int]]
    wall: float
    irq: int = 0                     # interrupt + softirq jiffies, all CPUs
    steal: int = 0                   # steal jiffies, all CPUs
    everyone: dict[int, int] | None = None   # utime + stime of every live process
    ours: frozenset[int] = frozenset()       # proxies, app and this process


def _snapshot(route: Route) -> _Snapshot:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    irq, steal = procs.softirq_steal_jiffies()
    return _Snapshot(_ticks(route), sum(procs.cpu_ticks(p) for p in route.app_pids),
                     ru.ru_utime + ru.ru_stime, procs.cpu_times(), time.monotonic(), irq, steal,
                     procs.all_cpu_ticks(),
                     frozenset({p for pids in route.proxies.values() for p in pids}
                               | set(route.app_pids) | {os.getpid()}))


def _account(a: _Snapshot, b: _Snapshot, requests: int) -> dict:
    """CPU between two snapshots: proxy µs/request, and utilisation of everyone involved.

    ``other_cpu`` is what the rest of the machine used meanwhile, in CPUs: the CPU time of
    every other process alive at both ends of the run, plus steal time (other guests of the
    hypervisor); on a shared box, the noise indicator. (Not "all busy time minus ours": that
    also counts softirq work that interrupted an idle CPU, e.g. our own loopback traffic at a
    low fixed rate.) ``softirq_cpu`` is the interrupt + softirq time of all CPUs.
    """
    wall = max(1e-9, b.wall - a.wall)
    user_s = {label: (b.proxies[label][0] - a.proxies[label][0]) / procs.CLK_TCK for label in a.proxies}
    kern_s = {label: (b.proxies[label][1] - a.proxies[label][1]) / procs.CLK_TCK for label in a.proxies}
    proxy_s = {label: user_s[label] + kern_s[label] for label in a.proxies}
    app_s = (b.app - a.app) / procs.CLK_TCK
    load_s = b.loadgen_s - a.loadgen_s
    irq_s = (b.irq - a.irq) / procs.CLK_TCK
    ours = a.ours
    before, after = a.everyone or {}, b.everyone or {}
    others_s = sum(t - before[p] for p, t in after.items() if p in before and p not in ours) / procs.CLK_TCK
    steal_s = (b.steal - a.steal) / procs.CLK_TCK
    per_req = {label: sec * 1e6 / max(1, requests) for label, sec in proxy_s.items()}
    if per_req:
        per_req["total"] = sum(per_req.values())
    return {
        "proxy_cpu_us_per_req": per_req,
        "proxy_user_kernel_us_per_req": {
            label: [round(user_s[label] * 1e6 / max(1, requests), 2), round(kern_s[label] * 1e6 / max(1, requests), 2)]
            for label in a.proxies},
        "proxy_cpu_util": {label: round(sec / wall, 3) for label, sec in proxy_s.items()},
        "app_cpu_util": round(app_s / wall, 3),
        "loadgen_cpu_util": round(load_s / wall, 3),
        "other_cpu": round(max(0.0, others_s + steal_s) / wall, 3),
        "softirq_cpu": round(irq_s / wall, 3),
        "cpu_util": {f"cpu{k}": round(v, 3) for k, v in procs.cpu_util(a.cpus, b.cpus).items()},
    }


def throughput(route: Route, s: Settings, pinning: procs.Pinning, sampler: procs.RssSampler) -> dict:
    before = _snapshot(route)
    run = loadgen.wrk(route.url, route.host, s.duration, conns=s.wrk_conns,
                      prefix=pinning.prefix(pinning.load_cpu))
    run.update(_account(before, _snapshot(route), run["requests"]))
    sampler.sample()
    return run


def latency(route: Route, s: Settings, pinning: procs.Pinning) -> dict:
    before = _snapshot(route)
    run = loadgen.fixed_rate(route.url, route.host, s.rate, s.duration, conns=s.fixed_conns,
                             prefix=pinning.prefix(pinning.load_cpu), drain=s.drain)
    run.update(_account(before, _snapshot(route), run["completed"]))
    return run


def counter_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Counter increase over warm-up + runs (empty if either read failed)."""
    return {k: b[k] - a[k] for k in b if k in a}


def measure(route: Route, s: Settings, pinning: procs.Pinning) -> dict:
    """All of one route's numbers: one throughput run and one latency run. (For more
    rounds the caller interleaves routes itself with :func:`throughput`.)"""
    pin(route, pinning)
    load_before = sysinfo.loadavg()
    sampler = procs.RssSampler(route.proxies)
    idle = sampler.sample()
    counters0 = route.counters() if route.counters else {}
    loadgen.wrk(route.url, route.host, s.warmup, conns=s.wrk_conns, prefix=pinning.prefix(pinning.load_cpu))
    with sampler:
        tput = throughput(route, s, pinning, sampler)
        lat = latency(route, s, pinning)
    return {
        "key": route.key, "title": route.title, "url": route.url, "host": route.host,
        "throughput": [tput], "latency": lat,
        "rss_kb": {label: {"idle": idle[label], "peak": sampler.peak_kb[label]} for label in route.proxies},
        "rss_samples": sampler.samples,
        "loadavg_before": load_before,
        "counters": counter_delta(counters0, route.counters() if route.counters else {}),
        "proxy_pids": route.proxies,
    }
