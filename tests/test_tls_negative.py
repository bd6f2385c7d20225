"""TLS negatives: every certificate and protocol a mesh peer must refuse, against real proxies.

Two directions:

- **inbound** (the proxy as TLS server): a client presents a bad certificate to the books
  proxy's inbound port; the request must fail (in TLS 1.3 the client's handshake completes
  before the server has checked the client's certificate, so the failure shows as an alert
  on the first read; the proxy counts it in ``inbound_tls_handshake_errors_total``).
- **outbound** (the proxy as TLS client): destination announces an endpoint whose server
  presents a bad certificate (or the wrong identity); the client proxy's request must
  answer 502 with the proxy-error header. A good endpoint set up the same way answers 200,
  so each 502 is the certificate's doing.

Plus protocol: TLS 1.0-1.2 and non-AEAD suites refused, renegotiation impossible, and a
sslyze scan that finds TLS 1.3 only. Bad certificates are built with identity/ca.py and
cryptography directly (the test holds the mesh's issuer key, as the CA owner would).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity import ca
from microproxy import ctlhttp, tls
from tests.harness import (HOST, AppProc, Conn, Mesh, ProxyProc, admin_get, identity_of, metric_sum,
                           wait_until)

pytestmark = [pytest.mark.timeout(120),
              # the TLS 1.0/1.1 probes name deprecated versions on purpose
              pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")]

NOW = dt.datetime.now(dt.timezone.utc)
HOUR = dt.timedelta(hours=1)


# === certificates ===

def leaf(identity: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
         not_before: dt.datetime, not_after: dt.datetime,
         sans: list[str] | None = None) -> tuple[bytes, bytes]:
    """A mesh-shaped leaf (chain PEM, key PEM) with any validity window and SANs."""
    key = ca.new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in (sans or [identity])]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return ca.cert_pem(cert) + ca.cert_pem(issuer), ca.key_pem(key)


def foreign_pki(unit: str) -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Another CA with the mesh's names: (anchor, issuer, issuer key)."""
    anchor, akey = ca.new_anchor(NOW, unit=unit)
    issuer, ikey = ca.new_issuer(anchor, akey, NOW)
    return anchor, issuer, ikey


# === a TLS endpoint destination can announce ===

class FakeEndpoint:
    """A TLS server presenting a given certificate; answers every request 200 "fake"."""

    def __init__(self, chain: bytes, key: bytes, trust: bytes) -> None:
        self.ctx = tls.server_context(chain, key, trust)
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                self.handshakes += 1
                buf = b""
                while True:
                    data = s.recv(65536)
                    if not data:
                        return
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfake")
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.sock.close()


# === the mesh ===

@dataclass
class Neg:
    mesh: Mesh
    app: AppProc
    books: ProxyProc
    client: ProxyProc
    extra_anchor: x509.Certificate
    extra_issuer: x509.Certificate
    extra_key: ec.EllipticCurvePrivateKey
    services: int = 0

    @property
    def trust(self) -> bytes:
        return self.mesh.home.trust_pem()

    def issuer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return self.mesh.home.issuer()

    def register(self, svc: str, port: int, identity: str | None = None) -> str:
        """Announce 127.0.0.1:port as the only endpoint of ``svc.default`` with ``identity``
        (default: the service's own), proving that identity to destination as its owner would.
        Returns the authority to request."""
        ident = identity or identity_of(svc)
        sa = ident.split(".", 1)[0]
        issuer, ikey = self.issuer()
        chain, key = ca.self_issue(ident, issuer, ikey, NOW)
        body = {"name": svc, "namespace": "default", "identity": ident, "service_account": sa,
                "address": f"{HOST}:{port}", "app_port": port, "service_port": port,
                "instance": f"{svc}-fake"}

        async def go() -> Any:
            client = ctlhttp.Client(HOST, self.mesh.destination_port,
                                    ssl=tls.client_context(self.trust, chain, key),
                                    server_hostname=ca.identity_name("destination", "micromesh"),
                                    timeout=5.0)
            try:
                return await client.json("POST", "/v1/register", body)
            finally:
                await client.close()

        asyncio.run(go())
        return f"{svc}.default:{port}"

    def via_client(self, authority: str) -> tuple[int, str, bytes]:
        """GET through the client proxy: (status, proxy-error header, body)."""
        with Conn(self.client.outbound) as c:
            r = c.request("GET", f"http://{authority}/", {"host": authority})
        return r.status, r.headers.get("x-mesh-proxy-error"), r.body

    def endpoint_status(self, svc: str, chain: bytes, key: bytes,
                        identity: str | None = None) -> tuple[int, str, bytes]:
        """Serve ``chain`` as ``svc``'s endpoint (announced with ``identity``) and request it
        through the client proxy."""
        ep = FakeEndpoint(chain, key, self.trust)
        try:
            authority = self.register(svc, ep.port, identity)
            return self.via_client(authority)
        finally:
            ep.close()


