"""End to end: real `python -m identity` / `python -m destination` processes on loopback,
spoken to over real HTTPS with certificates our CA issued."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity import ca, tokens
from identity.store import MeshHome
from microproxy import ctlhttp
from tests.controlplane_helpers import Component, leaf_for, make_home, running, start_component

T = TypeVar("T")
REFUSED = (OSError, asyncio.IncompleteReadError, h11.ProtocolError)  # what a refused handshake looks like
WAIT = 10.0  # deadline for anything we wait on
BOOKS = ca.identity_name("books", "default")
SHELVES = ca.identity_name("shelves", "default")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> MeshHome:
    return make_home(tmp_path_factory.mktemp("cp") / "mesh")


@pytest.fixture(scope="module")
def ident(home: MeshHome) -> Iterator[Component]:
    with running("identity", home) as comp:
        yield comp


@pytest.fixture(scope="module")
def dest(home: MeshHome) -> Iterator[Component]:
    with running("destination", home) as comp:
        yield comp


async def call(client: ctlhttp.Client, method: str, path: str, body: Any = None,
               headers: list[tuple[str, str]] | None = None) -> tuple[int, Any]:
    status, raw = await client.request(method, path, body, headers)
    return status, json.loads(raw)


def registration(name: str = "books", instance: str = "books-1", port: int = 41001,
                 sa: str | None = None, **over: Any) -> dict[str, Any]:
    sa = sa or name
    b: dict[str, Any] = {"name": name, "namespace": "default", "identity": ca.identity_name(sa, "default"),
                         "address": f"127.0.0.1:{port}", "app_port": 8080, "service_port": None,
                         "instance": instance, "service_account": sa}
    b.update(over)
    return b


# === identity ===

def csr_pem(identity: str) -> str:
    return ca.make_csr(ca.new_key(), identity).public_bytes(serialization.Encoding.PEM).decode()


def token(home: MeshHome, sa: str = "books", ns: str = "default", at: float | None = None,
          **kw: Any) -> str:
    return tokens.mint(home.secret(), ns, sa, time.time() if at is None else at, **kw)


def test_certify_ok_and_chain_verifies(home: MeshHome, ident: Component, dest: Component) -> None:
    key = ca.new_key()
    csr = ca.make_csr(key, BOOKS).public_bytes(serialization.Encoding.PEM).decode()

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        c = ident.client()
        try:
            s1, r1 = await call(c, "POST", "/v1/certify", {"token": token(home), "csr": csr})
            s2, r2 = await call(c, "POST", "/v1/certify", {"csr": csr},
                                headers=[("authorization", f"Bearer {token(home)}")])
        finally:
            await c.close()
        assert (s1, s2) == (200, 200), (r1, r2)
        return r1, r2

    got, via_header = run(go())
    assert got["identity"] == via_header["identity"] == BOOKS
    leaf, issuer = ca.load_certs(got["certificate"].encode())
    anchor = ca.load_certs(home.trust_pem())[0]
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(anchor)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [BOOKS]
    assert leaf.public_key() == key.public_key()
    expected = time.time() + 86400 + ca.CLOCK_SKEW.total_seconds()
    assert abs(got["valid_until_unix"] - expected) < 60
    assert got["valid_until"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert dt.datetime.fromisoformat(got["valid_until"].replace("Z", "+00:00")).timestamp() == \
        int(got["valid_until_unix"])

    # the issued chain is good for real mTLS: destination accepts it as books
    async def use() -> dict[str, Any]:
        c = dest.client(got["certificate"].encode(), ca.key_pem(key))
        try:
            status, resp = await call(c, "POST", "/v1/register", registration(instance="certified-1"))
            assert status == 200, resp
            await call(c, "POST", "/v1/deregister", {"instance": "certified-1"})
            return resp
        finally:
            await c.close()

    assert run(use())["service"] == "books.default"


def _certify_cases(home: MeshHome) -> list[tuple[str, bytes | Any, list[tuple[str, str]], int, str]]:
    good = csr_pem(BOOKS)
    return [
        # (case, body (bytes = raw), headers, status, error substring)
        ("body not JSON", b"{nope", [], 400, "JSON"),
        ("body a list", [1, 2], [], 400, "object"),
        ("csr missing", {"token": token(home)}, [], 400, "csr"),
        ("csr not PEM", {"token": token(home), "csr": "hello"}, [], 400, "malformed"),
        ("token missing", {"csr": good}, [], 401, "token"),
        ("token forged", {"token": tokens.mint(b"x" * 32, "default", "books", time.time()), "csr": good},
         [], 401, "signature"),
        ("token garbage", {"token": "a.b", "csr": good}, [], 401, "base64"),
        ("token expired", {"token": token(home, at=time.time() - 100, ttl=10), "csr": good}, [], 401, "expired"),
        ("token wrong audience", {"token": token(home, audience="k8s"), "csr": good}, [], 401, "audience"),
        ("bearer not bearer", {"csr": good}, [("authorization", "Basic Zm9v")], 401, "token"),
        ("identity mismatch", {"token": token(home, sa="shelves"), "csr": good}, [], 403, "does not match"),
    ]


def test_certify_errors(home: MeshHome, ident: Component) -> None:
    cases = _certify_cases(home)

    async def go() -> list[tuple[str, int, Any]]:
        out = []
        for case, body, headers, _, _ in cases:
            c = ident.client()
            try:
                if isinstance(body, bytes):
                    hdrs = [("content-type", "application/json"), ("content-length", str(len(body)))]
                    status, raw = await _raw_post(c, "/v1/certify", body, hdrs + headers)
                    out.append((case, status, json.loads(raw)))
                else:
                    out.append((case, *await call(c, "POST", "/v1/certify", body, headers)))
            finally:
                await c.close()
        return out

    results = run(go())
    for (case, _, _, want_status, why), (_, status, resp) in zip(cases, results):
        assert status == want_status, (case, resp)
        assert set(resp) == {"error"} and why in resp["error"], (case, resp)


async def _raw_post(c: ctlhttp.Client, path: str, body: bytes,
                    headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """POST exact bytes (ctlhttp.Client.request always JSON-encodes)."""
    io, conn = await c._open()
    try:
        await io.send(conn, h11.Request(method="POST", target=path,
                                        headers=[("host", "x")] + headers))
        await io.send(conn, h11.Data(data=body))
        await io.send(conn, h11.EndOfMessage())
        status, out = 0, b""
        while True:
            ev = await io.next_event(conn, WAIT)
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                out += ev.data
            else:
                return status, out
    finally:
        io.writer.close()


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/certify", 405), ("PUT", "/v1/certify", 405), ("GET", "/nope", 404),
    ("POST", "/ready", 405), ("GET", "/ready", 200),
])
def test_identity_routes(ident: Component, method: str, path: str, status: int) -> None:
    async def go() -> tuple[int, Any]:
        c = ident.client()
        try:
            return await call(c, method, path)
        finally:
            await c.close()
    got, body = run(go())
    assert got == status and isinstance(body, dict)


def test_certify_body_too_large(home: MeshHome, ident: Component) -> None:
    async def go() -> tuple[int, Any]:
        c = ident.client()
        try:
            return await call(c, "POST", "/v1/certify", {"token": token(home), "csr": "x" * (65 * 1024)})
        finally:
            await c.close()
    status, body = run(go())
    assert status == 413 and "error" in body


def _raw_tls(comp: Component, payload: bytes) -> bytes:
    ctx = comp.ssl_context()
    with socket.create_connection((comp.host, comp.port), timeout=WAIT) as raw:
        with ctx.wrap_socket(raw, server_hostname=comp.server_name) as s:
            s.sendall(payload)
            out = b""
            while chunk := s.recv(65536):  # until the server closes
                out += chunk
            return out


@pytest.mark.parametrize("payload", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
                                     b"GET /ready HTTP/1.1\r\n\r\n"])  # HTTP/1.1 without Host
def test_malformed_request_gets_400_and_close(ident: Component, payload: bytes) -> None:
    out = _raw_tls(ident, payload)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), out
    assert b"connection: close" in head.lower()
    assert "error" in json.loads(body)


def test_identity_needs_a_ca(tmp_path: Path) -> None:
    import subprocess
    import sys
    for module in ("identity", "destination"):
        p = subprocess.run([sys.executable, "-m", module, "--home", str(tmp_path / "empty"), "--port", "0"],
                           capture_output=True, timeout=WAIT)
        assert p.returncode == 2
        assert p.stderr.decode().count("\n") == 1 and "no mesh CA" in p.stderr.decode()


# === destination ===

def books_client(home: MeshHome, comp: Component, sa: str = "books") -> ctlhttp.Client:
    return comp.client(*leaf_for(home, sa, "default"))


def test_register_endpoints_deregister(home: MeshHome, dest: Component) -> None:
    async def go() -> None:
        c = books_client(home, dest)
        try:
            status, r = await call(c, "POST", "/v1/register", registration(instance="r-1", service_port=7000))
            assert (status, r) == (200, {"service": "books.default", "port": 7000, "lease_ttl": 3.0})
            status, r = await call(c, "POST", "/v1/register",
                                   registration(instance="r-2", port=41002, service_port=7777))
            assert (status, r["port"]) == (200, 7000)  # a replica joins the fixed port
            for authority in ("books.default:7000", "books.default.svc:7000",
                              "BOOKS.default.svc.cluster.local.:7000"):
                status, snap = await call(c, "GET", f"/v1/endpoints?authority={authority}")
                assert status == 200 and snap["exists"], snap
                assert snap["authority"] == "books.default.svc.cluster.local:7000"
                assert [e["address"] for e in snap["endpoints"]] == ["127.0.0.1:41001", "127.0.0.1:41002"]
                assert snap["endpoints"][0] == {
                    "address": "127.0.0.1:41001", "weight": 10000, "identity": BOOKS, "protocol_hint": "http/1",
                    "labels": {"workload": "books", "namespace": "default", "pod": "r-1",
                               "service_account": "books"}}
            _, bare = await call(c, "GET", "/v1/endpoints?authority=books:7000&namespace=default")
            assert bare["exists"] and len(bare["endpoints"]) == 2
            _, listing = await call(c, "GET", "/v1/workloads")
            assert {w["instance"] for w in listing} >= {"r-1", "r-2"}
            status, r = await call(c, "POST", "/v1/deregister", {"instance": "r-1"})
            assert status == 200 and r["service"] == "books.default"
            _, snap = await call(c, "GET", "/v1/endpoints?authority=books.default:7000")
            assert [e["address"] for e in snap["endpoints"]] == ["127.0.0.1:41002"]
            status, _ = await call(c, "POST", "/v1/deregister", {"instance": "r-2"})
            assert status == 200
            _, snap = await call(c, "GET", "/v1/endpoints?authority=books.default:7000")
            assert (snap["exists"], snap["endpoints"]) == (True, [])
        finally:
            await c.close()
    run(go())


def test_destination_refusals(home: MeshHome, dest: Component) -> None:
    cases = [
        # (client sa, method, path, body, status, error substring)
        ("books", "POST", "/v1/register", registration(name="shelves", instance="s-1"), 403, "may not register"),
        ("books", "POST", "/v1/register", registration(app_port=0), 400, "app_port"),
        ("books", "POST", "/v1/register", registration(address="nohost"), 400, "address"),
        ("books", "POST", "/v1/register", registration(name="Books!"), 400, "name"),
        ("books", "POST", "/v1/register", [1], 400, "object"),
        ("books", "POST", "/v1/deregister", {"instance": "owned-by-shelves"}, 403, "another identity"),
        ("books", "POST", "/v1/deregister", {"instance": "never-was"}, 404, "no instance"),
        ("books", "POST", "/v1/deregister", {}, 400, "instance"),
        ("books", "GET", "/v1/endpoints", None, 400, "authority"),
        ("books", "GET", "/v1/endpoints?authority=bad..name:80", None, 400, "authority"),
        ("books", "GET", "/v1/endpoints?authority=books.default:http", None, 400, "port"),
        ("books", "GET", "/v1/endpoints?authority=books:80", None, 400, "namespace"),
        ("books", "GET", "/v1/register", None, 405, "POST"),
        ("books", "GET", "/v2/nope", None, 404, "no such path"),
    ]

    async def go() -> None:
        shelves = books_client(home, dest, "shelves")
        books = books_client(home, dest, "books")
        try:
            status, _ = await call(shelves, "POST", "/v1/register",
                                   registration(name="shelves", instance="owned-by-shelves"))
            assert status == 200
            for sa, method, path, body, want, why in cases:
                status, resp = await call(books, method, path, body)
                assert (status, set(resp)) == (want, {"error"}), (path, body, resp)
                assert why in resp["error"], resp
            # and the shelves instance is untouched
            _, snap = await call(books, "GET", "/v1/endpoints?authority=shelves.default:8080")
            assert [e["labels"]["pod"] for e in snap["endpoints"]] == ["owned-by-shelves"]
        finally:
            await books.close()
            await shelves.close()
    run(go())


@pytest.mark.parametrize("authority,service", [
    ("nothing.default:8080", "nothing.default"),
    ("nothing.default.svc.cluster.local:8080", "nothing.default"),
    ("www.example.com:443", None),
])
def test_unknown_authority_is_explicit(home: MeshHome, dest: Component, authority: str,
                                       service: str | None) -> None:
    async def go() -> tuple[int, Any]:
        c = books_client(home, dest)
        try:
            return await call(c, "GET", f"/v1/endpoints?authority={authority}")
        finally:
            await c.close()
    status, snap = run(go())
    assert status == 200
    assert (snap["exists"], snap["endpoints"], snap["service"]) == (False, [], service)
    assert isinstance(snap["version"], int)


def test_destination_requires_a_client_cert(home: MeshHome, dest: Component) -> None:
    async def go() -> None:
        c = dest.client()  # trusts the server, presents nothing
        try:
            with pytest.raises(REFUSED):
                await c.request("GET", "/ready")
        finally:
            await c.close()
    run(go())
    # and a raw TLS handshake without a cert gets no HTTP answer at all
    # (TLS 1.3: the client's handshake completes first; the server then aborts — with an
    # alert or, under uvloop, a bare close)
    try:
        out = _raw_tls(dest, b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")
    except (ssl.SSLError, ConnectionError):
        out = b""
    assert out == b""


def test_destination_rejects_certs_from_another_ca(home: MeshHome, dest: Component, tmp_path: Path) -> None:
    other = make_home(tmp_path / "other")

    async def go() -> None:
        c = dest.client(*leaf_for(other, "books", "default"))
        try:
            with pytest.raises(REFUSED):
                await c.request("GET", "/ready")
        finally:
            await c.close()
    run(go())


# --- watches, leases, restarts (their own destinations)

async def next_matching(stream: AsyncIterator[dict[str, Any]], pred: Callable[[dict[str, Any]], bool],
                        seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read snapshots until one satisfies ``pred`` (deadline WAIT)."""
    async def read() -> dict[str, Any]:
        async for snap in stream:
            seen.append(snap)
            if pred(snap):
                return snap
        raise AssertionError(f"watch ended; saw {seen}")
    return await asyncio.wait_for(read(), WAIT)


