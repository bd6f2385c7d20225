"""Who does a bearer token prove? Local HMAC tokens or Kubernetes TokenReview, behind one
``Validator`` protocol (linkerd2's ``pkg/identity`` Validator: "Service implements the
gRPC service in terms of a Validator and Issuer").

- ``LocalValidator``: the mesh home's HMAC tokens (``tokens.verify``) — local mode.
- ``TokenReviewValidator``: Kubernetes mode. POSTs ``authentication.k8s.io/v1``
  TokenReview ``{"spec": {"token": T, "audiences": ["identity.micromesh.io"]}}`` with
  identity's own ServiceAccount token (RBAC: ``create`` on ``tokenreviews``), and accepts
  only ``status.authenticated: true`` for a ``system:serviceaccount:NS:SA`` user whose
  ``status.audiences`` include ours — an empty list means the token was judged for the
  API server's own audience, which a stolen kubectl token would pass, so it is refused.
  The proxy's token is the projected ServiceAccount token with that audience the
  injector mounts.

Both return ``tokens.Claims`` and raise ``tokens.TokenError`` (401) for a token that
proves nothing; TokenReview raises ``ReviewUnavailable`` (503) when the API server cannot
answer — a control-plane outage, not the proxy's fault.

How it plugs into identity/server.py (not wired yet: ``Certifier.certify`` is synchronous
and verifies the HMAC token itself)::

    # Certifier: take claims instead of verifying a token
    def certify_claims(self, claims, csr_pem, now): ...  # certify() minus tokens.verify
    # handler(): validate first (async), then sign
    try:
        claims = await validator.validate(token, clock().timestamp())
    except tokens.TokenError as e:     -> 401
    except ReviewUnavailable as e:     -> 503
    issued = certifier.certify_claims(claims, csr, clock())

and ``python -m identity --kubernetes`` would build
``TokenReviewValidator(APIClient(ClusterConfig.in_cluster(os.environ)))``
(destination/k8s_watch.py) instead of ``LocalValidator(home.secret())``.
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import ssl
from collections.abc import Sequence
from typing import Any, Protocol

import h11

from . import tokens

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
SA_PREFIX = "system:serviceaccount:"
MAX_TOKEN = 16 * 1024


class ReviewUnavailable(Exception):
    """The API server did not answer the TokenReview (maps to 503)."""


class Validator(Protocol):
    async def validate(self, token: str, now: float) -> tokens.Claims: ...


class Poster(Protocol):
    """What TokenReviewValidator needs of an API client (k8s_watch.APIClient has it)."""

    async def post(self, path: str, body: Any) -> tuple[int, Any]: ...


class LocalValidator:
    def __init__(self, secret: bytes, audience: str = tokens.AUDIENCE) -> None:
        self.secret, self.audience = secret, audience

    async def validate(self, token: str, now: float) -> tokens.Claims:
        return tokens.verify(self.secret, token, now, self.audience)


def review_request(token: str, audiences: Sequence[str]) -> dict[str, Any]:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)}}


def _jwt_expiry(token: str) -> float:
    """The ``exp`` of a JWT's payload, read *after* the API server vouched for the token;
    infinity when there is none to read."""
    parts = token.split(".")
    if len(parts) != 3:
        return math.inf
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else math.inf
    except (ValueError, TypeError):
        return math.inf


def claims_from_review(review: Any, audiences: Sequence[str], token: str = "") -> tokens.Claims:
    """A TokenReview answer -> Claims. Raises tokens.TokenError unless it authenticates a
    service account for one of ``audiences``."""
    status = review.get("status") if isinstance(review, dict) else None
    if not isinstance(status, dict):
        raise tokens.TokenError("TokenReview answer has no status")
    if status.get("authenticated") is not True:
        reason = status.get("error") or "not authenticated"
        raise tokens.TokenError(f"token rejected by TokenReview: {reason}")
    got = [a for a in status.get("audiences") or [] if isinstance(a, str)]
    matched = next((a for a in audiences if a in got), None)
    if matched is None:
        raise tokens.TokenError(f"token audiences {got} do not include {list(audiences)}")
    user = status.get("user")
    username = user.get("username") if isinstance(user, dict) else None
    if not isinstance(username, str) or not username.startswith(SA_PREFIX):
        raise tokens.TokenError(f"user {username!r} is not a service account")
    parts = username[len(SA_PREFIX):].split(":")
    if len(parts) != 2 or not all(tokens.valid_name(p) for p in parts):
        raise tokens.TokenError(f"bad service account user {username!r}")
    namespace, sa = parts
    return tokens.Claims(namespace, sa, matched, _jwt_expiry(token))


class TokenReviewValidator:
    def __init__(self, api: Poster, audiences: Sequence[str] = (tokens.AUDIENCE,),
                 timeout: float = 5.0) -> None:
        self.api, self.audiences, self.timeout = api, tuple(audiences), timeout

    async def validate(self, token: str, now: float) -> tokens.Claims:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise tokens.TokenError("malformed token")
        try:
            status, body = await asyncio.wait_for(
                self.api.post(TOKENREVIEW_PATH, review_request(token, self.audiences)), self.timeout)
        except (OSError, TimeoutError, h11.ProtocolError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            raise ReviewUnavailable(f"TokenReview failed: {e!r}") from None
        if status not in (200, 201):
            message = body.get("message") if isinstance(body, dict) else None
            raise ReviewUnavailable(f"TokenReview answered {status}: {message or 'no message'}")
        claims = claims_from_review(body, self.audiences, token)
        if claims.expires <= now:
            raise tokens.TokenError("token expired")
        return claims
