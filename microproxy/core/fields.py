"""Validation helpers for the core's config parsers, and Gateway API durations.

Every helper either returns the checked value or raises ``FieldError`` whose message starts
with the field path, e.g. ``spec.rules[0].backendRefs[1].weight: must be an integer
0..1000000``: a refused resource tells its author which field to fix.
"""
from __future__ import annotations

import re
from typing import Any


TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")      # an HTTP header name
HEADER_VALUE = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]+$")  # no control characters but tab


class FieldError(ValueError):
    """A refused configuration value; the message is ``"<field path>: <problem>"``."""


def fail(path: str, problem: str) -> FieldError:
    return FieldError(f"{path}: {problem}")


def mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(path, "must be a mapping")
    return value


def only(obj: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    """Unknown fields are errors: a typo must not silently change what a route does."""
    for key in obj:
        if key not in allowed:
            raise fail(f"{path}.{key}" if path else key,
                       f"unknown field (expected one of {', '.join(allowed)})")


def items(value: Any, path: str, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        raise fail(path, "must be a list")
    if len(value) > max_items:
        raise fail(path, f"must have at most {max_items} entries")
    return value


def listed(obj: dict[str, Any], key: str, path: str, max_items: int) -> list[Any]:
    """``obj[key]`` as a list; absent or null is the empty list."""
    value = obj.get(key)
    return [] if value is None else items(value, f"{path}.{key}", max_items)


def string(value: Any, path: str, pattern: re.Pattern[str] | None = None, max_len: int = 253,
           what: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value or len(value) > max_len or (
            pattern is not None and not pattern.match(value)):
        raise fail(path, f"must be {what} (at most {max_len} characters)")
    return value


def integer(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise fail(path, f"must be an integer {lo}..{hi}")
    return value


def number(value: Any, path: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise fail(path, f"must be a number {lo:g}..{hi:g}")
    return float(value)


# Gateway API Duration (GEP-2257): 1 to 4 parts of up to 5 digits, units h, m, s, ms.
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_PART = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}


def duration(value: Any, path: str) -> float:
    """A Gateway API duration ("10s", "500ms", "1m", "1h30m") in seconds."""
    if not isinstance(value, str) or not _DURATION.match(value):
        raise fail(path, 'must be a duration like "10s", "500ms", "1m" or "1h30m"')
    return sum(int(n) * _MS[unit] for n, unit in _PART.findall(value)) / 1000


def render_duration(seconds: float) -> str:
    """The canonical Gateway API spelling of a duration: ``render_duration(90.5) == "1m30s500ms"``."""
    ms = round(seconds * 1000)
    parts = []
    for unit in ("h", "m", "s", "ms"):
        n, ms = divmod(ms, _MS[unit])
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"
