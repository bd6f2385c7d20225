"""Sans-IO decision cores for traffic management: no asyncio, no clock, no sockets.

Each module takes its inputs (and ``now: float`` where time matters, and random floats in
[0, 1) where chance matters) and returns a decision; the transport acts on it.

- ``httproute``: Gateway API HTTPRoute documents -> validated frozen dataclasses (+ JSON).
- ``routing``: a service's route table; per-request route selection, weighted backends.
- ``balance``: peak-EWMA latency and power-of-two-choices over endpoints.
- ``retry``: retry policy, retry budget and the retry/give-up decision.
- ``breaker``: per-endpoint failure accrual and per-service connection-pool admission.
- ``fault``: fault injection (delay / abort) decisions.
- ``backoff``, ``fields``: exponential backoff with jitter; validation helpers.
"""
