"""`mesh check`: every check made to fail on purpose, the runner, the rendering, and the
real command on a real mesh.

Most tests call one check function against a tmp MeshHome with a fake ``now``; the
control plane and the proxies they talk to are small in-process stand-ins (threaded
HTTP(S) servers) so each failure can be staged exactly. The e2e tests at the end run
`mesh check` on a real mesh.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import http.server
import json
import os
import re
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from cli import check as health
from cli import checks, local
from cli.checks import control_plane as cp_checks
from cli.checks import home as home_checks
from cli.checks import pre as pre_checks
from cli.check import Check, Result
from identity import ca
from identity.store import MeshHome, write_json
from microproxy import tls
from tests.test_cli_local import http_server, mesh, needs_proxy, serve_dir, sweep

GOLDEN = Path(__file__).parent / "golden"
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)


def real_now() -> dt.datetime:
    return local.utcnow()


# === a mesh home on disk ===

def new_home(path: Path, now: dt.datetime = T0) -> MeshHome:
    home = MeshHome(path)
    home.root.mkdir(parents=True)
    home.ensure_ca(now)
    return home


def write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def set_anchors(home: MeshHome, *anchors: x509.Certificate) -> None:
    """The trust bundle (and anchor.crt, the first of them)."""
    write_private(home.bundle_crt, b"".join(ca.cert_pem(a) for a in anchors))
    write_private(home.anchor_crt, ca.cert_pem(anchors[0]))


def ctx_for(home: MeshHome, now: dt.datetime | None = None, **kw: Any) -> checks.CheckContext:
    if now is None:
        return checks.CheckContext(home, **kw)
    return checks.CheckContext(home, now=lambda: now, **kw)


def run_check(fn: Callable[[checks.CheckContext], health.Status], ctx: checks.CheckContext,
              warning: bool = False) -> Result:
    """One check function through the runner's own wrapper (CheckFailed -> error)."""
    return health.run_one(Check("test", "a check", "a hint", "mm-test", fn, warning=warning), ctx)


def rsa_ca(now: dt.datetime) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def p521_issuer(anchor: x509.Certificate, anchor_key: ec.EllipticCurvePrivateKey,
                now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP521R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "identity.micromesh.cluster.local")]))
            .issuer_name(anchor.subject).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - DAY).not_valid_after(now + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(anchor_key, hashes.SHA256()))
    return cert, key


# === micromesh-home ===

