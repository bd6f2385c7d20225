"""Leaf renewal at 70 % of the lifetime, under load, with zero failed requests.

identity issues 10-second leaves (``--leaf-lifetime 10 --clock-skew 1``: 11 s of validity,
renewed ~7.7 s after issuance); traffic flows through the client proxy to books (HTTP on
keep-alive connections) and to echo (a CONNECT tunnel every few requests: a new mTLS
handshake between the proxies each time, so renewed certificates are exercised on both
sides) for more than two lifetimes. Not one request may fail, and every proxy's
``identity_cert_refresh_total`` must have gone up by at least two.

``Traffic`` is also the steady load of the rotation end-to-end test (tests/test_rotation.py).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import HOST, Conn, Mesh, Proc, ProxyProc, clean_env, metric_sum, wait_until

pytestmark = pytest.mark.timeout(150)

LIFETIME = 10.0
SKEW = 1.0


class Traffic:
    """Steady requests through a client proxy from a thread, every failure recorded.

    HTTP GETs to ``http_authority`` on keep-alive connections (a new one every
    ``per_conn`` requests) and, with ``tunnel_authority``, a CONNECT tunnel round trip
    every ``tunnel_every`` requests."""

    def __init__(self, outbound: int, http_authority: str, tunnel_authority: str | None = None,
                 path: str = "/", per_conn: int = 20, tunnel_every: int = 5,
                 pause: float = 0.005) -> None:
        self.outbound, self.http_authority, self.tunnel_authority = outbound, http_authority, tunnel_authority
        self.path, self.per_conn, self.tunnel_every, self.pause = path, per_conn, tunnel_every, pause
        self.ok = 0
        self.tunnels = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def mark(self) -> tuple[int, int, int]:
        return self.ok, self.tunnels, len(self.failures)

    def wait_for_more(self, n: int = 20, timeout: float = 10.0) -> None:
        """Wait until ``n`` more requests succeeded (the load really is flowing)."""
        start = self.ok
        wait_until(lambda: self.ok >= start + n or self.failures, timeout, f"{n} more requests")

    def _fail(self, what: str) -> None:
        self.failures.append(f"{time.strftime('%H:%M:%S')} {what}")

    def _tunnel(self, n: int) -> None:
        auth = self.tunnel_authority
        assert auth is not None
        try:
            with Conn(self.outbound, timeout=10) as c:
                c.send(f"CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\n".encode())
                status, _, headers = c.read_head()
                if status != 200:
                    self._fail(f"CONNECT {status} {dict(headers).get('x-mesh-proxy-error')}")
                    return
                msg = f"ping {n}\n".encode()
                c.send(msg)
                if c.read_exact(len(msg)) != msg:
                    self._fail("tunnel echoed something else")
                    return
            self.tunnels += 1
        except (OSError, ConnectionError, ValueError) as e:
            self._fail(f"tunnel: {e!r}")

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                with Conn(self.outbound, timeout=10) as c:
                    for _ in range(self.per_conn):
                        if self._stop.is_set():
                            return
                        r = c.request("GET", f"http://{self.http_authority}{self.path}",
                                      {"host": self.http_authority})
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self._fail(f"HTTP {r.status} {r.headers.get('x-mesh-proxy-error')}")
                        n += 1
                        if self.tunnel_authority and n % self.tunnel_every == 0:
                            self._tunnel(n)
                        time.sleep(self.pause)  # a steady rate, not a flood
                        if r.headers.get("connection", "").lower() == "close":
                            break
            except (OSError, ConnectionError, ValueError, AssertionError) as e:
                self._fail(f"http: {e!r}")


def refreshes(p: ProxyProc) -> float:
    return metric_sum(p.metrics(), "identity_cert_refresh_total")


def config(p: ProxyProc) -> Any:
    status, body = p.admin_get("/config")
    assert status == 200
    return json.loads(body)


@pytest.fixture
def short_lived() -> Iterator[Mesh]:
    """A mesh whose identity issues 10-second leaves."""
    mesh = Mesh.create()
    try:
        ports_file = mesh._ports_file("identity")
        argv = [sys.executable, "-m", "identity", "--home", str(mesh.home.root),
                "--host", HOST, "--port", "0", "--ports-file", str(ports_file), "--log-level", "info",
                "--leaf-lifetime", str(LIFETIME), "--clock-skew", str(SKEW)]
        mesh.identity = mesh._spawn(Proc, "identity", argv, clean_env(), ports_file)
        mesh.identity.wait_ports(("port",))
        mesh.destination = mesh._start_cp("destination", 0)
        yield mesh
        tracebacks = mesh.logs_with("Traceback")
        assert not tracebacks, f"tracebacks in {tracebacks}"
    finally:
        mesh.close()
        mesh.remove()


def test_leaf_renewal_under_load_has_zero_failed_requests(short_lived: Mesh) -> None:
    mesh = short_lived
    app = mesh.start_app()
    books = mesh.start_proxy("books", app_port=app.http, wait=False)
    echo = mesh.start_proxy("echo", app_port=app.echo, wait=False)
    client = mesh.start_proxy("client", wait=False)
    proxies = (books, echo, client)
    for p in proxies:
        p.wait_ready()
    first = {p.name: config(p) for p in proxies}
    for p in proxies:
        cert = first[p.name]["certificate"]
        assert 9.5 <= cert["valid_until"] - cert["issued_at"] <= 11.5, cert   # 10 s + 1 s skew (whole seconds)
    before = {p.name: refreshes(p) for p in proxies}
    started = time.monotonic()
    with Traffic(client.outbound, f"books.default:{app.http}", f"echo.default:{app.echo}") as traffic:
        traffic.wait_for_more(20)
        wait_until(lambda: traffic.failures or (
            time.monotonic() - started > 2 * LIFETIME
            and all(refreshes(p) >= before[p.name] + 2 for p in proxies)), 4 * LIFETIME,
            "two lifetimes and two renewals of every proxy")
        traffic.wait_for_more(20)  # and traffic still flows on the newest certificates
    assert traffic.failures == [], traffic.failures[:10]
    print(f"\nrenewal: {time.monotonic() - started:.1f} s, requests ok {traffic.ok}, tunnels {traffic.tunnels}, "
          f"refreshes {[refreshes(p) - before[p.name] for p in proxies]}")
    assert traffic.ok > 200 and traffic.tunnels > 40, (traffic.ok, traffic.tunnels)
    for p in proxies:
        now = config(p)
        assert now["certificate"]["fingerprint"] != first[p.name]["certificate"]["fingerprint"]
        assert now["certificate"]["valid_until"] > time.time(), "serving an expired leaf"
        assert refreshes(p) >= before[p.name] + 2
    # every refresh was a scheduled one (no failures, no early retries)
    for p in proxies:
        assert "certify failed" not in p.log_text() and "expired before" not in p.log_text()
