"""nginx configurations for the bench: the app, and the two-hop mTLS baseline.

The app is PERF-LAB's: one worker, ``return 200 "ok"``, keep-alive with a huge
``keepalive_requests``. The two-hop baseline is the meshed path built from two nginx:

    client -> outbound nginx --mTLS (TLS 1.3, pooled)--> inbound nginx --plain (pooled)--> app

Every file an nginx instance writes (pid, logs, temp dirs) lives under its own prefix
directory, so nothing touches /var; ``daemon off`` comes from the command line
(``-g``) so the same app config also runs under ``mesh run``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from perf import procs

KEEPALIVE_REQUESTS = 100_000_000
UPSTREAM_KEEPALIVE = 64

_COMMON = """\
worker_processes 1;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 300s;
{body}
}}
"""


@dataclass(frozen=True, slots=True)
class Certs:
    """PEM files for the nginx two-hop: one leaf per side, both chained to one anchor."""
    anchor: Path
    out_chain: Path
    out_key: Path
    in_chain: Path
    in_key: Path
    in_identity: str


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def nginx_version(binary: str) -> str:
    r = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (r.stderr or r.stdout).strip().removeprefix("nginx version: ").removeprefix("nginx/")


def _render(prefix: Path, body: str) -> str:
    # A root master would run its worker as "nobody", which cannot read the prefix dir
    # (mkdtemp is 0700); the bench needs no privilege separation on loopback.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return _COMMON.format(user=user, prefix=prefix, keepalive_requests=KEEPALIVE_REQUESTS, body=body)


def app_conf(prefix: Path, port: int) -> str:
    return _render(prefix, f"""\
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok"; }}
    }}""")


def h2c_app_conf(prefix: Path, port: int) -> str:
    """The same app over cleartext HTTP/2 (h2c). nginx 1.22's ``listen ... http2`` without
    ``ssl`` speaks HTTP/2 with prior knowledge only (an HTTP/1 request gets no answer)."""
    return _render(prefix, f"""\
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ return 200 "ok"; }}
    }}""")


def inbound_conf(prefix: Path, port: int, app_port: int, certs: Certs) -> str:
    """TLS 1.3 listener that requires a client certificate from the anchor; pooled to the app."""
    return _render(prefix, f"""\
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs.in_chain};
        ssl_certificate_key {certs.in_key};
        ssl_protocols TLSv1.3;
        ssl_client_certificate {certs.anchor};
        ssl_verify_client on;
        ssl_verify_depth 2;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""")


def outbound_conf(prefix: Path, port: int, inbound_port: int, certs: Certs) -> str:
    """Plain listener that forwards over pooled mTLS, verifying the inbound's identity."""
    return _render(prefix, f"""\
    upstream inbound {{
        server 127.0.0.1:{inbound_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://inbound;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {certs.out_chain};
            proxy_ssl_certificate_key {certs.out_key};
            proxy_ssl_trusted_certificate {certs.anchor};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {certs.in_identity};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_session_reuse on;
        }}
    }}""")


def write_conf(prefix: Path, text: str) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def command(binary: str, prefix: Path, conf: Path) -> list[str]:
    return [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf),
            "-g", "daemon off;"]


def make_certs(directory: Path) -> Certs:
    """Anchor -> issuer -> two leaves, with identity/ca.py (the mesh's own CA code)."""
    import datetime as dt

    from identity import ca

    now = dt.datetime.now(dt.timezone.utc)
    anchor, anchor_key = ca.new_anchor(now)
    issuer, issuer_key = ca.new_issuer(anchor, anchor_key, now)
    out_id = ca.identity_name("nginx-out", "bench")
    in_id = ca.identity_name("nginx-in", "bench")
    out_chain, out_key = ca.self_issue(out_id, issuer, issuer_key, now)
    in_chain, in_key = ca.self_issue(in_id, issuer, issuer_key, now)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"anchor.pem": ca.cert_pem(anchor), "out.crt": out_chain, "out.key": out_key,
             "in.crt": in_chain, "in.key": in_key}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)
    return Certs(anchor=directory / "anchor.pem", out_chain=directory / "out.crt",
                 out_key=directory / "out.key", in_chain=directory / "in.crt",
                 in_key=directory / "in.key", in_identity=in_id)


def start(sup: "procs.Supervisor", binary: str, prefix: Path, text: str, port: int, timeout: float = 10.0
          ) -> tuple[int, list[int]]:
    """Start one nginx under ``sup``; returns (master pid, worker pids) once it listens."""
    conf = write_conf(prefix, text)
    p = sup.start(command(binary, prefix, conf), log=prefix / "stdout.log")
    procs.wait_port(port, timeout, p)
    deadline = time.monotonic() + timeout
    while not (workers := procs.children(p.pid)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx {prefix.name} has no worker after {timeout} s")
        time.sleep(0.02)
    return p.pid, workers
