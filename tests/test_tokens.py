"""identity.tokens: HMAC workload tokens (pure; time passed in)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from identity import tokens

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: object, secret: bytes = SECRET) -> str:
    """A correctly signed token around any payload (to reach the checks past the HMAC)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{_b64(raw)}.{_b64(hmac.new(secret, raw, hashlib.sha256).digest())}"


def good_payload(**over: object) -> dict[str, object]:
    p: dict[str, object] = {"ns": "default", "sa": "books", "aud": tokens.AUDIENCE, "exp": NOW + 60}
    p.update(over)
    return p


def test_round_trip() -> None:
    tok = tokens.mint(SECRET, "default", "books", NOW, ttl=60)
    claims = tokens.verify(SECRET, tok, NOW + 59)
    assert claims == tokens.Claims("default", "books", tokens.AUDIENCE, NOW + 60)


def _tampered() -> str:
    tok = tokens.mint(SECRET, "default", "books", NOW)
    p64, s64 = tok.split(".")
    payload = base64.urlsafe_b64decode(p64 + "=" * (-len(p64) % 4)).replace(b"books", b"admin")
    return f"{_b64(payload)}.{s64}"


REJECTED = [
    # (case, token, now, error substring)
    ("forged with another secret", tokens.mint(b"x" * 32, "default", "books", NOW), NOW, "signature"),
    ("payload tampered", _tampered(), NOW, "signature"),
    ("signature truncated", tokens.mint(SECRET, "default", "books", NOW)[:-4], NOW, "signature"),
    ("expired", tokens.mint(SECRET, "default", "books", NOW, ttl=60), NOW + 60, "expired"),
    ("long expired", tokens.mint(SECRET, "default", "books", NOW, ttl=60), NOW + 10**6, "expired"),
    ("wrong audience", tokens.mint(SECRET, "default", "books", NOW, audience="other"), NOW, "audience"),
    ("empty", "", NOW, "malformed"),
    ("no dot", "abc", NOW, "malformed"),
    ("two dots", "a.b.c", NOW, "malformed"),
    ("not base64url", "a+/.b==", NOW, "base64url"),
    ("impossible base64 length", "a.b", NOW, "base64url"),
    ("impossible base64 length in signature", signed(good_payload()).split(".")[0] + ".abcde", NOW, "base64url"),
    ("too long", "a" * 5000 + ".b", NOW, "malformed"),
    ("payload not JSON", signed(b"not json"), NOW, "payload"),
    ("payload a list", signed([1, 2]), NOW, "payload"),
    ("payload missing exp", signed({"ns": "default", "sa": "books", "aud": tokens.AUDIENCE}), NOW, "payload"),
    ("exp not a number", signed(good_payload(exp="soon")), NOW, "payload"),
    ("namespace not a label", signed(good_payload(ns="Default")), NOW, "DNS-1123"),
    ("service account with dots", signed(good_payload(sa="a.b")), NOW, "DNS-1123"),
]


@pytest.mark.parametrize("case,token,now,why", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected(case: str, token: str, now: float, why: str) -> None:
    with pytest.raises(tokens.TokenError, match=why):
        tokens.verify(SECRET, token, now)


def test_not_a_string_is_malformed() -> None:
    with pytest.raises(tokens.TokenError, match="malformed"):
        tokens.verify(SECRET, 123, NOW)  # type: ignore[arg-type]


def test_signed_good_payload_passes() -> None:
    assert tokens.verify(SECRET, signed(good_payload()), NOW).service_account == "books"


@pytest.mark.parametrize("ns,sa", [("Default", "books"), ("default", "-books"), ("a" * 64, "b"), ("", "b")])
def test_mint_rejects_bad_names(ns: str, sa: str) -> None:
    with pytest.raises(ValueError):
        tokens.mint(SECRET, ns, sa, NOW)


@pytest.mark.parametrize("name,ok", [("a", True), ("books-v2", True), ("a" * 63, True), ("a" * 64, False),
                                     ("Books", False), ("-a", False), ("a-", False), ("a.b", False),
                                     ("", False), ("a_b", False)])
def test_valid_name(name: str, ok: bool) -> None:
    assert tokens.valid_name(name) is ok
