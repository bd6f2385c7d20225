"""Certificates over time: the CA files of a mesh home, their rotation, and their reload.

Zero-downtime rotation (what Linkerd users have had outages doing by hand):

- **Issuer** (``rotate_issuer``): a new issuer signed by the current anchor. Leaves from
  the old and the new issuer chain to the same anchor, so peers accept both while
  proxies renew one by one.
- **Trust anchor** (``anchor_phase``), in three phases, each pushed to every proxy before
  the next starts:

  1. ``add``: a new anchor; ``ca/bundle.crt`` = old + new. Proxies renew and adopt the
     bundle (identity sends it with each leaf), so they trust both.
  2. ``reissue``: a new issuer signed by the new anchor. Proxies renew; their leaves now
     chain to the new anchor, which every peer already trusts.
  3. ``remove``: bundle = new anchor only; ``anchor.crt``/``anchor.key`` become the new
     anchor. Proxies renew and stop trusting the old anchor.

The state of a rotation lives in ``ca/rotation.json`` (``read_state``), so an interrupted
rotation resumes and ``mesh check`` can warn while one is half done
(``rotation_in_progress``). Pushing a phase to the proxies (admin ``POST /renew``) is the
CLI's job (cli/identity_cmd.py); this module only changes files.

``Reloader`` is the control-plane side: identity and destination re-read the CA files when
they change (mtime checked on each certify and each TLS handshake, every second, and on
SIGHUP) and swap issuer, trust bundle and their own serving certificate without dropping a
request: the listening context hands each new handshake the current context.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from microproxy import tls
from microproxy.identity_client import fingerprint

from . import ca, store

log = logging.getLogger(__name__)

PHASES = ("add", "reissue", "remove")
POLL_INTERVAL = 1.0
SERVING_CERT_LIFETIME = ca.ISSUER_LIFETIME


class RotationError(Exception):
    """The rotation cannot take this step now (the CLI shows the message)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError (name mismatch), TypeError (key type)
        return False
    return True


def trust_domain_of(anchor: x509.Certificate) -> str:
    cns = anchor.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    prefix = "root.micromesh."
    return cn[len(prefix):] if cn.startswith(prefix) else ca.DEFAULT_TRUST_DOMAIN


# === What a control-plane process serves with ===

@dataclass(frozen=True)
class Material:
    issuer: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey
    bundle_pem: bytes
    anchors: tuple[x509.Certificate, ...]

    @property
    def issuer_fingerprint(self) -> str:
        return cert_fingerprint(self.issuer)

    @property
    def anchor_fingerprints(self) -> list[str]:
        return [cert_fingerprint(a) for a in self.anchors]


def load_material(home: store.MeshHome) -> Material:
    """Issuer, key and bundle, checked to fit together (a half-written rotation does not:
    the caller keeps what it has and tries again). Raises OSError or ValueError."""
    issuer, key = home.issuer()
    numbers = key.public_key().public_numbers()
    pub = issuer.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != numbers:
        raise ValueError("issuer.key does not belong to issuer.crt")
    bundle = home.trust_pem()
    anchors = tuple(ca.load_certs(bundle))
    if not anchors:
        raise ValueError("the trust bundle holds no certificate")
    if not any(signed_by(issuer, a) for a in anchors):
        raise ValueError("the issuer is not signed by any anchor of the trust bundle")
    return Material(issuer, key, bundle, anchors)


