"""Circuit breaking: per-endpoint failure accrual and per-service connection-pool limits.

Failure accrual (Linkerd's ``consecutive`` mode)
------------------------------------------------
Each endpoint has a ``Breaker``::

    CLOSED --max_failures consecutive failures--> OPEN (reopen_at = now + backoff)
    OPEN --first request at now >= reopen_at--> PROBATION (that request is the probe)
    PROBATION --success--> CLOSED (backoff reset)
    PROBATION --failure--> OPEN (next backoff: doubled, up to max_penalty)

- A failure is a 5xx, a gRPC INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS or
  PERMISSION_DENIED, or no response at all (``is_failure``); a success resets the count.
- The backoff is ``backoff.exp_backoff(trips, min_penalty, max_penalty, jitter, rand)``
  (Linkerd: 1 s, 1 min, jitter 0.5), ``trips`` counting the opens since the last CLOSED.
- ``ready(now)`` says whether the balancer may send this endpoint a request: always when
  CLOSED, never while OPEN before ``reopen_at``; in PROBATION exactly one request is let
  through (``begin`` marks it; ``cancel`` frees the slot if that request is abandoned).
- While OPEN, outcomes are ignored (they are answers to requests sent before it tripped).
  In PROBATION the first outcome reported decides, as in Linkerd.

Connection-pool limits (Istio's ``connectionPool``)
---------------------------------------------------
``Admission`` counts, per service, the pending requests and the open connections, against
``PoolLimits`` (default: unlimited, as in Istio). Over a limit the answer is
``Reject(reason)``, which the caller turns into a 503 with access-log flag ``UO`` (Envoy's
"upstream overflow") and the reason in ``l5d-proxy-error``. The caller decides what counts
as pending: in Istio, a request waiting for (or using) a connection to the service.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backoff import exp_backoff

CLOSED, OPEN, PROBATION = "closed", "open", "probation"
# gRPC statuses counted as failures: INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS,
# PERMISSION_DENIED (Linkerd's consecutive failure accrual).
GRPC_FAILURES = frozenset({13, 14, 4, 15, 7})
UNLIMITED = 2**32 - 1


def is_failure(status: int | None, grpc_status: int | None = None) -> bool:
    """``status`` None means no response (connect error, reset, timeout)."""
    return status is None or status >= 500 or grpc_status in GRPC_FAILURES


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    max_failures: int = 7
    min_penalty: float = 1.0
    max_penalty: float = 60.0
    jitter: float = 0.5


DEFAULT_BREAKER = BreakerConfig()


class Breaker:
    __slots__ = ("config", "state", "failures", "trips", "reopen_at", "probing")

    def __init__(self, config: BreakerConfig = DEFAULT_BREAKER) -> None:
        self.config = config
        self.state = CLOSED
        self.failures = 0        # consecutive failures while CLOSED
        self.trips = 0           # opens since the last CLOSED: the backoff exponent
        self.reopen_at = 0.0
        self.probing = False     # the probation request is in flight

    def ready(self, now: float) -> bool:
        if self.state is CLOSED:
            return True
        if self.state is OPEN:
            return now >= self.reopen_at
        return not self.probing

    def begin(self, now: float) -> None:
        """A request is sent to the endpoint (the caller checked ``ready`` just before)."""
        if self.state is OPEN and now >= self.reopen_at:
            self.state = PROBATION
        if self.state is PROBATION:
            self.probing = True

    def cancel(self) -> None:
        """A request ended without an outcome (abandoned): free the probation slot."""
        self.probing = False

    def success(self) -> None:
        if self.state is not OPEN:
            self.state, self.failures, self.trips, self.probing = CLOSED, 0, 0, False

    def failure(self, now: float, rand: float) -> None:
        """``rand``: a random float in [0, 1) for the backoff jitter."""
        if self.state is CLOSED:
            self.failures += 1
            if self.failures < self.config.max_failures:
                return
        elif self.state is OPEN:
            return
        else:
            self.trips += 1
        c = self.config
        self.state, self.failures, self.probing = OPEN, 0, False
        self.reopen_at = now + exp_backoff(self.trips, c.min_penalty, c.max_penalty, c.jitter, rand)

    def record(self, failed: bool, now: float, rand: float) -> None:
        if failed:
            self.failure(now, rand)
        else:
            self.success()


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_pending_requests: int = UNLIMITED   # Istio http1MaxPendingRequests
    max_connections: int = UNLIMITED        # Istio tcp.maxConnections


@dataclass(frozen=True, slots=True)
class Admit:
    pass


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    flag: str = "UO"


ADMIT = Admit()


class Admission:
    """Per-service counters; every ``Admit`` must be paired with its ``*_done`` call."""

    __slots__ = ("limits", "pending", "connections", "_no_request", "_no_connection")

    def __init__(self, limits: PoolLimits = PoolLimits()) -> None:
        self.limits = limits
        self.pending = self.connections = 0
        self._no_request = Reject(
            f"service overflow: max pending requests ({limits.max_pending_requests}) reached")
        self._no_connection = Reject(
            f"service overflow: max connections ({limits.max_connections}) reached")

    def request(self) -> Admit | Reject:
        if self.pending >= self.limits.max_pending_requests:
            return self._no_request
        self.pending += 1
        return ADMIT

    def request_done(self) -> None:
        self.pending -= 1

    def connect(self) -> Admit | Reject:
        if self.connections >= self.limits.max_connections:
            return self._no_connection
        self.connections += 1
        return ADMIT

    def connection_done(self) -> None:
        self.connections -= 1