@pytest.fixture(scope="module")
def neg() -> Iterator[Neg]:
    mesh = Mesh.create()
    try:
        # One more anchor in the bundle (with its own issuer), rotated out by a test below.
        extra_anchor, extra_issuer, extra_key = foreign_pki("extra")
        home = mesh.home
        home.write_bundle(home.anchor_crt.read_bytes() + ca.cert_pem(extra_anchor))
        mesh.start_controlplane()
        app = mesh.start_app()
        trust_file = str(home.bundle_crt)
        books = mesh.start_proxy("books", app_port=app.http, wait=False, MESH_TRUST_ANCHORS_FILE=trust_file)
        client = mesh.start_proxy("client", wait=False, MESH_FAILFAST_TIMEOUT="1",
                                  MESH_TRUST_ANCHORS_FILE=trust_file)
        books.wait_ready()
        client.wait_ready()
        yield Neg(mesh, app, books, client, extra_anchor, extra_issuer, extra_key)
        tracebacks = mesh.logs_with("Traceback")
        assert not tracebacks, f"tracebacks in {tracebacks}"
    finally:
        mesh.close()
        mesh.remove()


# === inbound: what a client presents ===

def inbound_attempt(neg: Neg, chain: bytes | None = None, key: bytes | None = None,
                    ctx: ssl.SSLContext | None = None,
                    headers: dict[str, str] | None = None) -> tuple[str, Any]:
    """One request to the books proxy's inbound port over TLS.
    Returns ("handshake", error), ("request", error) or ("ok", response JSON)."""
    ctx = ctx or tls.client_context(neg.trust, chain, key)
    authority = f"books.default:{neg.app.http}"
    raw = socket.create_connection((HOST, neg.books.inbound), timeout=5)
    try:
        try:
            s = ctx.wrap_socket(raw, server_hostname=neg.books.identity)
        except (ssl.SSLError, OSError) as e:
            return "handshake", e
        try:
            hdrs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            s.sendall(f"GET /whoami HTTP/1.1\r\nhost: {authority}\r\n{hdrs}connection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ssl.SSLError, OSError) as e:
            return "request", e
        finally:
            s.close()
    finally:
        raw.close()
    if not data:
        return "request", EOFError("closed without a response")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return "ok", json.loads(body)


def handshake_errors(neg: Neg) -> float:
    return metric_sum(neg.books.metrics(), "inbound_tls_handshake_errors_total")


def refusals(neg: Neg) -> list[str]:
    return [line for line in neg.books.log_text().splitlines() if "inbound connection failed" in line]


def assert_refused(neg: Neg, chain: bytes, key: bytes, reason: str) -> None:
    """The request fails, and the proxy logged the handshake failure for ``reason``
    (OpenSSL's verify error; the client only sees the connection close)."""
    before, seen = handshake_errors(neg), len(refusals(neg))
    kind, detail = inbound_attempt(neg, chain, key)
    assert kind in ("handshake", "request"), f"{reason}: accepted: {detail}"
    wait_until(lambda: handshake_errors(neg) > before and len(refusals(neg)) > seen, 5,
               "the proxy to log and count the failed handshake")
    new = refusals(neg)[seen:]
    assert any(reason in line for line in new), new


def test_control_a_valid_client_certificate_is_accepted_with_its_identity(neg: Neg) -> None:
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("payment"), issuer, ikey, NOW - HOUR, NOW + HOUR)
    kind, seen = inbound_attempt(neg, chain, key)
    assert kind == "ok", seen
    assert seen["headers"]["x-mesh-client-id"] == [identity_of("payment")]


