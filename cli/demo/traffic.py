"""traffic: a client-only workload that calls web a few times per second, forever.

Prints one summary line every 30 s ($TARGET, $RPS to change what and how fast).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from demokit import call

TARGET = os.environ.get("TARGET", "http://web.default:7000/")
RPS = float(os.environ.get("RPS", "4"))
REPORT_EVERY = 30.0


def _stop(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    ok = failed = 0
    last_report = time.monotonic()
    while True:
        started = time.monotonic()
        status, _ = call(TARGET, timeout=5.0)
        if status == 200:
            ok += 1
        else:
            failed += 1
        now = time.monotonic()
        if now - last_report >= REPORT_EVERY:
            print(f"traffic: {ok} ok, {failed} failed in the last {now - last_report:.0f} s -> {TARGET}",
                  file=sys.stderr, flush=True)
            ok = failed = 0
            last_report = now
        time.sleep(max(0.0, 1.0 / RPS - (now - started)))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
