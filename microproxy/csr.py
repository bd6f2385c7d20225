"""The proxy's key and CSR, made with the OpenSSL that the ``ssl`` module already loaded.

Why not ``cryptography``: importing ``cryptography.x509`` adds ~10 MB of RSS to every proxy
(measured: 22.6 MB -> 32.5 MB), a third of the proxy's memory budget, for two calls made
once a day. libcrypto is already mapped into the process by ``_ssl``, so calling it through
ctypes costs nothing. If that fails (an unusual libcrypto), we fall back to cryptography.

The key is an ECDSA P-256 key that never leaves the process; the CSR carries exactly one
DNS SAN, the identity, and the CN set to it (what identity/ca.py's ``check_csr`` demands).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import ssl

log = logging.getLogger(__name__)

_MBSTRING_ASC = 0x1001
_NID_SUBJECT_ALT_NAME = 85
_BIO_CTRL_INFO = 3


def _libcrypto() -> ctypes.CDLL:
    import _ssl
    # Prefer the exact libcrypto _ssl is linked against (already in memory).
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "libcrypto" in path:
                return ctypes.CDLL(path)
    name = ctypes.util.find_library("crypto")
    if not name:
        raise OSError(f"libcrypto not found (ssl: {_ssl.OPENSSL_VERSION})")
    return ctypes.CDLL(name)


def _bind(lib: ctypes.CDLL) -> None:
    P, I, C = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    sigs = {
        "EVP_PKEY_CTX_new_from_name": (P, [P, C, C]),
        "EVP_PKEY_keygen_init": (I, [P]),
        "EVP_PKEY_CTX_set_group_name": (I, [P, C]),
        "EVP_PKEY_generate": (I, [P, ctypes.POINTER(P)]),
        "EVP_PKEY_CTX_free": (None, [P]),
        "EVP_PKEY_free": (None, [P]),
        "X509_REQ_new": (P, []),
        "X509_REQ_free": (None, [P]),
        "X509_REQ_set_version": (I, [P, ctypes.c_long]),
        "X509_REQ_set_pubkey": (I, [P, P]),
        "X509_REQ_get_subject_name": (P, [P]),
        "X509_NAME_add_entry_by_txt": (I, [P, C, I, C, I, I, I]),
        "X509V3_EXT_conf_nid": (P, [P, P, I, C]),
        "X509_EXTENSION_free": (None, [P]),
        "OPENSSL_sk_new_null": (P, []),
        "OPENSSL_sk_push": (I, [P, P]),
        "OPENSSL_sk_free": (None, [P]),
        "X509_REQ_add_extensions": (I, [P, P]),
        "EVP_sha256": (P, []),
        "X509_REQ_sign": (I, [P, P, P]),
        "BIO_s_mem": (P, []),
        "BIO_new": (P, [P]),
        "BIO_free": (I, [P]),
        "BIO_ctrl": (ctypes.c_long, [P, I, ctypes.c_long, P]),
        "PEM_write_bio_X509_REQ": (I, [P, P]),
        "PEM_write_bio_PrivateKey": (I, [P, P, P, P, I, P, P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _bio_pem(lib: ctypes.CDLL, write: object, *args: object) -> bytes:
    bio = lib.BIO_new(lib.BIO_s_mem())
    try:
        if write(bio, *args) != 1:  # type: ignore[operator]
            raise OSError("PEM write failed")
        ptr = ctypes.c_void_p()
        n = lib.BIO_ctrl(bio, _BIO_CTRL_INFO, 0, ctypes.byref(ptr))
        return ctypes.string_at(ptr, n)
    finally:
        lib.BIO_free(bio)


def _openssl_key_and_csr(identity: str) -> tuple[bytes, bytes]:
    lib = _libcrypto()
    _bind(lib)
    pctx = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
    pkey = ctypes.c_void_p()
    req = ext = sk = None
    try:
        if not pctx or lib.EVP_PKEY_keygen_init(pctx) != 1 \
                or lib.EVP_PKEY_CTX_set_group_name(pctx, b"P-256") != 1 \
                or lib.EVP_PKEY_generate(pctx, ctypes.byref(pkey)) != 1:
            raise OSError("EC key generation failed")
        req = lib.X509_REQ_new()
        ident = identity.encode("ascii")
        ok = (lib.X509_REQ_set_version(req, 0) == 1
              and lib.X509_REQ_set_pubkey(req, pkey) == 1
              and lib.X509_NAME_add_entry_by_txt(lib.X509_REQ_get_subject_name(req), b"CN",
                                                 _MBSTRING_ASC, ident, -1, -1, 0) == 1)
        ext = lib.X509V3_EXT_conf_nid(None, None, _NID_SUBJECT_ALT_NAME, b"DNS:" + ident)
        sk = lib.OPENSSL_sk_new_null()
        ok = ok and bool(ext) and lib.OPENSSL_sk_push(sk, ext) > 0 \
            and lib.X509_REQ_add_extensions(req, sk) == 1 \
            and lib.X509_REQ_sign(req, pkey, lib.EVP_sha256()) > 0
        if not ok:
            raise OSError("CSR construction failed")
        key_pem = _bio_pem(lib, lib.PEM_write_bio_PrivateKey, pkey, None, None, 0, None, None)
        csr_pem = _bio_pem(lib, lib.PEM_write_bio_X509_REQ, req)
        return key_pem, csr_pem
    finally:
        if sk:
            lib.OPENSSL_sk_free(sk)
        if ext:
            lib.X509_EXTENSION_free(ext)
        if req:
            lib.X509_REQ_free(req)
        if pkey:
            lib.EVP_PKEY_free(pkey)
        if pctx:
            lib.EVP_PKEY_CTX_free(pctx)


def _cryptography_key_and_csr(identity: str) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    from identity import ca
    key = ca.new_key()
    csr = ca.make_csr(key, identity)
    return ca.key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def key_and_csr(identity: str) -> tuple[bytes, bytes]:
    """(PKCS#8 key PEM, CSR PEM) for ``identity``."""
    if os.environ.get("MESH_CSR_BACKEND") != "cryptography":
        try:
            return _openssl_key_and_csr(identity)
        except (OSError, AttributeError) as e:
            log.info("libcrypto CSR path unavailable; using cryptography", extra={"error": repr(e)})
    return _cryptography_key_and_csr(identity)


def not_after(chain_pem: bytes) -> float:
    """The leaf's notAfter as unix time, parsed by the ssl module (no cryptography import)."""
    fd = os.memfd_create("mesh-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem)
        info = ssl._ssl._test_decode_cert(f"/proc/self/fd/{fd}")  # type: ignore[attr-defined]
    finally:
        os.close(fd)
    return float(ssl.cert_time_to_seconds(info["notAfter"]))
