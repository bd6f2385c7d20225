"""The mesh home on disk ($MESH_HOME, default ~/.micromesh): CA material and local state.

Layout::

    ca/anchor.crt  ca/anchor.key      trust anchor (10 years), key 0600
    ca/issuer.crt  ca/issuer.key      issuer (1 year), signed by the anchor, key 0600
    ca/bundle.crt                     trust bundle: the anchors proxies trust (one, or two
                                      during an anchor rotation; see identity/rotation.py)
    ca/token.secret                   HMAC secret for local workload tokens, 0600
    controlplane.json                 identity/destination addresses and pids (written by `mesh up`)
    destination-state.json            destination's persisted registry
    workloads/<name>-<id>.json        one file per running replica (written by `mesh run`)
    logs/                             control plane, proxy and app logs
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import ca


def default_home() -> Path:
    return Path(os.environ.get("MESH_HOME") or Path.home() / ".micromesh")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write JSON (0600: it may name ports and pids only, but stay private)."""
    _write_private(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class MeshHome:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_home()

    # --- paths
    @property
    def ca_dir(self) -> Path: return self.root / "ca"
    @property
    def anchor_crt(self) -> Path: return self.ca_dir / "anchor.crt"
    @property
    def anchor_key(self) -> Path: return self.ca_dir / "anchor.key"
    @property
    def issuer_crt(self) -> Path: return self.ca_dir / "issuer.crt"
    @property
    def issuer_key(self) -> Path: return self.ca_dir / "issuer.key"
    @property
    def bundle_crt(self) -> Path: return self.ca_dir / "bundle.crt"
    @property
    def token_secret(self) -> Path: return self.ca_dir / "token.secret"
    @property
    def controlplane(self) -> Path: return self.root / "controlplane.json"
    @property
    def destination_state(self) -> Path: return self.root / "destination-state.json"
    @property
    def workloads_dir(self) -> Path: return self.root / "workloads"
    @property
    def logs_dir(self) -> Path: return self.root / "logs"

    def has_ca(self) -> bool:
        return all(p.exists() for p in (self.anchor_crt, self.issuer_crt, self.issuer_key, self.token_secret))

    def ensure_ca(self, now: dt.datetime, trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> bool:
        """Create the anchor, issuer and token secret the first time. Returns True if created."""
        if self.has_ca():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        anchor, akey = ca.new_anchor(now, trust_domain)
        issuer, ikey = ca.new_issuer(anchor, akey, now, trust_domain)
        _write_private(self.anchor_key, ca.key_pem(akey))
        _write_private(self.anchor_crt, ca.cert_pem(anchor))
        _write_private(self.issuer_key, ca.key_pem(ikey))
        _write_private(self.issuer_crt, ca.cert_pem(issuer))
        _write_private(self.bundle_crt, ca.cert_pem(anchor))
        _write_private(self.token_secret, secrets.token_bytes(32))
        return True

    def trust_file(self) -> Path:
        """The trust bundle (ca/bundle.crt), or the anchor in a home made before bundles."""
        return self.bundle_crt if self.bundle_crt.exists() else self.anchor_crt

    def trust_pem(self) -> bytes:
        return self.trust_file().read_bytes()

    def write_bundle(self, pem: bytes) -> None:
        _write_private(self.bundle_crt, pem)

    def issuer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return ca.load_certs(self.issuer_crt.read_bytes())[0], ca.load_key(self.issuer_key.read_bytes())

    def secret(self) -> bytes:
        return self.token_secret.read_bytes()

    def write_issuer(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        _write_private(self.issuer_key, ca.key_pem(key))
        _write_private(self.issuer_crt, ca.cert_pem(cert))
