"""Retries: the policy of a route, the retry budget of a service and the retry decision.

Theory of operation
-------------------
A *policy* (per route) says which outcomes are retried and how often:

- ``statuses``: HTTP response statuses that are retried; ``grpc_statuses``: gRPC statuses;
- ``limit``: retries per request (not counting the first attempt);
- ``backoff``/``max_backoff``: exponential backoff between attempts (``backoff.py``), with
  jitter ``JITTER`` drawn from a random float the caller passes in;
- ``timeout``: the per-try timeout (``retry.linkerd.io/timeout``). An attempt cut by it is
  retried; that is what it is for.

It is written either as Linkerd's annotations on the HTTPRoute (``from_annotations``; they
apply to all of the route's rules; ``retry.linkerd.io/http`` defaults to ``5xx`` when only
``limit`` or ``timeout`` is given) or as the Gateway API ``rules[].retry`` (``from_gateway``:
``codes`` default to none, so only connection errors are retried; ``attempts`` defaults to 1;
``backoff`` is the minimum delay between attempts). A rule's ``retry`` wins over annotations.

``decide()`` is called after each failed attempt and answers ``Retry(after)`` or
``GiveUp(reason)``. In order:

1. no policy -> give up; an attempt cut by the route's ``timeouts.request`` or
   ``timeouts.backendRequest`` -> give up (timeouts are never retried, as in Linkerd);
2. the outcome must be retryable: a listed status, a listed gRPC status, a connection error
   (``status=None``) or the per-try timeout; anything else is final;
3. the request body must be fully known and at most 64 KiB (``MAX_BODY``);
4. fewer than ``limit`` retries so far; the backoff must end before the request deadline;
5. the *budget* must allow it. Every logical request deposits 1, every retry withdraws 1;
   a retry is allowed while ``min_per_second * ttl + ratio * deposits - withdrawals >= 1``,
   both counted over the last ``ttl`` seconds (10 buckets of ``ttl / 10`` seconds). So in
   that window retries <= ratio * requests + min_per_second * ttl: a backend failing every
   request sees at most 1.2x its traffic plus 100 retries per 10 s, never a storm.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .backoff import exp_backoff
from .fields import duration, fail, integer, listed, mapping, only, render_duration

MAX_BODY = 64 * 1024
JITTER = 1.0
DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF = 0.025, 0.25   # Envoy's: 25 ms, 10x that
HTTP, GRPC, LIMIT, TIMEOUT = (f"retry.linkerd.io/{k}" for k in ("http", "grpc", "limit", "timeout"))
GRPC_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
              "unavailable": 14}
ROUTE_TIMEOUT, TRY_TIMEOUT = "route", "try"   # values of decide(timeout=...)
ALL_5XX = frozenset(range(500, 600))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    statuses: frozenset[int] = ALL_5XX
    grpc_statuses: frozenset[int] = frozenset()
    limit: int = 1
    backoff: float = DEFAULT_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    after: float   # seconds to wait before the next attempt


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


NO_POLICY = GiveUp("no retry policy")
TIMED_OUT = GiveUp("timeouts are not retried")
FINAL = GiveUp("response is not retryable")
BODY = GiveUp("request body unknown or larger than 64 KiB")
LIMIT_REACHED = GiveUp("retry limit reached")
DEADLINE = GiveUp("request deadline too close")
BUDGET = GiveUp("retry budget exhausted")


class Budget:
    """Linkerd's retry budget (defaults: ratio 0.2, 10 retries/s, ttl 10 s)."""

    __slots__ = ("ratio", "reserve", "_width", "_gen", "_deposits", "_withdrawals", "_d", "_w")
    BUCKETS = 10

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, ttl: float = 10.0) -> None:
        self.ratio, self.reserve, self._width = ratio, min_per_second * ttl, ttl / self.BUCKETS
        self._gen: int | None = None
        self._deposits, self._withdrawals = [0] * self.BUCKETS, [0] * self.BUCKETS
        self._d = self._w = 0   # sums over the buckets

    def _roll(self, now: float) -> int:
        """Expire the buckets older than ttl; the index of ``now``'s bucket."""
        gen = int(now // self._width)
        last = self._gen
        if last is not None and gen <= last:   # same bucket, or a clock read a bit earlier
            return last % self.BUCKETS
        first = gen - self.BUCKETS + 1 if last is None else max(last + 1, gen - self.BUCKETS + 1)
        for g in range(first, gen + 1):
            i = g % self.BUCKETS
            self._d -= self._deposits[i]
            self._w -= self._withdrawals[i]
            self._deposits[i] = self._withdrawals[i] = 0
        self._gen = gen
        return gen % self.BUCKETS

    def deposit(self, now: float) -> None:
        """Call once per logical request (not per retry)."""
        gen = int(now // self._width)
        i = gen % self.BUCKETS if gen == self._gen else self._roll(now)   # same bucket: no roll
        self._deposits[i] += 1
        self._d += 1

    def balance(self, now: float) -> float:
        self._roll(now)
        return self.reserve + self.ratio * self._d - self._w

    def withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is empty."""
        i = self._roll(now)
        if self.reserve + self.ratio * self._d - self._w < 1:
            return False
        self._withdrawals[i] += 1
        self._w += 1
        return True


def is_retryable(policy: RetryPolicy, status: int | None, grpc_status: int | None = None,
                 timeout: str | None = None) -> bool:
    if timeout is not None:
        return timeout == TRY_TIMEOUT
    if grpc_status is not None and grpc_status in policy.grpc_statuses:
        return True
    return status is None or status in policy.statuses


def decide(policy: RetryPolicy | None, budget: Budget, *, retries: int, status: int | None,
           body_len: int | None, now: float, rand: float, grpc_status: int | None = None,
           timeout: str | None = None, deadline: float | None = None) -> Retry | GiveUp:
    """After a failed attempt: retry (after a backoff) or give up.

    ``retries``: retries already made for this request; ``status``: the response status, or
    None for a connection error; ``body_len``: the request body's length, None when it is
    streamed or not fully buffered; ``timeout``: ``ROUTE_TIMEOUT`` or ``TRY_TIMEOUT`` when
    the attempt was cut by one; ``deadline``: absolute time the request must be done by;
    ``rand``: a random float in [0, 1) for the jitter.
    """
    if policy is None:
        return NO_POLICY
    if timeout == ROUTE_TIMEOUT:
        return TIMED_OUT
    if not is_retryable(policy, status, grpc_status, timeout):
        return FINAL
    if body_len is None or body_len > MAX_BODY:
        return BODY
    if retries >= policy.limit:
        return LIMIT_REACHED
    after = exp_backoff(retries, policy.backoff, policy.max_backoff, JITTER, rand)
    if deadline is not None and now + after >= deadline:
        return DEADLINE
    if not budget.withdraw(now):
        return BUDGET
    return Retry(after)


# === configuration: Linkerd annotations and Gateway API rules[].retry ===

_RANGE = re.compile(r"^([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?$")
_CLASS = re.compile(r"^([1-5])xx$")
_LIMIT = re.compile(r"^[0-9]{1,3}$")


def _statuses(text: str, path: str) -> frozenset[int]:
    out: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        m, c = _RANGE.match(item), _CLASS.match(item)
        if item == "gateway-error":
            out.update((502, 503, 504))
        elif c:
            out.update(range(int(c[1]) * 100, int(c[1]) * 100 + 100))
        elif m and int(m[1]) <= int(m[2] or m[1]):
            out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
        else:
            raise fail(path, f"{item!r} is not a status (503), a range (500-504), 5xx or gateway-error")
    return frozenset(out)


def _ranges(statuses: frozenset[int]) -> str:
    runs: list[list[int]] = []
    for s in sorted(statuses):
        if runs and runs[-1][1] == s - 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def from_annotations(annotations: Mapping[str, Any], path: str) -> RetryPolicy | None:
    """Linkerd's ``retry.linkerd.io/*`` annotations -> a policy (None when none is set)."""
    if not any(key in annotations for key in (HTTP, GRPC, LIMIT, TIMEOUT)):
        return None
    values = {}
    for key in (HTTP, GRPC, LIMIT, TIMEOUT):
        value = annotations.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f'{path}["{key}"]', "must be a string (quote it in YAML)")
        values[key] = value
    grpc: set[int] = set()
    for name in filter(None, (v.strip() for v in (values[GRPC] or "").split(","))):
        if name not in GRPC_CODES:
            raise fail(f'{path}["{GRPC}"]', f"{name!r} is not one of {', '.join(GRPC_CODES)}")
        grpc.add(GRPC_CODES[name])
    http = values[HTTP]
    statuses = (_statuses(http, f'{path}["{HTTP}"]') if http is not None
                else frozenset() if grpc else ALL_5XX)
    limit = values[LIMIT]
    if limit is not None and not _LIMIT.match(limit):
        raise fail(f'{path}["{LIMIT}"]', "must be an integer 0..100")
    timeout = values[TIMEOUT]
    seconds = duration(timeout, f'{path}["{TIMEOUT}"]') if timeout is not None else None
    return RetryPolicy(statuses, frozenset(grpc), integer(int(limit or 1), f'{path}["{LIMIT}"]', 0, 100),
                       timeout=seconds or None)


def to_annotations(policy: RetryPolicy) -> dict[str, str]:
    out = {LIMIT: str(policy.limit)}
    if policy.statuses:
        out[HTTP] = _ranges(policy.statuses)
    if policy.grpc_statuses:
        out[GRPC] = ",".join(n for n, c in GRPC_CODES.items() if c in policy.grpc_statuses)
    if policy.timeout:
        out[TIMEOUT] = render_duration(policy.timeout)
    return out


def from_gateway(value: Any, path: str) -> RetryPolicy:
    """Gateway API ``rules[].retry`` (``codes``, ``attempts``, ``backoff``) -> a policy."""
    obj = mapping(value, path)
    only(obj, path, ("codes", "attempts", "backoff"))
    codes = frozenset(integer(c, f"{path}.codes[{i}]", 400, 599)
                      for i, c in enumerate(listed(obj, "codes", path, 200)))
    attempts = integer(obj.get("attempts", 1), f"{path}.attempts", 0, 100)
    backoff = duration(obj["backoff"], f"{path}.backoff") if "backoff" in obj else DEFAULT_BACKOFF
    return RetryPolicy(codes, frozenset(), attempts, backoff, 10 * backoff)


def to_gateway(policy: RetryPolicy) -> dict[str, Any]:
    return {"codes": sorted(policy.statuses), "attempts": policy.limit,
            "backoff": render_duration(policy.backoff)}
