"""Fault injection (Istio's ``HTTPFaultInjection``): the pure decision.

Configuration
-------------
Gateway API has no fault filter, so a route carries its faults in one annotation on the
HTTPRoute (an annotation keeps the YAML valid for a real Kubernetes API server, where an
unknown ``spec`` field would be pruned or refused); it applies to every rule of that route::

    metadata:
      annotations:
        fault.micromesh.io/http: '{"delay": {"percentage": 10, "fixedDelay": "2s"},
                                   "abort": {"percentage": 5, "httpStatus": 503}}'

The value is a JSON object in Istio's shape. ``percentage`` is a number 0..100 (Istio's
``{"value": 10}`` form is accepted too) and defaults to 100; ``fixedDelay`` is a Gateway API
duration; ``httpStatus`` is 200..599.

Decision
--------
``decide(fault, r_delay, r_abort)`` draws the delay and the abort independently, as Envoy's
fault filter does: a request may be delayed, aborted, both (delayed, then aborted) or neither.
The caller sleeps ``delay`` before forwarding and, for an abort, answers ``abort`` itself
without contacting a backend. As in Istio, a faulted request is not retried, and the delay
is injected before (so outside) the route's timeouts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .fields import duration, fail, integer, mapping, number, only, render_duration

ANNOTATION = "fault.micromesh.io/http"


@dataclass(frozen=True, slots=True)
class Fault:
    delay: float = 0.0          # seconds; 0 = no delay fault
    delay_percent: float = 0.0  # 0..100
    abort_status: int = 0       # HTTP status; 0 = no abort fault
    abort_percent: float = 0.0  # 0..100


@dataclass(frozen=True, slots=True)
class Inject:
    """Delay the request by ``delay`` seconds (0: none), then answer ``abort`` (0: forward)."""
    delay: float
    abort: int


NO_FAULT = Inject(0.0, 0)


def decide(fault: Fault | None, r_delay: float, r_abort: float) -> Inject:
    """``r_delay`` and ``r_abort`` are independent random floats in [0, 1)."""
    if fault is None:
        return NO_FAULT
    delay = fault.delay if r_delay * 100.0 < fault.delay_percent else 0.0
    abort = fault.abort_status if r_abort * 100.0 < fault.abort_percent else 0
    return NO_FAULT if not delay and not abort else Inject(delay, abort)


def _percentage(obj: dict[str, Any], path: str) -> float:
    value = obj.get("percentage", 100)
    if isinstance(value, dict):
        only(value, f"{path}.percentage", ("value",))
        value, path = value.get("value"), f"{path}.percentage.value"
    else:
        path = f"{path}.percentage"
    return number(value, path, 0, 100)


def parse(text: Any, path: str) -> Fault:
    """The annotation's value -> ``Fault``; raises ``FieldError`` naming the field."""
    if not isinstance(text, str):
        raise fail(path, "must be a string holding a JSON object")
    try:
        obj = json.loads(text)
    except ValueError:
        raise fail(path, 'must be a JSON object like {"abort": {"percentage": 10, '
                         '"httpStatus": 503}}') from None
    only(mapping(obj, path), path, ("delay", "abort"))
    if not obj:
        raise fail(path, "must set delay, abort or both")
    fault = Fault()
    if "delay" in obj:
        where = f"{path}.delay"
        delay = mapping(obj["delay"], where)
        only(delay, where, ("percentage", "fixedDelay"))
        if "fixedDelay" not in delay:
            raise fail(f"{where}.fixedDelay", "is required")
        fixed = duration(delay["fixedDelay"], f"{where}.fixedDelay")
        if not fixed:
            raise fail(f"{where}.fixedDelay", "must be longer than 0s")
        fault = Fault(fixed, _percentage(delay, where))
    if "abort" in obj:
        where = f"{path}.abort"
        abort = mapping(obj["abort"], where)
        only(abort, where, ("percentage", "httpStatus"))
        status = integer(abort.get("httpStatus"), f"{where}.httpStatus", 200, 599)
        fault = Fault(fault.delay, fault.delay_percent, status, _percentage(abort, where))
    return fault


def render(fault: Fault) -> str:
    """The canonical annotation value: ``parse(render(f), ...) == f``."""
    obj: dict[str, Any] = {}
    if fault.delay:
        obj["delay"] = {"fixedDelay": render_duration(fault.delay), "percentage": fault.delay_percent}
    if fault.abort_status:
        obj["abort"] = {"httpStatus": fault.abort_status, "percentage": fault.abort_percent}
    return json.dumps(obj, sort_keys=True)
