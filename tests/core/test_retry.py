"""Retry policy, budget and decisions (microproxy/core/retry.py, backoff.py), with a fake clock."""
from __future__ import annotations

import random
from math import isclose
from typing import Any

import pytest

from microproxy.core.backoff import exp_backoff
from microproxy.core.fields import FieldError
from microproxy.core.retry import (ALL_5XX, BODY, BUDGET, DEADLINE, FINAL, LIMIT_REACHED, MAX_BODY,
                                   NO_POLICY, ROUTE_TIMEOUT, TIMED_OUT, TRY_TIMEOUT, Budget, GiveUp,
                                   Retry, RetryPolicy, decide, from_annotations, from_gateway,
                                   is_retryable, to_annotations, to_gateway)

POLICY = RetryPolicy(frozenset({502, 503, 504}), frozenset({14}), limit=2)


def test_budget_reserve_and_ratio() -> None:
    b = Budget()   # ratio 0.2, 10/s, ttl 10 s: a reserve of 100 retries
    assert b.balance(0.0) == 100.0
    assert sum(b.withdraw(0.5) for _ in range(150)) == 100
    for _ in range(1000):
        b.deposit(1.0)
    assert isclose(b.balance(1.0), 200.0)
    assert sum(b.withdraw(1.5) for _ in range(500)) == 200
    assert not b.withdraw(9.9)


def test_budget_slides_over_ttl() -> None:
    b = Budget(ratio=0.5, min_per_second=1.0, ttl=10.0)   # buckets of 1 s
    for _ in range(10):
        b.deposit(0.5)                     # bucket 0
    assert isclose(b.balance(0.5), 15.0)
    assert sum(b.withdraw(3.2) for _ in range(20)) == 15   # bucket 3
    assert b.balance(9.99) == 0.0          # nothing expired yet
    assert isclose(b.balance(10.0), -5.0)  # bucket 0 (deposits) expired, bucket 3 not yet
    assert b.balance(13.0) == 10.0         # bucket 3 (withdrawals) expired: the reserve only
    assert b.balance(12.9) == 10.0         # a clock read slightly earlier counts as now
    b.deposit(13.5)
    assert isclose(b.balance(40.0), 10.0)  # a long idle gap clears every bucket


# (policy, keyword arguments to decide, expected decision)
DECISIONS: list[tuple[RetryPolicy | None, dict[str, Any], Retry | GiveUp]] = [
    (None, {}, NO_POLICY),
    (POLICY, {"timeout": ROUTE_TIMEOUT}, TIMED_OUT),
    (POLICY, {"timeout": ROUTE_TIMEOUT, "status": None}, TIMED_OUT),
    (POLICY, {"status": 200}, FINAL),
    (POLICY, {"status": 500}, FINAL),
    (POLICY, {"status": 200, "grpc_status": 5}, FINAL),
    (POLICY, {"status": 503}, Retry(0.025)),
    (POLICY, {"status": 503, "rand": 0.5}, Retry(0.0375)),
    (POLICY, {"status": 503, "retries": 1, "rand": 0.5}, Retry(0.075)),
    (POLICY, {"status": None}, Retry(0.025)),                     # connection error
    (POLICY, {"status": 200, "grpc_status": 14}, Retry(0.025)),   # gRPC UNAVAILABLE
    (POLICY, {"status": None, "timeout": TRY_TIMEOUT}, Retry(0.025)),
    (POLICY, {"status": 503, "body_len": None}, BODY),
    (POLICY, {"status": 503, "body_len": MAX_BODY + 1}, BODY),
    (POLICY, {"status": 503, "body_len": MAX_BODY}, Retry(0.025)),
    (POLICY, {"status": 503, "retries": 2}, LIMIT_REACHED),
    (RetryPolicy(limit=0), {"status": 503}, LIMIT_REACHED),
    (POLICY, {"status": 503, "deadline": 0.02}, DEADLINE),
    (POLICY, {"status": 503, "deadline": 0.026}, Retry(0.025)),
    (POLICY, {"status": 503, "budget": Budget(min_per_second=0.0)}, BUDGET),
]


