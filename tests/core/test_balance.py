"""Peak-EWMA and P2C (microproxy/core/balance.py), with a fake clock."""
from __future__ import annotations

import heapq
import random
from collections import Counter
from math import exp, isclose

import pytest

from microproxy.core.balance import DECAY, DEFAULT_RTT, Endpoint, PeakEWMA, pick
from microproxy.core.breaker import OPEN, PROBATION, Breaker, BreakerConfig


def test_defaults_are_linkerds() -> None:
    assert (DEFAULT_RTT, DECAY) == (0.030, 10.0)


# (observations [(rtt, now)], read at, expected estimate)
EWMA = [
    ([], 0.0, 0.030),                                      # starts at default_rtt
    ([], 10.0, 0.030 * exp(-1)),                           # decays towards 0 while idle
    ([], -1.0, 0.030),                                     # a read before the last update: no decay
    ([(0.2, 1.0)], 1.0, 0.2),                              # a peak replaces the estimate at once
    ([(0.2, 1.0), (0.01, 1.0)], 1.0, 0.2),                 # no time passed: a lower RTT has no weight
    ([(0.2, 1.0), (0.01, 11.0)], 11.0, 0.2 * exp(-1) + 0.01 * (1 - exp(-1))),
    ([(0.2, 1.0), (0.01, 0.5)], 1.0, 0.2),                 # an out-of-order observation has no weight
    ([(0.001, 0.0)], 0.0, 0.001),                          # the first measurement replaces the guess
    ([(0.001, 0.0), (0.0005, 0.0)], 0.0, 0.001),           # later ones: below the estimate, no time passed
]


@pytest.mark.parametrize("observations,at,expected", EWMA)
def test_peak_ewma(observations: list[tuple[float, float]], at: float, expected: float) -> None:
    e = PeakEWMA(0.0)
    for rtt, now in observations:
        e.observe(rtt, now)
    assert isclose(e.get(at), expected)


def test_peak_ewma_converges_with_time_constant_decay() -> None:
    e = PeakEWMA(0.0)
    e.observe(0.5, 0.0)
    for i in range(1, 10_001):   # 10 ms RTTs, one every 10 ms, for 100 s
        e.observe(0.010, i * 0.01)
    assert isclose(e.get(100.0), 0.010 + 0.49 * exp(-10), rel_tol=1e-3)
    half = PeakEWMA(0.0)
    half.observe(0.5, 0.0)
    for i in range(1, 1001):     # after one time constant (10 s) about 1/e of the gap is left
        half.observe(0.010, i * 0.01)
    assert isclose(half.get(10.0), 0.010 + 0.49 * exp(-1), rel_tol=1e-2)


def eps(*rtts: float, now: float = 0.0) -> list[Endpoint]:
    out = []
    for i, rtt in enumerate(rtts):
        ep = Endpoint(f"ep{i}", now, breaker=Breaker(), default_rtt=rtt)
        ep.ewma.seen = True   # as if measured: these tables are about costs, not probes
        out.append(ep)
    return out


def test_an_unmeasured_idle_endpoint_is_probed_once() -> None:
    fast, new = eps(0.001, 0.030)
    new.ewma.seen = False                       # a new replica: only the 30 ms guess
    assert pick([fast, new], 0.0, 0.0, 0.0) is new        # tried although it looks slower
    new.begin(0.0)
    assert pick([fast, new], 0.0, 0.0, 0.0) is fast       # one probe at a time
    new.end(0.001, 0.002)
    assert new.ewma.seen and isclose(new.ewma.get(0.001), 0.002)
    assert pick([fast, new], 0.001, 0.0, 0.0) is fast     # now priced by its real RTT
    a, b = eps(0.01, 0.02)
    a.ewma.seen = b.ewma.seen = False           # both unmeasured: plain cost order
    assert pick([a, b], 0.0, 0.0, 0.0) is a


def trip(ep: Endpoint, now: float = 0.0) -> None:
    assert ep.breaker is not None
    for _ in range(ep.breaker.config.max_failures):
        ep.breaker.failure(now, 0.0)
    assert ep.breaker.state == OPEN


def test_pick_degenerate() -> None:
    assert pick([], 0.0, 0.5, 0.5) is None
    (only,) = eps(0.05)
    assert pick([only], 0.0, 0.9, 0.9) is only
    trip(only)
    assert pick([only], 0.0, 0.9, 0.9) is None
    assert pick([only], 1.0, 0.9, 0.9) is only   # the penalty (1 s, no jitter) is over
    plain = Endpoint("plain", 0.0)               # no breaker: always ready
    assert plain.ready(1e9) and pick([plain], 0.0, 0.0, 0.0) is plain


