"""The two load generators, each run as a bounded, pinned subprocess.

- :func:`wrk` — closed-loop max throughput (``wrk -t1 -c32 -dS``), reported through
  ``wrk_report.lua`` as one JSON line.
- :func:`fixed_rate` — open-loop, coordinated-omission-corrected latency at a fixed rate
  (``python -m perf.fixed_rate``), one JSON object.

Both hard-stop: a run that overstays its duration by a margin is killed and raises.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
MARGIN_S = 30.0


class LoadError(RuntimeError):
    pass


def wrk_version() -> str:
    r = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first = (r.stdout or r.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip().removeprefix("wrk ") if first else "unknown"


def wrk(url: str, host: str | None, duration: float, *, threads: int = 1, conns: int = 32,
        prefix: list[str] | None = None) -> dict:
    """Run wrk for ``duration`` seconds; returns requests, rps, errors and latency (µs)."""
    secs = max(1, round(duration))
    argv = [*(prefix or []), "wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s",
            "--timeout", "5s", "-s", str(WRK_SCRIPT)]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(url)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + MARGIN_S, check=False)
    except subprocess.TimeoutExpired:
        raise LoadError(f"wrk overran {secs}s by {MARGIN_S}s and was killed") from None
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if r.returncode != 0 or line is None:
        raise LoadError(f"wrk failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    out = json.loads(line.removeprefix("WRKJSON "))
    out["duration_s"] = out.pop("duration_us") / 1e6
    out["rps"] = out["requests"] / out["duration_s"] if out["duration_s"] else 0.0
    out["argv"] = " ".join(argv)
    return out


def fixed_rate(url: str, host: str | None, rate: float, duration: float, conns: int = 16,
               prefix: list[str] | None = None, drain: float = 5.0) -> dict:
    """Open-loop run at ``rate`` rps over ``conns`` keep-alive connections."""
    argv = [*(prefix or []), sys.executable, "-m", "perf.fixed_rate", url, str(rate),
            str(duration), str(conns), "--drain", str(drain)]
    if host:
        argv += ["--host", host]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False,
                           timeout=duration + drain + MARGIN_S,
                           cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        raise LoadError("fixed_rate overran its duration and was killed") from None
    if r.returncode != 0:
        raise LoadError(f"fixed_rate failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
    out = json.loads(r.stdout)
    out["argv"] = " ".join(argv)
    return out
