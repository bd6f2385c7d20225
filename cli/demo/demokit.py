"""What the demo apps share (stdlib only): a quiet JSON server on $PORT and a client.

The client is plain urllib, which honours $http_proxy: under `mesh run` every call goes
through the workload's sidecar, so `http://books.default:7002/` needs no DNS at all.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

INSTANCE = os.environ.get("MESH_INSTANCE", "local")
Route = Callable[[str], "tuple[int, Any]"]


def call(url: str, timeout: float = 3.0) -> tuple[int, Any]:
    """GET ``url``; returns (status, parsed JSON or an error string). Status 0: no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        reason = e.headers.get("x-mesh-proxy-error") or e.reason
        e.close()
        return e.code, f"{url}: {e.code} {reason}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return 0, f"{url}: {e}"


def _stop(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def serve(name: str, route: Route, default_port: int) -> None:
    """Serve ``route(path) -> (status, json)`` on 127.0.0.1:$PORT until SIGTERM."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive: the proxy pools connections to us
        server_version = name

        def do_GET(self) -> None:
            status: int
            body: Any
            if self.path == "/healthz":
                status, body = 200, {"ok": True}
            else:
                try:
                    status, body = route(self.path)
                except Exception as e:  # task boundary: answer 500, keep serving
                    status, body = 500, {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(body).encode() + b"\n"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the proxies' metrics tell the story

    port = int(os.environ.get("PORT", default_port))
    signal.signal(signal.SIGTERM, _stop)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"{name} ({INSTANCE}) listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
