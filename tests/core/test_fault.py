"""Fault injection decisions and configuration (microproxy/core/fault.py)."""
from __future__ import annotations

from typing import Any

import pytest

from microproxy.core.fault import ANNOTATION, NO_FAULT, Fault, Inject, decide, parse, render
from microproxy.core.fields import FieldError

BOTH = Fault(delay=2.0, delay_percent=10.0, abort_status=503, abort_percent=50.0)


@pytest.mark.parametrize("fault,r_delay,r_abort,expected", [
    (None, 0.0, 0.0, NO_FAULT),
    (BOTH, 0.0, 0.0, Inject(2.0, 503)),
    (BOTH, 0.0999, 0.4999, Inject(2.0, 503)),
    (BOTH, 0.1, 0.4999, Inject(0.0, 503)),
    (BOTH, 0.0, 0.5, Inject(2.0, 0)),
    (BOTH, 0.1, 0.5, NO_FAULT),
    (Fault(delay=1.0, delay_percent=100.0), 0.9999, 0.0, Inject(1.0, 0)),
    (Fault(abort_status=500, abort_percent=0.0), 0.0, 0.0, NO_FAULT),
])
def test_decide(fault: Fault | None, r_delay: float, r_abort: float, expected: Inject) -> None:
    assert decide(fault, r_delay, r_abort) == expected


def test_percentages_hold_over_many_draws() -> None:
    n = 10_000
    got = [decide(BOTH, i / n, ((i * 7919) % n) / n) for i in range(n)]
    assert sum(d.delay > 0 for d in got) == 1000 and sum(d.abort == 503 for d in got) == 5000


@pytest.mark.parametrize("text,expected", [
    ('{"delay": {"fixedDelay": "2s", "percentage": 10}, "abort": {"httpStatus": 503, "percentage": 50}}', BOTH),
    ('{"delay": {"fixedDelay": "500ms"}}', Fault(delay=0.5, delay_percent=100.0)),
    ('{"abort": {"httpStatus": 429, "percentage": {"value": 0.5}}}', Fault(abort_status=429, abort_percent=0.5)),
])
def test_parse(text: str, expected: Fault) -> None:
    assert parse(text, "f") == expected
    assert parse(render(expected), "f") == expected


@pytest.mark.parametrize("value,message", [
    (5, "f: must be a string holding a JSON object"),
    ("abort: 503", "f: must be a JSON object like"),
    ("[]", "f: must be a mapping"),
    ("{}", "f: must set delay, abort or both"),
    ('{"retry": {}}', "f.retry: unknown field"),
    ('{"delay": {"percentage": 5}}', "f.delay.fixedDelay: is required"),
    ('{"delay": {"fixedDelay": "0s"}}', "f.delay.fixedDelay: must be longer than 0s"),
    ('{"delay": {"fixedDelay": "1.5s"}}', "f.delay.fixedDelay: must be a duration"),
    ('{"delay": {"fixedDelay": "1s", "percentage": 101}}', "f.delay.percentage: must be a number 0..100"),
    ('{"delay": {"fixedDelay": "1s", "percentage": {"val": 1}}}', "f.delay.percentage.val: unknown field"),
    ('{"delay": {"fixedDelay": "1s", "percentage": {}}}', "f.delay.percentage.value: must be a number"),
    ('{"abort": {"percentage": 5}}', "f.abort.httpStatus: must be an integer 200..599"),
    ('{"abort": {"httpStatus": 600}}', "f.abort.httpStatus: must be an integer 200..599"),
    ('{"abort": {"httpStatus": 503, "grpcStatus": 14}}', "f.abort.grpcStatus: unknown field"),
    ('{"abort": {"httpStatus": 503, "percentage": true}}', "f.abort.percentage: must be a number"),
])
def test_bad_faults(value: Any, message: str) -> None:
    with pytest.raises(FieldError) as e:
        parse(value, "f")
    assert str(e.value).startswith(message), str(e.value)


def test_annotation_name() -> None:
    assert ANNOTATION == "fault.micromesh.io/http"
