"""The proxy's certificate: make a key (it never leaves the process), send a CSR with the
workload token to identity, and renew at 70 % of the lifetime (clamped to 10 s - 24 h, as
Linkerd's proxy does). On failure retry with backoff; the current certificate keeps serving.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from . import csr, ctlhttp, tls
from .config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Credentials:
    chain_pem: bytes
    key_pem: bytes
    issued_at: float        # unix time
    valid_until: float      # unix time
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext


def refresh_in(issued_at: float, valid_until: float, now: float) -> float:
    """Seconds until renewal: at 70 % of the lifetime, clamped to 1 s - 24 h from now.

    (Linkerd clamps at 10 s; we allow 1 s so short-lived test certificates rotate.)"""
    due = issued_at + 0.7 * (valid_until - issued_at)
    return max(min(due - now, 24 * 3600.0), 1.0)


class IdentityClient:
    def __init__(self, cfg: Config, now: Callable[[], float]) -> None:
        self.cfg = cfg
        self.now = now
        self.key_pem, self.csr_pem = csr.key_and_csr(cfg.identity)
        self.refreshes = 0

    async def certify(self) -> Credentials:
        cfg = self.cfg
        client = ctlhttp.Client(cfg.identity_addr[0], cfg.identity_addr[1],
                                ssl=tls.client_context(cfg.trust_pem), server_hostname=cfg.identity_name,
                                timeout=10.0)
        try:
            ans = await client.json("POST", "/v1/certify",
                                    {"token": cfg.token, "csr": self.csr_pem.decode()})
        finally:
            await client.close()
        chain = ans["certificate"].encode()
        valid_until = csr.not_after(chain)
        issued_at = self.now()
        # Loading the chain with our key fails unless the leaf is for our key.
        server_ctx = tls.server_context(chain, self.key_pem, cfg.trust_pem)
        client_ctx = tls.client_context(cfg.trust_pem, chain, self.key_pem)
        self.refreshes += 1
        log.info("certified", extra={"identity": cfg.identity,
                                     "valid_until": dt.datetime.fromtimestamp(valid_until, dt.timezone.utc).isoformat()})
        return Credentials(chain, self.key_pem, issued_at, valid_until, server_ctx, client_ctx)

    async def certify_with_retry(self, stop_at: float | None = None) -> Credentials:
        delay = 0.1
        while True:
            try:
                return await self.certify()
            except asyncio.CancelledError:
                raise
            except ctlhttp.HTTPError as e:
                log.error("identity refused the CSR", extra={"status": e.status, "body": e.body[:200]})
                if e.status in (400, 401, 403):
                    delay = max(delay, 2.0)
            except (OSError, asyncio.TimeoutError, ValueError, KeyError, ssl.SSLError) as e:
                log.warning("certify failed; retrying", extra={"error": repr(e)})
            if stop_at is not None and self.now() + delay > stop_at:
                raise TimeoutError("could not renew the certificate before it expires")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