# (RTTs, pending per endpoint, r1, r2, picked index)
PICKS = [
    ((0.01, 0.05), (0, 0), 0.0, 0.0, 0),
    ((0.01, 0.05), (0, 0), 0.99, 0.99, 0),     # draws 1 then 0: distinct, cheaper wins
    ((0.05, 0.01), (0, 0), 0.0, 0.0, 1),
    ((0.01, 0.01), (0, 0), 0.6, 0.1, 1),       # a tie goes to the first draw
    ((0.01, 0.01), (0, 0), 0.1, 0.6, 0),
    ((0.01, 0.03), (3, 0), 0.0, 0.0, 1),       # 0.01 * 4 > 0.03 * 1: pending work counts
    ((0.01, 0.03), (1, 0), 0.0, 0.0, 0),       # 0.01 * 2 < 0.03
    ((0.01, 0.02, 0.03), (0, 0, 0), 0.99, 0.99, 1),   # draws 2 and 1
    ((0.01, 0.02, 0.03), (0, 0, 0), 0.5, 0.0, 0),     # draws 1 and 0
]


@pytest.mark.parametrize("rtts,pending,r1,r2,expected", PICKS)
def test_pick(rtts: tuple[float, ...], pending: tuple[int, ...], r1: float, r2: float, expected: int) -> None:
    endpoints = eps(*rtts)
    for ep, n in zip(endpoints, pending, strict=True):
        ep.pending = n
    assert pick(endpoints, 0.0, r1, r2) is endpoints[expected]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_pick_draws_two_distinct_endpoints(n: int) -> None:
    grid = [i / 20 for i in range(20)] + [1 - 2**-53]
    seen = set()
    for r1 in grid:
        for r2 in grid:
            endpoints = eps(*([0.01] * n))
            endpoints[0].ewma.observe(1.0, 0.0)   # the first is expensive: it loses every pair
            picked = pick(endpoints, 0.0, r1, r2)
            assert picked is not None
            seen.add(picked.key)
    assert "ep0" not in seen and len(seen) == n - 1


def test_pick_skips_endpoints_whose_breaker_is_open() -> None:
    endpoints = eps(0.01, 0.5, 0.5)
    trip(endpoints[0])
    rng = random.Random(1)
    picked = [pick(endpoints, 0.5, rng.random(), rng.random()) for _ in range(300)]
    assert {ep.key if ep else None for ep in picked} == {"ep1", "ep2"}
    trip(endpoints[1])
    trip(endpoints[2])
    assert pick(endpoints, 0.5, 0.1, 0.7) is None
    assert pick(endpoints, 1.0, 0.1, 0.7) is endpoints[0]   # penalties over: P2C over all again


def test_probation_lets_exactly_one_request_through() -> None:
    a, b = eps(0.01, 0.01)
    trip(a)
    assert pick([a, b], 1.0, 0.0, 0.0) is a      # reopened: the cheaper one is probed
    a.begin(1.0)
    assert a.breaker is not None and a.breaker.state == PROBATION and a.pending == 1
    assert all(pick([a, b], 1.0, r, r) is b for r in (0.0, 0.5, 0.99))
    a.cancel()                                   # the probe was abandoned: another one may go
    assert a.pending == 0 and pick([a, b], 1.0, 0.0, 0.0) is a
    a.begin(1.0)
    a.end(1.2, 0.2, failed=False)
    assert a.breaker.state == "closed" and a.pending == 0 and isclose(a.ewma.get(1.2), 0.2)


def test_end_without_rtt_and_without_breaker() -> None:
    ep = Endpoint("x", 0.0)
    ep.begin(0.0)
    ep.end(1.0, None, failed=True)
    ep.begin(1.0)
    ep.cancel()
    assert ep.pending == 0 and ep.ewma.get(0.0) == DEFAULT_RTT


def simulate(latency: dict[str, float], seconds: float = 60.0, rps: float = 200.0,
             seed: int = 3) -> Counter[str]:
    """Poisson arrivals; each request takes its endpoint's latency; the EWMA sees every RTT."""
    rng = random.Random(seed)
    endpoints = [Endpoint(key, 0.0, breaker=Breaker(BreakerConfig())) for key in latency]
    done: list[tuple[float, int, Endpoint]] = []
    counts: Counter[str] = Counter()
    now, seq = 0.0, 0
    while now < seconds:
        now += rng.expovariate(rps)
        while done and done[0][0] <= now:
            at, _, finished = heapq.heappop(done)
            finished.end(at, latency[str(finished.key)])
        ep = pick(endpoints, now, rng.random(), rng.random())
        assert ep is not None
        ep.begin(now)
        counts[str(ep.key)] += 1
        seq += 1
        heapq.heappush(done, (now + latency[str(ep.key)] * rng.uniform(0.8, 1.2), seq, ep))
    return counts


def test_one_slow_endpoint_among_three_gets_clearly_less_traffic() -> None:
    counts = simulate({"fast-1": 0.010, "fast-2": 0.010, "slow": 0.200})
    total = sum(counts.values())
    assert counts["slow"] / total < 0.10, counts          # a random or round-robin choice gives 1/3
    assert min(counts["fast-1"], counts["fast-2"]) / total > 0.40, counts


def test_equal_endpoints_share_evenly() -> None:
    counts = simulate({"a": 0.010, "b": 0.010, "c": 0.010}, seconds=20.0)
    total = sum(counts.values())
    assert all(abs(n / total - 1 / 3) < 0.05 for n in counts.values()), counts
