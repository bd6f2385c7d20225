"""The proxy's certificate: make a key (it never leaves the process), send a CSR with the
workload token to identity, and renew at 70 % of the lifetime (clamped to 10 s - 24 h, as
Linkerd's proxy does). On failure retry with backoff; the current certificate keeps serving.

Trust follows identity: each answer carries the mesh's current trust bundle, and the proxy
adopts it when it verifies the new certificate (identity itself was verified against the
proxy's current trust, so the bundle arrives over an authenticated channel). That is how
an anchor rotation reaches running proxies (identity/rotation.py). ``renew_now`` is the
admin ``POST /renew``: certify at once, so a rotation does not wait for the 70 % mark.

The token is ``current_token(cfg)``: ``MESH_TOKEN_FILE`` is read again at every
certification (projected ServiceAccount tokens are rotated by the kubelet), falling back
to the token read at start.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
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
    trust_pem: bytes = b""  # the bundle the contexts trust


def pem_blocks(pem: bytes) -> list[bytes]:
    """The DER of each certificate in a PEM bundle (no cryptography import: see csr.py)."""
    out = []
    text = pem.decode("ascii", "replace")
    end_marker = "-----END CERTIFICATE-----"
    pos = 0
    while True:
        start = text.find("-----BEGIN CERTIFICATE-----", pos)
        if start < 0:
            return out
        end = text.find(end_marker, start)
        if end < 0:
            raise ValueError("truncated PEM certificate")
        out.append(ssl.PEM_cert_to_DER_cert(text[start:end + len(end_marker)] + "\n"))
        pos = end + len(end_marker)


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, lower-case hex (what `mesh identity` shows)."""
    return hashlib.sha256(der).hexdigest()


def pem_fingerprints(pem: bytes) -> list[str]:
    return [fingerprint(der) for der in pem_blocks(pem)]


def describe_creds(creds: Credentials | None) -> dict[str, object]:
    """For /config and /renew: the anchors this proxy trusts and who issued its leaf."""
    if creds is None:
        return {"trust_anchors": [], "certificate": None}
    chain = pem_blocks(creds.chain_pem)
    return {
        "trust_anchors": pem_fingerprints(creds.trust_pem),
        "certificate": {"fingerprint": fingerprint(chain[0]) if chain else None,
                        "issuer_fingerprint": fingerprint(chain[1]) if len(chain) > 1 else None,
                        "valid_until": creds.valid_until, "issued_at": creds.issued_at},
    }


def is_loopback(peer: object) -> bool:
    host = peer[0] if isinstance(peer, (tuple, list)) and peer else None
    try:
        addr = ipaddress.ip_address(str(host))
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def verify_with(trust_pem: bytes, chain_pem: bytes, key_pem: bytes, identity: str) -> None:
    """Prove that peers holding ``trust_pem`` accept this certificate, both as a server (for
    ``identity``) and as a client: a TLS 1.3 handshake in memory. Raises ssl.SSLError."""
    server = tls.server_context(chain_pem, key_pem, trust_pem, require_client_cert=True)
    client = tls.client_context(trust_pem, chain_pem, key_pem)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=identity)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    pending = {c, s}
    for _ in range(8):
        for obj in (c, s):
            if obj in pending:
                try:
                    obj.do_handshake()
                    pending.discard(obj)
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            # TLS 1.3: the server checks the client's certificate last; make it read it
            try:
                s.read(1)
            except ssl.SSLWantReadError:
                return
    raise ssl.SSLError("in-memory handshake did not complete")