def _stamp(home: store.MeshHome) -> tuple[Any, ...]:
    out: list[Any] = []
    for path in (home.issuer_crt, home.issuer_key, home.bundle_crt, home.anchor_crt):
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class Reloader:
    """Keeps a control-plane server (identity, destination) on the home's current CA files.

    ``context`` is the listener's SSL context: its SNI callback (run for every handshake,
    with or without SNI) checks the files and switches the connection to the current
    context, whose certificate comes from the current issuer and whose client trust is the
    current bundle. With ``certifier``, its issuer and ``trust_bundle`` follow too, and it
    checks the files before each certificate it signs."""

    def __init__(self, home: store.MeshHome, server_name: str, *, require_client_cert: bool = False,
                 certifier: Any = None, clock: Callable[[], dt.datetime] = utcnow,
                 poll: float = POLL_INTERVAL) -> None:
        self.home = home
        self.server_name = server_name
        self.require_client_cert = require_client_cert
        self.certifier = certifier
        self.clock = clock
        self.poll = poll
        self.reloads = 0
        self._stamp = _stamp(home)
        self._bad_stamp: tuple[Any, ...] | None = None
        self.material = load_material(home)
        self.current = self._context(self.material)
        self.context = self.current
        self.context.sni_callback = self._on_handshake
        self._apply(self.material)

    def _context(self, m: Material) -> ssl.SSLContext:
        chain, key = ca.self_issue(self.server_name, m.issuer, m.issuer_key, self.clock(),
                                   SERVING_CERT_LIFETIME)
        return tls.server_context(chain, key, m.bundle_pem, require_client_cert=self.require_client_cert)

    def _apply(self, m: Material) -> None:
        if self.certifier is not None:
            self.certifier.issuer, self.certifier.issuer_key = m.issuer, m.issuer_key
            self.certifier.trust_bundle = m.bundle_pem
            self.certifier.refresh = self.check

    def _on_handshake(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            self.check()
        except Exception:  # never fail a handshake over a reload; the old context serves
            log.exception("reloading the CA files failed")
        if self.current is not self.context:
            sslobj.context = self.current
        return None

    def check(self) -> bool:
        """Reload if the CA files changed; True if something new was loaded."""
        stamp = _stamp(self.home)
        if stamp == self._stamp:
            return False
        try:
            m = load_material(self.home)
        except Exception as e:  # half-written files, a bad key: keep serving, retry later
            if stamp != self._bad_stamp:
                log.warning("the CA files changed but cannot be used (yet): %s; keeping the current ones", e)
                self._bad_stamp = stamp
            return False
        self._stamp = stamp
        old = self.material
        if m.issuer_fingerprint == old.issuer_fingerprint and m.bundle_pem == old.bundle_pem:
            return False
        self.current = self._context(m)
        self.material = m
        self._apply(m)
        self.reloads += 1
        log.info("reloaded the CA files: issuer %s, trust anchors %s", m.issuer_fingerprint[:16],
                 ", ".join(f[:16] for f in m.anchor_fingerprints))
        return True

    async def watch(self) -> None:
        """Background task: check every ``poll`` seconds and on SIGHUP."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.check)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests): polling is enough
        while True:
            await asyncio.sleep(self.poll)
            try:
                self.check()
            except Exception:
                log.exception("reloading the CA files failed")


# === Rotation state ===

def state_path(home: store.MeshHome) -> Path:
    return home.ca_dir / "rotation.json"


def next_anchor_paths(home: store.MeshHome) -> tuple[Path, Path]:
    return home.ca_dir / "anchor-next.crt", home.ca_dir / "anchor-next.key"


def read_state(home: store.MeshHome) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(home).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RotationError(f"cannot read {state_path(home)}: {e}") from None
    return data if isinstance(data, dict) else None


def _write_state(home: store.MeshHome, state: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
    state = dict(state)
    state.setdefault("started", now.isoformat(timespec="seconds"))
    state["updated"] = now.isoformat(timespec="seconds")
    store.write_json(state_path(home), state)
    return state


def confirm(home: store.MeshHome, now: dt.datetime | None = None) -> dict[str, Any]:
    """Every proxy reported the current phase's state: mark it confirmed."""
    state = read_state(home)
    if state is None:
        raise RotationError("no rotation recorded")
    state["confirmed"] = True
    return _write_state(home, state, now or utcnow())


def _anchor_active(state: dict[str, Any] | None) -> bool:
    return bool(state and state.get("kind") == "anchor"
                and not (state.get("phase") == "remove" and state.get("confirmed")))


def next_anchor_phase(state: dict[str, Any] | None) -> str | None:
    """The phase `rotate-anchor` runs next: the current one if it was not confirmed yet,
    else the one after it; ``add`` when no anchor rotation is under way."""
    if not _anchor_active(state):
        return "add"
    assert state is not None
    phase = state.get("phase")
    if phase not in PHASES:
        return "add"
    if not state.get("confirmed"):
        return str(phase)
    i = PHASES.index(phase)
    return PHASES[i + 1] if i + 1 < len(PHASES) else None


def rotation_in_progress(home: store.MeshHome) -> str | None:
    """For `mesh check`: a one-line warning while a rotation is half done, else None."""
    try:
        state = read_state(home)
    except RotationError as e:
        return str(e)
    if _anchor_active(state):
        assert state is not None
        phase = state.get("phase")
        how = "done" if state.get("confirmed") else "started but not yet confirmed by every proxy"
        return (f"trust anchor rotation half done: phase {phase!r} {how} (phases: add, reissue, "
                f"remove); finish it with `mesh identity rotate-anchor`")
    if state and state.get("kind") == "issuer" and not state.get("confirmed"):
        return ("issuer rotation not yet confirmed by every proxy: finish it with "
                "`mesh identity rotate-issuer`")
    try:
        n = len(ca.load_certs(home.trust_pem()))
    except (OSError, ValueError):
        return None
    if n > 1:
        return f"the trust bundle holds {n} anchors but no anchor rotation is under way"
    return None


# === Rotation steps (files only) ===

def _anchor(home: store.MeshHome) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        return ca.load_certs(home.anchor_crt.read_bytes())[0], ca.load_key(home.anchor_key.read_bytes())
    except FileNotFoundError as e:
        raise RotationError(f"the trust anchor's key is not in this mesh home ({e.filename})") from None


def rotate_issuer(home: store.MeshHome, now: dt.datetime) -> dict[str, Any]:
    """Write a new issuer signed by the current anchor (or, when the last issuer rotation was
    not confirmed and its issuer is still in place, keep that one: resuming). Returns the state."""
    state = read_state(home)
    if _anchor_active(state):
        raise RotationError("a trust anchor rotation is under way: finish it first "
                            "(`mesh identity rotate-anchor`)")
    if state and state.get("kind") == "issuer" and not state.get("confirmed"):
        if state.get("issuer") == cert_fingerprint(home.issuer()[0]):
            return state
    anchor, akey = _anchor(home)
    issuer, ikey = ca.new_issuer(anchor, akey, now, trust_domain_of(anchor))
    home.write_issuer(issuer, ikey)
    return _write_state(home, {"kind": "issuer", "phase": "reissue", "confirmed": False,
                               "issuer": cert_fingerprint(issuer), "anchor": cert_fingerprint(anchor),
                               "started": now.isoformat(timespec="seconds")}, now)


def anchor_phase(home: store.MeshHome, phase: str, now: dt.datetime) -> dict[str, Any]:
    """Do the file part of one phase of an anchor rotation. Running the phase that was
    started but not confirmed again changes nothing (the CLI pushes it again). Returns the
    new state; raises RotationError when ``phase`` is not the one due."""
    if phase not in PHASES:
        raise RotationError(f"unknown phase {phase!r}: want one of {', '.join(PHASES)}")
    state = read_state(home)
    due = next_anchor_phase(state)
    if phase != due:
        if due is None:
            raise RotationError("no anchor rotation is under way: start one with --phase add")
        raise RotationError(f"the anchor rotation is due for phase {due!r}, not {phase!r}")
    if state is not None and _anchor_active(state) and state.get("phase") == phase:
        return state  # started before, not confirmed: nothing more to write
    crt_next, key_next = next_anchor_paths(home)
    if phase == "add":
        if state and state.get("kind") == "issuer" and not state.get("confirmed"):
            raise RotationError("an issuer rotation is not confirmed yet: finish it first "
                                "(`mesh identity rotate-issuer`)")
        old, _ = _anchor(home)
        new, nkey = ca.new_anchor(now, trust_domain_of(old),
                                  unit=f"anchor {now:%Y-%m-%d} {secrets.token_hex(3)}")
        store._write_private(key_next, ca.key_pem(nkey))
        store._write_private(crt_next, ca.cert_pem(new))
        home.write_bundle(ca.cert_pem(old) + ca.cert_pem(new))
        return _write_state(home, {"kind": "anchor", "phase": "add", "confirmed": False,
                                   "old_anchor": cert_fingerprint(old), "new_anchor": cert_fingerprint(new),
                                   "started": now.isoformat(timespec="seconds")}, now)
    assert state is not None
    try:
        new = ca.load_certs(crt_next.read_bytes())[0]
        nkey = ca.load_key(key_next.read_bytes())
    except (OSError, ValueError, IndexError) as e:
        raise RotationError(f"the new anchor is missing from {crt_next.parent}: {e}") from None
    if cert_fingerprint(new) != state.get("new_anchor"):
        raise RotationError(f"{crt_next} is not the anchor this rotation added")
    if phase == "reissue":
        issuer, ikey = ca.new_issuer(new, nkey, now, trust_domain_of(new))
        home.write_issuer(issuer, ikey)
        return _write_state(home, {**state, "phase": "reissue", "confirmed": False,
                                   "issuer": cert_fingerprint(issuer)}, now)
    # remove: the bundle first (identity then sends it), then the anchor files
    home.write_bundle(ca.cert_pem(new))
    store._write_private(home.anchor_key, ca.key_pem(nkey))
    store._write_private(home.anchor_crt, ca.cert_pem(new))
    key_next.unlink(missing_ok=True)
    crt_next.unlink(missing_ok=True)
    return _write_state(home, {**state, "phase": "remove", "confirmed": False}, now)


@dataclass(frozen=True)
class Expected:
    """What every proxy must report once the current phase reached it."""
    issuer: str                 # fingerprint of the issuer that signs leaves now
    anchors: tuple[str, ...]    # fingerprints of the bundle, in order


def expected(home: store.MeshHome) -> Expected:
    m = load_material(home)
    return Expected(m.issuer_fingerprint, tuple(m.anchor_fingerprints))
