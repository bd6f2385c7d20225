"""Trace context propagation, I/O-free: W3C ``traceparent`` and B3 (single ``b3`` header or
``x-b3-*`` headers) in, a sampling decision, rewritten headers out.

Rules (https://www.w3.org/TR/trace-context/ and https://github.com/openzipkin/b3-propagation):

- A valid ``traceparent`` wins; else the single ``b3`` header; else the ``x-b3-*`` headers.
  An invalid or repeated header counts as absent, so the proxy starts a new trace (the W3C
  rule). Which B3 forms the caller used is remembered either way, so they are written back.
- ``traceparent``: version ``ff`` is invalid; version ``00`` is exactly
  ``00-<32 hex>-<16 hex>-<2 hex>``; a higher version may append ``-``-separated fields. Hex is
  lower-case and all-zero ids are invalid. Only the sampled bit of the flags is read.
- B3 ids may be upper-case; a 64-bit trace id is left-padded to 128 bits and written back as
  64 bits. A lone sampling state (``0``, ``1``, ``d``) carries no ids.
- ``decide``: a caller that said "not sampled" is forwarded untouched. A caller that said
  "sampled" gets a child span. Otherwise (no context, or B3 that deferred the decision) the
  proxy rolls ``rate`` and propagates the outcome either way, so the next hop does not roll again.
- ``inject``: ``traceparent`` always, B3 in the forms the caller used, each naming this proxy's
  span as the next hop's parent. ``tracestate`` is never touched.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable
from typing import NamedTuple

TRACEPARENT = b"traceparent"
B3 = b"b3"
B3_TRACE, B3_SPAN, B3_PARENT = b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid"
B3_SAMPLED, B3_FLAGS = b"x-b3-sampled", b"x-b3-flags"
B3_MULTI = frozenset((B3_TRACE, B3_SPAN, B3_PARENT, B3_SAMPLED, B3_FLAGS))
TRACE_HEADERS = B3_MULTI | {TRACEPARENT, B3}

_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.S)


# --- identifiers

def _is_hex(s: bytes, n: int) -> bool:
    """``n`` lower-case hex digits, not all zero."""
    return len(s) == n and _HEX.issuperset(s) and s.count(b"0") != n


def new_trace_id(rand: random.Random) -> bytes:
    while True:
        v = rand.getrandbits(128)
        if v:
            return b"%032x" % v


def new_span_id(rand: random.Random) -> bytes:
    while True:
        v = rand.getrandbits(64)
        if v:
            return b"%016x" % v


# --- extracting the caller's context

class Context(NamedTuple):
    """The trace context a request carried (ids are lower-case hex bytes). A NamedTuple, not a
    frozen dataclass: as immutable, and a quarter of the cost to build on the data path."""
    trace_id: bytes | None = None    # 32 digits (a 64-bit B3 id is left-padded with zeros)
    span_id: bytes | None = None     # 16 digits: the caller's span, our parent
    sampled: bool | None = None      # None: the caller left the decision to us
    debug: bool = False              # B3 debug ("d" / x-b3-flags: 1): sampled, and said so again
    b3_single: bool = False          # which B3 forms to write back
    b3_multi: bool = False
    b3_short: bool = False           # the B3 trace id was 64 bits: write it back that way


NO_CONTEXT = Context()


def parse_traceparent(value: bytes) -> Context | None:
    """A W3C ``traceparent``, or None if invalid (see the rules above)."""
    m = _TRACEPARENT.match(value.strip(b" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, more = m.groups()
    if version == b"ff" or (more is not None and version == b"00"):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Context(trace_id, span_id, bool(int(flags, 16) & 1))


def _b3_trace(value: bytes) -> tuple[bytes, bool] | None:
    """(32-digit trace id, was it 64 bits) of a B3 trace id, or None."""
    if _is_hex(value, 32):
        return value, False
    if _is_hex(value, 16):
        return b"0" * 16 + value, True
    return None


_B3_SAMPLING = {b"0": (False, False), b"1": (True, False), b"d": (True, True)}


def parse_b3_single(value: bytes) -> Context | None:
    """The single ``b3`` header: ``{trace}-{span}[-{sampling}[-{parent}]]`` or a lone
    sampling state ``0``, ``1`` or ``d``. None if invalid."""
    v = value.strip(b" \t").lower()
    if v in _B3_SAMPLING:
        sampled, debug = _B3_SAMPLING[v]
        return Context(sampled=sampled, debug=debug, b3_single=True)
    parts = v.split(b"-")
    if not 2 <= len(parts) <= 4:
        return None
    trace = _b3_trace(parts[0])
    if trace is None or not _is_hex(parts[1], 16):
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        if parts[2] not in _B3_SAMPLING:
            return None
        sampled, debug = _B3_SAMPLING[parts[2]]
    if len(parts) == 4 and not _is_hex(parts[3], 16):
        return None
    return Context(trace[0], parts[1], sampled, debug, b3_single=True, b3_short=trace[1])


def parse_b3_multi(found: dict[bytes, bytes]) -> Context | None:
    """The ``x-b3-*`` headers (names lower-case). None if invalid or absent."""
    flags = found.get(B3_FLAGS, b"").strip()
    debug = flags == b"1"
    sampled: bool | None = None
    raw = found.get(B3_SAMPLED)
    if raw is not None:
        s = raw.strip().lower()
        if s in (b"1", b"true"):
            sampled = True
        elif s in (b"0", b"false"):
            sampled = False
        else:
            return None
    if debug:
        sampled = True
    t, s_id = found.get(B3_TRACE), found.get(B3_SPAN)
    if t is None and s_id is None:
        if sampled is None:
            return None
        return Context(sampled=sampled, debug=debug, b3_multi=True)
    if t is None or s_id is None:
        return None
    trace = _b3_trace(t.strip().lower())
    span_id = s_id.strip().lower()
    if trace is None or not _is_hex(span_id, 16):
        return None
    return Context(trace[0], span_id, sampled, debug, b3_multi=True, b3_short=trace[1])


def extract(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The caller's context from a request's headers (names lower-case). A valid
    traceparent wins over B3 (single over multi); the B3 forms seen are remembered either
    way so they are written back. Invalid or repeated headers count as absent."""
    found: dict[bytes, bytes] | None = None
    repeated: set[bytes] = set()
    for name, value in headers:
        if name in TRACE_HEADERS:
            if found is None:
                found = {}
            elif name in found:
                repeated.add(name)
            found[name] = value
    if found is None:
        return NO_CONTEXT
    if not repeated and len(found) == 1 and TRACEPARENT in found:   # the usual case
        return parse_traceparent(found[TRACEPARENT]) or NO_CONTEXT
    for name in repeated:
        del found[name]
    has_single = B3 in found or B3 in repeated
    has_multi = any(n in B3_MULTI for n in found) or bool(repeated & B3_MULTI)
    ctx: Context | None = None
    if TRACEPARENT in found:
        ctx = parse_traceparent(found[TRACEPARENT])
    if ctx is None and B3 in found:
        ctx = parse_b3_single(found[B3])
    if ctx is None and has_multi and not repeated & B3_MULTI:
        ctx = parse_b3_multi(found)
    if ctx is None:
        ctx = NO_CONTEXT
    short = _b3_short(found)
    if (has_single, has_multi, short) != (ctx.b3_single, ctx.b3_multi, ctx.b3_short):
        ctx = ctx._replace(b3_single=has_single, b3_multi=has_multi, b3_short=short)
    return ctx