def test_expired_client_certificate_is_refused(neg: Neg) -> None:
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("payment"), issuer, ikey, NOW - 2 * HOUR, NOW - HOUR)
    assert_refused(neg, chain, key, "certificate has expired")


def test_not_yet_valid_client_certificate_is_refused(neg: Neg) -> None:
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("payment"), issuer, ikey, NOW + HOUR, NOW + 2 * HOUR)
    assert_refused(neg, chain, key, "certificate is not yet valid")


def test_client_certificate_from_an_unknown_ca_is_refused(neg: Neg) -> None:
    _, issuer, ikey = foreign_pki("unknown")
    chain, key = leaf(identity_of("payment"), issuer, ikey, NOW - HOUR, NOW + HOUR)
    assert_refused(neg, chain, key, "unable to get local issuer certificate")


def test_client_without_certificate_is_accepted_but_has_no_identity(neg: Neg) -> None:
    """TLS lets it in (as Linkerd does); it carries no identity, and a forged identity
    header is dropped, so policy sees an unauthenticated client."""
    before = neg.books.metrics()
    kind, seen = inbound_attempt(neg, headers={"x-mesh-client-id": identity_of("payment")})
    assert kind == "ok", seen
    assert "x-mesh-client-id" not in seen["headers"], seen["headers"]
    after = neg.books.metrics()
    name = "request_total"
    labels = {"direction": "inbound", "tls": "true", "client_id": ""}
    assert metric_sum(after, name, **labels) == metric_sum(before, name, **labels) + 1


def test_server_refuses_tls_1_2_and_below(neg: Neg) -> None:
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer what OpenSSL 3 disables
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
        kind, detail = inbound_attempt(neg, ctx=ctx)
        assert kind == "handshake", f"{version.name}: {detail}"


def test_server_refuses_non_aead_suites(neg: Neg) -> None:
    """CBC, NULL and RC4 suites exist only below TLS 1.3, which is refused; TLS 1.3's own
    suites are all AEAD (the sslyze scan below lists the accepted ones)."""
    for suites in ("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384", "eNULL:NULL", "RC4"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            ctx.set_ciphers(suites + ":@SECLEVEL=0")
        except ssl.SSLError:
            continue  # this OpenSSL cannot even offer them
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        kind, detail = inbound_attempt(neg, ctx=ctx)
        assert kind == "handshake", f"{suites}: {detail}"


def test_renegotiation_is_impossible(neg: Neg) -> None:
    """TLS 1.3 has no renegotiation: OpenSSL refuses to start one on the connection."""
    from OpenSSL import SSL
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_NONE)
    sock = socket.create_connection((HOST, neg.books.inbound), timeout=5)
    sock.setblocking(True)  # pyOpenSSL drives the file descriptor itself
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(neg.books.identity.encode())
    conn.set_connect_state()
    try:
        conn.do_handshake()
        assert conn.get_protocol_version_name() == "TLSv1.3"
        with pytest.raises(SSL.Error):
            conn.renegotiate()
    finally:
        sock.close()


def test_rotated_out_anchor_is_refused(neg: Neg) -> None:
    """A certificate from an anchor the proxy trusted is refused once that anchor has left
    the bundle and the proxy renewed (it adopts the bundle identity sends)."""
    chain, key = leaf(identity_of("payment"), neg.extra_issuer, neg.extra_key, NOW - HOUR, NOW + HOUR)
    kind, seen = inbound_attempt(neg, chain, key)
    assert kind == "ok", f"the extra anchor should be trusted before the rotation: {seen}"
    home = neg.mesh.home
    home.write_bundle(home.anchor_crt.read_bytes())
    assert admin_get(neg.books.admin, "/renew")[0] == 405          # POST only
    conn_status, body = _post(neg.books.admin, "/renew")
    assert conn_status == 200, body
    assert len(body["trust_anchors"]) == 1
    assert_refused(neg, chain, key, "unable to get local issuer certificate")


def _post(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=20)
    try:
        conn.request("POST", path, body=b"")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# === outbound: what a server presents to the client proxy ===

