"""Checks of the mesh home and its CA files (categories micromesh-home and
micromesh-identity), after the certificate checks of Linkerd's ``linkerd-identity``."""
from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from identity import ca

from ..check import CheckFailed, Status, error, ok, warn
from .context import CheckContext, span, when

MIN_VALIDITY = dt.timedelta(days=60)        # anchors and issuer: warn below this (as Linkerd)
SUPPORTED_CURVES = ("secp256r1", "secp384r1")


def home_readable(ctx: CheckContext) -> Status:
    root = ctx.home.root
    if not root.exists():
        raise CheckFailed(f"{root} does not exist")
    if not root.is_dir():
        raise CheckFailed(f"{root} is not a directory")
    for d in (root, ctx.home.ca_dir):
        if not d.is_dir():
            raise CheckFailed(f"{d} is missing: this home has no CA")
        if not os.access(d, os.R_OK | os.X_OK):
            raise CheckFailed(f"{d} is not readable by this user")
        try:
            os.listdir(d)
        except OSError as e:
            raise CheckFailed(f"cannot list {d}: {e.strerror}") from None
    return ok()


def read(ctx: CheckContext, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckFailed(f"{ctx.rel(path)} is missing") from None
    except OSError as e:
        raise CheckFailed(f"cannot read {ctx.rel(path)}: {e.strerror}") from None


def certs(ctx: CheckContext, path: Path) -> list[x509.Certificate]:
    def load() -> list[x509.Certificate]:
        try:
            certs = ca.load_certs(read(ctx, path))
        except ValueError as e:
            raise CheckFailed(f"{ctx.rel(path)} is not a PEM certificate: {e}") from None
        if not certs:
            raise CheckFailed(f"{ctx.rel(path)} holds no certificate")
        return certs
    return ctx.cached(f"certs:{path}", load)  # type: ignore[no-any-return]


def trust_file(ctx: CheckContext) -> Path:
    """The trust bundle: the anchors proxies trust (two during an anchor rotation)."""
    return ctx.home.trust_file()


def anchors(ctx: CheckContext) -> list[x509.Certificate]:
    return certs(ctx, trust_file(ctx))


def issuer(ctx: CheckContext) -> x509.Certificate:
    return certs(ctx, ctx.home.issuer_crt)[0]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def certificate_config(ctx: CheckContext) -> Status:
    problems = []
    for cert in anchors(ctx):
        if not _is_ca(cert):
            problems.append(f"trust anchor {cert.subject.rfc4514_string()} is not a CA certificate")
    bundle = trust_file(ctx)
    if bundle != ctx.home.anchor_crt and ctx.home.anchor_crt.exists():
        current = certs(ctx, ctx.home.anchor_crt)[0]
        if current not in anchors(ctx):
            problems.append(f"{ctx.rel(ctx.home.anchor_crt)} is not in the trust bundle {ctx.rel(bundle)}")
    iss = issuer(ctx)
    if not _is_ca(iss):
        problems.append("the issuer certificate is not a CA certificate")
    try:
        key = ca.load_key(read(ctx, ctx.home.issuer_key))
    except (ValueError, TypeError) as e:
        raise CheckFailed(f"{ctx.rel(ctx.home.issuer_key)} is not a usable private key: {e}") from None
    if key.public_key().public_numbers() != _public_numbers(iss):
        problems.append(f"{ctx.rel(ctx.home.issuer_key)} does not belong to {ctx.rel(ctx.home.issuer_crt)}")
    if not read(ctx, ctx.home.token_secret):
        problems.append(f"{ctx.rel(ctx.home.token_secret)} is empty")
    return error("\n".join(problems)) if problems else ok()


def _public_numbers(cert: x509.Certificate) -> object:
    pub = cert.public_key()
    return pub.public_numbers() if isinstance(pub, ec.EllipticCurvePublicKey) else None


def _algorithm_problem(cert: x509.Certificate, what: str) -> str | None:
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return f"{what} has a {type(pub).__name__.lstrip('_')} key: want ECDSA P-256"
    if pub.curve.name not in SUPPORTED_CURVES:
        return f"{what} uses curve {pub.curve.name}: want P-256 (or P-384)"
    if not isinstance(cert.signature_hash_algorithm, (hashes.SHA256, hashes.SHA384)):
        name = cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else "none"
        return f"{what} is signed with {name}: want ECDSA with SHA-256"
    return None


def anchors_algorithm(ctx: CheckContext) -> Status:
    problems = [p for c in anchors(ctx) if (p := _algorithm_problem(c, f"trust anchor {c.subject.rfc4514_string()}"))]
    return error("\n".join(problems)) if problems else ok()


def issuer_algorithm(ctx: CheckContext) -> Status:
    problem = _algorithm_problem(issuer(ctx), "the issuer certificate")
    return error(problem) if problem else ok()


def _validity_problem(cert: x509.Certificate, what: str, now: dt.datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return (f"{what} is not valid before {when(cert.not_valid_before_utc)} "
                f"(it is {when(now)} here: check the clock)")
    if now > cert.not_valid_after_utc:
        return f"{what} is not valid anymore: it expired on {when(cert.not_valid_after_utc)}"
    return None


def _expiring(cert: x509.Certificate, what: str, now: dt.datetime) -> str | None:
    left = cert.not_valid_after_utc - now
    if left < MIN_VALIDITY:
        return f"{what} will expire on {when(cert.not_valid_after_utc)} (in {span(left)})"
    return None


def anchors_valid(ctx: CheckContext) -> Status:
    now = ctx.now()
    problems = [p for c in anchors(ctx) if (p := _validity_problem(c, f"trust anchor {c.subject.rfc4514_string()}", now))]
    return error("\n".join(problems)) if problems else ok()


def anchors_not_expiring(ctx: CheckContext) -> Status:
    now = ctx.now()
    problems = [p for c in anchors(ctx) if (p := _expiring(c, f"trust anchor {c.subject.rfc4514_string()}", now))]
    return warn("\n".join(problems)) if problems else ok()


def issuer_valid(ctx: CheckContext) -> Status:
    problem = _validity_problem(issuer(ctx), "the issuer certificate", ctx.now())
    return error(problem) if problem else ok()


def issuer_not_expiring(ctx: CheckContext) -> Status:
    problem = _expiring(issuer(ctx), "the issuer certificate", ctx.now())
    return warn(problem) if problem else ok()


def issuer_signed_by_anchor(ctx: CheckContext) -> Status:
    iss = issuer(ctx)
    for anchor in anchors(ctx):
        try:
            iss.verify_directly_issued_by(anchor)
            return ok()
        except (ValueError, TypeError, InvalidSignature):
            continue  # another anchor of the bundle may have signed it
    return error(f"the issuer certificate ({iss.issuer.rfc4514_string()}) is not signed by any trust "
                 f"anchor in {ctx.rel(trust_file(ctx))}")


def key_files_private(ctx: CheckContext) -> Status:
    problems = []
    for path in sorted({ctx.home.anchor_key, ctx.home.issuer_key, ctx.home.token_secret,
                        *ctx.home.ca_dir.glob("*.key")}):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # the anchor key may well be kept elsewhere
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            problems.append(f"{ctx.rel(path)} is mode {mode:04o}: want 0600")
        if st.st_uid != os.getuid():
            problems.append(f"{ctx.rel(path)} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    return error("\n".join(problems)) if problems else ok()


def rotation_done(ctx: CheckContext) -> Status:
    from identity import rotation   # late: only this check needs it
    note = rotation.rotation_in_progress(ctx.home)
    return warn(note) if note else ok()
