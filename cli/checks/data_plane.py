"""Checks of the data plane (category micromesh-data-plane, `mesh check --proxy`): each
workload's proxy through its admin port, and the certificate it serves on its inbound
port. One check covers every proxy; its message names each one that fails."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from microproxy import tls
from microproxy.identity_client import fingerprint

from .. import local
from ..check import ERROR, SUCCESS, CheckFailed, Status, error, ok, warn
from .context import CheckContext, span, when
from .control_plane import describe_error
from .home import anchors, read, trust_file

LEAF_NEAR_EXPIRY = 0.25     # a proxy renews at 70 % of its lifetime: less than 25 % left means it did not


def workloads(ctx: CheckContext) -> list[dict[str, Any]]:
    return ctx.cached("workloads", lambda: local.list_workloads(ctx.home, probe=False))  # type: ignore[no-any-return]


def admin(ctx: CheckContext, rec: dict[str, Any], path: str) -> tuple[int, bytes]:
    port = rec.get("admin_port")
    if not port:
        raise CheckFailed("it has no admin port")
    try:
        return local.admin_get(int(port), path, timeout=ctx.timeout)
    except (OSError, http.client.HTTPException) as e:
        raise CheckFailed(f"its admin port {port} does not answer: {describe_error(e)}") from None


def proxy_config(ctx: CheckContext, rec: dict[str, Any]) -> dict[str, Any] | None:
    """The proxy's /config, or None when it cannot be had (the ready check says why)."""
    def fetch() -> dict[str, Any] | None:
        if not rec.get("alive"):
            return None
        try:
            status, body = admin(ctx, rec, "/config")
        except CheckFailed:
            return None
        if status != 200:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    return ctx.cached(f"config:{rec.get('instance')}", fetch)  # type: ignore[no-any-return]


def _per_proxy(ctx: CheckContext, probe: Callable[[dict[str, Any]], Status],
               only_reachable: bool = True) -> Status:
    """Run ``probe`` for every workload; the worst result wins, messages are collected."""
    worst, lines = SUCCESS, []
    for rec in workloads(ctx):
        if only_reachable and proxy_config(ctx, rec) is None:
            continue  # reported by "data plane proxies are ready"
        try:
            st = probe(rec)
        except CheckFailed as e:
            st = error(str(e))
        if st.result != SUCCESS:
            lines.append(f"{rec.get('instance', '?')}: {st.message}")
            if worst != ERROR:
                worst = st.result
    return Status(worst, "\n".join(lines))


def _ready(ctx: CheckContext, rec: dict[str, Any]) -> Status:
    if not rec.get("alive"):
        return error("its supervisor is not running (`mesh down` cleans up what is left)")
    try:
        status, body = admin(ctx, rec, "/ready")
    except CheckFailed:
        ctx.cache[f"config:{rec.get('instance')}"] = None   # no second wait for /config
        raise
    if status != 200:
        return error(f"not ready: {body.decode('utf-8', 'replace').strip() or status}")
    return ok()


def proxies_ready(ctx: CheckContext) -> Status:
    return _per_proxy(ctx, lambda rec: _ready(ctx, rec), only_reachable=False)


@dataclass(frozen=True, slots=True)
class Leaf:
    cert: x509.Certificate | None
    verify_error: str | None        # None: it verified against the trust anchor as its identity


def fetch_leaf(port: int, identity: str, trust_pem: bytes, timeout: float) -> Leaf:
    """The certificate a proxy serves on its inbound port, verified (chain to ``trust_pem``
    and name ``identity``); if that fails, fetched again unverified to say why."""
    def handshake(context: ssl.SSLContext, name: str | None) -> bytes:
        with socket.create_connection((local.LOOPBACK, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=name) as tsock:
                return tsock.getpeercert(binary_form=True) or b""

    try:
        der = handshake(tls.client_context(trust_pem), identity)
        return Leaf(x509.load_der_x509_certificate(der), None)
    except ssl.SSLCertVerificationError as e:
        reason = e.verify_message or str(e)
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    der = handshake(unverified, identity)
    return Leaf(x509.load_der_x509_certificate(der) if der else None, reason)


def leaf(ctx: CheckContext, rec: dict[str, Any]) -> Leaf:
    def get() -> Leaf:
        port, identity = rec.get("inbound_port"), rec.get("identity")
        if not port or not identity:
            raise CheckFailed("its record has no inbound port or identity")
        trust = ctx.cached("trust", lambda: read(ctx, trust_file(ctx)))
        try:
            return fetch_leaf(int(port), str(identity), trust, ctx.timeout)
        except (OSError, ssl.SSLError) as e:
            raise CheckFailed(f"no TLS handshake on its inbound port {port}: {describe_error(e)}") from None
    return ctx.cached(f"leaf:{rec.get('instance')}", get)  # type: ignore[no-any-return]


def _chains(ctx: CheckContext, rec: dict[str, Any]) -> Status:
    got = leaf(ctx, rec)
    if got.verify_error is not None:
        return error(f"its certificate does not verify against the current trust anchor as "
                     f"{rec.get('identity')}: {got.verify_error}")
    trusted = (proxy_config(ctx, rec) or {}).get("trust_anchors")
    if trusted is not None:   # the anchors it verifies peers with (proxies that report them)
        want = [fingerprint(c.public_bytes(Encoding.DER)) for c in anchors(ctx)]
        if list(trusted) != want:
            return error(f"it trusts anchors {', '.join(f[:16] for f in trusted) or 'none'}, the trust "
                         f"bundle is {', '.join(f[:16] for f in want)}: it must be restarted or renewed")
    return ok()


def proxies_certs_chain(ctx: CheckContext) -> Status:
    return _per_proxy(ctx, lambda rec: _chains(ctx, rec))


def _not_near_expiry(ctx: CheckContext, rec: dict[str, Any]) -> Status:
    now = ctx.now()
    cert = leaf(ctx, rec).cert
    if cert is None:
        raise CheckFailed("it served no certificate")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now >= end:
        return error(f"its certificate expired on {when(end)}")
    if (end - now) < LEAF_NEAR_EXPIRY * (end - start):
        return warn(f"its certificate expires on {when(end)} (in {span(end - now)}): the proxy "
                    f"should have renewed it by now")
    return ok()


def proxies_certs_not_expiring(ctx: CheckContext) -> Status:
    return _per_proxy(ctx, lambda rec: _not_near_expiry(ctx, rec))


def _connected(ctx: CheckContext, rec: dict[str, Any]) -> Status:
    config = proxy_config(ctx, rec) or {}
    dest = config.get("destination") or {}
    if not dest.get("reachable"):
        return error("it has not reached destination")
    if rec.get("service_port") and not dest.get("registered"):
        return error("it is not registered with destination")
    return ok()


def proxies_connected(ctx: CheckContext) -> Status:
    return _per_proxy(ctx, lambda rec: _connected(ctx, rec))


def _version(ctx: CheckContext, rec: dict[str, Any]) -> Status:
    version = (proxy_config(ctx, rec) or {}).get("version")
    if not version:
        return error(f"its /config reports no version (the CLI is {ctx.cli_version})")
    if version != ctx.cli_version:
        return error(f"it runs {version}, the CLI is {ctx.cli_version}")
    return ok()


def proxies_version(ctx: CheckContext) -> Status:
    return _per_proxy(ctx, lambda rec: _version(ctx, rec))
