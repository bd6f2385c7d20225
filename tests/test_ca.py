"""identity.ca rules and identity.server.Certifier / RateLimiter — pure, time passed in."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity import ca, tokens
from identity.server import Certifier, RateLimited, RateLimiter, handler
from microproxy.ctlhttp import Request

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
ID = ca.identity_name("books", "default")
OTHER = ca.identity_name("shelves", "default")
SECRET = b"k" * 32


@pytest.fixture(scope="module")
def pki() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    anchor, akey = ca.new_anchor(NOW)
    issuer, ikey = ca.new_issuer(anchor, akey, NOW)
    return anchor, issuer, ikey


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def build_csr(key: object = None, cn: str | None = ID,
              sans: list[x509.GeneralName] | None = None,
              extra: x509.ExtensionType | None = None) -> bytes:
    key = key if key is not None else ca.new_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans is None:
        sans = [x509.DNSName(ID)]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if extra is not None:
        b = b.add_extension(extra, critical=True)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return pem(b.sign(key, algo))  # type: ignore[arg-type]


def tampered_csr() -> bytes:
    der = ca.make_csr(ca.new_key(), ID).public_bytes(serialization.Encoding.DER)
    der = der.replace(b"books", b"bookz", 1)  # the subject CN, under the signature
    return pem(x509.load_der_x509_csr(der))


# === CSR checks ===

CSR_CASES: list[tuple[str, Callable[[], bytes], str, bool]] = [
    # (case, csr, error substring, forbidden?)
    ("SAN for another identity", lambda: pem(ca.make_csr(ca.new_key(), OTHER)), "does not match", True),
    ("extra URI SAN", lambda: build_csr(sans=[x509.DNSName(ID), x509.UniformResourceIdentifier(
        ca.spiffe_id("books", "default"))]), "only carry a DNS SAN", True),
    ("extra IP SAN", lambda: build_csr(sans=[x509.DNSName(ID), x509.IPAddress(
        __import__("ipaddress").ip_address("10.0.0.1"))]), "only carry a DNS SAN", True),
    ("two DNS SANs", lambda: build_csr(sans=[x509.DNSName(ID), x509.DNSName(OTHER)]), "does not match", True),
    ("no SAN", lambda: build_csr(sans=[]), "no subjectAltName", False),
    ("CN mismatch", lambda: build_csr(cn=OTHER), "common name", True),
    ("tampered (bad signature)", tampered_csr, "signature", False),
    ("RSA key", lambda: build_csr(key=rsa.generate_private_key(65537, 2048)), "ECDSA", False),
    ("P-521 key", lambda: build_csr(key=ec.generate_private_key(ec.SECP521R1())), "ECDSA", False),
    ("Ed25519 key", lambda: build_csr(key=ed25519.Ed25519PrivateKey.generate()), "ECDSA", False),
    ("not PEM", lambda: b"hello", "malformed", False),
    ("empty", lambda: b"", "malformed", False),
    ("PEM of garbage", lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "malformed", False),
]


@pytest.mark.parametrize("case,make,why,forbidden", CSR_CASES, ids=[c[0] for c in CSR_CASES])
def test_csr_rejected(case: str, make: Callable[[], bytes], why: str, forbidden: bool) -> None:
    with pytest.raises(ca.CSRError, match=why) as info:
        ca.check_csr(make(), ID)
    assert info.value.forbidden is forbidden


@pytest.mark.parametrize("case,make", [
    ("make_csr", lambda: pem(ca.make_csr(ca.new_key(), ID))),
    ("no CN", lambda: build_csr(cn=None)),
    ("P-384", lambda: build_csr(key=ec.generate_private_key(ec.SECP384R1()))),
])
def test_csr_accepted(case: str, make: Callable[[], bytes]) -> None:
    assert ca.check_csr(make(), ID).is_signature_valid


# === Leaves ===

def test_leaf_shape(pki) -> None:  # type: ignore[no-untyped-def]
    anchor, issuer, ikey = pki
    key = ca.new_key()
    # a CSR asking for CA powers: nothing is copied from it
    csr = ca.check_csr(build_csr(key=key, extra=x509.BasicConstraints(ca=True, path_length=None)), ID)
    issued = ca.issue_leaf(csr, ID, issuer, ikey, NOW)
    leaf = issued.leaf
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [ID]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/default/sa/books"]
    assert leaf.public_key() == key.public_key()
    assert leaf.issuer == issuer.subject
    # the chain: leaf <- issuer <- anchor
    certs = ca.load_certs(issued.chain_pem)
    assert [c.serial_number for c in certs] == [leaf.serial_number, issuer.serial_number]
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(anchor)


def test_leaf_validity_has_skew(pki) -> None:  # type: ignore[no-untyped-def]
    _, issuer, ikey = pki
    csr = ca.make_csr(ca.new_key(), ID)
    issued = ca.issue_leaf(csr, ID, issuer, ikey, NOW, lifetime=dt.timedelta(hours=1))
    assert issued.leaf.not_valid_before_utc == NOW - ca.CLOCK_SKEW
    assert issued.leaf.not_valid_after_utc == NOW + dt.timedelta(hours=1) + ca.CLOCK_SKEW
    assert issued.valid_until == issued.leaf.not_valid_after_utc


def test_leaf_capped_at_issuer_not_after() -> None:
    anchor, akey = ca.new_anchor(NOW)
    short, skey = ca.new_issuer(anchor, akey, NOW, lifetime=dt.timedelta(hours=2))
    issued = ca.issue_leaf(ca.make_csr(ca.new_key(), ID), ID, short, skey, NOW)
    assert issued.leaf.not_valid_after_utc == short.not_valid_after_utc
    assert issued.valid_until == short.not_valid_after_utc


def test_expired_issuer_refuses(pki) -> None:  # type: ignore[no-untyped-def]
    _, issuer, ikey = pki
    with pytest.raises(RuntimeError, match="expired"):
        ca.issue_leaf(ca.make_csr(ca.new_key(), ID), ID, issuer, ikey, NOW + dt.timedelta(days=400))


def test_self_issue(pki) -> None:  # type: ignore[no-untyped-def]
    _, issuer, ikey = pki
    name = ca.identity_name("destination", "micromesh")
    chain, key = ca.self_issue(name, issuer, ikey, NOW)
    leaf = ca.load_certs(chain)[0]
    leaf.verify_directly_issued_by(issuer)
    assert leaf.public_key() == ca.load_key(key).public_key()


@pytest.mark.parametrize("name,parsed", [
    ("books.default.serviceaccount.identity.cluster.local", ("books", "default", "cluster.local")),
    ("identity.micromesh.serviceaccount.identity.example.org", ("identity", "micromesh", "example.org")),
    ("books.serviceaccount.identity.cluster.local", None),
    ("a.b.c.serviceaccount.identity.cluster.local", None),
    ("books.default.serviceaccount.identity.", None),
    ("books.default", None),
])
def test_parse_identity(name: str, parsed: tuple[str, str, str] | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError):
            ca.parse_identity(name)
    else:
        assert ca.parse_identity(name) == parsed


# === Certifier: token -> identity -> CSR -> leaf ===

def certifier(pki, **kw) -> Certifier:  # type: ignore[no-untyped-def]
    _, issuer, ikey = pki
    return Certifier(SECRET, issuer, ikey, **kw)


def token(sa: str = "books", ns: str = "default", **kw: object) -> str:
    return tokens.mint(SECRET, ns, sa, NOW.timestamp(), **kw)  # type: ignore[arg-type]


def test_certify_ok(pki) -> None:  # type: ignore[no-untyped-def]
    c = certifier(pki, lifetime=dt.timedelta(hours=3))
    issued = c.certify(token(), pem(ca.make_csr(ca.new_key(), ID)), NOW)
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [ID]
    assert issued.valid_until == NOW + dt.timedelta(hours=3) + ca.CLOCK_SKEW


def test_certify_other_trust_domain(pki) -> None:  # type: ignore[no-untyped-def]
    c = certifier(pki, trust_domain="example.org")
    name = ca.identity_name("books", "default", "example.org")
    issued = c.certify(token(), pem(ca.make_csr(ca.new_key(), name)), NOW)
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/ns/default/sa/books"]


CERTIFY_REJECTED = [
    # (case, token, csr identity, now, exception, substring)
    ("forged token", tokens.mint(b"z" * 32, "default", "books", NOW.timestamp()), ID, NOW,
     tokens.TokenError, "signature"),
    ("expired token", token(ttl=10), ID, NOW + dt.timedelta(seconds=11), tokens.TokenError, "expired"),
    ("wrong audience", token(audience="kubernetes"), ID, NOW, tokens.TokenError, "audience"),
    ("garbage token", "nope", ID, NOW, tokens.TokenError, "malformed"),
    ("CSR for another identity", token(), OTHER, NOW, ca.CSRError, "does not match"),
    ("token for another namespace", token(ns="prod"), ID, NOW, ca.CSRError, "does not match"),
]


@pytest.mark.parametrize("case,tok,csr_id,now,exc,why", CERTIFY_REJECTED, ids=[c[0] for c in CERTIFY_REJECTED])
def test_certify_rejected(pki, case, tok, csr_id, now, exc, why) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=why):
        certifier(pki).certify(tok, pem(ca.make_csr(ca.new_key(), csr_id)), now)


def test_certify_maps_odd_csr_to_csr_error(pki) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ca.CSRError) as info:
        certifier(pki).certify(token(), b"\xff\xfe garbage", NOW)
    assert not info.value.forbidden


def test_certify_rate_limited_per_identity(pki) -> None:  # type: ignore[no-untyped-def]
    c = certifier(pki, limiter=RateLimiter(rate=1, burst=2, global_rate=100, global_burst=100))
    csr = pem(ca.make_csr(ca.new_key(), ID))
    c.certify(token(), csr, NOW)
    c.certify(token(), csr, NOW)
    with pytest.raises(RateLimited):
        c.certify(token(), csr, NOW)
    # another identity has its own bucket
    c.certify(token(sa="shelves"), pem(ca.make_csr(ca.new_key(), OTHER)), NOW)
    # a second later one token is back
    c.certify(token(), csr, NOW + dt.timedelta(seconds=1))


# === RateLimiter (pure) ===

LIMITER_CASES = [
    # (case, limiter kwargs, [(key, now, allowed)])
    ("burst then refill", dict(rate=10, burst=2, global_rate=1000, global_burst=1000),
     [("a", 0.0, True), ("a", 0.0, True), ("a", 0.0, False), ("a", 0.05, False), ("a", 0.1, True),
      ("a", 0.1, False), ("a", 10.0, True), ("a", 10.0, True), ("a", 10.0, False)]),
    ("keys are independent", dict(rate=1, burst=1, global_rate=1000, global_burst=1000),
     [("a", 0.0, True), ("a", 0.0, False), ("b", 0.0, True), ("b", 0.0, False)]),
    ("global cap across keys", dict(rate=100, burst=100, global_rate=1, global_burst=3),
     [("a", 0.0, True), ("b", 0.0, True), ("c", 0.0, True), ("d", 0.0, False), ("d", 1.0, True)]),
    ("a refusal costs nothing", dict(rate=1, burst=1, global_rate=1, global_burst=1),
     [("a", 0.0, True), ("b", 0.0, False), ("a", 0.5, False), ("b", 1.0, True)]),
    ("time going backwards is ignored", dict(rate=1, burst=1, global_rate=100, global_burst=100),
     [("a", 5.0, True), ("a", 1.0, False), ("a", 6.0, True)]),
]


@pytest.mark.parametrize("case,kw,steps", LIMITER_CASES, ids=[c[0] for c in LIMITER_CASES])
def test_rate_limiter(case, kw, steps) -> None:  # type: ignore[no-untyped-def]
    limiter = RateLimiter(**kw)
    got = [limiter.allow(key, now) for key, now, _ in steps]
    assert got == [ok for _, _, ok in steps]


def test_rate_limiter_forgets_idle_keys() -> None:
    limiter = RateLimiter(rate=1, burst=1, global_rate=1e9, global_burst=1e9, max_keys=3)
    for i in range(3):
        assert limiter.allow(f"k{i}", 0.0)
    assert limiter.allow("k3", 10.0)  # the full (idle) buckets are dropped first
    assert len(limiter._buckets) == 1


# === HTTP mapping (the handler, driven without sockets) ===

def post(handle, body: object, headers: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
         method: str = "POST", path: str = "/v1/certify") -> tuple[int, dict[str, object]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = Request(method, path, {}, headers or {}, raw, None, ("127.0.0.1", 1))
    resp = asyncio.run(handle(req))
    return resp.status, json.loads(resp.body)


def test_handler_maps_errors(pki) -> None:  # type: ignore[no-untyped-def]
    c = certifier(pki, limiter=RateLimiter(rate=1, burst=1, global_rate=100, global_burst=100))
    handle = handler(c, lambda: NOW)
    csr = pem(ca.make_csr(ca.new_key(), ID)).decode()
    status, ok = post(handle, {"csr": csr}, {"authorization": f"Bearer {token()}"})
    assert status == 200 and ok["identity"] == ID
    assert ok["valid_until"] == "2030-01-03T03:04:25Z"
    assert ok["valid_until_unix"] == (NOW + ca.LEAF_LIFETIME + ca.CLOCK_SKEW).timestamp()
    assert str(ok["certificate"]).count("BEGIN CERTIFICATE") == 2
    cases = [
        ({"token": token(), "csr": csr}, None, "POST", "/v1/certify", 429),   # bucket of 1 is spent
        ({"token": 7, "csr": csr}, None, "POST", "/v1/certify", 400),
        ({"token": token(), "csr": 7}, None, "POST", "/v1/certify", 400),
        (b"\xff", None, "POST", "/v1/certify", 400),
        ({"csr": csr}, {"authorization": "Bearer "}, "POST", "/v1/certify", 401),
        ({}, None, "GET", "/v1/certify", 405),
        ({}, None, "GET", "/v1/nope", 404),
    ]
    for body, headers, method, path, want in cases:
        status, resp = post(handle, body, headers, method, path)
        assert status == want and set(resp) == {"error"}, (body, resp)