def pods(snap: dict[str, Any]) -> list[str]:
    return [e["labels"]["pod"] for e in snap["endpoints"]]


async def wait_for_watches(c: ctlhttp.Client, n: int) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        _, ready = await call(c, "GET", "/ready")
        if ready["watches"] == n:
            return
        assert time.monotonic() < deadline, f"watches: {ready['watches']} != {n}"
        await asyncio.sleep(0.02)  # polling loop with a deadline


def test_watch_follows_replicas_and_lease_expiry(mesh_home: MeshHome, start_controlplane) -> None:  # type: ignore[no-untyped-def]
    dest = start_controlplane("destination", mesh_home, "--lease-ttl", "1")

    async def go() -> None:
        c = books_client(mesh_home, dest)
        renew_client = books_client(mesh_home, dest)
        watcher = books_client(mesh_home, dest)
        renewing: set[asyncio.Task[None]] = set()

        async def renew_a() -> None:
            while True:  # a lives on; b is registered once and left to expire
                status, _ = await call(renew_client, "POST", "/v1/register", registration(instance="a"))
                assert status == 200
                await asyncio.sleep(0.2)

        try:
            status, _ = await call(c, "POST", "/v1/register", registration(instance="a"))
            assert status == 200
            task = asyncio.create_task(renew_a())
            renewing.add(task)
            seen: list[dict[str, Any]] = []
            stream = watcher.watch("/v1/endpoints?authority=books.default.svc.cluster.local:8080&watch=1")
            first = await next_matching(stream, lambda s: True, seen)
            assert first["exists"] and pods(first) == ["a"]
            await call(c, "POST", "/v1/register", registration(instance="b", port=41002))
            both = await next_matching(stream, lambda s: pods(s) == ["a", "b"], seen)
            assert both["version"] > first["version"]
            t0 = time.monotonic()
            alone = await next_matching(stream, lambda s: pods(s) == ["a"], seen)
            assert alone["version"] > both["version"]
            assert 0.5 < time.monotonic() - t0 < 5  # b's lease (1 s) ran out, a's renewals kept it
            versions = [s["version"] for s in seen]
            assert versions == sorted(versions) and len(set(versions)) == len(versions)
            assert all(s["exists"] for s in seen)

            # a service that appears later wakes a watch of an unknown authority
            late_seen: list[dict[str, Any]] = []
            late = watcher.watch("/v1/endpoints?authority=late.default:8080&watch=1")
            absent = await next_matching(late, lambda s: True, late_seen)
            assert (absent["exists"], absent["endpoints"]) == (False, [])
            late_client = books_client(mesh_home, dest, "late")
            try:
                await call(late_client, "POST", "/v1/register", registration(name="late", instance="late-1"))
            finally:
                await late_client.close()
            present = await next_matching(late, lambda s: s["exists"], late_seen)
            assert pods(present) == ["late-1"] and present["version"] > absent["version"]

            await wait_for_watches(c, 2)
            await stream.aclose()  # type: ignore[attr-defined]
            await late.aclose()  # type: ignore[attr-defined]
            await wait_for_watches(c, 0)  # clients gone: nothing left behind
        finally:
            for t in renewing:
                t.cancel()
            await asyncio.gather(*renewing, return_exceptions=True)
            for cl in (c, renew_client, watcher):
                await cl.close()
    run(go())


