"""The mesh CA, without I/O: trust anchor, issuer, and leaf issuance from CSRs.

Rules for a leaf (after Linkerd's ``pkg/tls/ca.go`` and the CSR checks its audits asked for):
- the CSR's signature must verify (proof of possession of the key);
- its key must be ECDSA (P-256 or P-384);
- it must name exactly one DNS SAN, equal to the identity the token proves, and no other
  SAN kinds; the CN, if present, must equal that identity;
- the leaf is built fresh (no extension is copied): CA:false, digitalSignature,
  server+client EKU, the DNS SAN plus a SPIFFE URI SAN we add ourselves;
- validity: notBefore = now - skew, notAfter = now + lifetime + skew, never past the
  issuer's own notAfter.

Time is always passed in (``now``), so every rule is testable without a clock.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"
LEAF_LIFETIME = dt.timedelta(hours=24)
CLOCK_SKEW = dt.timedelta(seconds=20)
ANCHOR_LIFETIME = dt.timedelta(days=3650)
ISSUER_LIFETIME = dt.timedelta(days=365)


class CSRError(ValueError):
    """The CSR is malformed or asks for something it may not have (maps to 400/403)."""

    def __init__(self, message: str, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden


def identity_name(sa: str, ns: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"{sa}.{ns}.serviceaccount.identity.{trust_domain}"


def spiffe_id(sa: str, ns: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


def parse_identity(name: str) -> tuple[str, str, str]:
    """``sa.ns.serviceaccount.identity.td`` -> (sa, ns, td)."""
    parts = name.split(".serviceaccount.identity.", 1)
    if len(parts) != 2 or parts[0].count(".") != 1 or not parts[1]:
        raise ValueError(f"not a mesh identity: {name!r}")
    sa, ns = parts[0].split(".")
    return sa, ns, parts[1]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("issuer key must be ECDSA")
    return key


def load_certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def _ca_cert(subject: str | x509.Name, key: ec.EllipticCurvePrivateKey, issuer_name: x509.Name,
             signing_key: ec.EllipticCurvePrivateKey, now: dt.datetime,
             lifetime: dt.timedelta, path_len: int | None) -> x509.Certificate:
    name = subject if isinstance(subject, x509.Name) else \
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name if issuer_name is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(signing_key, hashes.SHA256())


def new_anchor(now: dt.datetime, trust_domain: str = DEFAULT_TRUST_DOMAIN,
               lifetime: dt.timedelta = ANCHOR_LIFETIME, unit: str | None = None
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """``unit`` (an OU) tells a rotated-in anchor's name from the one it replaces, so
    chain building never confuses the two while a bundle holds both."""
    key = new_key()
    cn = f"root.micromesh.{trust_domain}"
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    name = x509.Name(attrs)
    return _ca_cert(name, key, name, key, now, lifetime, path_len=1), key


def new_issuer(anchor: x509.Certificate, anchor_key: ec.EllipticCurvePrivateKey,
               now: dt.datetime, trust_domain: str = DEFAULT_TRUST_DOMAIN,
               lifetime: dt.timedelta = ISSUER_LIFETIME
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    not_after = min(now + lifetime, anchor.not_valid_after_utc)
    cert = _ca_cert(f"identity.micromesh.{trust_domain}", key, anchor.subject, anchor_key,
                    now, not_after - now, path_len=0)
    return cert, key


def make_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> x509.CertificateSigningRequest:
    """What a proxy sends: exactly one DNS SAN, the identity."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def check_csr(csr_pem: bytes, identity: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR against the identity the caller proved. Raises CSRError."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CSRError(f"malformed CSR: {e}") from None
    if not csr.is_signature_valid:
        raise CSRError("CSR signature does not verify")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name not in ("secp256r1", "secp384r1"):
        raise CSRError("CSR key must be ECDSA P-256 or P-384")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CSRError("CSR has no subjectAltName") from None
    except ValueError as e:
        raise CSRError(f"malformed CSR extensions: {e}") from None
    dns = san.get_values_for_type(x509.DNSName)
    others = [g for g in san if not isinstance(g, x509.DNSName)]
    if others:
        raise CSRError("CSR may only carry a DNS SAN", forbidden=True)
    if dns != [identity]:
        raise CSRError(f"CSR identity {dns} does not match token identity {identity!r}", forbidden=True)
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns and (len(cns) != 1 or cns[0].value != identity):
        raise CSRError("CSR common name does not match the identity", forbidden=True)
    return csr


@dataclass(frozen=True, slots=True)
class Issued:
    leaf: x509.Certificate
    chain_pem: bytes          # leaf + issuer, PEM
    valid_until: dt.datetime


def issue_leaf(csr: x509.CertificateSigningRequest, identity: str,
               issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
               now: dt.datetime, lifetime: dt.timedelta = LEAF_LIFETIME,
               skew: dt.timedelta = CLOCK_SKEW) -> Issued:
    """Sign a fresh leaf for ``identity`` with the CSR's public key."""
    sa, ns, td = parse_identity(identity)
    not_after = min(now + lifetime + skew, issuer.not_valid_after_utc)
    if not_after <= now:
        raise RuntimeError("issuer certificate has expired")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(issuer.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - skew)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(identity),
            x509.UniformResourceIdentifier(spiffe_id(sa, ns, td)),
        ]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return Issued(leaf=leaf, chain_pem=cert_pem(leaf) + cert_pem(issuer), valid_until=not_after)


def self_issue(identity: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
               now: dt.datetime, lifetime: dt.timedelta = LEAF_LIFETIME) -> tuple[bytes, bytes]:
    """For control-plane components that hold the issuer: a key and chain for ``identity``."""
    key = new_key()
    issued = issue_leaf(make_csr(key, identity), identity, issuer, issuer_key, now, lifetime)
    return issued.chain_pem, key_pem(key)
