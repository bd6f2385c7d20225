"""`mesh run --netns`: pods as network namespaces, intercepted by iptables, end to end.

Real parts only: `mesh up`, three pods (books: HTTP; echo: TCP on two ports; clients
that are one-shot `mesh run --netns`), microproxy init's nat rules, the proxy as uid
2102, SO_ORIGINAL_DST, service VIPs from destination, then `mesh down`. Every address
used is inside namespaces the mesh created (10.244.0.0/24 on the mm-node bridge; VIPs
10.96.0.0/16 are redirected before they leave a pod). Root only (CI is root).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import netns

pytestmark = pytest.mark.timeout(120)

MESH = Path(sys.executable).parent / "mesh"
CLIENT_ID = "client.default.serviceaccount.identity.cluster.local"
TCPC_ID = "tcpc.default.serviceaccount.identity.cluster.local"

BOOKS = textwrap.dedent('''\
    import http.server, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (f"books host={self.headers.get('host')} client-id={self.headers.get('x-mesh-client-id')} "
                    f"peer={self.client_address[0]}\\n").encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
''')

# TCP echo on PORT and PORT+1, prefixed with the port and the peer address it saw
ECHO = textwrap.dedent('''\
    import os, socket, threading
    def serve(port):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(16)
        while True:
            c, peer = ls.accept()
            def one(c=c, peer=peer):
                data = c.recv(4096)
                c.sendall(f"{port} peer={peer[0]} ".encode() + data)
                c.close()
            threading.Thread(target=one, daemon=True).start()
    port = int(os.environ["PORT"])
    threading.Thread(target=serve, args=(port + 1,), daemon=True).start()
    serve(port)
''')

# an opaque (non-HTTP: first byte 0x00) client: one line per target
TCP_CLIENT = textwrap.dedent('''\
    import socket, sys
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"\\x00\\x01hello")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        print(target, out[:-7].decode(), out[-7:] == b"\\x00\\x01hello")
''')


def _why_not() -> str | None:
    why = netns.unsupported()
    if why:
        return why
    if shutil.which("curl") is None:
        return "curl is not installed"
    if netns.NODE_NS in netns.namespaces():
        return f"namespace {netns.NODE_NS} already exists (another mesh is using it)"
    return None


_WHY = _why_not()
pytestmark = [pytestmark, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]


def mesh(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    env["MESH_HOME"] = str(home)
    argv = [str(MESH)] if MESH.exists() else [sys.executable, "-m", "cli.main"]
    r = subprocess.run([*argv, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"`mesh {' '.join(args)}` exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def sh(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=True).stdout


def ours() -> set[str]:
    return {n for n in netns.namespaces() if n.startswith("mm-")}


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    before = ours()
    h = tmp_path / "home"
    try:
        yield h
    finally:
        mesh(h, "down", check=False)
        for ns in ours() - before:   # only if `down` failed: never leave a namespace behind
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def test_pods_in_network_namespaces(home: Path, tmp_path: Path) -> None:
    (tmp_path / "books.py").write_text(BOOKS)
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "tcp.py").write_text(TCP_CLIENT)
    py = sys.executable
    mesh(home, "up")
    mesh(home, "run", "--netns", "--name", "books", "--port", "7002", "-d", "--", py, str(tmp_path / "books.py"))
    mesh(home, "run", "--netns", "--name", "echo", "--port", "7003", "--skip-inbound-ports", "7004", "-d",
         "--", py, str(tmp_path / "echo.py"))
    pods = {r["name"]: r for r in json.loads(mesh(home, "ps", "-o", "json").stdout)}
    books_ip, echo_ip = pods["books"]["pod_ip"], pods["echo"]["pod_ip"]
    assert re.fullmatch(r"10\.244\.0\.\d+", books_ip) and pods["books"]["ready"] is True

    # outbound interception: no proxy environment, a plain name -> VIP -> 4140 -> mTLS -> 4143
    out = mesh(home, "run", "--netns", "--name", "client", "--",
               "sh", "-c", "env | grep -ci proxy; getent hosts books.default; "
               "curl -sS -m 10 http://books.default:7002/").stdout.splitlines()
    assert out[0] == "0", out                               # the app had no *_proxy variable
    assert re.match(r"10\.96\.\d+\.\d+\s+books\.default\b", out[1]), out   # the service's VIP
    assert out[2] == f"books host=books.default:7002 client-id={CLIENT_ID} peer=127.0.0.1", out

    # inbound interception: a connection to books' pod IP:7002 lands on 4143 first. From
    # the (unmeshed) node namespace: plaintext, so no client identity; from a meshed pod
    # (its proxy resolves the pod IP in destination): mTLS with the caller's identity.
    plain = sh("ip", "netns", "exec", netns.NODE_NS, "curl", "-sS", "-m", "10", f"http://{books_ip}:7002/")
    assert plain == f"books host={books_ip}:7002 client-id=None peer=127.0.0.1\n"
    by_ip = mesh(home, "run", "--netns", "--name", "client", "--",
                 "curl", "-sS", "-m", "10", f"http://{books_ip}:7002/").stdout
    assert by_ip == f"books host={books_ip}:7002 client-id={CLIENT_ID} peer=127.0.0.1\n"

    # opaque TCP through the VIP (by name and by address) and to the pod IP: tunnelled over
    # mTLS (the echo app sees its proxy, 127.0.0.1); port 7004 is skipped outbound by the
    # client and inbound by echo, so it goes straight from pod to pod.
    lines = mesh(home, "run", "--netns", "--name", "tcpc", "--skip-outbound-ports", "7004", "--",
                 py, str(tmp_path / "tcp.py"), "echo.default:7003", f"{echo_ip}:7003",
                 f"{echo_ip}:7004").stdout.splitlines()
    assert lines[0] == "echo.default:7003 7003 peer=127.0.0.1  True", lines
    assert lines[1] == f"{echo_ip}:7003 7003 peer=127.0.0.1  True", lines
    m = re.fullmatch(rf"{re.escape(echo_ip)}:7004 7004 peer=(10\.244\.0\.\d+)  True", lines[2])
    assert m and m.group(1) not in (echo_ip, "127.0.0.1"), lines   # the client pod's own address

    # mTLS with identities, as the servers' proxies counted it
    def metrics(name: str) -> str:
        admin = next(r["admin_port"] for r in json.loads(mesh(home, "ps", "-o", "json").stdout)
                     if r["name"] == name)
        return sh("curl", "-sS", "-m", "5", f"http://127.0.0.1:{admin}/metrics")
    assert re.search(rf'request_total{{[^}}]*direction="inbound"[^}}]*tls="true"[^}}]*client_id="{CLIENT_ID}"',
                     metrics("books"))
    assert re.search(rf'tcp_open_total{{[^}}]*direction="inbound"[^}}]*tls="true",client_id="{TCPC_ID}"}} 2',
                     metrics("echo"))

    # the one-shot clients removed their pods already; `mesh down` removes the rest
    assert ours() == {netns.NODE_NS, pods["books"]["netns"], pods["echo"]["netns"]}
    mesh(home, "down")
    assert not ours(), sh("ip", "netns", "list")
    assert not any(Path("/etc/netns").glob("mm-*"))
    assert "mmv" not in sh("ip", "link") and netns.BRIDGE not in sh("ip", "link")
    assert "MICROMESH" not in sh("iptables-save", "-t", "nat")
    assert not (home / "netns.json").exists()