def test_home_readable(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    assert home_checks.home_readable(ctx_for(home)).result == "success"


@pytest.mark.parametrize("setup, expect", [
    (lambda root: None, "does not exist"),
    (lambda root: root.write_text("not a dir"), "is not a directory"),
    (lambda root: root.mkdir(), "this home has no CA"),
])
def test_home_readable_fails(tmp_path: Path, setup: Callable[[Path], None], expect: str) -> None:
    root = tmp_path / "h"
    setup(root)
    r = run_check(home_checks.home_readable, ctx_for(MeshHome(root)))
    assert r.result == "error" and expect in r.message


# === micromesh-identity ===

def test_identity_checks_pass_on_a_fresh_ca(tmp_path: Path) -> None:
    ctx = ctx_for(new_home(tmp_path / "h"), T0 + DAY)
    for fn in (home_checks.certificate_config, home_checks.anchors_algorithm, home_checks.anchors_valid,
               home_checks.anchors_not_expiring, home_checks.issuer_algorithm, home_checks.issuer_valid,
               home_checks.issuer_not_expiring, home_checks.issuer_signed_by_anchor, home_checks.key_files_private):
        assert run_check(fn, ctx).result == "success", fn.__name__


def test_certificate_config_issuer_key_of_another_cert(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    write_private(home.issuer_key, ca.key_pem(ca.new_key()))
    r = run_check(home_checks.certificate_config, ctx_for(home, T0))
    assert r.result == "error" and "ca/issuer.key does not belong to ca/issuer.crt" in r.message


def test_certificate_config_garbage_and_missing_files(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    write_private(home.issuer_crt, b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    r = run_check(home_checks.certificate_config, ctx_for(home, T0))
    assert r.result == "error" and "ca/issuer.crt is not a PEM certificate" in r.message
    home.bundle_crt.unlink()      # a home from before bundles: the anchor is the bundle
    home.anchor_crt.unlink()
    r = run_check(home_checks.certificate_config, ctx_for(home, T0))
    assert r.result == "error" and r.message == "ca/anchor.crt is missing"


def test_certificate_config_issuer_that_is_not_a_ca_and_empty_secret(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    issuer, key = home.issuer()
    chain, leaf_key = ca.self_issue("x.default.serviceaccount.identity.cluster.local", issuer, key, T0)
    write_private(home.issuer_crt, chain)           # a leaf where the issuer should be
    write_private(home.issuer_key, leaf_key)
    write_private(home.token_secret, b"")
    r = run_check(home_checks.certificate_config, ctx_for(home, T0))
    assert r.result == "error"
    assert "the issuer certificate is not a CA certificate" in r.message
    assert "ca/token.secret is empty" in r.message


def test_anchor_with_an_unsupported_algorithm(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    anchor, _ = rsa_ca(T0)
    set_anchors(home, anchor)
    r = run_check(home_checks.anchors_algorithm, ctx_for(home, T0))
    assert r.result == "error" and "RSAPublicKey key: want ECDSA P-256" in r.message


def test_issuer_with_an_unsupported_curve(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    anchor, akey = ca.new_anchor(T0)
    issuer, ikey = p521_issuer(anchor, akey, T0)
    set_anchors(home, anchor)
    home.write_issuer(issuer, ikey)  # type: ignore[arg-type]
    r = run_check(home_checks.issuer_algorithm, ctx_for(home, T0))
    assert r.result == "error" and "curve secp521r1" in r.message
    assert run_check(home_checks.issuer_signed_by_anchor, ctx_for(home, T0)).result == "success"


@pytest.mark.parametrize("now, expect", [
    (T0 - DAY, "is not valid before 2029-12-31T23:59:40Z (it is 2029-12-31T00:00:00Z here: check the clock)"),
    (T0 + 3651 * DAY, "is not valid anymore: it expired on 2039-12-30T00:00:00Z"),
])
def test_anchors_outside_their_validity(tmp_path: Path, now: dt.datetime, expect: str) -> None:
    r = run_check(home_checks.anchors_valid, ctx_for(new_home(tmp_path / "h"), now))
    assert r.result == "error"
    assert r.message == f"trust anchor CN=root.micromesh.cluster.local {expect}"


def test_anchors_expiring_within_60_days_is_a_warning(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    now = T0 + 3650 * DAY - 59 * DAY
    assert run_check(home_checks.anchors_valid, ctx_for(home, now)).result == "success"
    r = run_check(home_checks.anchors_not_expiring, ctx_for(home, now))
    assert r.result == "warning"
    assert r.message == ("trust anchor CN=root.micromesh.cluster.local will expire on "
                         "2039-12-30T00:00:00Z (in 59 days)")


@pytest.mark.parametrize("now, expect", [
    (T0 - dt.timedelta(minutes=5), "the issuer certificate is not valid before 2029-12-31T23:59:40Z"),
    (T0 + 366 * DAY, "the issuer certificate is not valid anymore: it expired on 2031-01-01T00:00:00Z"),
])
def test_issuer_outside_its_validity(tmp_path: Path, now: dt.datetime, expect: str) -> None:
    r = run_check(home_checks.issuer_valid, ctx_for(new_home(tmp_path / "h"), now))
    assert r.result == "error" and r.message.startswith(expect)


def test_issuer_expiring_within_60_days_is_a_warning(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    r = run_check(home_checks.issuer_not_expiring, ctx_for(home, T0 + 335 * DAY))
    assert r.result == "warning"
    assert r.message == "the issuer certificate will expire on 2031-01-01T00:00:00Z (in 30 days)"
    assert run_check(home_checks.issuer_not_expiring, ctx_for(home, T0 + 300 * DAY)).result == "success"


def test_issuer_not_signed_by_the_anchor(tmp_path: Path) -> None:
    """Another CA's issuer: same subject names (every mesh CA has them), other keys."""
    home = new_home(tmp_path / "h")
    other_anchor, other_key = ca.new_anchor(T0)
    home.write_issuer(*ca.new_issuer(other_anchor, other_key, T0))
    r = run_check(home_checks.issuer_signed_by_anchor, ctx_for(home, T0))
    assert r.result == "error"
    assert "is not signed by any trust anchor in ca/bundle.crt" in r.message
    # the rest of the config is consistent: only the signature gives it away
    assert run_check(home_checks.certificate_config, ctx_for(home, T0)).result == "success"


def test_issuer_signed_by_one_anchor_of_a_bundle(tmp_path: Path) -> None:
    """Mid anchor rotation: the bundle holds old and new anchors, the issuer is the new one's."""
    home = new_home(tmp_path / "h")
    old = ca.load_certs(home.anchor_crt.read_bytes())[0]
    new, new_key = ca.new_anchor(T0)
    home.write_issuer(*ca.new_issuer(new, new_key, T0))
    set_anchors(home, old, new)
    ctx = ctx_for(home, T0)
    for fn in (home_checks.issuer_signed_by_anchor, home_checks.certificate_config, home_checks.anchors_valid):
        assert run_check(fn, ctx).result == "success", fn.__name__


def test_anchor_missing_from_the_bundle(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    other, _ = ca.new_anchor(T0)
    write_private(home.bundle_crt, ca.cert_pem(other))
    r = run_check(home_checks.certificate_config, ctx_for(home, T0))
    assert r.result == "error" and "ca/anchor.crt is not in the trust bundle ca/bundle.crt" in r.message


def test_rotation_half_done(tmp_path: Path) -> None:
    from identity import rotation
    home = new_home(tmp_path / "h")
    assert run_check(home_checks.rotation_done, ctx_for(home, T0)).result == "success"
    rotation.anchor_phase(home, "add", T0)
    r = run_check(home_checks.rotation_done, ctx_for(home, T0), warning=True)
    assert r.result == "warning" and "rotation half done" in r.message
    # and the rest of the identity checks hold mid-rotation
    for check in checks.LOCAL:
        if check.category == checks.IDENTITY and check.anchor != "mm-rotation-done":
            assert health.run_one(check, ctx_for(home, T0)).result == "success", check.description


@pytest.mark.parametrize("name", ["issuer.key", "anchor.key", "token.secret", "anchor-next.key"])
def test_key_files_readable_by_others(tmp_path: Path, name: str) -> None:
    home = new_home(tmp_path / "h")
    if not (home.ca_dir / name).exists():
        (home.ca_dir / name).write_bytes(b"key")
    os.chmod(home.ca_dir / name, 0o644)
    r = run_check(home_checks.key_files_private, ctx_for(home, T0))
    assert r.result == "error" and r.message == f"ca/{name} is mode 0644: want 0600"


def test_key_files_anchor_key_kept_elsewhere_is_fine(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    home.anchor_key.unlink()
    assert run_check(home_checks.key_files_private, ctx_for(home, T0)).result == "success"


# === stand-ins for the control plane and the proxies ===

class Server:
    """A threaded HTTP(S) server on loopback answering GET with ``routes[path]`` =
    (status, body); an unknown path is 404. ``date_offset`` skews its Date header."""

    def __init__(self, routes: dict[str, tuple[int, bytes]], context: ssl.SSLContext | None = None,
                 date_offset: dt.timedelta | None = None) -> None:
        self.routes = routes
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                status, body = outer.routes.get(self.path, (404, b"not found\n"))
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def date_time_string(self, timestamp: float | None = None) -> str:
                if date_offset is None:
                    return super().date_time_string(timestamp)
                return email.utils.format_datetime(real_now() + date_offset, usegmt=True)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: Any, **kw: Any) -> Server:
        s = Server(*args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def serving_context(home: MeshHome, identity: str, now: dt.datetime | None = None,
                    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
                    lifetime: dt.timedelta = ca.LEAF_LIFETIME) -> ssl.SSLContext:
    issuer, key = signer or home.issuer()
    chain, key_pem = ca.self_issue(identity, issuer, key, now or real_now(), lifetime)
    return tls.server_context(chain, key_pem, home.trust_pem())


def other_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    anchor, akey = ca.new_anchor(real_now())
    return ca.new_issuer(anchor, akey, real_now())


def me() -> dict[str, Any]:
    """pid and start time of a live process (this one) for records that must look alive."""
    return {"pid": os.getpid(), "start": local.start_time(os.getpid())}


def fake_control_plane(home: MeshHome, start: Callable[..., Server], identity_routes: Any = None,
                       identity_ctx: ssl.SSLContext | None = None,
                       date_offset: dt.timedelta | None = None) -> dict[str, Server]:
    ready = {"/ready": (200, b'{"ok": true}\n')}
    ident = start(identity_routes or ready,
                  identity_ctx or serving_context(home, ca.identity_name("identity", "micromesh")),
                  date_offset=date_offset)
    dest = start(ready, serving_context(home, ca.identity_name("destination", "micromesh")))
    write_json(home.controlplane, {name: {"host": "127.0.0.1", "port": srv.port, **me()}
                                   for name, srv in (("identity", ident), ("destination", dest))})
    return {"identity": ident, "destination": dest}


# === micromesh-control-plane ===

def test_control_plane_never_started(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    r = run_check(cp_checks.control_plane_running, ctx_for(home))
    assert r.result == "error" and r.message == f"no control plane was ever started in {home.root}"


def test_control_plane_down(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    write_json(home.controlplane, {"identity": {"host": "127.0.0.1", "port": 1, **me()},
                                   "destination": {"host": "127.0.0.1", "port": 2, "pid": os.getpid(),
                                                   "start": -1}})   # a pid that is not the same process
    r = run_check(cp_checks.control_plane_running, ctx_for(home))
    assert r.result == "error" and r.message == "destination is not running (it listened on 127.0.0.1:2)"


def test_control_plane_ready_and_no_skew(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_control_plane(home, servers)
    ctx = ctx_for(home)
    for fn in (cp_checks.control_plane_running, cp_checks.identity_ready, cp_checks.destination_ready,
               cp_checks.clock_skew):
        assert run_check(fn, ctx).result == "success", fn.__name__


def test_identity_not_ready(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    cp = fake_control_plane(home, servers, identity_routes={"/ready": (503, b"issuer not loaded\n")})
    r = run_check(cp_checks.identity_ready, ctx_for(home))
    assert r.result == "error"
    assert r.message == f"identity at 127.0.0.1:{cp['identity'].port} answered /ready with 503: issuer not loaded"


def test_identity_serving_a_certificate_of_another_ca(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    name = ca.identity_name("identity", "micromesh")
    fake_control_plane(home, servers, identity_ctx=serving_context(home, name, signer=other_ca()))
    r = run_check(cp_checks.identity_ready, ctx_for(home))
    assert r.result == "error"
    assert "its certificate does not verify against the trust anchor" in r.message


def test_identity_with_the_wrong_name(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_control_plane(home, servers, identity_ctx=serving_context(
        home, ca.identity_name("impostor", "micromesh")))
    r = run_check(cp_checks.identity_ready, ctx_for(home))
    assert r.result == "error" and "Hostname mismatch" in r.message


def test_destination_unreachable(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    cp = fake_control_plane(home, servers)
    port = cp["destination"].port
    cp["destination"].close()
    r = run_check(cp_checks.destination_ready, ctx_for(home))
    assert r.result == "error" and r.message == f"destination at 127.0.0.1:{port}: connection refused"


def test_destination_needs_a_client_cert_the_cli_cannot_make(tmp_path: Path,
                                                             servers: Callable[..., Server]) -> None:
    """An expired issuer: the CLI cannot issue itself a client certificate."""
    home = new_home(tmp_path / "h", real_now() - 400 * DAY)
    write_json(home.controlplane, {"destination": {"host": "127.0.0.1", "port": 9, **me()}})
    r = run_check(cp_checks.destination_ready, ctx_for(home))
    assert r.result == "error" and "cannot build the CLI's TLS credentials" in r.message
    assert "issuer certificate has expired" in r.message


def test_destination_silent(tmp_path: Path) -> None:
    """Accepts connections but never answers (a stopped process): a timeout, not a hang."""
    home = new_home(tmp_path / "h", real_now())
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        write_json(home.controlplane, {"destination": {"host": "127.0.0.1", "port": lsock.getsockname()[1], **me()}})
        r = run_check(cp_checks.destination_ready, ctx_for(home, timeout=0.3))
    assert r.result == "error" and r.message.endswith("no answer in time")


def test_clock_skew_against_the_date_header(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_control_plane(home, servers, date_offset=dt.timedelta(seconds=-90))
    r = run_check(cp_checks.clock_skew, ctx_for(home), warning=True)
    assert r.result == "warning"
    assert re.match(r"this clock is 9[01] s ahead of the control plane's", r.message), r.message  # Date: 1 s steps


@pytest.mark.parametrize("offset, date, not_before, result, expect", [
    (0, True, None, "success", ""),
    (4, True, None, "success", ""),
    (-30, True, None, "warning", "this clock is 30 s behind the control plane's"),
    (3600, True, None, "warning", "this clock is 60 minutes ahead of the control plane's"),
    (0, False, None, "success", ""),
    # no Date header: only a clock behind the server's certificate can be seen
    (0, False, -60, "success", ""),
    (0, False, 60, "warning", "this clock is at least 80 s behind the control plane's"),
])
def test_skew(offset: int, date: bool, not_before: int | None, result: str, expect: str) -> None:
    server_now = T0
    local_now = T0 + dt.timedelta(seconds=offset)
    header = email.utils.format_datetime(server_now, usegmt=True) if date else None
    nb = None if not_before is None else T0 + dt.timedelta(seconds=not_before)
    st = cp_checks.skew(local_now, header, nb)
    assert (st.result, st.message[:len(expect)]) == (result, expect)


def test_skew_with_an_unreadable_date() -> None:
    assert cp_checks.skew(T0, "yesterday-ish", None).result == "warning"


# === micromesh-data-plane ===

def fake_proxy(home: MeshHome, start: Callable[..., Server], name: str = "books", *,
               ready: tuple[int, bytes] = (200, b"ready\n"), config: dict[str, Any] | None = None,
               tls_ctx: ssl.SSLContext | None = None, alive: bool = True,
               service_port: int | None = 7002) -> dict[str, Any]:
    identity = ca.identity_name(name, "default")
    cfg = {"version": checks.cli_version(), "identity": identity,
           "destination": {"reachable": True, "registered": True}}
    cfg.update(config or {})
    admin = start({"/ready": ready, "/config": (200, json.dumps(cfg).encode())})
    inbound = start({}, tls_ctx or serving_context(home, identity))
    rec = {"name": name, "namespace": "default", "instance": f"{name}-0001", "identity": identity,
           "supervisor_pid": os.getpid(), "supervisor_start": me()["start"] if alive else -1,
           "admin_port": admin.port, "inbound_port": inbound.port, "service_port": service_port,
           "app_port": service_port}
    home.workloads_dir.mkdir(exist_ok=True)
    write_json(home.workloads_dir / f"{rec['instance']}.json", rec)
    return rec


def data_plane(ctx: checks.CheckContext) -> dict[str, Result]:
    return {c.anchor: health.run_one(c, ctx) for c in checks.PROXY}


def test_data_plane_all_good(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_proxy(home, servers, "books")
    fake_proxy(home, servers, "client", service_port=None, config={"destination": {"reachable": True}})
    results = data_plane(ctx_for(home))
    assert {a: r.result for a, r in results.items()} == {a: "success" for a in results}


def test_data_plane_without_workloads(tmp_path: Path) -> None:
    results = data_plane(ctx_for(new_home(tmp_path / "h", real_now())))
    assert all(r.result == "success" for r in results.values())


def test_proxy_not_ready(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_proxy(home, servers, ready=(503, b"destination not reached yet\n"))
    r = data_plane(ctx_for(home))["mm-data-plane-ready"]
    assert r.result == "error" and r.message == "books-0001: not ready: destination not reached yet"


def test_proxy_whose_supervisor_is_gone(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_proxy(home, servers, alive=False)
    results = data_plane(ctx_for(home))
    r = results["mm-data-plane-ready"]
    assert r.result == "error" and r.message.startswith("books-0001: its supervisor is not running")
    # the other checks skip a proxy they cannot reach (it is reported once, above)
    assert all(r.result == "success" for a, r in results.items() if a != "mm-data-plane-ready")


def test_proxy_admin_port_closed(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    rec = fake_proxy(home, servers)
    rec["admin_port"] = local.free_port()
    write_json(home.workloads_dir / f"{rec['instance']}.json", rec)
    r = data_plane(ctx_for(home))["mm-data-plane-ready"]
    assert r.result == "error"
    assert r.message == f"books-0001: its admin port {rec['admin_port']} does not answer: connection refused"


def test_proxy_certificate_from_another_ca(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    identity = ca.identity_name("books", "default")
    fake_proxy(home, servers, tls_ctx=serving_context(home, identity, signer=other_ca()))
    results = data_plane(ctx_for(home))
    r = results["mm-data-plane-certs-match-ca"]
    assert r.result == "error"
    # every mesh CA has the same names, so OpenSSL finds "our" anchor and the signature fails
    assert r.message == (f"books-0001: its certificate does not verify against the current trust anchor "
                         f"as {identity}: certificate signature failure")
    assert results["mm-data-plane-certs-expiry"].result == "success"   # read unverified


def test_proxy_trusting_other_anchors(tmp_path: Path, servers: Callable[..., Server]) -> None:
    """Its leaf chains, but it verifies its peers with anchors that are not the bundle
    (an anchor rotation that never reached it): Linkerd's "must be restarted"."""
    from microproxy.identity_client import pem_fingerprints
    home = new_home(tmp_path / "h", real_now())
    current = pem_fingerprints(home.trust_pem())
    fake_proxy(home, servers, "books", config={"trust_anchors": current})
    stale = pem_fingerprints(ca.cert_pem(ca.new_anchor(real_now())[0]))
    fake_proxy(home, servers, "authors", config={"trust_anchors": stale})
    r = data_plane(ctx_for(home))["mm-data-plane-certs-match-ca"]
    assert r.result == "error"
    assert r.message == (f"authors-0001: it trusts anchors {stale[0][:16]}, the trust bundle is "
                         f"{current[0][:16]}: it must be restarted or renewed")


def test_proxy_certificate_for_another_identity(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_proxy(home, servers, tls_ctx=serving_context(home, ca.identity_name("authors", "default")))
    r = data_plane(ctx_for(home))["mm-data-plane-certs-match-ca"]
    assert r.result == "error" and "Hostname mismatch" in r.message


def test_proxy_certificate_near_expiry_and_expired(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h", real_now() - 3 * DAY)
    fake_proxy(home, servers)      # a fresh 24 h leaf
    ctx = ctx_for(home, real_now() + dt.timedelta(hours=20))
    r = data_plane(ctx)["mm-data-plane-certs-expiry"]
    assert r.result == "warning"
    assert r.message.startswith("books-0001: its certificate expires on ") and "should have renewed" in r.message
    # a proxy actually serving an expired certificate
    identity = ca.identity_name("old", "default")
    fake_proxy(home, servers, "old", tls_ctx=serving_context(home, identity, now=real_now() - 2 * DAY))
    results = data_plane(ctx_for(home))
    assert results["mm-data-plane-certs-expiry"].result == "error"
    assert "old-0001: its certificate expired on" in results["mm-data-plane-certs-expiry"].message
    assert "old-0001: " in results["mm-data-plane-certs-match-ca"].message
    assert "certificate has expired" in results["mm-data-plane-certs-match-ca"].message


@pytest.mark.parametrize("destination, expect", [
    ({"reachable": False, "registered": False}, "books-0001: it has not reached destination"),
    ({"reachable": True, "registered": False}, "books-0001: it is not registered with destination"),
])
def test_proxy_not_connected_to_the_control_plane(tmp_path: Path, servers: Callable[..., Server],
                                                 destination: dict[str, bool], expect: str) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_proxy(home, servers, config={"destination": destination})
    r = data_plane(ctx_for(home))["mm-data-plane-connected"]
    assert (r.result, r.message) == ("error", expect)


@pytest.mark.parametrize("version, expect", [
    ("0.0.1", "books-0001: it runs 0.0.1, the CLI is {cli}"),
    (None, "books-0001: its /config reports no version (the CLI is {cli})"),
])
def test_proxy_version_differs(tmp_path: Path, servers: Callable[..., Server], version: str | None,
                               expect: str) -> None:
    home = new_home(tmp_path / "h", real_now())
    fake_proxy(home, servers, config={"version": version})
    r = data_plane(ctx_for(home))["mm-data-plane-version"]
    assert r.result == "warning"     # as Linkerd's "data plane and cli versions match"
    assert r.message == expect.format(cli=checks.cli_version())


# === micromesh-pre-install ===

def pre(ctx: checks.CheckContext) -> dict[str, Result]:
    return {c.anchor: health.run_one(c, ctx) for c in checks.PRE}


def test_pre_passes_here(tmp_path: Path) -> None:
    results = pre(ctx_for(MeshHome(tmp_path / "new" / "home"), which=lambda _: "/usr/sbin/iptables"))
    assert {a: r.result for a, r in results.items()} == {a: "success" for a in results}


def test_pre_old_python() -> None:
    r = health.run_one(checks.PRE[0], ctx_for(MeshHome("/nonexistent"), python=(3, 10)))
    assert (r.result, r.message) == ("error", "this is Python 3.10: micromesh needs 3.11 or newer")


def test_pre_missing_package(tmp_path: Path) -> None:
    ctx = ctx_for(MeshHome(tmp_path), modules=("json", "no_such_module_for_mesh_check"))
    r = run_check(pre_checks.packages_importable, ctx)
    assert r.result == "error" and r.message.startswith("cannot import no_such_module_for_mesh_check:")


def test_pre_home_not_writable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    r = run_check(pre_checks.home_writable, ctx_for(MeshHome(tmp_path / "a-file" / "home")))
    assert r.result == "error" and r.message.endswith("a-file is not a directory")


def test_pre_port_taken_by_someone_else(tmp_path: Path, servers: Callable[..., Server]) -> None:
    home = new_home(tmp_path / "h")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        write_json(home.controlplane, {"identity": {"host": "127.0.0.1", "port": port, "pid": None}})
        r = run_check(pre_checks.ports_free, ctx_for(home))
        assert r.result == "warning" and f"identity's port 127.0.0.1:{port} is in use" in r.message
        assert "`mesh up` will move it" in r.message
        fake_proxy(home, servers)   # a live workload was configured with that address
        r = run_check(pre_checks.ports_free, ctx_for(home))
        assert r.result == "error" and "running workloads were configured with it" in r.message


def test_pre_port_held_by_our_own_component_is_fine(tmp_path: Path) -> None:
    home = new_home(tmp_path / "h")
    with socket.socket() as ours:
        ours.bind(("127.0.0.1", 0))
        ours.listen()
        write_json(home.controlplane, {"identity": {"host": "127.0.0.1", "port": ours.getsockname()[1], **me()}})
        assert run_check(pre_checks.ports_free, ctx_for(home)).result == "success"


def test_pre_no_iptables() -> None:
    r = health.run_one(checks.PRE[-1], ctx_for(MeshHome("/x"), which=lambda _: None))
    assert r.result == "warning" and "netns mode" in r.message


# === the runner ===

def fn_returning(status: health.Status) -> Callable[[Any], health.Status]:
    return lambda ctx: status


def crash(ctx: Any) -> health.Status:
    raise KeyError("boom")


def test_runner_fatal_error_stops_the_category_and_its_dependents() -> None:
    seen: list[tuple[str, str, str]] = []
    todo = [
        Check("a", "a1", "h", "x", fn_returning(health.ok())),
        Check("a", "a2", "h", "x", fn_returning(health.error("bad")), fatal=True),
        Check("a", "a3", "h", "x", fn_returning(health.ok())),
        Check("b", "b1", "h", "x", fn_returning(health.ok())),      # depends on a: skipped
        Check("c", "c1", "h", "x", fn_returning(health.ok())),      # depends on b: skipped too
        Check("d", "d1", "h", "x", fn_returning(health.ok())),      # independent: runs
    ]
    ok = health.run(todo, None, lambda r: seen.append((r.category, r.check.description, r.result)),  # type: ignore[arg-type]
                    {"b": ("a",), "c": ("b",)})
    assert ok is False
    assert seen == [("a", "a1", "success"), ("a", "a2", "error"), ("d", "d1", "success")]


def test_runner_non_fatal_error_continues_and_warnings_are_not_failures() -> None:
    collect = health.Collector()
    todo = [
        Check("a", "a1", "h", "x", fn_returning(health.error("bad"))),
        Check("a", "a2", "h", "x", fn_returning(health.warn("meh"))),
        Check("a", "a3", "h", "x", crash),
    ]
    assert health.run(todo, None, collect) is False  # type: ignore[arg-type]
    assert [r.result for r in collect.results] == ["error", "warning", "error"]
    assert collect.results[2].message == "the check itself failed: KeyError: 'boom'"
    warn_only = [Check("a", "w", "h", "x", fn_returning(health.error("soft")), warning=True),
                 Check("a", "v", "h", "x", fn_returning(health.warn("soft")))]
    collect = health.Collector()
    assert health.run(warn_only, None, collect) is True  # type: ignore[arg-type]
    assert [r.result for r in collect.results] == ["warning", "warning"]


def test_every_check_is_declared_with_a_unique_anchor_and_a_hint() -> None:
    every = checks.LOCAL + checks.PROXY + checks.PRE
    assert len({c.anchor for c in every}) == len(every)
    assert all(c.anchor.startswith("mm-") and c.hint and c.description for c in every)
    assert not any(c.fatal and c.warning for c in every)
    assert checks.selected(pre=True) == checks.PRE
    assert checks.selected(proxy=True) == checks.LOCAL + checks.PROXY


# === rendering (golden) ===

def golden_run(tmp_path: Path) -> tuple[list[Result], bool, str]:
    """The local checks on a home whose issuer expires in 45 days, a key file readable by
    the group, and no control plane: a warning, an error and a fatal error."""
    home = new_home(tmp_path / "h")
    os.chmod(home.issuer_key, 0o640)
    collect = health.Collector()
    success = health.run(checks.LOCAL, ctx_for(home, T0 + 320 * DAY), collect, checks.DEPENDS)
    return collect.results, success, str(home.root)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path} (UPDATE_GOLDEN=1 rewrites it)"


def test_text_output_golden(tmp_path: Path) -> None:
    results, success, root = golden_run(tmp_path)
    assert success is False
    assert_golden("check_output.txt", health.render_text(results, success).replace(root, "<home>"))


def test_json_output_golden(tmp_path: Path) -> None:
    results, success, root = golden_run(tmp_path)
    doc = health.to_json(results, success)
    assert set(doc) == {"success", "categories"}
    for cat in doc["categories"]:
        assert set(cat) == {"categoryName", "checks"}
        for c in cat["checks"]:
            assert set(c) == {"description", "hint", "error", "result"}
    assert_golden("check_output.json", json.dumps(doc, indent=2).replace(root, "<home>") + "\n")


def test_text_renderer_all_green() -> None:
    c = Check("micromesh-home", "mesh home exists and is readable", "h", "mm-x", fn_returning(health.ok()))
    assert health.render_text([Result(c, "success")], True) == (
        "micromesh-home\n--------------\n√ mesh home exists and is readable\n\nStatus check results are √\n")
    assert health.render_text([], True) == "Status check results are √\n"


# === the real command on a real mesh ===

@pytest.fixture(scope="module")
def live_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    h = tmp_path_factory.mktemp("check") / "mesh-home"
    mesh(h, "up")
    port = local.free_port()
    mesh(h, "run", "--name", "books", "--port", str(port), "--detach", "--",
         *http_server(port, serve_dir(h.parent, "www", "books")))
    [rec] = json.loads(mesh(h, "ps", "-o", "json").stdout)
    yield h, rec
    mesh(h, "down", check=False)
    sweep(h)


@needs_proxy
def test_e2e_all_green(live_mesh: tuple[Path, dict[str, Any]]) -> None:
    home, _ = live_mesh
    r = mesh(home, "check", "--proxy")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[-1] == "Status check results are √"
    assert not [line for line in lines if line.startswith(("×", "‼"))], r.stdout
    assert sum(line.startswith("√") for line in lines) == len(checks.LOCAL + checks.PROXY)
    doc = json.loads(mesh(home, "check", "--proxy", "-o", "json").stdout)
    assert doc["success"] is True
    assert [c["categoryName"] for c in doc["categories"]] == [
        "micromesh-home", "micromesh-identity", "micromesh-control-plane", "micromesh-data-plane"]


@needs_proxy
def test_e2e_stopped_proxy_fails_the_data_plane(live_mesh: tuple[Path, dict[str, Any]]) -> None:
    home, rec = live_mesh
    os.kill(rec["proxy_pid"], signal.SIGSTOP)
    try:
        r = mesh(home, "check", "--proxy", check=False)
    finally:
        os.kill(rec["proxy_pid"], signal.SIGCONT)
    assert r.returncode == 1
    assert "× data plane proxies are ready" in r.stdout
    assert f"{rec['instance']}: its admin port {rec['admin_port']} does not answer: no answer in time" in r.stdout
    assert "hint: see the proxy's log" in r.stdout and "#mm-data-plane-ready" in r.stdout
    assert r.stdout.rstrip().endswith("Status check results are ×")
    assert mesh(home, "check", "--proxy").returncode == 0     # and green again once it runs


@needs_proxy
def test_e2e_stopped_then_dead_destination(tmp_path: Path) -> None:
    home = tmp_path / "mesh-home"
    try:
        mesh(home, "up")
        pid = json.loads((home / "controlplane.json").read_text())["destination"]["pid"]
        os.kill(pid, signal.SIGSTOP)   # running, but not answering
        try:
            r = mesh(home, "check", check=False)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.returncode == 1
        assert "√ identity is ready\n× destination is ready\n" in r.stdout
        assert "no answer in time" in r.stdout and "#mm-destination-ready" in r.stdout
        assert "no clock skew detected" not in r.stdout       # fatal: the category stops
        os.kill(pid, signal.SIGKILL)
        assert local.wait_for(lambda: True if not local.alive(pid) else None, 5)
        r = mesh(home, "check", "-o", "json", check=False)
        assert r.returncode == 1
        doc = json.loads(r.stdout)
        assert doc["success"] is False
        [failed] = [c for cat in doc["categories"] for c in cat["checks"] if c["result"] == "error"]
        assert failed["description"] == "control plane is running"
        assert failed["error"].startswith("destination is not running")
        assert failed["hint"] == "`mesh up` starts what is not running (#mm-control-plane-running)"
    finally:
        mesh(home, "down", check=False)
        sweep(home)


def test_e2e_no_home_and_pre(tmp_path: Path) -> None:
    r = mesh(tmp_path / "nowhere", "check", check=False)
    assert r.returncode == 1
    assert r.stdout.startswith("micromesh-home\n--------------\n× mesh home exists and is readable\n")
    assert "micromesh-identity" not in r.stdout      # depends on the home
    r = mesh(tmp_path / "nowhere", "check", "--pre", check=False)
    assert r.returncode == 0, r.stdout
    assert "micromesh-pre-install" in r.stdout and "Status check results are √" in r.stdout
    r = mesh(tmp_path / "nowhere", "check", "--pre", "--proxy", check=False)
    assert r.returncode == 2 and "cannot be combined" in r.stderr

