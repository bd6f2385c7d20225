"""`mesh up / run / ps / down / demo` end to end: the real CLI, real control plane, real
proxies and apps as subprocesses, in a throwaway MESH_HOME.

Every mesh home used here is swept at teardown: any process whose environment carries
that MESH_HOME (everything `mesh` starts inherits it) is killed, so a failing test never
leaks processes into the next one. The `down` tests assert that the sweep finds nothing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import local
from identity.store import MeshHome

pytestmark = pytest.mark.timeout(180)

needs_proxy = pytest.mark.skipif(importlib.util.find_spec("microproxy.__main__") is None,
                                 reason="the proxy (python -m microproxy) is not in this tree")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

MESH = Path(sys.executable).parent / "mesh"


# === helpers ===

def mesh_argv() -> list[str]:
    return [str(MESH)] if MESH.exists() else [sys.executable, "-m", "cli.main"]


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    env["MESH_HOME"] = str(home)
    env.update(extra)
    return env


def mesh(home: Path, *args: str, check: bool = True, timeout: float = 90.0,
         **env: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*mesh_argv(), *args], env=env_for(home, **env), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"`mesh {' '.join(args)}` exited {r.returncode}\n"
                             f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def ps(home: Path) -> list[dict[str, Any]]:
    return json.loads(mesh(home, "ps", "-o", "json").stdout)


def pids_of_home(home: Path) -> list[int]:
    """Live processes whose environment names this mesh home."""
    needle = f"MESH_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and local.alive(int(entry)):
            found.append(int(entry))
    return found


def sweep(home: Path) -> list[int]:
    """Kill whatever of this home is still running; returns what was found."""
    left = pids_of_home(home)
    local.signal_pids(left, signal.SIGKILL)
    return left


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def serve_dir(tmp: Path, name: str, text: str) -> Path:
    """A directory for `python -m http.server` holding ``id`` = text."""
    d = tmp / name
    d.mkdir()
    (d / "id").write_text(text)
    return d


def http_server(port: int, directory: Path) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", str(directory)]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A fresh mesh home path (nothing started); swept at teardown."""
    h = tmp_path / "mesh-home"
    yield h
    if h.exists():
        mesh(h, "down", check=False)
    sweep(h)