def test_watch_ends_cleanly_on_shutdown(mesh_home: MeshHome) -> None:
    dest = start_component("destination", mesh_home)
    try:
        async def go() -> int:
            w = books_client(mesh_home, dest)
            stream = w.watch("/v1/endpoints?authority=books.default:8080&watch=1")
            seen: list[dict[str, Any]] = []
            await next_matching(stream, lambda s: True, seen)
            loop = asyncio.get_running_loop()
            rc = loop.run_in_executor(None, dest.stop)
            async for snap in stream:  # the stream ends (no hang) when destination stops
                seen.append(snap)
            return await rc
        assert run(go()) == 0
        assert "Traceback" not in dest.log_path.read_text()
    finally:
        dest.stop()


def test_restart_keeps_endpoints(mesh_home: MeshHome) -> None:
    async def register_and_read(comp: Component) -> dict[str, Any]:
        c = books_client(mesh_home, comp)
        try:
            for i in (1, 2):
                status, _ = await call(c, "POST", "/v1/register", registration(instance=f"p-{i}", port=41000 + i))
                assert status == 200
            _, snap = await call(c, "GET", "/v1/endpoints?authority=books.default:8080")
            return snap
        finally:
            await c.close()

    async def read(comp: Component) -> dict[str, Any]:
        c = books_client(mesh_home, comp)
        try:
            _, snap = await call(c, "GET", "/v1/endpoints?authority=books.default:8080")
            return snap
        finally:
            await c.close()

    async def register_more(comp: Component) -> dict[str, Any]:
        c = books_client(mesh_home, comp)
        try:
            await call(c, "POST", "/v1/register", registration(instance="p-3", port=41003))
            _, snap = await call(c, "GET", "/v1/endpoints?authority=books.default:8080")
            return snap
        finally:
            await c.close()

    first = start_component("destination", mesh_home)
    try:
        before = run(register_and_read(first))
    finally:
        assert first.stop() == 0
    assert mesh_home.destination_state.exists()
    assert not first.ports_file.exists()  # removed on a clean exit

    second = start_component("destination", mesh_home)  # nobody re-registers
    try:
        after = run(read(second))
        assert after == before and pods(after) == ["p-1", "p-2"]
        more = run(register_more(second))
        assert more["version"] > before["version"] and pods(more) == ["p-1", "p-2", "p-3"]
    finally:
        assert second.stop() == 0
    for comp in (first, second):
        assert "Traceback" not in comp.log_path.read_text(), comp.log_tail()


