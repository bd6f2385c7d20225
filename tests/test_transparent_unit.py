"""microproxy.transparent: protocol detection on the first bytes of a redirected connection."""
from __future__ import annotations

import pytest

from microproxy.transparent import classify


@pytest.mark.parametrize("first, want", [
    (b"GET / HT", "http"), (b"POST /x ", "http"), (b"CONNECT ", "http"), (b"PRI * HT", "http"),
    (b"\x16\x03\x01\x02\x00", "opaque"),      # a TLS ClientHello
    (b"\x00\x01hello", "opaque"), (b"get / ", "opaque"), (b"GETX", "opaque"), (b"SSH-2.0-", "opaque"),
    (b"G", None), (b"GE", None), (b"OPTIONS", None), (b"", None),   # too short to tell yet
])
def test_classify(first: bytes, want: str | None) -> None:
    assert classify(first) == want