@pytest.mark.parametrize("policy,kwargs,expected", DECISIONS)
def test_decide(policy: RetryPolicy | None, kwargs: dict[str, Any], expected: Retry | GiveUp) -> None:
    args: dict[str, Any] = {"retries": 0, "status": 503, "body_len": 0, "now": 0.0, "rand": 0.0,
                            "budget": Budget(), **kwargs}
    budget = args.pop("budget")
    got = decide(policy, budget, **args)
    assert type(got) is type(expected)
    if isinstance(got, Retry):
        assert isinstance(expected, Retry) and isclose(got.after, expected.after)
        assert budget.balance(0.0) == 99.0     # a retry is withdrawn from the budget
    else:
        assert got == expected
        assert budget.balance(0.0) == budget.reserve   # giving up costs nothing


def test_is_retryable() -> None:
    assert is_retryable(POLICY, 503) and is_retryable(POLICY, None) and not is_retryable(POLICY, 404)
    assert is_retryable(POLICY, None, timeout=TRY_TIMEOUT)
    assert not is_retryable(POLICY, 503, timeout=ROUTE_TIMEOUT)


# (n, min, max, jitter, rand, expected): linkerd-exp-backoff's arithmetic
BACKOFF = [
    (0, 1.0, 60.0, 0.5, 0.0, 1.0),
    (0, 1.0, 60.0, 0.5, 0.999, 1.4995),
    (1, 1.0, 60.0, 0.5, 0.0, 2.0),
    (5, 1.0, 60.0, 0.5, 0.5, 40.0),       # 32 + 32 * 0.25
    (5, 1.0, 60.0, 0.5, 0.999, 47.984),   # 32 + 32 * 0.4995, under the cap
    (5, 1.0, 40.0, 0.5, 0.999, 40.0),     # jitter capped so as never to exceed max
    (6, 1.0, 60.0, 0.5, 0.5, 60.0),       # 64 capped to 60, no room for jitter
    (10_000, 1.0, 60.0, 0.5, 0.5, 60.0),  # no overflow
    (2, 0.025, 0.25, 1.0, 0.5, 0.15),
    (0, 0.0, 0.0, 1.0, 0.5, 0.0),
]


@pytest.mark.parametrize("n,lo,hi,jitter,rand,expected", BACKOFF)
def test_exp_backoff(n: int, lo: float, hi: float, jitter: float, rand: float, expected: float) -> None:
    assert isclose(exp_backoff(n, lo, hi, jitter, rand), expected)


# (annotations, expected policy)
ANNOTATIONS: list[tuple[dict[str, Any], RetryPolicy | None]] = [
    ({}, None),
    ({"other": "x"}, None),
    ({"retry.linkerd.io/http": "5xx"}, RetryPolicy(ALL_5XX, frozenset(), 1)),
    ({"retry.linkerd.io/http": "gateway-error"}, RetryPolicy(frozenset({502, 503, 504}))),
    ({"retry.linkerd.io/http": "500-502, 429,503"}, RetryPolicy(frozenset({429, 500, 501, 502, 503}))),
    ({"retry.linkerd.io/http": "4xx"}, RetryPolicy(frozenset(range(400, 500)))),
    ({"retry.linkerd.io/limit": "3"}, RetryPolicy(ALL_5XX, frozenset(), 3)),
    ({"retry.linkerd.io/limit": "0"}, RetryPolicy(limit=0)),
    ({"retry.linkerd.io/timeout": "300ms"}, RetryPolicy(timeout=0.3)),
    ({"retry.linkerd.io/timeout": "0s"}, RetryPolicy()),
    ({"retry.linkerd.io/grpc": "unavailable, cancelled"}, RetryPolicy(frozenset(), frozenset({14, 1}))),
    ({"retry.linkerd.io/grpc": "internal", "retry.linkerd.io/http": "503"},
     RetryPolicy(frozenset({503}), frozenset({13}))),
]


@pytest.mark.parametrize("annotations,expected", ANNOTATIONS)
def test_from_annotations(annotations: dict[str, Any], expected: RetryPolicy | None) -> None:
    policy = from_annotations(annotations, "a")
    assert policy == expected
    if policy is not None:
        assert from_annotations(to_annotations(policy), "a") == policy