@pytest.fixture(scope="module")
def up_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One mesh, up, shared by the workload tests of this module."""
    h = tmp_path_factory.mktemp("shared") / "mesh-home"
    mesh(h, "up")
    yield h
    mesh(h, "down", check=False)
    sweep(h)


# === no proxy needed ===

def test_run_without_up_fails_with_one_line(home: Path) -> None:
    r = mesh(home, "run", "--name", "books", "--", "true", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "mesh up" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [
    ["run", "--name", "Books", "--", "true"],
    ["run", "--name", "books_1", "--", "true"],
    ["run", "--name", "-books", "--", "true"],
    ["run", "--name", "b" * 64, "--", "true"],
    ["run", "--name", "books", "--namespace", "Prod", "--", "true"],
    ["run", "--name", "books", "--port", "70000", "--", "true"],
    ["run", "--name", "books", "--port", "x", "--", "true"],
    ["run", "--name", "books"],
    ["run", "--", "true"],
    ["run", "--name", "books", "--service-port", "80", "--", "true"],
    ["ps", "-o", "yaml"],
    ["up", "--bogus"],
])
def test_bad_input_is_a_one_line_usage_error(home: Path, args: list[str]) -> None:
    r = mesh(home, *args, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_up_creates_private_ca_and_is_idempotent(home: Path) -> None:
    first = mesh(home, "up")
    assert "identity:" in first.stdout and "destination:" in first.stdout
    cp = json.loads((home / "controlplane.json").read_text())
    second = mesh(home, "up")
    assert "already up" in second.stdout
    assert json.loads((home / "controlplane.json").read_text()) == cp
    mh = MeshHome(home)
    for path in (mh.anchor_key, mh.issuer_key, mh.token_secret, mh.controlplane):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for name in ("identity", "destination"):
        assert local.alive(cp[name]["pid"], cp[name]["start"])
        assert f"127.0.0.1:{cp[name]['port']}" in second.stdout


def test_down_then_up_reuses_the_ports_and_leaves_nothing_behind(home: Path) -> None:
    mesh(home, "up")
    cp = json.loads((home / "controlplane.json").read_text())
    ports = {n: cp[n]["port"] for n in local.COMPONENTS}
    down = mesh(home, "down")
    assert "identity" in down.stdout and "destination" in down.stdout
    assert pids_of_home(home) == []
    for name, port in ports.items():
        assert not local.alive(cp[name]["pid"], cp[name]["start"])
        assert bindable(port), f"{name}'s port {port} leaked"
    after = json.loads((home / "controlplane.json").read_text())
    assert all(after[n]["pid"] is None for n in local.COMPONENTS)
    assert "nothing was running" in mesh(home, "down").stdout   # idempotent
    mesh(home, "up")
    again = json.loads((home / "controlplane.json").read_text())
    assert {n: again[n]["port"] for n in local.COMPONENTS} == ports


def test_up_restarts_a_dead_component_on_the_same_port(home: Path) -> None:
    mesh(home, "up")
    cp = json.loads((home / "controlplane.json").read_text())
    os.kill(cp["destination"]["pid"], signal.SIGKILL)
    assert local.wait_gone(lambda: [p for p in [cp["destination"]["pid"]] if local.alive(p)], 5) == []
    r = mesh(home, "ps")                         # ps still works, and says the mesh is down
    assert "not up" in r.stderr
    mesh(home, "up")
    again = json.loads((home / "controlplane.json").read_text())
    assert again["identity"]["pid"] == cp["identity"]["pid"]
    assert again["destination"]["pid"] != cp["destination"]["pid"]
    assert again["destination"]["port"] == cp["destination"]["port"]


def test_ps_without_workloads(home: Path) -> None:
    mesh(home, "up")
    assert ps(home) == []
    assert mesh(home, "ps").stdout.split() == [
        "NAME", "NAMESPACE", "SERVICE", "INSTANCE", "READY", "PID", "PROXY_PID", "APP_PORT",
        "INBOUND", "OUTBOUND", "ADMIN", "IDENTITY"]


def test_up_fails_clearly_when_a_component_cannot_start(home: Path) -> None:
    """A mesh home whose issuer key is unreadable garbage: identity cannot start."""
    mesh(home, "up")
    mesh(home, "down")
    (home / "ca" / "issuer.key").write_text("not a key\n")
    r = mesh(home, "up", "--timeout", "10", check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr.splitlines()[0]
    assert "logs/identity.log" in r.stderr or "logs/destination.log" in r.stderr
    assert pids_of_home(home) == []     # what it started, it stopped


# === with the proxy ===

@needs_proxy
@needs_curl
def test_detached_service_and_one_shot_client(up_home: Path, tmp_path: Path) -> None:
    port = local.free_port()
    out = mesh(up_home, "run", "--name", "books", "--port", str(port), "--detach", "--",
               *http_server(port, serve_dir(tmp_path, "one", "books-one")))
    assert "ready" in out.stdout and f"http://books.default:{port}" in out.stdout
    for url in (f"http://books.default:{port}/id", f"http://books.default.svc.cluster.local:{port}/id",
                f"http://books:{port}/id"):
        r = mesh(up_home, "run", "--name", "client", "--", "curl", "-sS", "--max-time", "10", url)
        assert r.stdout == "books-one", (url, r.stdout, r.stderr)
    # a client-only workload's exit code is the app's, and its proxy is gone with it
    r = mesh(up_home, "run", "--name", "client", "--", "sh", "-c", "exit 3", check=False)
    assert r.returncode == 3
    assert not [w for w in ps(up_home) if w["name"] == "client"]


@needs_proxy
def test_ps_json_fields(up_home: Path, tmp_path: Path) -> None:
    port = local.free_port()
    mesh(up_home, "run", "--name", "shelf", "--namespace", "library", "--service-account", "librarian",
         "--port", str(port), "--detach", "--", *http_server(port, serve_dir(tmp_path, "d", "x")))
    [w] = [w for w in ps(up_home) if w["name"] == "shelf"]
    assert w["namespace"] == "library"
    assert w["identity"] == "librarian.library.serviceaccount.identity.cluster.local"
    assert w["instance"].startswith("shelf-")
    assert w["ready"] is True and w["alive"] is True
    assert w["app_port"] == w["service_port"] == port
    for key in ("pid", "proxy_pid", "inbound_port", "outbound_port", "admin_port"):
        assert isinstance(w[key], int) and w[key] > 0, key
    assert local.alive(w["pid"]) and local.alive(w["proxy_pid"])
    status, body = local.admin_get(w["admin_port"], "/metrics")
    assert status == 200 and b"# TYPE" in body
    table = mesh(up_home, "ps").stdout
    assert w["instance"] in table and w["identity"] in table


@needs_proxy
@needs_curl
def test_a_second_run_adds_a_replica_and_traffic_is_balanced(up_home: Path, tmp_path: Path) -> None:
    p1, p2 = local.free_port(), local.free_port()
    mesh(up_home, "run", "--name", "papers", "--port", str(p1), "--detach", "--",
         *http_server(p1, serve_dir(tmp_path, "a", "replica-a")))
    mesh(up_home, "run", "--name", "papers", "--port", str(p2), "--detach", "--",
         *http_server(p2, serve_dir(tmp_path, "b", "replica-b")))
    replicas = [w for w in ps(up_home) if w["name"] == "papers"]
    assert len(replicas) == 2
    assert len({w["instance"] for w in replicas}) == 2
    assert {w["service_port"] for w in replicas} == {p1}      # the first replica's port
    assert {w["app_port"] for w in replicas} == {p1, p2}
    r = mesh(up_home, "run", "--name", "reader", "--", "sh", "-c",
             f"for i in 1 2 3 4 5 6; do curl -sS --max-time 10 http://papers.default:{p1}/id; echo; done")
    assert set(r.stdout.split()) == {"replica-a", "replica-b"}, r.stdout


@needs_proxy
def test_replica_on_a_taken_port_gets_a_free_one(up_home: Path) -> None:
    """Like a second pod of a Deployment: same --port, so the app is moved to a free $PORT."""
    app = [sys.executable, "-c",
           "import http.server, os; http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])),"
           " http.server.SimpleHTTPRequestHandler).serve_forever()"]
    port = local.free_port()
    mesh(up_home, "run", "--name", "twins", "--port", str(port), "--detach", "--", *app)
    r = mesh(up_home, "run", "--name", "twins", "--port", str(port), "--detach", "--", *app)
    assert "PORT=" in r.stderr
    twins = [w for w in ps(up_home) if w["name"] == "twins"]
    assert len(twins) == 2 and all(w["ready"] for w in twins)
    assert {w["service_port"] for w in twins} == {port}
    assert len({w["app_port"] for w in twins}) == 2


@needs_proxy
def test_detached_app_that_dies_is_reported_with_its_log(up_home: Path) -> None:
    port = local.free_port()
    r = mesh(up_home, "run", "--name", "crashy", "--port", str(port), "--detach", "--",
             "sh", "-c", "echo the-app-said-goodbye >&2; exit 4", check=False)
    assert r.returncode == 1
    assert "the-app-said-goodbye" in r.stderr and "exited with code 4" in r.stderr
    assert "Traceback" not in r.stderr
    assert not [w for w in ps(up_home) if w["name"] == "crashy"]


@needs_proxy
def test_sigterm_to_a_foreground_run_stops_app_and_proxy(up_home: Path) -> None:
    run = subprocess.Popen([*mesh_argv(), "run", "--name", "sleeper", "--", "sleep", "60"],
                           env=env_for(up_home), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rec = local.wait_for(lambda: next((w for w in ps(up_home)
                                           if w["name"] == "sleeper" and w["ready"]), None), 30, 0.2)
        assert rec is not None, "the foreground workload never became ready"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=20) == 128 + signal.SIGTERM
        assert not local.alive(rec["pid"]) and not local.alive(rec["proxy_pid"])
        assert not [w for w in ps(up_home) if w["name"] == "sleeper"]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


@needs_proxy
def test_down_stops_every_process_and_frees_every_port(home: Path, tmp_path: Path) -> None:
    mesh(home, "up")
    port = local.free_port()
    mesh(home, "run", "--name", "books", "--port", str(port), "--detach", "--",
         *http_server(port, serve_dir(tmp_path, "d", "x")))
    # a client-only workload whose app forks children of its own
    mesh(home, "run", "--name", "forker", "--detach", "--", "sh", "-c", "sleep 600 & sleep 600")
    # a foreground workload, still running when `down` comes
    fg = subprocess.Popen([*mesh_argv(), "run", "--name", "fg", "--", "sleep", "600"],
                          env=env_for(home), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert local.wait_for(lambda: True if any(w["name"] == "fg" and w["ready"] for w in ps(home))
                              else None, 30, 0.2)
        workloads = ps(home)
        cp = json.loads((home / "controlplane.json").read_text())
        assert len(workloads) == 3 and pids_of_home(home)
        r = mesh(home, "down")
        assert "3 workloads" in r.stdout
        assert fg.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
    assert pids_of_home(home) == [], "orphan processes after `mesh down`"
    ports = [cp[n]["port"] for n in local.COMPONENTS]
    for w in workloads:
        assert not any(local.alive(w[k]) for k in ("pid", "proxy_pid", "supervisor_pid"))
        ports += [w[k] for k in ("app_port", "inbound_port", "outbound_port", "admin_port") if w[k]]
    assert [p for p in ports if not bindable(p)] == []
    assert list((home / "workloads").iterdir()) == []
    assert ps(home) == []


@needs_proxy
def test_down_cleans_up_after_a_killed_supervisor(home: Path, tmp_path: Path) -> None:
    mesh(home, "up")
    port = local.free_port()
    mesh(home, "run", "--name", "books", "--port", str(port), "--detach", "--",
         *http_server(port, serve_dir(tmp_path, "d", "x")))
    [w] = ps(home)
    os.kill(w["supervisor_pid"], signal.SIGKILL)
    assert local.wait_for(lambda: True if not local.alive(w["supervisor_pid"]) else None, 5)
    [dead] = ps(home)
    assert dead["alive"] is False and dead["ready"] is False
    assert "dead" in mesh(home, "ps").stdout
    mesh(home, "down")
    assert pids_of_home(home) == []
    assert bindable(port) and bindable(w["inbound_port"])


@needs_proxy
@needs_curl
def test_demo(home: Path) -> None:
    r = mesh(home, "demo", FAILURE_RATE="0", timeout=120)
    assert "Try next" in r.stdout and "mesh down" in r.stdout
    names = sorted(w["name"] for w in ps(home))
    assert names == ["authors", "authors", "books", "traffic", "web"]
    page = mesh(home, "run", "--name", "me", "--", "curl", "-sS", "--max-time", "10",
                "http://web.default:7000/")
    body = json.loads(page.stdout)
    assert [b["title"] for b in body["books"]][:1] == ["The Dispossessed"]
    assert body["served_by"]["authors"].startswith("authors-")
    again = mesh(home, "demo", timeout=60)
    assert "already running" in again.stdout
    assert len(ps(home)) == 5
    mesh(home, "down")
    assert pids_of_home(home) == []


@needs_proxy
def test_run_hands_the_proxy_tunables_to_it(up_home: Path, tmp_path: Path) -> None:
    """`MESH_*` tunables in `mesh run`'s environment (the README's way to turn on tracing or
    tune pipelining) reach the proxy; other MESH_* variables do not."""
    port = local.free_port()
    mesh(up_home, "run", "--name", "tuned", "--port", str(port), "--detach", "--",
         *http_server(port, serve_dir(tmp_path, "t", "x")),
         MESH_PIPELINE_DEPTH="1", MESH_TRACE_COLLECTOR="http://127.0.0.1:9/v1/traces",
         MESH_TRACE_SAMPLE="0.5", MESH_NOT_A_TUNABLE="x")
    [w] = [w for w in ps(up_home) if w["name"] == "tuned"]
    status, body = local.admin_get(w["admin_port"], "/config")
    assert status == 200 and json.loads(body)["pipelining"]["depth"] == 1
    env = Path(f"/proc/{w['proxy_pid']}/environ").read_bytes().split(b"\0")
    assert b"MESH_TRACE_COLLECTOR=http://127.0.0.1:9/v1/traces" in env
    assert b"MESH_TRACE_SAMPLE=0.5" in env
    assert not any(e.startswith(b"MESH_NOT_A_TUNABLE=") for e in env)
