"""The identity service: the mesh CA over HTTPS (after linkerd2's ``pkg/identity/service.go``).

``Certifier`` is the logic, without I/O: verify the bearer token, rate limit the identity
it proves, check the CSR asks for exactly that identity, sign a leaf. It takes ``now``.
``handler()`` maps it onto ``POST /v1/certify``; ``run_until_signalled()`` is the process
lifecycle (listen, write the ports file, stop on SIGTERM/SIGINT), shared with destination.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from microproxy import ctlhttp
from microproxy.ctlhttp import Request, Response

from . import ca, store, tokens
from .tokenreview import ReviewUnavailable, Validator

log = logging.getLogger(__name__)

SECONDS = 1.0
PER_IDENTITY_RATE = 10.0      # certificates per second, per identity
PER_IDENTITY_BURST = 20.0
GLOBAL_RATE = 200.0           # certificates per second, all identities together
GLOBAL_BURST = 200.0
MAX_BUCKETS = 10_000          # idle (full) per-identity buckets are forgotten past this


class RateLimited(Exception):
    """Too many certificate requests (maps to 429)."""


# === Rate limiting ===

class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, now

    def refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class RateLimiter:
    """A token bucket per key plus one global bucket; a request needs a token from both."""

    def __init__(self, rate: float = PER_IDENTITY_RATE, burst: float = PER_IDENTITY_BURST,
                 global_rate: float = GLOBAL_RATE, global_burst: float = GLOBAL_BURST,
                 max_keys: int = MAX_BUCKETS) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._global_rate, self._global_burst = global_rate, global_burst
        self._global: TokenBucket | None = None
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, key: str, now: float) -> bool:
        if self._global is None:
            self._global = TokenBucket(self._global_rate, self._global_burst, now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        bucket.refill(now)
        self._global.refill(now)
        if bucket.tokens < 1 or self._global.tokens < 1:
            return False
        bucket.tokens -= 1
        self._global.tokens -= 1
        return True


# === The logic ===

class Certifier:
    """Turns (token, CSR) into a signed leaf. Raises tokens.TokenError (401),
    ca.CSRError (400, or 403 when ``forbidden``) or RateLimited (429)."""

    def __init__(self, secret: bytes, issuer: x509.Certificate,
                 issuer_key: ec.EllipticCurvePrivateKey,
                 trust_domain: str = ca.DEFAULT_TRUST_DOMAIN,
                 lifetime: dt.timedelta = ca.LEAF_LIFETIME,
                 limiter: RateLimiter | None = None,
                 skew: dt.timedelta = ca.CLOCK_SKEW) -> None:
        self.secret = secret
        self.issuer, self.issuer_key = issuer, issuer_key
        self.trust_domain = trust_domain
        self.lifetime = lifetime
        self.skew = skew
        self.limiter = limiter if limiter is not None else RateLimiter()
        # Set by identity.rotation.Reloader: the bundle sent with each leaf, and a check
        # that re-reads the CA files when they changed (an issuer or anchor rotation).
        self.trust_bundle: bytes | None = None
        self.refresh: Callable[[], object] | None = None

    def certify(self, token: str, csr_pem: bytes, now: dt.datetime) -> ca.Issued:
        if self.refresh is not None:
            self.refresh()
        claims = tokens.verify(self.secret, token, now.timestamp())
        return self._certify(claims, csr_pem, now)

    def certify_claims(self, claims: tokens.Claims, csr_pem: bytes, now: dt.datetime) -> ca.Issued:
        """``certify`` for a token a ``tokenreview.Validator`` has already validated."""
        if self.refresh is not None:
            self.refresh()
        return self._certify(claims, csr_pem, now)

    def _certify(self, claims: tokens.Claims, csr_pem: bytes, now: dt.datetime) -> ca.Issued:
        identity = ca.identity_name(claims.service_account, claims.namespace, self.trust_domain)
        if not self.limiter.allow(identity, now.timestamp()):
            raise RateLimited(f"too many certificate requests for {identity}")
        try:
            csr = ca.check_csr(csr_pem, identity)
        except (ValueError, UnsupportedAlgorithm) as e:
            if isinstance(e, ca.CSRError):
                raise
            raise ca.CSRError(f"unusable CSR: {e}") from None  # odd keys/algorithms
        return ca.issue_leaf(csr, identity, self.issuer, self.issuer_key, now, self.lifetime, self.skew)


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# === HTTP ===

def _bearer(req: Request) -> str | None:
    auth = req.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def handler(certifier: Certifier, clock: Callable[[], dt.datetime],
            validator: Validator | None = None) -> ctlhttp.Handler:
    """``validator`` (a ``tokenreview.Validator``, e.g. TokenReview in Kubernetes mode)
    proves the token; None: the certifier verifies local HMAC tokens itself."""
    async def handle(req: Request) -> Response:
        if req.path == "/ready":
            if req.method != "GET":
                return Response.error(405, "use GET")
            return Response.json({"ok": True})
        if req.path != "/v1/certify":
            return Response.error(404, f"no such path {req.path!r}")
        if req.method != "POST":
            return Response.error(405, "use POST")
        try:
            body = req.json()
        except ValueError:
            return Response.error(400, "body is not JSON")
        if not isinstance(body, dict):
            return Response.error(400, "body must be a JSON object")
        csr = body.get("csr")
        if not isinstance(csr, str) or not csr:
            return Response.error(400, "field 'csr' must be a PEM string")
        token = body.get("token")
        if token is None:
            token = _bearer(req)
        elif not isinstance(token, str):
            return Response.error(400, "field 'token' must be a string")
        if not token:
            return Response.error(401, "missing token")
        try:
            if validator is None:
                issued = certifier.certify(token, csr.encode("utf-8", "replace"), clock())
            else:
                now = clock()
                claims = await validator.validate(token, now.timestamp())
                issued = certifier.certify_claims(claims, csr.encode("utf-8", "replace"), now)
        except ReviewUnavailable as e:
            log.warning("certify unavailable (503): %s", e)
            return Response.error(503, f"cannot validate the token now: {e}")
        except tokens.TokenError as e:
            log.info("certify refused (401) from %s: %s", req.peer, e)
            return Response.error(401, str(e))
        except RateLimited as e:
            log.info("certify refused (429): %s", e)
            return Response.error(429, str(e))
        except ca.CSRError as e:
            status = 403 if e.forbidden else 400
            log.info("certify refused (%d) from %s: %s", status, req.peer, e)
            return Response.error(status, str(e))
        identity = issued_identity(issued)
        log.info("issued certificate identity=%s serial=%x expires=%s",
                 identity, issued.leaf.serial_number, rfc3339(issued.valid_until))
        return Response.json({
            "certificate": issued.chain_pem.decode("ascii"),
            "valid_until": rfc3339(issued.valid_until),
            "valid_until_unix": issued.valid_until.timestamp(),
            "identity": identity,
            **({"trust_bundle": certifier.trust_bundle.decode("ascii")} if certifier.trust_bundle else {}),
        })

    return handle


def issued_identity(issued: ca.Issued) -> str:
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.DNSName)[0])


# === Process lifecycle (shared with destination) ===

# The control plane's own serving certificate: as long as the issuer allows (the
# processes hold the issuer key, so they would re-issue on restart anyway).
SERVING_CERT_LIFETIME = ca.ISSUER_LIFETIME


def wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def control_plane_args(prog: str, description: str) -> argparse.ArgumentParser:
    """Flags every control-plane process takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--home", type=Path, default=None,
                   help="mesh home holding the CA (default $MESH_HOME or ~/.micromesh)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0 = pick a free one)")
    p.add_argument("--ports-file", type=Path, default=None,
                   help='once listening, write {"pid": ..., "port": ...} here as JSON')
    p.add_argument("--trust-domain", default=ca.DEFAULT_TRUST_DOMAIN,
                   help="trust domain (default cluster.local)")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="log level (default warning)")
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class SetupError(Exception):
    """The mesh home cannot serve this process (the caller exits 2 with the message)."""


