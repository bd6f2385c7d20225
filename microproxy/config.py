"""Proxy configuration: a frozen dataclass; ``from_env()`` is the only reader of os.environ.

Environment (all optional unless marked):

| variable | default | meaning |
|---|---|---|
| MESH_IDENTITY_ADDR (required) | | host:port of identity |
| MESH_DESTINATION_ADDR (required) | | host:port of destination |
| MESH_TRUST_ANCHORS / MESH_TRUST_ANCHORS_FILE (one required) | | PEM trust bundle |
| MESH_TOKEN / MESH_TOKEN_FILE (one required) | | bearer token proving the service account; a MESH_TOKEN_FILE (a projected, rotating ServiceAccount token) is read again at every (re)certification, the token read at start being the fallback |
| MESH_WORKLOAD | `app` | workload name (local mode: also its service name) |
| MESH_NAMESPACE | `default` | namespace |
| MESH_SERVICE_ACCOUNT | workload | service account |
| MESH_TRUST_DOMAIN | `cluster.local` | trust domain |
| MESH_APP_PORT | none | the app's port on 127.0.0.1; none = client-only workload |
| MESH_SERVICE | workload | the shared service to register under (local mode; `mesh run --service`) |
| MESH_SERVICE_PORT | app port | the service port to register (local mode) |
| MESH_REGISTER | `1` | register this workload with destination (local mode) |
| MESH_INSTANCE | `<workload>-<pid>` | replica id (the "pod" label) |
| MESH_OUTBOUND_ADDR | `127.0.0.1:4140` | outbound listener (port 0 = pick a free one) |
| MESH_INBOUND_ADDR | `0.0.0.0:4143` | inbound listener |
| MESH_ADMIN_ADDR | `127.0.0.1:4191` | admin listener |
| MESH_INBOUND_ADVERTISE_HOST | `127.0.0.1` | host peers use to reach the inbound listener |
| MESH_PORTS_FILE | none | where to write the bound ports as JSON once listening |
| MESH_SHUTDOWN_GRACE_PERIOD | `30` | seconds to finish in-flight requests on SIGTERM |
| MESH_FAILFAST_TIMEOUT | `3` | seconds to wait for a resolution/endpoints before 504 |
| MESH_CONNECT_TIMEOUT | `1` | seconds to connect to a peer |
| MESH_LOG_LEVEL | `warning` | log level; `MESH_ACCESS_LOG=1` logs each request at INFO |
| MESH_DEFAULT_INBOUND_POLICY | `all-unauthenticated` | when no ALLOW policy targets the workload: `all-unauthenticated`, `all-authenticated`, `deny` or `audit` (see policy.py) |
| MESH_IDENTITY_NAME / MESH_DESTINATION_NAME | `identity.micromesh…` | control-plane identities |
| MESH_TRACE_COLLECTOR | none (tracing off) | OTLP/HTTP JSON traces URL, e.g. `http://127.0.0.1:4318/v1/traces` |
| MESH_TRANSPARENT | `0` | `1`: the outbound listener takes iptables-redirected connections (`mesh run --netns`): HTTP by Host as usual, other TCP by SO_ORIGINAL_DST (microproxy/transparent.py) |
| MESH_TRACE_SAMPLE | `1` | probability (0..1) of sampling a new root trace; a caller's sampled flag wins |
| MESH_PIPELINE_DEPTH / MESH_PIPELINE_AFTER / MESH_PIPELINE_MAX_AGE_MS | `16` / `2` / `10` | HTTP/1.1 pipelining of bodiless GETs to peer proxies: at most DEPTH per connection (1 = off), once AFTER connections to the endpoint are busy, only behind a response in flight for less than MAX_AGE_MS (upstream.Pipelining) |
| MESH_OPAQUE_PORTS | none | comma list of ports and ranges (`25,3306,4000-4010`; the `config.micromesh.io/opaque-ports` annotation): with MESH_TRANSPARENT, connections whose original destination port is listed skip protocol detection and go straight to the opaque tunnel (portranges.py) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Mapping

from .policy import DEFAULT_MODE, MODES
from .portranges import PortRanges, parse_port_ranges


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {addr!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host[:port][/path]`` -> (host, port, path); the path defaults to ``/v1/traces``
    (OTLP/HTTP). Plain http only."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise ValueError(f"bad URL {url!r}: want http://HOST[:PORT][/PATH]")
    hostport, slash, path = rest.partition("/")
    path = slash + path if path else "/v1/traces"
    if hostport.startswith("[") and "]" in hostport:
        host, _, port = hostport[1:].partition("]")
        port = port[1:] if port.startswith(":") else "80"
    else:
        host, sep, port = hostport.partition(":")
        port = port if sep else "80"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad URL {url!r}: want http://HOST[:PORT][/PATH]")
    return host, int(port), path


def _read(env: Mapping[str, str], name: str) -> str | None:
    if env.get(name):
        return env[name]
    path = env.get(name + "_FILE")
    if path:
        with open(path) as f:
            return f.read()
    return None


@dataclass(frozen=True, slots=True)
class Config:
    identity_addr: tuple[str, int]
    destination_addr: tuple[str, int]
    trust_pem: bytes
    token: str
    workload: str = "app"
    namespace: str = "default"
    service_account: str = "app"
    trust_domain: str = "cluster.local"
    app_port: int | None = None
    service_port: int | None = None
    service: str = ""                 # the shared service (local mode); "" = the workload's name
    register: bool = True
    instance: str = "app-0"
    outbound_addr: tuple[str, int] = ("127.0.0.1", 4140)
    inbound_addr: tuple[str, int] = ("0.0.0.0", 4143)
    admin_addr: tuple[str, int] = ("127.0.0.1", 4191)
    advertise_host: str = "127.0.0.1"
    ports_file: str | None = None
    shutdown_grace: float = 30.0
    failfast_timeout: float = 3.0
    connect_timeout: float = 1.0
    log_level: str = "warning"
    access_log: bool = False
    identity_name: str = ""
    destination_name: str = ""
    default_inbound_policy: str = DEFAULT_MODE
    trace_collector: str | None = None
    trace_sample: float = 1.0
    transparent: bool = False         # outbound takes redirected TCP (transparent.py)
    token_file: str | None = None     # MESH_TOKEN_FILE: re-read at each certify (identity_client.py)
    opaque_ports: PortRanges = ()     # MESH_OPAQUE_PORTS: inclusive (first, last) ranges

    @property
    def identity(self) -> str:
        return f"{self.service_account}.{self.namespace}.serviceaccount.identity.{self.trust_domain}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Config":
        env = os.environ if env is None else env
        missing = [n for n in ("MESH_IDENTITY_ADDR", "MESH_DESTINATION_ADDR") if not env.get(n)]
        trust = _read(env, "MESH_TRUST_ANCHORS")
        token = _read(env, "MESH_TOKEN")
        if trust is None:
            missing.append("MESH_TRUST_ANCHORS")
        if token is None:
            missing.append("MESH_TOKEN")
        if missing:
            raise ValueError("missing configuration: " + ", ".join(missing))
        assert trust is not None and token is not None
        workload = env.get("MESH_WORKLOAD", "app")
        td = env.get("MESH_TRUST_DOMAIN", "cluster.local")
        app_port = int(env["MESH_APP_PORT"]) if env.get("MESH_APP_PORT") else None
        svc_port = int(env["MESH_SERVICE_PORT"]) if env.get("MESH_SERVICE_PORT") else app_port
        inbound_policy = env.get("MESH_DEFAULT_INBOUND_POLICY") or DEFAULT_MODE
        if inbound_policy not in MODES:
            raise ValueError(f"MESH_DEFAULT_INBOUND_POLICY must be one of {', '.join(MODES)}")
        collector = env.get("MESH_TRACE_COLLECTOR") or None
        if collector is not None:
            split_url(collector)
        sample = float(env.get("MESH_TRACE_SAMPLE", "1"))
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"MESH_TRACE_SAMPLE={sample}: want a probability in 0..1")
        return cls(
            identity_addr=split_addr(env["MESH_IDENTITY_ADDR"]),
            destination_addr=split_addr(env["MESH_DESTINATION_ADDR"]),
            trust_pem=trust.encode(),
            token=token.strip(),
            workload=workload,
            namespace=env.get("MESH_NAMESPACE", "default"),
            service_account=env.get("MESH_SERVICE_ACCOUNT", workload),
            trust_domain=td,
            app_port=app_port,
            service_port=svc_port,
            service=env.get("MESH_SERVICE") or "",
            register=env.get("MESH_REGISTER", "1") not in ("0", "false", "no"),
            instance=env.get("MESH_INSTANCE") or f"{workload}-{os.getpid()}",
            outbound_addr=split_addr(env.get("MESH_OUTBOUND_ADDR", "127.0.0.1:4140")),
            inbound_addr=split_addr(env.get("MESH_INBOUND_ADDR", "0.0.0.0:4143")),
            admin_addr=split_addr(env.get("MESH_ADMIN_ADDR", "127.0.0.1:4191")),
            advertise_host=env.get("MESH_INBOUND_ADVERTISE_HOST", "127.0.0.1"),
            ports_file=env.get("MESH_PORTS_FILE") or None,
            shutdown_grace=float(env.get("MESH_SHUTDOWN_GRACE_PERIOD", "30")),
            failfast_timeout=float(env.get("MESH_FAILFAST_TIMEOUT", "3")),
            connect_timeout=float(env.get("MESH_CONNECT_TIMEOUT", "1")),
            log_level=env.get("MESH_LOG_LEVEL", "warning"),
            access_log=env.get("MESH_ACCESS_LOG", "0") in ("1", "true", "yes"),
            identity_name=env.get("MESH_IDENTITY_NAME") or f"identity.micromesh.serviceaccount.identity.{td}",
            destination_name=env.get("MESH_DESTINATION_NAME") or f"destination.micromesh.serviceaccount.identity.{td}",
            default_inbound_policy=inbound_policy,
            trace_collector=collector,
            trace_sample=sample,
            transparent=env.get("MESH_TRANSPARENT", "0") in ("1", "true", "yes"),
            # MESH_TOKEN wins over the file, as in _read
            token_file=None if env.get("MESH_TOKEN") else (env.get("MESH_TOKEN_FILE") or None),
            opaque_ports=parse_port_ranges(env.get("MESH_OPAQUE_PORTS", ""), "MESH_OPAQUE_PORTS"),
        )
