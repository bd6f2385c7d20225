"""TLS contexts for the mesh: TLS 1.3 only, ECDSA leaves, identities as DNS SANs.

The private key never touches the disk: PEM material is handed to OpenSSL through an
anonymous memory file (memfd), because the stdlib ``ssl`` module only loads from paths.

Identity checking on the client side is ordinary hostname verification with the
*identity name* as the server name: the leaf's only DNS SAN is the identity, so
``check_hostname`` proves the peer is exactly the identity destination announced.
"""
from __future__ import annotations

import os
import ssl
from typing import Any

__all__ = ["server_context", "client_context", "peer_identity", "load_pem_into"]


def _memfd_path(data: bytes) -> tuple[int, str]:
    fd = os.memfd_create("mesh-pem", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


def load_pem_into(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate chain and key from memory into ``ctx``."""
    cfd, cpath = _memfd_path(chain_pem)
    kfd, kpath = _memfd_path(key_pem)
    try:
        ctx.load_cert_chain(cpath, kpath)
    finally:
        os.close(cfd)
        os.close(kfd)


def _base(purpose: ssl.Purpose, trust_pem: bytes) -> ssl.SSLContext:
    # Not ssl.create_default_context(): it loads the whole system CA store (several MB per
    # context) although only the mesh's trust anchors may be trusted.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=trust_pem.decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx


def server_context(chain_pem: bytes, key_pem: bytes, trust_pem: bytes,
                   require_client_cert: bool = False,
                   alpn: list[str] | None = None) -> ssl.SSLContext:
    """A server context. Client certificates are requested and verified against the
    trust anchors; without ``require_client_cert`` a client may omit one (policy, not
    TLS, then decides — as Linkerd does)."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, trust_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    load_pem_into(ctx, chain_pem, key_pem)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(trust_pem: bytes, chain_pem: bytes | None = None,
                   key_pem: bytes | None = None,
                   alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against the trust anchors and checks
    the server name (pass the expected identity as ``server_hostname``)."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, trust_pem)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if chain_pem is not None and key_pem is not None:
        load_pem_into(ctx, chain_pem, key_pem)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def peer_identity(ssl_object: Any) -> str | None:
    """The verified peer's identity: the first DNS SAN of its leaf, or None."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    return None
