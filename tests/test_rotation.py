"""Issuer and trust-anchor rotation: the file steps (identity/rotation.py), the control-plane
reload, the proxy's adoption of the trust bundle, and `mesh identity rotate-issuer` /
`rotate-anchor` end to end under steady traffic with zero failed requests.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from cli import local
from identity import ca, rotation, tokens
from identity.server import Certifier, handler
from identity.store import MeshHome
from microproxy import ctlhttp, identity_client, tls
from microproxy.config import Config
from tests.test_cli_local import mesh as run_mesh
from tests.test_cli_local import sweep
from tests.test_renewal_e2e import Traffic

pytestmark = pytest.mark.timeout(180)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
HOST = "127.0.0.1"


def make_home(tmp_path: Path) -> MeshHome:
    home = MeshHome(tmp_path / "home")
    home.ensure_ca(dt.datetime.now(dt.timezone.utc))
    return home


def anchors(home: MeshHome) -> list[x509.Certificate]:
    return ca.load_certs(home.trust_pem())


def fp(cert: x509.Certificate) -> str:
    return rotation.cert_fingerprint(cert)


# === the file steps ===

def test_a_new_home_has_a_bundle_holding_its_anchor(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    assert home.bundle_crt.read_bytes() == home.anchor_crt.read_bytes()
    assert home.trust_file() == home.bundle_crt
    assert rotation.rotation_in_progress(home) is None
    home.bundle_crt.unlink()   # a home from before bundles: the anchor is the trust
    assert home.trust_pem() == home.anchor_crt.read_bytes()


def test_rotate_issuer_signs_with_the_anchor_and_resumes_until_confirmed(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    old_issuer = home.issuer()[0]
    state = rotation.rotate_issuer(home, T0)
    issuer = home.issuer()[0]
    assert fp(issuer) == state["issuer"] != fp(old_issuer)
    assert rotation.signed_by(issuer, anchors(home)[0])
    assert "issuer rotation" in (rotation.rotation_in_progress(home) or "")
    assert rotation.rotate_issuer(home, T0)["issuer"] == state["issuer"]   # resumed, not redone
    rotation.confirm(home)
    assert rotation.rotation_in_progress(home) is None
    assert rotation.rotate_issuer(home, T0)["issuer"] != state["issuer"]   # a new rotation


def test_anchor_rotation_phases_in_order(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    old = anchors(home)[0]
    with pytest.raises(rotation.RotationError, match="due for phase 'add'"):
        rotation.anchor_phase(home, "reissue", T0)

    st = rotation.anchor_phase(home, "add", T0)
    both = anchors(home)
    assert [fp(a) for a in both] == [fp(old), st["new_anchor"]]
    assert both[0].subject != both[1].subject, "the anchors need distinct names for chain building"
    assert rotation.load_material(home).issuer_fingerprint == fp(home.issuer()[0])  # still the old issuer
    assert "phase 'add' started" in (rotation.rotation_in_progress(home) or "")
    assert rotation.anchor_phase(home, "add", T0) == st                          # idempotent until confirmed
    assert anchors(home) == both
    with pytest.raises(rotation.RotationError, match="due for phase 'add'"):
        rotation.anchor_phase(home, "reissue", T0)
    with pytest.raises(rotation.RotationError, match="finish it first"):
        rotation.rotate_issuer(home, T0)
    rotation.confirm(home)
    assert "phase 'add' done" in (rotation.rotation_in_progress(home) or "")

    st = rotation.anchor_phase(home, "reissue", T0)
    issuer = home.issuer()[0]
    assert rotation.signed_by(issuer, both[1]) and not rotation.signed_by(issuer, old)
    assert rotation.expected(home) == rotation.Expected(fp(issuer), (fp(old), fp(both[1])))
    with pytest.raises(rotation.RotationError):
        rotation.anchor_phase(home, "remove", T0)
    rotation.confirm(home)

    rotation.anchor_phase(home, "remove", T0)
    assert [fp(a) for a in anchors(home)] == [fp(both[1])]
    assert fp(ca.load_certs(home.anchor_crt.read_bytes())[0]) == fp(both[1])
    assert ca.load_key(home.anchor_key.read_bytes()).public_key().public_numbers() == \
        both[1].public_key().public_numbers()  # type: ignore[union-attr]
    assert not any(p.exists() for p in rotation.next_anchor_paths(home))
    assert rotation.rotation_in_progress(home) is not None
    rotation.confirm(home)
    assert rotation.rotation_in_progress(home) is None
    assert rotation.next_anchor_phase(rotation.read_state(home)) == "add"   # a next rotation may start
    rotation.rotate_issuer(home, T0)                                        # and issuers rotate again
    assert rotation.signed_by(home.issuer()[0], both[1])


def test_load_material_refuses_what_does_not_fit(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    rotation.load_material(home)
    other, okey = ca.new_anchor(T0, unit="other")
    stray_issuer, stray_key = ca.new_issuer(other, okey, T0)
    good_crt = home.issuer_crt.read_bytes()
    home.issuer_key.write_bytes(ca.key_pem(stray_key))           # half-written: new key, old cert
    with pytest.raises(ValueError, match="does not belong"):
        rotation.load_material(home)
    home.issuer_crt.write_bytes(ca.cert_pem(stray_issuer))       # both new, but from an unknown anchor
    with pytest.raises(ValueError, match="not signed by any anchor"):
        rotation.load_material(home)
    home.write_bundle(home.anchor_crt.read_bytes() + ca.cert_pem(other))
    assert rotation.load_material(home).issuer_fingerprint == fp(stray_issuer)
    assert good_crt != home.issuer_crt.read_bytes()


def test_a_stray_bundle_is_reported(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    other, _ = ca.new_anchor(T0, unit="other")
    home.write_bundle(home.anchor_crt.read_bytes() + ca.cert_pem(other))
    assert "holds 2 anchors" in (rotation.rotation_in_progress(home) or "")


def test_cli_rotates_an_offline_home_and_refuses_phases_out_of_order(tmp_path: Path) -> None:
    """No control plane and no workloads: nothing to push, the file steps still run."""
    from click.testing import CliRunner

    from cli.main import cli
    home = make_home(tmp_path)
    old = fp(anchors(home)[0])
    runner = CliRunner()
    r = runner.invoke(cli, ["--home", str(home.root), "identity", "rotate-anchor", "--phase", "reissue"])
    assert r.exit_code == 1 and "due for phase 'add'" in r.output, r.output
    r = runner.invoke(cli, ["--home", str(home.root), "identity", "rotate-anchor", "--phase", "add"])
    assert r.exit_code == 0 and "next: mesh identity rotate-anchor --phase reissue" in r.output, r.output
    r = runner.invoke(cli, ["--home", str(home.root), "identity", "rotate-anchor"])   # the rest
    assert r.exit_code == 0, r.output
    assert "phase reissue" in r.output and "phase remove" in r.output and "rotation complete" in r.output
    assert [fp(a) for a in anchors(home)] != [old] and len(anchors(home)) == 1
    r = runner.invoke(cli, ["--home", str(home.root), "identity", "rotate-issuer"])
    assert r.exit_code == 0 and "done: 0 proxies renewed" in r.output, r.output
    r = runner.invoke(cli, ["--home", str(home.root), "identity", "nosuch"])
    assert r.exit_code == 1 and "no running workload" in r.output, r.output


# === the proxy side: fingerprints, in-memory verification ===

def test_fingerprints_and_in_memory_verification(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    issuer, ikey = home.issuer()
    name = ca.identity_name("books", "default")
    chain, key = ca.self_issue(name, issuer, ikey, dt.datetime.now(dt.timezone.utc))
    trust = home.trust_pem()
    assert identity_client.pem_fingerprints(trust) == [fp(anchors(home)[0])]
    assert identity_client.pem_fingerprints(chain)[1] == fp(issuer)
    identity_client.verify_with(trust, chain, key, name)           # accepted by its own mesh
    other, _ = ca.new_anchor(T0, unit="other")
    with pytest.raises(ssl.SSLError):
        identity_client.verify_with(ca.cert_pem(other), chain, key, name)
    with pytest.raises(ssl.SSLError):                               # the name is checked too
        identity_client.verify_with(trust, chain, key, ca.identity_name("billing", "default"))
    assert identity_client.describe_creds(None) == {"trust_anchors": [], "certificate": None}


# === identity and destination reload; the proxy adopts the bundle ===

def served(port: int, name: str, trust: bytes, chain: bytes | None = None,
           key: bytes | None = None) -> x509.Certificate:
    ctx = tls.client_context(trust, chain, key)
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as s:
        der = s.getpeercert(binary_form=True)
        if chain is not None:   # TLS 1.3: the server judges our certificate after the handshake
            s.settimeout(0.3)
            try:
                if s.recv(1) == b"":
                    raise ssl.SSLError("closed by the server")
            except TimeoutError:
                pass
    assert der
    return x509.load_der_x509_certificate(der)


def proxy_config(home: MeshHome, port: int, trust: bytes | None = None) -> Config:
    return Config(identity_addr=(HOST, port), destination_addr=(HOST, 1),
                  trust_pem=trust if trust is not None else home.trust_pem(),
                  token=tokens.mint(home.secret(), "default", "books", time.time()),
                  workload="books", service_account="books",
                  identity_name=ca.identity_name("identity", "micromesh"))


def test_identity_reloads_and_the_proxy_adopts_only_a_bundle_that_verifies(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    name = ca.identity_name("identity", "micromesh")

    async def main() -> None:
        issuer, ikey = home.issuer()
        certifier = Certifier(home.secret(), issuer, ikey)
        reloader = rotation.Reloader(home, name, certifier=certifier)
        server = await ctlhttp.serve(handler(certifier, rotation.utcnow), HOST, 0, ssl=reloader.context)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            client = identity_client.IdentityClient(proxy_config(home, port), time.time)
            creds = await client.certify()
            assert identity_client.describe_creds(creds)["trust_anchors"] == [fp(anchors(home)[0])]

            # anchor phase add: identity sends old + new; the proxy adopts it
            rotation.anchor_phase(home, "add", rotation.utcnow())
            creds = await client.certify()
            assert len(identity_client.pem_fingerprints(creds.trust_pem)) == 2
            assert reloader.reloads == 1
            rotation.confirm(home)

            # reissue: identity serves (and signs) from the new issuer at once
            rotation.anchor_phase(home, "reissue", rotation.utcnow())
            leaf = await loop.run_in_executor(None, served, port, name, home.trust_pem())
            assert rotation.signed_by(leaf, home.issuer()[0])
            creds = await client.certify()
            assert identity_client.describe_creds(creds)["certificate"]["issuer_fingerprint"] == \
                fp(home.issuer()[0])
            rotation.confirm(home)

            # a bundle that would not verify the proxy's own new leaf is not adopted
            before = creds.trust_pem
            certifier.trust_bundle = ca.cert_pem(ca.new_anchor(T0, unit="bogus")[0])
            reloader.check = lambda: False   # type: ignore[method-assign]  # keep the bogus bundle
            certifier.refresh = None
            creds = await client.certify()
            assert creds.trust_pem == before
        finally:
            server.close()

    asyncio.run(main())


def test_destination_style_reloader_drops_the_old_anchor_for_client_certificates(tmp_path: Path) -> None:
    """require_client_cert=True (destination): after the anchor is removed, a client
    certificate chaining to it is refused; one from the new issuer is accepted."""
    home = make_home(tmp_path)
    name = ca.identity_name("destination", "micromesh")
    me = ca.identity_name("books", "default")
    now = rotation.utcnow()
    old_chain, old_key = ca.self_issue(me, *home.issuer(), now)
    old_trust = home.trust_pem()

    async def main() -> None:
        reloader = rotation.Reloader(home, name, require_client_cert=True)

        async def ok(req: ctlhttp.Request) -> ctlhttp.Response:
            return ctlhttp.Response.json({"peer": req.peer_identity})

        server = await ctlhttp.serve(ok, HOST, 0, ssl=reloader.context)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()

        def probe(chain: bytes, key: bytes) -> x509.Certificate:
            return served(port, name, home.trust_pem(), chain, key)

        try:
            await loop.run_in_executor(None, probe, old_chain, old_key)
            for phase in rotation.PHASES:
                rotation.anchor_phase(home, phase, rotation.utcnow())
                rotation.confirm(home)
            new_chain, new_key = ca.self_issue(me, *home.issuer(), rotation.utcnow())
            leaf = await loop.run_in_executor(None, probe, new_chain, new_key)
            assert rotation.signed_by(leaf, home.issuer()[0])
            with pytest.raises((ssl.SSLError, OSError)):
                await loop.run_in_executor(None, probe, old_chain, old_key)
            with pytest.raises(ssl.SSLError):   # and a peer with only the old anchor cannot verify it
                await loop.run_in_executor(None, served, port, name, old_trust)
        finally:
            server.close()

    asyncio.run(main())


# === end to end: `mesh identity` under steady traffic ===

ECHO_APP = """
import asyncio, os
async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    server = await asyncio.start_server(echo, '127.0.0.1', int(os.environ['PORT']))
    await server.serve_forever()
