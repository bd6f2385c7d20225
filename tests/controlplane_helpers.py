"""Start real control-plane processes (python -m identity / destination) for tests.

    home = make_home(tmp_path / "mesh")
    with running("identity", home) as ident:          # waits for the ports file + /ready
        client = ident.client()                         # ctlhttp.Client over real HTTPS
    dest = start_component("destination", home, "--lease-ttl", "1")
    chain, key = leaf_for(home, "books", "default")     # a cert our CA issued
    client = dest.client(chain, key)
    ...
    dest.stop()                                          # SIGTERM; returns the exit code

Every process logs to ``<home>/logs/<module>-<n>.log``; a start failure raises with the log tail.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from identity import ca, store
from identity.store import MeshHome
from microproxy import ctlhttp, tls

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
_counter = itertools.count()


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_home(path: Path, trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> MeshHome:
    home = MeshHome(path)
    home.ensure_ca(now_utc(), trust_domain)
    return home


def leaf_for(home: MeshHome, sa: str, ns: str = "default",
             trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) for ``sa.ns.serviceaccount.identity.<td>``, signed by the home's issuer."""
    issuer, key = home.issuer()
    return ca.self_issue(ca.identity_name(sa, ns, trust_domain), issuer, key, now_utc())


def server_name(module: str, trust_domain: str = ca.DEFAULT_TRUST_DOMAIN) -> str:
    return ca.identity_name(module, "micromesh", trust_domain)


@dataclass
class Component:
    module: str
    home: MeshHome
    proc: subprocess.Popen[bytes]
    ports_file: Path
    log_path: Path
    trust_domain: str = ca.DEFAULT_TRUST_DOMAIN
    port: int = 0
    host: str = HOST
    _logs: list[object] = field(default_factory=list)

    @property
    def server_name(self) -> str:
        return server_name(self.module, self.trust_domain)

    def ssl_context(self, chain: bytes | None = None, key: bytes | None = None):  # type: ignore[no-untyped-def]
        return tls.client_context(self.home.trust_pem(), chain, key)

    def client(self, chain: bytes | None = None, key: bytes | None = None,
               timeout: float = 5.0) -> ctlhttp.Client:
        """A client for use inside one asyncio.run (a Client binds to its loop)."""
        return ctlhttp.Client(self.host, self.port, self.ssl_context(chain, key),
                              server_hostname=self.server_name, timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, kill if it hangs. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in self._logs:
            f.close()  # type: ignore[attr-defined]
        self._logs.clear()
        return self.proc.returncode


def _probe_client(comp: Component) -> ctlhttp.Client:
    if comp.module == "destination":  # mTLS required: present some mesh identity
        return comp.client(*leaf_for(comp.home, "probe", "micromesh", comp.trust_domain), timeout=2.0)
    return comp.client(timeout=2.0)


def _ready(comp: Component) -> bool:
    async def probe() -> bool:
        client = _probe_client(comp)
        try:
            status, _ = await client.request("GET", "/ready")
            return status == 200
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return False
        finally:
            await client.close()
    return asyncio.run(probe())


def start_component(module: str, home: MeshHome, *args: str,
                    trust_domain: str = ca.DEFAULT_TRUST_DOMAIN,
                    log_level: str = "info", timeout: float = START_TIMEOUT) -> Component:
    """Start ``python -m <module>`` on a free loopback port and wait until /ready answers."""
    n = next(_counter)
    ports_file = home.root / f"{module}-{n}.ports.json"
    ports_file.unlink(missing_ok=True)
    home.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = home.logs_dir / f"{module}-{n}.log"
    log = open(log_path, "ab")
    cmd = [sys.executable, "-m", module, "--home", str(home.root), "--host", HOST, "--port", "0",
           "--ports-file", str(ports_file), "--trust-domain", trust_domain,
           "--log-level", log_level, *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ))
    comp = Component(module, home, proc, ports_file, log_path, trust_domain, _logs=[log])
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {proc.returncode}:\n{comp.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} not ready after {timeout}s:\n{comp.log_tail()}")
            if comp.port == 0 and ports_file.exists():
                comp.port = int(store.read_json(ports_file)["port"])  # written atomically
            if comp.port and _ready(comp):
                return comp
            time.sleep(0.02)  # polling loop with a deadline
    except BaseException:
        comp.stop()
        raise


@contextlib.contextmanager
def running(module: str, home: MeshHome, *args: str, **kw: object) -> Iterator[Component]:
    comp = start_component(module, home, *args, **kw)  # type: ignore[arg-type]
    try:
        yield comp
    finally:
        comp.stop()
