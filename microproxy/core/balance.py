"""Load balancing: power of two choices (P2C) over peak-EWMA latency, as linkerd2-proxy does.

Theory of operation
-------------------
``PeakEWMA`` estimates an endpoint's round-trip time (tower's ``PeakEwma``, Finagle's
``PeakEwma``; Linkerd's defaults: ``default_rtt`` 30 ms, ``decay`` 10 s):

- It starts at ``default_rtt``, a guess that the first observed RTT replaces outright.
  While an endpoint has no measurement and nothing pending, P2C prefers it once (a probe),
  so a new replica is measured instead of being priced at the guess until it decays.
- ``observe(rtt, now)``: an RTT above the current estimate replaces it at once (the *peak*:
  a slowing endpoint is avoided immediately); a lower one pulls the estimate towards it with
  weight ``1 - exp(-elapsed / decay)``, i.e. the estimate recovers with time constant
  ``decay`` however many requests arrive.
- ``get(now)``: between observations the estimate decays towards 0 by ``exp(-elapsed /
  decay)``, so an endpoint that was slow and then left idle is tried again. ``get`` does
  not mutate: reading is free of side effects.

An ``Endpoint``'s cost is ``ewma * (pending + 1)``: latency times outstanding work.

``pick(endpoints, now, r1, r2)`` draws two distinct endpoints with the random floats r1, r2
in [0, 1) and returns the cheaper (the first on a tie). Endpoints whose breaker is not
``ready`` are skipped: if either draw is not ready, P2C runs over the ready endpoints only
(a scan, paid only while some breaker is not closed); with none ready it returns None (the
caller fails the request with 503). The caller brackets each request with
``Endpoint.begin(now)`` and ``end(...)`` / ``cancel()``, which keep ``pending``, the EWMA
and the breaker up to date.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from math import exp

from .breaker import CLOSED, Breaker

DEFAULT_RTT = 0.030
DECAY = 10.0


class PeakEWMA:
    __slots__ = ("value", "stamp", "decay", "seen")

    def __init__(self, now: float, default_rtt: float = DEFAULT_RTT, decay: float = DECAY) -> None:
        self.value, self.stamp, self.decay = default_rtt, now, decay
        self.seen = False   # no RTT observed yet: the value is only a guess

    def get(self, now: float) -> float:
        elapsed = now - self.stamp
        return self.value if elapsed <= 0 else self.value * exp(-elapsed / self.decay)

    def observe(self, rtt: float, now: float) -> None:
        if not self.seen:
            # The first real measurement replaces the guess (default_rtt) outright;
            # otherwise a 1 ms endpoint would be priced at ~30 ms for tens of seconds.
            self.seen = True
            self.value, self.stamp = rtt, max(now, self.stamp)
            return
        elapsed = now - self.stamp
        w = 1.0 if elapsed <= 0 else exp(-elapsed / self.decay)
        current = self.value * w
        self.value = rtt if rtt > current else current + rtt * (1.0 - w)
        self.stamp = max(now, self.stamp)


class Endpoint:
    """An endpoint's load-balancing state; ``key`` is whatever the caller dials (an address)."""

    __slots__ = ("key", "ewma", "pending", "breaker")

    def __init__(self, key: Hashable, now: float, breaker: Breaker | None = None,
                 default_rtt: float = DEFAULT_RTT, decay: float = DECAY) -> None:
        self.key = key
        self.ewma = PeakEWMA(now, default_rtt, decay)
        self.pending = 0
        self.breaker = breaker

    def cost(self, now: float) -> float:
        return self.ewma.get(now) * (self.pending + 1)

    def ready(self, now: float) -> bool:
        return self.breaker is None or self.breaker.ready(now)

    def begin(self, now: float) -> None:
        self.pending += 1
        b = self.breaker
        if b is not None and b.state is not CLOSED:   # closed: Breaker.begin has nothing to do
            b.begin(now)

    def end(self, now: float, rtt: float | None, failed: bool = False, rand: float = 0.0) -> None:
        """The request finished: ``rtt`` is None when no response came (connect error)."""
        self.pending -= 1
        if rtt is not None:
            self.ewma.observe(rtt, now)
        b = self.breaker
        if b is not None:
            if failed:
                b.failure(now, rand)
            elif b.state is not CLOSED or b.failures:   # closed, no failures: success is a no-op
                b.success()

    def cancel(self) -> None:
        """The request was abandoned without an outcome."""
        self.pending -= 1
        if self.breaker is not None:
            self.breaker.cancel()


def pick(endpoints: Sequence[Endpoint], now: float, r1: float, r2: float) -> Endpoint | None:
    n = len(endpoints)
    if n < 2:
        return endpoints[0] if n and endpoints[0].ready(now) else None
    i = min(int(r1 * n), n - 1)
    j = min(int(r2 * (n - 1)), n - 2)
    if j >= i:
        j += 1
    a, b = endpoints[i], endpoints[j]
    if a.ready(now) and b.ready(now):
        # Exploration: an endpoint never measured and idle is tried once, so a new replica
        # gets its first real RTT instead of being priced at the guess forever.
        probe_a = not a.ewma.seen and a.pending == 0
        probe_b = not b.ewma.seen and b.pending == 0
        if probe_a != probe_b:
            return a if probe_a else b
        return a if a.cost(now) <= b.cost(now) else b
    return pick([e for e in endpoints if e.ready(now)], now, r1, r2)   # all ready: one level
