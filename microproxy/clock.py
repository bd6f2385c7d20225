"""The only module that reads the wall clock; everything else takes ``now`` as an argument."""
from __future__ import annotations

import time


def now() -> float:
    """Seconds since the epoch (certificate validity is wall-clock time)."""
    return time.time()


def monotonic() -> float:
    return time.monotonic()
