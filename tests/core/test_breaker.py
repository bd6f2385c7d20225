"""Failure accrual and connection-pool admission (microproxy/core/breaker.py), fake clock."""
from __future__ import annotations

import pytest

from microproxy.core.breaker import (ADMIT, CLOSED, OPEN, PROBATION, Admission, Breaker,
                                     BreakerConfig, PoolLimits, Reject, is_failure)


@pytest.mark.parametrize("status,grpc,failed", [
    (200, None, False), (404, None, False), (429, None, False), (499, None, False),
    (500, None, True), (503, None, True), (599, None, True), (None, None, True),
    (200, 0, False), (200, 5, False), (200, 8, False),      # OK, NOT_FOUND, RESOURCE_EXHAUSTED
    (200, 13, True), (200, 14, True), (200, 4, True), (200, 15, True), (200, 7, True),
])
def test_failure_classification(status: int | None, grpc: int | None, failed: bool) -> None:
    assert is_failure(status, grpc) is failed


def test_linkerd_defaults() -> None:
    assert BreakerConfig() == BreakerConfig(max_failures=7, min_penalty=1.0, max_penalty=60.0, jitter=0.5)


# A script of (time, event, rand) -> (state, ready) after the event; events: "ok", "fail",
# "begin", "cancel", "check". Jitter 0.5 with rand 0 means exact penalties (1 s, 2 s, 4 s ...).
SCRIPT: list[tuple[float, str, float, str, bool]] = [
    *[(0.0, "fail", 0.0, CLOSED, True) for _ in range(6)],
    (0.0, "ok", 0.0, CLOSED, True),                  # a success resets the count
    *[(0.1, "fail", 0.0, CLOSED, True) for _ in range(6)],
    (0.1, "fail", 0.0, OPEN, False),                 # 7th consecutive failure: open for 1 s
    (0.5, "ok", 0.0, OPEN, False),                   # outcomes while open are ignored
    (0.6, "fail", 0.0, OPEN, False),
    (1.09, "check", 0.0, OPEN, False),
    (1.1, "check", 0.0, OPEN, True),                 # penalty over: one request may go
    (1.1, "begin", 0.0, PROBATION, False),           # ... and only one
    (1.2, "cancel", 0.0, PROBATION, True),           # abandoned: the next request probes
    (1.2, "begin", 0.0, PROBATION, False),
    (1.5, "fail", 0.0, OPEN, False),                 # probe failed: open for 2 s
    (3.49, "check", 0.0, OPEN, False),
    (3.5, "begin", 0.0, PROBATION, False),
    (3.6, "fail", 0.0, OPEN, False),                 # 4 s
    (7.6, "begin", 0.0, PROBATION, False),
    (7.7, "ok", 0.0, CLOSED, True),                  # probe succeeded: closed, backoff reset
    (7.7, "begin", 0.0, CLOSED, True),
    *[(8.0, "fail", 0.0, CLOSED, True) for _ in range(6)],
    (8.0, "fail", 0.999, OPEN, False),               # back to a 1 s penalty, jittered to ~1.5 s
    (9.4, "check", 0.0, OPEN, False),
    (9.5, "check", 0.0, OPEN, True),
]


def test_state_machine() -> None:
    b = Breaker()
    for step, (now, event, rand, state, ready) in enumerate(SCRIPT):
        if event == "ok":
            b.record(False, now, rand)
        elif event == "fail":
            b.record(True, now, rand)
        elif event == "begin":
            b.begin(now)
        elif event == "cancel":
            b.cancel()
        assert (b.state, b.ready(now)) == (state, ready), f"step {step}: {now} {event}"


def test_penalty_grows_to_the_cap() -> None:
    b = Breaker(BreakerConfig(max_failures=1, min_penalty=1.0, max_penalty=60.0, jitter=0.0))
    now, penalties = 0.0, []
    b.failure(now, 0.5)
    for _ in range(8):
        penalties.append(b.reopen_at - now)
        now = b.reopen_at
        b.begin(now)
        b.failure(now, 0.5)
    assert penalties == [1, 2, 4, 8, 16, 32, 60, 60]


def test_begin_before_reopen_does_not_start_probation() -> None:
    b = Breaker(BreakerConfig(max_failures=1))
    b.failure(0.0, 0.0)
    b.begin(0.5)   # a caller that did not check ready(): no probation yet
    assert b.state == OPEN and not b.probing


def test_admission_limits() -> None:
    a = Admission(PoolLimits(max_pending_requests=2, max_connections=1))
    assert [a.request(), a.request()] == [ADMIT, ADMIT]
    rejected = a.request()
    assert rejected == Reject("service overflow: max pending requests (2) reached", "UO")
    a.request_done()
    assert a.request() is ADMIT and a.pending == 2
    assert a.connect() is ADMIT
    assert a.connect() == Reject("service overflow: max connections (1) reached")
    a.connection_done()
    assert a.connect() is ADMIT and a.connections == 1


def test_admission_is_unlimited_by_default() -> None:
    a = Admission()
    assert all(a.request() is ADMIT and a.connect() is ADMIT for _ in range(10_000))