def load_issuer(home: store.MeshHome) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The issuer cert and key. Raises SetupError when the CA is missing or unreadable."""
    if not home.has_ca():
        raise SetupError(f"no mesh CA in {home.root} (create one with `mesh up`)")
    try:
        return home.issuer()
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot load the issuer from {home.root}: {e}") from None


async def run_until_signalled(handle: ctlhttp.Handler, host: str, port: int,
                              ssl_ctx: ssl.SSLContext, ports_file: Path | None,
                              background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
                              on_stop: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Once listening, start ``background`` tasks and write
    ``ports_file`` ({"pid", "port"}); on a signal close the listener, call ``on_stop``,
    cancel the tasks and remove the ports file."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await ctlhttp.serve(handle, host, port, ssl=ssl_ctx)
    bound = server.sockets[0].getsockname()[1]
    tasks: set[asyncio.Task[Any]] = {asyncio.create_task(fn()) for fn in background}
    if ports_file is not None:
        store.write_json(ports_file, {"pid": os.getpid(), "port": bound})
    log.info("listening on %s:%d", host, bound)
    try:
        waiter = asyncio.create_task(stop.wait())
        tasks.add(waiter)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {waiter}:
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc  # a background task died: fail loudly rather than serve half a service
    finally:
        server.close()
        if on_stop is not None:
            on_stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(server.wait_closed(), 2 * SECONDS)
        except asyncio.TimeoutError:
            pass  # idle keep-alive connections; the loop's shutdown closes them
        if ports_file is not None:
            try:
                if store.read_json(ports_file).get("pid") == os.getpid():
                    ports_file.unlink()
            except (OSError, ValueError):
                pass  # already gone or rewritten by a successor
        log.info("stopped")