def _b3_short(found: dict[bytes, bytes]) -> bool:
    """Whether the caller's B3 trace id has 64 bits (even when traceparent was used)."""
    if B3 in found:
        return len(found[B3].strip(b" \t").split(b"-", 1)[0]) == 16
    return len(found.get(B3_TRACE, b"").strip(b" \t")) == 16


# --- deciding and injecting

class Decision(NamedTuple):
    """This proxy's span for a request: recorded when ``sampled``."""
    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    sampled: bool


def decide(ctx: Context, rate: float, rand: random.Random) -> Decision | None:
    """None: the caller said "not sampled", so forward its headers untouched."""
    if ctx.sampled is False:
        return None
    sampled = True if ctx.sampled else rand.random() < rate
    trace_id = ctx.trace_id or new_trace_id(rand)
    return Decision(trace_id, new_span_id(rand), ctx.span_id, sampled)


def inject(d: Decision, ctx: Context) -> list[tuple[bytes, bytes]]:
    """The trace headers to forward (the incoming ones are dropped): traceparent, plus B3 in
    the forms the caller used, each naming this proxy's span as the next hop's parent."""
    flag = b"01" if d.sampled else b"00"
    out = [(TRACEPARENT, b"00-%s-%s-%s" % (d.trace_id, d.span_id, flag))]
    if ctx.b3_single or ctx.b3_multi:
        trace = d.trace_id[16:] if ctx.b3_short and d.trace_id[:16] == _ZERO_SPAN else d.trace_id
        state = b"d" if ctx.debug else (b"1" if d.sampled else b"0")
        if ctx.b3_single:
            single = b"%s-%s-%s" % (trace, d.span_id, state)
            if d.parent_id is not None:
                single += b"-" + d.parent_id
            out.append((B3, single))
        if ctx.b3_multi:
            out += [(B3_TRACE, trace), (B3_SPAN, d.span_id)]
            if d.parent_id is not None:
                out.append((B3_PARENT, d.parent_id))
            out.append((B3_FLAGS, b"1") if ctx.debug else (B3_SAMPLED, state[:1]))
    return out

