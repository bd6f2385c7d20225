"""A fake Kubernetes API server for tests: HTTPS on loopback, replaying recorded objects.

    api = FakeAPI(tmp_path)                   # CA, serving cert, ServiceAccount dir
    api.lists["/api/v1/pods"] = [pods_list]  # each list call takes the next (the last sticks)
    api.watches["/api/v1/pods"] = [Events(events), Status(410, body), HOLD]
    api.on_review = lambda body: (201, {...})  # POST .../tokenreviews
    port = await api.start()
    cfg = ClusterConfig.in_cluster(api.env(), api.sa_dir)

Lists are paged by the ``limit`` the client sends (``continue`` tokens are ours). Watch
scripts are consumed one per watch request; when a path's script is used up (or reaches
``HOLD``) the watch stays open, sending nothing, until ``stop()``. Every request is logged
with its query and bearer token.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from microproxy import ctlhttp
from microproxy.ctlhttp import Request, Response, Stream

TESTDATA = Path(__file__).resolve().parent / "testdata" / "k8s-api"


def load(name: str) -> Any:
    return json.loads((TESTDATA / name).read_text())


@dataclass
class Events:
    events: list[dict[str, Any]]
    end: bool = True                                  # end the stream after them (else hold)
    before: Callable[[], None] | None = None          # run when this script is served


@dataclass
class Status:
    code: int
    body: dict[str, Any]


HOLD = "hold"


@dataclass
class Logged:
    method: str
    path: str
    query: dict[str, str]
    token: str | None
    body: Any = None


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          signer: ec.EllipticCurvePrivateKey, ca: bool, sans: list[x509.GeneralName]) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(signer, hashes.SHA256())


@dataclass
class FakeAPI:
    root: Path
    lists: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    watches: dict[str, list[Any]] = field(default_factory=dict)
    on_review: Callable[[Any], tuple[int, Any]] | None = None
    log: list[Logged] = field(default_factory=list)
    list_calls: dict[str, int] = field(default_factory=dict)
    holding: dict[str, int] = field(default_factory=dict)      # open idle watches per path
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.sa_dir = self.root / "serviceaccount"
        self.sa_dir.mkdir(parents=True, exist_ok=True)
        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        ca_cert = _cert("kubernetes", ca_key, ca_name, ca_key, True, [])
        cert = _cert("kube-apiserver", key, ca_name, ca_key, False, [
            x509.DNSName("kubernetes.default.svc"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        (self.sa_dir / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (self.sa_dir / "token").write_text("token-1\n")
        (self.sa_dir / "namespace").write_text("micromesh")
        chain, key_file = self.root / "apiserver.crt", self.root / "apiserver.key"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(chain, key_file)
        self._stop = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    def set_token(self, token: str) -> None:
        (self.sa_dir / "token").write_text(token + "\n")

    def env(self) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}

    async def start(self) -> int:
        self._server = await ctlhttp.serve(self.handle, "127.0.0.1", 0, ssl=self._ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()

    def requests(self, path: str, watch: bool | None = None) -> list[Logged]:
        return [r for r in self.log if r.path == path
                and (watch is None or (r.query.get("watch") == "1") == watch)]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not cond():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)

    def _note(self) -> None:
        self.changed.set()

    async def handle(self, req: Request) -> Response | Stream:
        auth = req.headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        body = None
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                body = None
        self.log.append(Logged(req.method, req.path, dict(req.query), token, body))
        self._note()
        if token is None:
            return Response.json({"kind": "Status", "status": "Failure", "reason": "Unauthorized",
                                  "code": 401, "message": "Unauthorized"}, 401)
        if req.method == "POST" and req.path.endswith("/tokenreviews"):
            if self.on_review is None:
                return Response.error(404, "no tokenreview")
            status, answer = self.on_review(body)
            return Response.json(answer, status)
        if req.method != "GET":
            return Response.error(405, "use GET")
        if req.query.get("watch") == "1":
            return self._watch(req.path)
        return self._list(req)

    def _list(self, req: Request) -> Response:
        versions = self.lists.get(req.path)
        if not versions:
            return Response.json({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
        cont = req.query.get("continue")
        if cont:
            idx, _, offset_text = cont.partition(":")
            version, offset = int(idx), int(offset_text)
        else:
            n = self.list_calls.get(req.path, 0)
            self.list_calls[req.path] = n + 1
            version, offset = min(n, len(versions) - 1), 0
        full = versions[version]
        limit = int(req.query.get("limit", "0")) or len(full["items"])
        page = dict(full)
        page["items"] = full["items"][offset:offset + limit]
        meta = dict(full.get("metadata") or {})
        if offset + limit < len(full["items"]):
            meta["continue"] = f"{version}:{offset + limit}"
            meta["remainingItemCount"] = len(full["items"]) - offset - limit
        page["metadata"] = meta
        return Response.json(page)

    def _watch(self, path: str) -> Response | Stream:
        script = self.watches.get(path) or []
        step = script.pop(0) if script else HOLD
        if isinstance(step, Status):
            return Response.json(step.body, step.code)
        if isinstance(step, Events) and step.before is not None:
            step.before()
        return Stream(self._stream(path, step))

    async def _stream(self, path: str, step: Any) -> AsyncIterator[bytes]:
        if isinstance(step, Events):
            for ev in step.events:
                yield json.dumps(ev).encode() + b"\n"
            if step.end:
                return
        self.holding[path] = self.holding.get(path, 0) + 1
        self._note()
        try:
            await self._stop.wait()
        finally:
            self.holding[path] -= 1
            self._note()