# --- keep_watching: the proxy's watch loop (policy, profiles, endpoints)

class _ScriptedClient:
    """A watch that streams the given snapshots and ends, or fails with the given error."""

    def __init__(self, step: list[Any] | Exception) -> None:
        self.step = step

    async def watch(self, path: str) -> AsyncIterator[Any]:
        assert path == "/v1/x?watch=1"
        if isinstance(self.step, Exception):
            raise self.step
        for snap in self.step:
            yield snap


def test_keep_watching_reconnects_with_backoff_and_stops_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots are applied as they stream; a watch that ends, breaks or is refused is
    opened again after a doubling backoff, reset by the next snapshot; a refusal the caller
    calls final stops the loop."""
    steps = iter([["a", "b"], OSError("reset"), ctlhttp.HTTPError(503, b"busy"), ["c"],
                  ctlhttp.HTTPError(400, b"bad")])
    events: list[tuple[str, Any]] = []
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(ctlhttp.asyncio, "sleep", no_wait)
    monkeypatch.setattr(ctlhttp.random, "random", lambda: 0.5)   # jitter factor 1.0

    def refused(e: ctlhttp.HTTPError) -> bool:
        events.append(("refused", e.status))
        return e.status == 400

    asyncio.run(ctlhttp.keep_watching(
        lambda: _ScriptedClient(next(steps)), "/v1/x?watch=1", lambda s: events.append(("apply", s)),
        lambda up: events.append(("up", up)), refused, lambda e: events.append(("lost", repr(e)))))
    assert events == [("up", True), ("apply", "a"), ("up", True), ("apply", "b"), ("up", False),
                      ("lost", "OSError('reset')"), ("up", False),
                      ("refused", 503), ("up", False),
                      ("up", True), ("apply", "c"), ("up", False),
                      ("refused", 400)]
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.1])
