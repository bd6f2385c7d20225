"""identity/tokenreview.py: TokenReview answers -> claims (pure, table), and the validator
over real HTTPS against the fake API server (tests/k8s_fake_api.py). No real API server
ran here (ENVIRONMENT.md); the answers are shaped as authentication.k8s.io/v1 returns them.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from destination.k8s_watch import APIClient, ClusterConfig
from identity import tokens
from identity.tokenreview import (TOKENREVIEW_PATH, LocalValidator, ReviewUnavailable,
                                  TokenReviewValidator, Validator, claims_from_review)
from tests.k8s_fake_api import FakeAPI, load

AUD = tokens.AUDIENCE
NOW = 1_800_000_000.0


def review(**status: Any) -> dict[str, Any]:
    ok: dict[str, Any] = copy.deepcopy(load("tokenreview-authenticated.json"))
    ok["status"].update(status)
    return ok


def jwt(exp: float | None) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    payload: dict[str, Any] = {"aud": [AUD], "iss": "https://kubernetes.default.svc.cluster.local",
                               "sub": "system:serviceaccount:shop:web"}
    if exp is not None:
        payload["exp"] = exp
    return f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part(payload)}.c2lnbmF0dXJl"


def test_an_authenticated_service_account_for_our_audience() -> None:
    claims = claims_from_review(load("tokenreview-authenticated.json"), [AUD], jwt(NOW + 3600))
    assert claims == tokens.Claims("shop", "web", AUD, NOW + 3600)
    # no readable exp: the API server's word stands
    assert claims_from_review(load("tokenreview-authenticated.json"), [AUD], "opaque").expires == math.inf
    assert claims_from_review(load("tokenreview-authenticated.json"), ["other", AUD]).audience == AUD


@pytest.mark.parametrize("answer, message", [
    (load("tokenreview-unauthenticated.json"), "rejected by TokenReview: [invalid bearer token"),
    (review(authenticated=False, error="token has been invalidated"), "token has been invalidated"),
    (review(authenticated="true"), "not authenticated"),
    # audience-unaware authenticators answer with no audiences: the API server's own audience
    (review(audiences=[]), "do not include ['identity.micromesh.io']"),
    (review(audiences=None), "do not include"),
    (review(audiences=["https://kubernetes.default.svc.cluster.local"]), "do not include"),
    (review(user={"username": "kubernetes-admin", "groups": ["system:masters"]}), "is not a service account"),
    (review(user={"username": "system:node:node-a"}), "is not a service account"),
    (review(user={}), "is not a service account"),
    (review(user="system:serviceaccount:shop:web"), "is not a service account"),
    (review(user={"username": "system:serviceaccount:shop"}), "bad service account user"),
    (review(user={"username": "system:serviceaccount:shop:web:x"}), "bad service account user"),
    (review(user={"username": "system:serviceaccount:Shop:web"}), "bad service account user"),
    ({"kind": "TokenReview"}, "has no status"),
    ("not json object", "has no status"),
])
def test_answers_that_prove_nothing(answer: Any, message: str) -> None:
    with pytest.raises(tokens.TokenError) as e:
        claims_from_review(answer, [AUD])
    assert message in str(e.value)


def test_local_validator() -> None:
    secret = b"s" * 32
    v: Validator = LocalValidator(secret)
    claims = asyncio.run(v.validate(tokens.mint(secret, "shop", "web", NOW), NOW))
    assert (claims.namespace, claims.service_account) == ("shop", "web")
    with pytest.raises(tokens.TokenError):
        asyncio.run(v.validate(tokens.mint(b"x" * 32, "shop", "web", NOW), NOW))


GOOD = jwt(NOW + 600)


def _answer(body: Any) -> tuple[int, Any]:
    """The fake API server's TokenReview: decides by the reviewed token."""
    token = body["spec"]["token"]
    if token == GOOD:
        return 201, load("tokenreview-authenticated.json")
    if token == "apiserver-audience":
        return 201, review(audiences=["https://kubernetes.default.svc.cluster.local"])
    if token == "admin":
        return 201, review(user={"username": "kubernetes-admin", "groups": ["system:masters"]})
    if token == "forbidden":
        return 403, load("status-403-tokenreviews.json")
    return 201, load("tokenreview-unauthenticated.json")


def test_tokenreview_over_https(tmp_path: Path) -> None:
    async def scenario() -> None:
        api = FakeAPI(tmp_path)
        api.on_review = _answer
        await api.start()
        client = APIClient(ClusterConfig.in_cluster(api.env(), api.sa_dir))
        v: Validator = TokenReviewValidator(client)
        try:
            assert await v.validate(GOOD, NOW) == tokens.Claims("shop", "web", AUD, NOW + 600)
            sent = api.log[0]
            assert (sent.method, sent.path) == ("POST", TOKENREVIEW_PATH)
            assert sent.token == "token-1"  # identity's own ServiceAccount token, not the reviewed one
            assert sent.body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                 "spec": {"token": GOOD, "audiences": [AUD]}}

            for token, message in [("stolen", "rejected by TokenReview"),
                                   ("apiserver-audience", "do not include"),
                                   ("admin", "is not a service account"),
                                   ("", "malformed token"),
                                   ("x" * 20000, "malformed token")]:
                with pytest.raises(tokens.TokenError, match=message):
                    await v.validate(token, NOW)
            with pytest.raises(ReviewUnavailable, match="answered 403: tokenreviews.authentication.k8s.io is forbidden"):
                await v.validate("forbidden", NOW)

            await api.stop()
            await client.close()
            await asyncio.sleep(0)
            with pytest.raises(ReviewUnavailable, match="TokenReview failed"):
                await v.validate(GOOD, NOW)
        finally:
            await api.stop()
            await client.close()

    asyncio.run(scenario())


def test_an_expired_jwt_is_refused_even_if_reviewed(tmp_path: Path) -> None:
    class Poster:
        async def post(self, path: str, body: Any) -> tuple[int, Any]:
            return 201, load("tokenreview-authenticated.json")

    v = TokenReviewValidator(Poster())
    assert asyncio.run(v.validate(jwt(NOW + 1), NOW)).expires == NOW + 1
    with pytest.raises(tokens.TokenError, match="expired"):
        asyncio.run(v.validate(jwt(NOW - 1), NOW))