asyncio.run(main())
"""


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "mesh-home"
    run_mesh(home, "up")
    yield home
    run_mesh(home, "down", check=False)
    sweep(home)


def proxies(home: Path) -> list[dict[str, Any]]:
    return [r for r in local.list_workloads(MeshHome(home), probe=False) if r["alive"]]


def config_of(rec: dict[str, Any]) -> Any:
    conn = http.client.HTTPConnection(HOST, rec["admin_port"], timeout=5)
    try:
        conn.request("GET", "/config")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_rotations_under_steady_traffic_fail_no_request(up: Path, tmp_path: Path) -> None:
    home = MeshHome(up)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "id").write_text("books\n")
    books_port, echo_port = local.free_port(), local.free_port()
    run_mesh(up, "run", "--name", "books", "--port", str(books_port), "--detach", "--",
             sys.executable, "-m", "http.server", str(books_port), "--bind", HOST,
             "--directory", str(tmp_path / "www"))
    run_mesh(up, "run", "--name", "echo", "--port", str(echo_port), "--detach", "--",
             sys.executable, "-c", ECHO_APP)
    run_mesh(up, "run", "--name", "client", "--detach", "--", "sleep", "3600")
    recs = {r["name"]: r for r in proxies(up)}
    old_anchor = home.anchor_crt.read_bytes()
    old_issuer, old_issuer_key = home.issuer()
    me = ca.identity_name("payment", "default")
    old_chain, old_key = ca.self_issue(me, old_issuer, old_issuer_key, rotation.utcnow())

    shown = run_mesh(up, "identity", "books")
    assert "subject     CN=books.default.serviceaccount.identity.cluster.local" in shown.stdout
    assert "URI:spiffe://cluster.local/ns/default/sa/books" in shown.stdout

    timings: dict[str, float] = {}
    with Traffic(recs["client"]["outbound_port"], f"books.default:{books_port}",
                 f"echo.default:{echo_port}", path="/id") as traffic:
        traffic.wait_for_more(30)
        t, ok_before = time.monotonic(), traffic.ok
        r = run_mesh(up, "identity", "rotate-issuer")
        timings["rotate-issuer"] = time.monotonic() - t
        assert traffic.ok > ok_before, "no traffic while rotating"
        assert "done: 3 proxies renewed" in r.stdout, r.stdout
        issuer = home.issuer()[0]
        assert fp(issuer) != fp(old_issuer)
        for rec in proxies(up):
            assert config_of(rec)["certificate"]["issuer_fingerprint"] == fp(issuer)
        traffic.wait_for_more(30)
        for phase in ("add", "reissue", "remove"):
            t, ok_before = time.monotonic(), traffic.ok
            r = run_mesh(up, "identity", "rotate-anchor", "--phase", phase)
            timings[phase] = time.monotonic() - t
            assert traffic.ok > ok_before, f"no traffic during phase {phase}"
            assert "done: 3 proxies renewed" in r.stdout, r.stdout
            exp = rotation.expected(home)
            for rec in proxies(up):
                cfg = config_of(rec)
                assert tuple(cfg["trust_anchors"]) == exp.anchors, (phase, rec["instance"])
                assert cfg["certificate"]["issuer_fingerprint"] == exp.issuer, (phase, rec["instance"])
            if phase != "remove":   # `mesh check` would warn now
                assert "half done" in (rotation.rotation_in_progress(home) or "")
                assert f"next: mesh identity rotate-anchor --phase" in r.stdout
            else:
                assert "rotation complete" in r.stdout
            traffic.wait_for_more(30)   # traffic flows between the phases too
    assert traffic.failures == [], traffic.failures[:10]
    assert traffic.ok > 150 and traffic.tunnels > 30, (traffic.ok, traffic.tunnels)
    print(f"\nrotation timings (s): {timings}; requests ok {traffic.ok}, tunnels {traffic.tunnels}")
    assert rotation.rotation_in_progress(home) is None

    # afterwards the old anchor is gone from every proxy's trust ...
    old_fp = identity_client.pem_fingerprints(old_anchor)[0]
    new_fp = identity_client.pem_fingerprints(home.anchor_crt.read_bytes())[0]
    assert new_fp != old_fp
    for rec in proxies(up):
        assert config_of(rec)["trust_anchors"] == [new_fp]
    shown = json.loads(run_mesh(up, "identity", "-o", "json").stdout)
    assert {row["workload"] for row in shown} == {"books", "echo", "client"}
    assert all(row["trust_anchors"] == [new_fp] for row in shown)

    # ... and a peer holding only the old anchor can no longer connect:
    books_in, books_id = recs["books"]["inbound_port"], recs["books"]["identity"]
    with pytest.raises(ssl.SSLCertVerificationError):          # it cannot verify the proxies
        served(books_in, books_id, old_anchor)
    with pytest.raises((ssl.SSLError, OSError)):               # the proxies refuse its certificate
        served(books_in, books_id, home.trust_pem(), old_chain, old_key)
    served(books_in, books_id, home.trust_pem())               # (the new trust works)
    stale = start_proxy_with_trust(home, old_anchor, tmp_path)
    try:
        log = tmp_path / "stale-proxy.log"
        local.wait_for(lambda: True if "CERTIFICATE_VERIFY_FAILED" in log.read_text() else None, 15)
        assert "CERTIFICATE_VERIFY_FAILED" in log.read_text(), log.read_text()[-2000:]
        assert stale.poll() is None
        ports = json.loads((tmp_path / "stale.ports.json").read_text()) \
            if (tmp_path / "stale.ports.json").exists() else {}
        assert "inbound" not in ports, "a proxy with only the old anchor got certified"
    finally:
        stale.terminate()
        stale.wait(10)


def start_proxy_with_trust(home: MeshHome, trust: bytes, tmp: Path) -> subprocess.Popen[bytes]:
    comps = local.require_up(home)
    (tmp / "stale-trust.crt").write_bytes(trust)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MESH_") and k.lower() not in ("http_proxy", "https_proxy")}
    env.update({
        "MESH_IDENTITY_ADDR": comps["identity"].addr, "MESH_DESTINATION_ADDR": comps["destination"].addr,
        "MESH_TRUST_ANCHORS_FILE": str(tmp / "stale-trust.crt"),
        "MESH_TOKEN": tokens.mint(home.secret(), "default", "stale", time.time()),
        "MESH_WORKLOAD": "stale", "MESH_OUTBOUND_ADDR": f"{HOST}:0", "MESH_INBOUND_ADDR": f"{HOST}:0",
        "MESH_ADMIN_ADDR": f"{HOST}:0", "MESH_PORTS_FILE": str(tmp / "stale.ports.json"),
        "MESH_LOG_LEVEL": "info", "MESH_HOME": str(home.root),
    })
    with open(tmp / "stale-proxy.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "microproxy"], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(Path(__file__).parents[1]))