@pytest.mark.parametrize("annotations,message", [
    ({"retry.linkerd.io/http": ""}, "a[\"retry.linkerd.io/http\"]: '' is not a status"),
    ({"retry.linkerd.io/http": "504-500"}, "a[\"retry.linkerd.io/http\"]: '504-500' is not"),
    ({"retry.linkerd.io/http": "600"}, "a[\"retry.linkerd.io/http\"]: '600' is not"),
    ({"retry.linkerd.io/http": "5XX"}, "a[\"retry.linkerd.io/http\"]: '5XX' is not"),
    ({"retry.linkerd.io/limit": "x"}, 'a["retry.linkerd.io/limit"]: must be an integer 0..100'),
    ({"retry.linkerd.io/limit": "101"}, 'a["retry.linkerd.io/limit"]: must be an integer 0..100'),
    ({"retry.linkerd.io/limit": "-1"}, 'a["retry.linkerd.io/limit"]: must be an integer 0..100'),
    ({"retry.linkerd.io/limit": 2}, 'a["retry.linkerd.io/limit"]: must be a string (quote it in YAML)'),
    ({"retry.linkerd.io/timeout": "1.5s"}, 'a["retry.linkerd.io/timeout"]: must be a duration'),
    ({"retry.linkerd.io/grpc": "bogus"}, 'a["retry.linkerd.io/grpc"]: \'bogus\' is not one of cancelled'),
])
def test_bad_annotations(annotations: dict[str, Any], message: str) -> None:
    with pytest.raises(FieldError) as e:
        from_annotations(annotations, "a")
    assert str(e.value).startswith(message), str(e.value)


def test_gateway_retry() -> None:
    policy = from_gateway({"codes": [500, 503], "attempts": 4, "backoff": "1s"}, "r")
    assert policy == RetryPolicy(frozenset({500, 503}), frozenset(), 4, 1.0, 10.0)
    assert to_gateway(policy) == {"codes": [500, 503], "attempts": 4, "backoff": "1s"}
    assert from_gateway(to_gateway(policy), "r") == policy
    for bad, message in (([], "r: must be a mapping"), ({"codes": 503}, "r.codes: must be a list")):
        with pytest.raises(FieldError, match=f"^{message}"):
            from_gateway(bad, "r")


def run(failure_rate: float, policy: RetryPolicy, seconds: float, rps: float = 100.0,
        seed: int = 11) -> tuple[int, int, int]:
    """Logical requests at a steady rate through the retry core: (requests, successes, attempts)."""
    rng, budget = random.Random(seed), Budget()
    requests = successes = attempts = 0
    while requests < seconds * rps:
        start = requests / rps
        budget.deposit(start)
        requests += 1
        now, retries = start, 0
        while True:
            attempts += 1
            ok = rng.random() >= failure_rate
            if ok:
                successes += 1
                break
            d = decide(policy, budget, retries=retries, status=503, body_len=120, now=now, rand=rng.random())
            if not isinstance(d, Retry):
                break
            now, retries = now + d.after, retries + 1
    return requests, successes, attempts


@pytest.mark.parametrize("limit,at_least", [(2, 0.99), (3, 0.99)])
def test_a_flaky_backend_looks_healthy(limit: int, at_least: float) -> None:
    requests, successes, attempts = run(0.2, RetryPolicy(limit=limit), seconds=60.0)
    assert successes / requests >= at_least, (successes, requests)
    assert attempts / requests < 1.3


def test_linkerds_default_limit_of_one_retry_is_not_enough_for_99_percent() -> None:
    requests, successes, _ = run(0.2, RetryPolicy(limit=1), seconds=60.0)
    assert 0.95 < successes / requests < 0.97   # 1 - 0.2 ** 2


def test_a_dead_backend_gets_no_retry_storm() -> None:
    ttl = 10.0   # requests for 9.5 s: their retries (backoffs < 0.35 s) all fall within one ttl
    requests, successes, attempts = run(1.0, RetryPolicy(limit=3), seconds=ttl - 0.5)
    assert successes == 0
    assert requests < attempts <= 1.2 * requests + 10 * ttl, (requests, attempts)
    # over a longer run the reserve (10/s) is replenished as the window slides
    requests, _, attempts = run(1.0, RetryPolicy(limit=3), seconds=60.0)
    assert attempts <= 1.2 * requests + 10 * 60.0 + 100, (requests, attempts)
