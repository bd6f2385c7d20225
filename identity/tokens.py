"""Local workload tokens: what proves a proxy's service account in a local mesh.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256(secret, payload))`` with
payload ``{"ns", "sa", "aud", "exp"}``. ``mesh run`` mints them from the secret in the mesh
home; identity checks them. (In Kubernetes the same role is played by a projected
ServiceAccount token checked with a TokenReview.) Pure: time is passed in.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

AUDIENCE = "identity.micromesh.io"
DEFAULT_TTL = 24 * 3600
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class TokenError(ValueError):
    """The token is malformed, forged, expired or for another audience (maps to 401)."""


@dataclass(frozen=True, slots=True)
class Claims:
    namespace: str
    service_account: str
    audience: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise TokenError("token is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def valid_name(name: str) -> bool:
    """A DNS-1123 label, as Kubernetes namespaces and service accounts are."""
    return bool(_NAME.match(name))


def mint(secret: bytes, namespace: str, service_account: str, now: float,
         ttl: float = DEFAULT_TTL, audience: str = AUDIENCE) -> str:
    if not (valid_name(namespace) and valid_name(service_account)):
        raise ValueError("namespace and service account must be DNS-1123 labels")
    payload = json.dumps({"ns": namespace, "sa": service_account, "aud": audience,
                          "exp": int(now + ttl)}, separators=(",", ":"), sort_keys=True).encode()
    sig = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(sig)}"


def verify(secret: bytes, token: str, now: float, audience: str = AUDIENCE) -> Claims:
    if not isinstance(token, str) or token.count(".") != 1 or len(token) > 4096:
        raise TokenError("malformed token")
    p64, s64 = token.split(".")
    payload, sig = _unb64(p64), _unb64(s64)
    if not hmac.compare_digest(hmac.new(secret, payload, hashlib.sha256).digest(), sig):
        raise TokenError("bad token signature")
    try:
        data = json.loads(payload)
        claims = Claims(str(data["ns"]), str(data["sa"]), str(data["aud"]), float(data["exp"]))
    except (ValueError, KeyError, TypeError):
        raise TokenError("malformed token payload") from None
    if claims.audience != audience:
        raise TokenError(f"token audience {claims.audience!r} is not {audience!r}")
    if claims.expires <= now:
        raise TokenError("token expired")
    if not (valid_name(claims.namespace) and valid_name(claims.service_account)):
        raise TokenError("token names are not DNS-1123 labels")
    return claims
