"""The checks of `mesh check`, as data: ``LOCAL``, ``PROXY`` (with --proxy) and ``PRE``
(with --pre), and the categories they depend on. Types, runner and rendering are in
``cli/check.py``; the functions are in this package's modules, one per category:
``home`` (the mesh home and its CA), ``control_plane``, ``data_plane`` and ``pre``.

Every function takes a ``CheckContext`` (``context.py``): the mesh home, an injectable
clock and a per-run cache, so one run reads each file and asks each process once.
"""
from __future__ import annotations

from ..check import Check
from . import control_plane, data_plane, home, pre
from .context import CheckContext, cli_version

__all__ = ["CheckContext", "cli_version", "LOCAL", "PROXY", "PRE", "DEPENDS", "selected",
           "HOME", "IDENTITY", "CONTROL", "DATA", "PRE_INSTALL"]

# === the checks, as data ===

HOME, IDENTITY, CONTROL, DATA, PRE_INSTALL = ("micromesh-home", "micromesh-identity", "micromesh-control-plane",
                                      "micromesh-data-plane", "micromesh-pre-install")

DEPENDS: dict[str, tuple[str, ...]] = {
    IDENTITY: (HOME,),
    CONTROL: (HOME,),
    DATA: (HOME, IDENTITY, CONTROL),
}

LOCAL: tuple[Check, ...] = (
    Check(HOME, "mesh home exists and is readable",
          "`mesh up` creates the home; --home or $MESH_HOME choose it", "mm-home-readable",
          home.home_readable, fatal=True),

    Check(IDENTITY, "certificate config is valid",
          "a new mesh home gets a fresh CA from `mesh up`", "mm-identity-config", home.certificate_config, fatal=True),
    Check(IDENTITY, "trust anchors are using supported crypto algorithm",
          "the anchor must be ECDSA P-256 with SHA-256", "mm-anchors-algorithm", home.anchors_algorithm, fatal=True),
    Check(IDENTITY, "trust anchors are within their validity period",
          "replace ca/anchor.crt (and the issuer it signs), then restart the mesh", "mm-anchors-valid",
          home.anchors_valid, fatal=True),
    Check(IDENTITY, "trust anchors are valid for at least 60 days",
          "plan a trust anchor rotation before it expires", "mm-anchors-not-expiring-soon",
          home.anchors_not_expiring, warning=True),
    Check(IDENTITY, "issuer cert is using supported crypto algorithm",
          "the issuer must be ECDSA P-256 with SHA-256", "mm-issuer-algorithm", home.issuer_algorithm, fatal=True),
    Check(IDENTITY, "issuer cert is within its validity period",
          "issue a new ca/issuer.crt from the anchor, then restart the mesh", "mm-issuer-valid",
          home.issuer_valid, fatal=True),
    Check(IDENTITY, "issuer cert is valid for at least 60 days",
          "rotate the issuer before it expires", "mm-issuer-not-expiring-soon",
          home.issuer_not_expiring, warning=True),
    Check(IDENTITY, "issuer cert is issued by the trust anchor",
          "ca/issuer.crt must be signed by an anchor of the trust bundle ca/bundle.crt",
          "mm-issuer-signed-by-anchor",
          home.issuer_signed_by_anchor, fatal=True),
    Check(IDENTITY, "no certificate rotation is half done",
          "finish it with `mesh identity rotate-anchor` or `mesh identity rotate-issuer`",
          "mm-rotation-done", home.rotation_done, warning=True),
    Check(IDENTITY, "CA key files are private",
          "chmod 600 the files named; they must belong to the mesh's user", "mm-key-files-private",
          home.key_files_private),

    Check(CONTROL, "control plane is running",
          "`mesh up` starts what is not running", "mm-control-plane-running",
          control_plane.control_plane_running, fatal=True),
    Check(CONTROL, "identity is ready",
          "see logs/identity.log in the mesh home; `mesh down` then `mesh up` restarts it", "mm-identity-ready",
          control_plane.identity_ready, fatal=True),
    Check(CONTROL, "destination is ready",
          "see logs/destination.log in the mesh home; `mesh down` then `mesh up` restarts it",
          "mm-destination-ready", control_plane.destination_ready, fatal=True),
    Check(CONTROL, "no clock skew detected",
          "sync this machine's clock (NTP): certificates are only valid in their time window",
          "mm-clock-skew", control_plane.clock_skew, warning=True),
)

PROXY: tuple[Check, ...] = (
    Check(DATA, "data plane proxies are ready",
          "see the proxy's log, logs/<instance>-proxy.log; `mesh ps` shows each replica",
          "mm-data-plane-ready", data_plane.proxies_ready),
    Check(DATA, "data plane proxies certificate match CA",
          "the proxies hold certificates from another CA: restart the workloads", "mm-data-plane-certs-match-ca",
          data_plane.proxies_certs_chain),
    Check(DATA, "data plane proxies certificates are not near expiry",
          "the proxy failed to renew its certificate: is identity ready? see its log", "mm-data-plane-certs-expiry",
          data_plane.proxies_certs_not_expiring),
    Check(DATA, "data plane proxies are connected to the control plane",
          "is destination ready? see the proxy's log, logs/<instance>-proxy.log", "mm-data-plane-connected",
          data_plane.proxies_connected),
    Check(DATA, "data plane and cli versions match",
          "restart the workloads to run this version's proxy", "mm-data-plane-version",
          data_plane.proxies_version, warning=True),
)

PRE: tuple[Check, ...] = (
    Check(PRE_INSTALL, "python is 3.11 or newer", "install Python 3.11+ and reinstall micromesh", "mm-pre-python",
          pre.python_version, fatal=True),
    Check(PRE_INSTALL, "required packages are installed", "pip install -e . in micromesh's venv", "mm-pre-packages",
          pre.packages_importable),
    Check(PRE_INSTALL, "can write to the mesh home", "choose another home with --home or $MESH_HOME", "mm-pre-home-writable",
          pre.home_writable),
    Check(PRE_INSTALL, "control plane ports are free", "stop what uses the port, or `mesh down` and `mesh up`",
          "mm-pre-ports-free", pre.ports_free),
    Check(PRE_INSTALL, "iptables is installed", "apt-get install iptables; only netns mode needs it", "mm-pre-iptables",
          pre.iptables_present, warning=True),
)


def selected(pre: bool = False, proxy: bool = False) -> tuple[Check, ...]:
    """The checks `mesh check [--pre] [--proxy]` runs (as `linkerd check`: --pre runs only
    the pre-install checks)."""
    if pre:
        return PRE
    return LOCAL + (PROXY if proxy else ())
