"""Exponential backoff with jitter, as linkerd's ``linkerd/exp-backoff`` computes it.

The n-th delay (n = 0, 1, 2 ...) is ``base = min(max, min * 2**n)`` plus a jitter of
``base * jitter * rand``, where the jitter is capped so that the delay never exceeds ``max``.
``rand`` is a random float in [0, 1) supplied by the caller, so tests are deterministic.
"""
from __future__ import annotations


def exp_backoff(n: int, min_delay: float, max_delay: float, jitter: float, rand: float) -> float:
    base = min(max_delay, min_delay * 2.0 ** min(n, 64))
    return base + min(max_delay - base, base * jitter * rand)