def test_control_a_valid_endpoint_answers(neg: Neg) -> None:
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("good"), issuer, ikey, NOW - HOUR, NOW + HOUR)
    status, err, body = neg.endpoint_status("good", chain, key)
    assert (status, body) == (200, b"fake"), err


def test_wrong_identity_for_the_endpoint_fails_with_502(neg: Neg) -> None:
    """Destination says the endpoint is `impostor`; it presents books' certificate."""
    authority = neg.register("impostor", neg.books.inbound)
    status, err, _ = neg.via_client(authority)
    assert status == 502 and err, (status, err)


def test_expired_server_certificate_fails_with_502(neg: Neg) -> None:
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("stale"), issuer, ikey, NOW - 2 * HOUR, NOW - HOUR)
    status, err, _ = neg.endpoint_status("stale", chain, key)
    assert status == 502 and err, (status, err)


def test_not_yet_valid_server_certificate_fails_with_502(neg: Neg) -> None:
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("early"), issuer, ikey, NOW + HOUR, NOW + 2 * HOUR)
    status, err, _ = neg.endpoint_status("early", chain, key)
    assert status == 502 and err, (status, err)


def test_server_certificate_from_an_unknown_ca_fails_with_502(neg: Neg) -> None:
    _, issuer, ikey = foreign_pki("unknown")
    chain, key = leaf(identity_of("alien"), issuer, ikey, NOW - HOUR, NOW + HOUR)
    status, err, _ = neg.endpoint_status("alien", chain, key)
    assert status == 502 and err, (status, err)


def test_server_certificate_with_an_extra_san_for_another_name_fails_with_502(neg: Neg) -> None:
    """The leaf names some other identity; the one destination announced is not in it."""
    issuer, ikey = neg.issuer()
    chain, key = leaf(identity_of("other"), issuer, ikey, NOW - HOUR, NOW + HOUR,
                      sans=[identity_of("other"), "books.default.svc.cluster.local"])
    status, err, _ = neg.endpoint_status("named", chain, key)
    assert status == 502 and err, (status, err)


# === a scanner's view ===

def test_sslyze_finds_only_tls_1_3_with_aead_suites(neg: Neg) -> None:
    sslyze = pytest.importorskip("sslyze")
    loc = sslyze.ServerNetworkLocation(hostname=neg.books.identity, port=neg.books.inbound, ip_address=HOST)
    cmd = sslyze.ScanCommand
    commands = {cmd.SSL_2_0_CIPHER_SUITES, cmd.SSL_3_0_CIPHER_SUITES, cmd.TLS_1_0_CIPHER_SUITES,
                cmd.TLS_1_1_CIPHER_SUITES, cmd.TLS_1_2_CIPHER_SUITES, cmd.TLS_1_3_CIPHER_SUITES,
                cmd.SESSION_RENEGOTIATION, cmd.TLS_COMPRESSION}
    scanner = sslyze.Scanner(per_server_concurrent_connections_limit=10)
    started = time.monotonic()
    scanner.queue_scans([sslyze.ServerScanRequest(server_location=loc, scan_commands=commands)])
    [result] = list(scanner.get_results())
    assert result.connectivity_status == sslyze.ServerConnectivityStatusEnum.COMPLETED, \
        result.connectivity_error_trace
    res = result.scan_result
    assert res is not None

    def accepted(name: str) -> list[str]:
        attempt = getattr(res, name)
        assert attempt.status == sslyze.ScanCommandAttemptStatusEnum.COMPLETED, attempt.error_trace
        return [s.cipher_suite.name for s in attempt.result.accepted_cipher_suites]

    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2"):
        assert accepted(f"{old}_cipher_suites") == [], old
    tls13 = accepted("tls_1_3_cipher_suites")
    assert tls13, "TLS 1.3 must be offered"
    assert set(tls13) <= {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                          "TLS_CHACHA20_POLY1305_SHA256"}, tls13
    reneg = res.session_renegotiation
    assert reneg.status == sslyze.ScanCommandAttemptStatusEnum.COMPLETED
    assert reneg.result.client_renegotiations_success_count == 0
    assert not reneg.result.is_vulnerable_to_client_renegotiation_dos
    assert res.tls_compression.result.supports_compression is False
    assert time.monotonic() - started < 30
