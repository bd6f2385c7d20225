"""The Kubernetes API client: list + watch Services, EndpointSlices, Pods and Namespaces into
a ``k8s.Store`` (the pure translation), over HTTPS with the pod's ServiceAccount.

- ``ClusterConfig.in_cluster(env)``: ``KUBERNETES_SERVICE_HOST``/``_PORT``, and the
  ServiceAccount files under /var/run/secrets/kubernetes.io/serviceaccount (``token``,
  ``ca.crt``, ``namespace``). The token is re-read for every request: projected tokens are
  rotated by the kubelet.
- ``APIClient``: JSON over ctlhttp's h11 client. ``list`` pages with ``limit``/``continue``
  (a 410 on an expired continue token restarts the list); ``watch`` streams the
  newline-delimited watch events (``?watch=1&resourceVersion=RV&allowWatchBookmarks=true
  &timeoutSeconds=N``) on a connection of its own.
- ``Watcher``: per kind, list (``Store.replace``) then watch from the list's
  resourceVersion, applying each event (``Store.apply``) and reporting the changed
  service keys to ``on_change``. When a watch ends (the server's timeoutSeconds) it
  resumes from the last resourceVersion seen (events and BOOKMARKs move it). 410 Gone —
  as an ERROR event or an HTTP status — means that version is too old: re-list. Other
  failures back off exponentially (core/backoff.py) and resume. ``synced`` is set once
  every kind has been listed; serve endpoints only after it.

Wiring it into destination (left to whoever owns server.py / __main__.py)::

    store = k8s.Store(k8s.Settings(trust_domain=td, control_plane_namespace=ns))
    watcher = Watcher(APIClient(ClusterConfig.in_cluster(os.environ)), store,
                      on_change=dest.hub.notify, sleep=asyncio.sleep)
    # background task: watcher.run(); /v1/endpoints answers store.snapshot(store.parse(a, ns))

RBAC needed: get/list/watch on services, pods, namespaces ("") and endpointslices
(discovery.k8s.io); for the resources (k8s_resources.py) authorizationpolicies
(policy.micromesh.io), httproutes and grpcroutes (gateway.networking.k8s.io).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import h11

from microproxy import ctlhttp
from microproxy.core.backoff import exp_backoff

from . import k8s

log = logging.getLogger(__name__)

SECONDS = 1.0
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
KIND_PATHS = {
    "Namespace": "/api/v1/namespaces",
    "Service": "/api/v1/services",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
    "Pod": "/api/v1/pods",
}
# the mesh's own resources (k8s_resources.py: a second Watcher, over resources.Store)
RESOURCE_KIND_PATHS = {
    "AuthorizationPolicy": "/apis/policy.micromesh.io/v1alpha1/authorizationpolicies",
    "HTTPRoute": "/apis/gateway.networking.k8s.io/v1/httproutes",
    "GRPCRoute": "/apis/gateway.networking.k8s.io/v1/grpcroutes",
}
LIST_PAGE = 500
WATCH_TIMEOUT = 300 * SECONDS        # asked of the server (timeoutSeconds)
WATCH_SLACK = 60 * SECONDS           # then we give up on a silent connection ourselves
REQUEST_TIMEOUT = 30 * SECONDS
BACKOFF_MIN, BACKOFF_MAX, BACKOFF_JITTER = 0.5 * SECONDS, 30 * SECONDS, 0.5


class ConfigError(OSError):
    """Not in a cluster, or the ServiceAccount files are unreadable (an OSError, so callers
    that treat I/O trouble as "API server unavailable" need no import of this module)."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    host: str
    port: int
    token_path: Path
    ca_path: Path
    namespace: str = "default"

    @classmethod
    def in_cluster(cls, env: Mapping[str, str], sa_dir: Path = SA_DIR) -> "ClusterConfig":
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ConfigError("not running in a cluster: KUBERNETES_SERVICE_HOST/PORT are unset")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad KUBERNETES_SERVICE_PORT {port!r}")
        token, ca_file = sa_dir / "token", sa_dir / "ca.crt"
        for f in (token, ca_file):
            if not f.is_file():
                raise ConfigError(f"missing {f} (is a ServiceAccount token mounted?)")
        try:
            namespace = (sa_dir / "namespace").read_text().strip() or "default"
        except OSError:
            namespace = "default"
        return cls(host.strip("[]"), int(port), token, ca_file, namespace)

    def ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_path))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load {self.ca_path}: {e}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def bearer(self) -> str:
        try:
            token = self.token_path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read {self.token_path}: {e}") from None
        if not token:
            raise ConfigError(f"{self.token_path} is empty")
        return token


class API(Protocol):
    async def list(self, kind: str) -> tuple[list[dict[str, Any]], str | None]: ...
    def watch(self, kind: str, resource_version: str | None,
              timeout_seconds: float) -> AsyncGenerator[dict[str, Any], None]: ...