def current_token(cfg: Config) -> str:
    """The token to certify with now: MESH_TOKEN_FILE read again (the kubelet rotates
    projected ServiceAccount tokens), else — no file, or it cannot be read or is empty —
    the token read at start (``cfg.token``)."""
    if cfg.token_file:
        try:
            with open(cfg.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            log.warning("cannot read the token file; using the token read at start",
                        extra={"path": cfg.token_file, "error": repr(e)})
        else:
            if token:
                return token
            log.warning("the token file is empty; using the token read at start",
                        extra={"path": cfg.token_file})
    return cfg.token


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
        self.trust_pem = cfg.trust_pem      # replaced by the bundle identity sends
        self.generation = 0                 # bumped by renew_now
        self._lock: asyncio.Lock | None = None
        self._woken: asyncio.Event | None = None

    def _sync(self) -> tuple[asyncio.Lock, asyncio.Event]:
        if self._lock is None or self._woken is None:
            self._lock, self._woken = asyncio.Lock(), asyncio.Event()
        return self._lock, self._woken

    async def certify(self) -> Credentials:
        """One certification (serialised with renew_now, so an older answer never wins)."""
        async with self._sync()[0]:
            return await self._certify()

    async def _certify(self) -> Credentials:
        cfg = self.cfg
        trust = self.trust_pem
        client = ctlhttp.Client(cfg.identity_addr[0], cfg.identity_addr[1],
                                ssl=tls.client_context(trust), server_hostname=cfg.identity_name,
                                timeout=10.0)
        try:
            ans = await client.json("POST", "/v1/certify",
                                    {"token": current_token(cfg), "csr": self.csr_pem.decode()})
        finally:
            await client.close()
        chain = ans["certificate"].encode()
        valid_until = csr.not_after(chain)
        issued_at = self.now()
        bundle = ans.get("trust_bundle")
        if isinstance(bundle, str) and bundle.encode() != trust:
            try:
                verify_with(bundle.encode(), chain, self.key_pem, cfg.identity)
            except (ssl.SSLError, ValueError, OSError) as e:
                log.error("identity sent a trust bundle that does not verify our new certificate; "
                          "keeping the current trust", extra={"error": repr(e)})
            else:
                trust = bundle.encode()
                log.info("adopted the trust bundle from identity",
                         extra={"anchors": ",".join(f[:16] for f in pem_fingerprints(trust))})
        # Loading the chain with our key fails unless the leaf is for our key.
        server_ctx = tls.server_context(chain, self.key_pem, trust)
        client_ctx = tls.client_context(trust, chain, self.key_pem)
        self.trust_pem = trust
        self.refreshes += 1
        log.info("certified", extra={"identity": cfg.identity,
                                     "valid_until": dt.datetime.fromtimestamp(valid_until, dt.timezone.utc).isoformat()})
        return Credentials(chain, self.key_pem, issued_at, valid_until, server_ctx, client_ctx, trust)

    async def renew_now(self, install: Callable[[Credentials], None]) -> Credentials:
        """Certify now and ``install`` the result; the renewal loop then reschedules from it."""
        lock, woken = self._sync()
        async with lock:
            creds = await self._certify()
            install(creds)
            self.generation += 1
            woken.set()
        return creds

    async def wait_refresh(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if renew_now replaced the credentials meanwhile."""
        _, woken = self._sync()
        gen = self.generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while self.generation == gen:
            left = deadline - loop.time()
            if left <= 0:
                return False
            woken.clear()
            try:
                await asyncio.wait_for(woken.wait(), left)
            except asyncio.TimeoutError:
                pass
        return True

    async def admin_renew(self, req: ctlhttp.Request,
                          install: Callable[[Credentials], None]) -> ctlhttp.Response:
        """Admin ``POST /renew`` (loopback callers only): certify now, answer the new state."""
        if req.method != "POST":
            return ctlhttp.Response.error(405, "use POST")
        if not is_loopback(req.peer):
            return ctlhttp.Response.error(403, "renew is only allowed from loopback")
        try:
            creds = await asyncio.wait_for(self.renew_now(install), 15.0)
        except ctlhttp.HTTPError as e:
            return ctlhttp.Response.error(502, f"identity refused: HTTP {e.status}")
        except (OSError, asyncio.TimeoutError, ValueError, KeyError, ssl.SSLError) as e:
            return ctlhttp.Response.error(502, f"certify failed: {e!r}")
        return ctlhttp.Response.json({"identity": self.cfg.identity, "renewed": True,
                                      **describe_creds(creds)})

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