class APIClient:
    """list / watch / post against the API server. Raises ctlhttp.HTTPError for non-2xx
    answers, OSError/ConnectionError/TimeoutError/h11.ProtocolError for transport trouble,
    ConfigError when the token cannot be read."""

    def __init__(self, cfg: ClusterConfig, timeout: float = REQUEST_TIMEOUT) -> None:
        self.cfg = cfg
        self._client = ctlhttp.Client(cfg.host, cfg.port, ssl=cfg.ssl_context(),
                                      server_hostname=cfg.host, timeout=timeout)

    def _headers(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.cfg.bearer()}"), ("accept", "application/json")]

    async def close(self) -> None:
        await self._client.close()

    async def get(self, path: str) -> Any:
        return await self._client.json("GET", path, headers=self._headers())

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST JSON; (status, decoded body or None). Does not raise on HTTP status."""
        status, raw = await self._client.request("POST", path, body, headers=self._headers())
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None

    async def list(self, kind: str) -> tuple[list[dict[str, Any]], str | None]:
        base = KIND_PATHS.get(kind) or RESOURCE_KIND_PATHS[kind]
        for _ in range(3):  # a continue token can expire mid-list (410): start over
            items: list[dict[str, Any]] = []
            query: dict[str, str] = {"limit": str(LIST_PAGE)}
            try:
                while True:
                    page = await self.get(f"{base}?{urlencode(query)}")
                    if not isinstance(page, dict):
                        raise ValueError(f"{kind} list is not a JSON object")
                    items += [i for i in page.get("items") or [] if isinstance(i, dict)]
                    meta = page.get("metadata") or {}
                    if not meta.get("continue"):
                        return items, meta.get("resourceVersion") or None
                    query["continue"] = str(meta["continue"])
            except ctlhttp.HTTPError as e:
                if e.status != 410 or "continue" not in query:
                    raise
                log.info("%s list: continue token expired, listing again", kind)
        raise ctlhttp.HTTPError(410, b"list kept expiring")

    async def watch(self, kind: str, resource_version: str | None,
                    timeout_seconds: float = WATCH_TIMEOUT) -> AsyncGenerator[dict[str, Any], None]:
        query = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(int(timeout_seconds))}
        if resource_version:
            query["resourceVersion"] = resource_version
        path = f"{KIND_PATHS.get(kind) or RESOURCE_KIND_PATHS[kind]}?{urlencode(query, quote_via=quote)}"
        stream = self._client.watch(path, headers=self._headers())
        assert isinstance(stream, AsyncGenerator)
        async with contextlib.aclosing(stream):
            async for event in stream:
                if isinstance(event, dict):
                    yield event


_TRANSPORT_ERRORS = (OSError, ConnectionError, TimeoutError, h11.ProtocolError, ssl.SSLError,
                     asyncio.IncompleteReadError)


class Watcher:
    """Keeps a Store in step with the API server, one list+watch loop per kind."""

    def __init__(self, api: API, store: k8s.Store,
                 on_change: Callable[[frozenset[str]], None],
                 sleep: Callable[[float], Awaitable[None]],
                 rand: Callable[[], float] = random.random,
                 kinds: Iterable[str] = k8s.KINDS,
                 watch_timeout: float = WATCH_TIMEOUT) -> None:
        self.api, self.store = api, store
        self.on_change, self.sleep, self.rand = on_change, sleep, rand
        self.kinds = tuple(kinds)
        self.watch_timeout = watch_timeout
        self.synced = asyncio.Event()
        self.relists: dict[str, int] = dict.fromkeys(self.kinds, 0)   # lists after the first
        self._listed: set[str] = set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for kind in self.kinds:
                tg.create_task(self.run_kind(kind))

    def _changed(self, keys: frozenset[str]) -> None:
        if keys:
            self.on_change(keys)

    async def _backoff(self, kind: str, failures: int, why: object) -> None:
        delay = exp_backoff(failures - 1, BACKOFF_MIN, BACKOFF_MAX, BACKOFF_JITTER, self.rand())
        log.warning("%s watch: %s; retrying in %.1fs", kind, why, delay)
        await self.sleep(delay)

    async def _list(self, kind: str) -> str | None:
        items, rv = await self.api.list(kind)
        if kind in self._listed:
            self.relists[kind] += 1
        self._changed(self.store.replace(kind, items, rv))
        self._listed.add(kind)
        if len(self._listed) == len(self.kinds):
            self.synced.set()
        log.info("listed %d %s at resourceVersion %s", len(items), kind, rv)
        return rv

    async def run_kind(self, kind: str) -> None:
        rv: str | None = None
        listed = False
        failures = 0
        while True:
            try:
                if not listed:
                    rv = await self._list(kind)
                    listed = True
                events = 0
                async with (asyncio.timeout(self.watch_timeout + WATCH_SLACK),
                            contextlib.aclosing(self.api.watch(kind, rv, self.watch_timeout)) as stream):
                    async for event in stream:
                        try:
                            changed = self.store.apply(kind, event)
                        except ValueError as e:
                            log.warning("%s watch: skipping a bad event: %s", kind, e)
                            continue
                        events += 1
                        failures = 0
                        rv = self.store.resource_versions[kind] or rv
                        self._changed(changed)
                if events == 0:  # ended at once without a word: do not spin
                    failures += 1
                    await self._backoff(kind, failures, "watch ended without events")
            except k8s.Gone as e:
                listed, failures = False, failures + 1
                log.info("%s watch: resourceVersion %s is gone (%s); re-listing", kind, rv, e)
                if failures > 1:
                    await self._backoff(kind, failures, "gone again")
            except ctlhttp.HTTPError as e:
                failures += 1
                if e.status == 410:
                    listed = False
                    log.info("%s watch: HTTP 410 for resourceVersion %s; re-listing", kind, rv)
                    if failures > 1:
                        await self._backoff(kind, failures, "gone again")
                else:
                    await self._backoff(kind, failures, e)
            except (k8s.WatchError, ConfigError, ValueError, *_TRANSPORT_ERRORS) as e:
                failures += 1
                await self._backoff(kind, failures, e)
