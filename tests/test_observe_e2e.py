"""`mesh stat / edges / tap / top / diagnostics` against a real small mesh with real traffic.

One mesh for the module (a throwaway MESH_HOME): a ``books`` server whose ``/flaky`` path
answers 500 to every 4th request (so 1 in 8 of all its requests fails, deterministically)
and a ``client`` workload calling ``/ok`` and ``/flaky`` in a loop through its proxy. The
live view runs under tmux in an 80x24 pane and is read back with ``capture-pane``.
Every wait is a condition polled against a deadline; teardown is `mesh down` plus a sweep
of anything left that carries this MESH_HOME.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cli import local, stat
from identity.store import MeshHome

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")

MESH = Path(sys.executable).parent / "mesh"
SERVER = '''
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
flaky = count()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536   # head and body in one write, flushed after each request
    def do_GET(self):
        status = 200
        if self.path.startswith("/flaky") and next(flaky) % 4 == 3:
            status = 500
        body = b"books\\n"
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''
CLIENT = '''
import sys, time, urllib.request, urllib.error
base = f"http://books.default:{sys.argv[1]}"
while True:
    for path in ("/ok", "/flaky"):
        try:
            urllib.request.urlopen(base + path, timeout=3).read()
        except urllib.error.HTTPError as e:
            e.read()   # read the whole answer before hanging up, as a well-behaved client does
            e.close()
        except OSError:
            time.sleep(0.2)
    time.sleep(0.05)
'''


def wait(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    env["MESH_HOME"] = str(home)
    return env


def mesh_argv() -> list[str]:
    return [str(MESH)] if MESH.exists() else [sys.executable, "-m", "cli.main"]


def mesh(home: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mesh_argv(), *args], env=env_for(home), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(home: Path, *args: str) -> str:
    r = mesh(home, *args)
    assert r.returncode == 0, f"mesh {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def sweep(home: Path) -> None:
    needle = f"MESH_HOME={home}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                local.signal_pids([int(entry)], signal.SIGKILL)


@pytest.fixture(scope="module")
def mesh_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("observe")
    root = tmp / "mesh-home"
    (tmp / "server.py").write_text(SERVER)
    (tmp / "client.py").write_text(CLIENT)
    home = MeshHome(root)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    try:
        local.up(home)
        port = local.free_port()
        local.run_detached(home, local.WorkloadSpec(
            name="books", cmd=(sys.executable, str(tmp / "server.py")), port=port, cwd=str(tmp)))
        local.run_detached(home, local.WorkloadSpec(
            name="client", cmd=(sys.executable, str(tmp / "client.py"), str(port)), cwd=str(tmp)))
        yield root
    finally:
        os.environ.update(saved)
        local.down(home, timeout=10)
        sweep(root)


def books_row(home: Path, *args: str) -> dict[str, Any] | None:
    rows = json.loads(ok(home, "stat", "deploy/books", "-o", "json", *args))
    return rows[0] if rows and rows[0]["success"] is not None and rows[0]["rps"] > 1 else None


@pytest.fixture(scope="module")
def traffic(mesh_home: Path) -> Path:
    """The mesh, once books has served enough requests for a stable success rate."""
    def enough() -> dict[str, Any] | None:
        row = books_row(mesh_home, "-t", "10s")
        return row if row is not None and row["rps"] * 10 >= 40 else None
    wait(enough, 30, "books to serve traffic")
    return mesh_home


# === stat ===

def test_stat_shows_the_failing_service_below_100(traffic: Path) -> None:
    def failing() -> str | None:
        text = ok(traffic, "stat", "deploy")
        row = next((line.split() for line in text.splitlines() if line.startswith("books ")), None)
        return text if row and row[2] != "100.00%" else None
    # Poll: the 1-minute window must include some of the 1-in-8 failures. (Seen once in a
    # full-suite run: 100.00 % on the first read; the books proxy's /stats is attached below
    # if it ever stays so.)
    try:
        out = wait(failing, 20, "books' success rate to show the 1-in-8 failures")
    except AssertionError:
        recs = [w for w in local.list_workloads(MeshHome(traffic)) if w["name"] == "books"]
        raise AssertionError(ok(traffic, "stat", "deploy") + "\n" + "\n".join(
            local.admin_get(w["admin_port"], "/stats?window=60")[1].decode(errors="replace")[:3000]
            for w in recs))
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95",
                                "LATENCY_P99", "TCP_CONN"]
    books = next(line.split() for line in lines if line.startswith("books "))
    assert books[1] == "1/1"
    assert 80.0 <= float(books[2].rstrip("%")) <= 95.0          # 1 in 8 fails: 87.5 %
    assert books[3].endswith("rps") and float(books[3][:-3]) > 1
    assert all(re.fullmatch(r"\d+ms", c) for c in books[4:7]) and int(books[7]) >= 1
    client = next(line.split() for line in lines if line.startswith("client "))
    assert client[1:] == ["1/1", "-", "-", "-", "-", "-", "-"]   # a client serves nothing


def test_stat_from_to_and_authority_agree(traffic: Path) -> None:
    # Rates agree once both proxies are older than the window (a young proxy's rate is over
    # its uptime, which for books includes the time before the client started).
    home = MeshHome(traffic)
    records = [r for r in local.list_workloads(home, probe=False) if r["alive"]]
    wait(lambda: True if all(p.elapsed >= 5 for p in stat.fetch(records, 5, stat.peer_lookup(records)).stats)
         else None, 15, "both proxies to cover a 5 s window")
    served = books_row(traffic, "-t", "5s")
    sent = json.loads(ok(traffic, "stat", "deploy/client", "--to", "deploy/books", "-t", "5s", "-o", "json"))[0]
    via = books_row(traffic, "--from", "deploy/client", "-t", "5s")
    assert served is not None and via is not None
    for row in (sent, via):
        assert 0.80 <= row["success"] <= 0.95
        assert row["rps"] == pytest.approx(served["rps"], rel=0.25)
    assert "tcp_open_connections" not in via                    # TCP is per proxy, not per client
    auth = ok(traffic, "stat", "authority")
    assert re.search(r"^books\.default:\d+\s+-\s+\d+\.\d\d%", auth, re.MULTILINE), auth
    pods = ok(traffic, "stat", "pod", "-o", "wide").splitlines()
    assert pods[0].split()[:3] == ["NAME", "STATUS", "MESHED"] and pods[0].endswith("WRITE_BYTES/SEC")
    assert any(re.match(r"books-[0-9a-f]{4}\s+Running\s+1/1", line) for line in pods)


def test_stat_answers_in_well_under_a_second_and_skips_a_hung_proxy(traffic: Path) -> None:
    home = MeshHome(traffic)
    records = [r for r in local.list_workloads(home, probe=False) if r["alive"]]
    started = time.monotonic()
    fetched = stat.fetch(records, 60, stat.peer_lookup(records))
    assert time.monotonic() - started < 0.5 and not fetched.notes and len(fetched.stats) == 2
    client = next(r for r in records if r["name"] == "client")
    os.kill(client["proxy_pid"], signal.SIGSTOP)                # hung: accepts, never answers
    try:
        started = time.monotonic()
        r = mesh(traffic, "stat", "pod")
        took = time.monotonic() - started
    finally:
        os.kill(client["proxy_pid"], signal.SIGCONT)
    assert r.returncode == 0 and took < 3.0, (took, r.stderr)
    assert f"mesh: {client['instance']} (admin 127.0.0.1:{client['admin_port']}): timed out; skipped" \
        in r.stderr
    assert re.search(rf"^{client['instance']}\s+NotReady\s+0/1(\s+-)+$", r.stdout, re.MULTILINE), r.stdout


@pytest.mark.parametrize(("args", "code", "message"), [
    (["stat", "books"], 2, "unknown resource type 'books'"),
    (["stat", "deploy/books", "--from", "deploy/a", "--to", "deploy/b"], 2, "mutually exclusive"),
    (["stat", "-t", "11m"], 2, "out of range"),
    (["stat", "-n", "x", "-A"], 2, "mutually exclusive"),
    (["stat", "deploy/nope"], 1, "no running deploy/nope in namespace default"),
    (["tap", "authority"], 2, "not supported here"),
    (["top", "deploy/nope"], 1, "nothing to tap"),
    (["diagnostics", "proxy-metrics", "nope"], 1, "no running proxy matches nope"),
    (["stat", "--prometheus", "http://127.0.0.1:1"], 1, "cannot query Prometheus"),
])
def test_bad_targets_and_flags_are_one_line_errors(mesh_home: Path, args: list[str], code: int,
                                                   message: str) -> None:
    r = mesh(mesh_home, *args)
    assert r.returncode == code, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


# === edges, diagnostics ===

def test_edges_show_who_talks_to_whom_over_mtls(traffic: Path) -> None:
    assert ok(traffic, "edges").splitlines() == [
        "SRC      DST     SRC_NS    DST_NS    SECURED",
        "client   books   default   default   √"]
    wide = ok(traffic, "edges", "-o", "wide").splitlines()
    assert wide[1].split() == ["client", "books", "default", "default", "client.default", "books.default", "√"]
    [edge] = json.loads(ok(traffic, "edges", "-o", "json"))
    assert edge["no_tls_reason"] == "" and edge["server_id"] == "books.default"


def test_proxy_metrics_prints_each_proxy_with_a_header(traffic: Path) -> None:
    out = ok(traffic, "diagnostics", "proxy-metrics", "books")
    assert re.match(r"#\n# POD books-[0-9a-f]{4} \(1 of 1\)\n#\n# HELP ", out)
    assert 'request_total{namespace="default",workload="books",direction="inbound"' in out


# === tap ===

def test_tap_prints_req_rsp_end_lines(traffic: Path) -> None:
    lines = ok(traffic, "tap", "deploy/books", "--max-events", "12").splitlines()
    assert len(lines) == 12
    req = next(line for line in lines if line.startswith("req "))
    m = re.match(r"req id=(1:\d+) proxy=in  src=127\.0\.0\.1:\d+ dst=127\.0\.0\.1:\d+ tls=true "
                 r":method=GET :authority=books\.default:\d+ :path=/(ok|flaky)$", req)
    assert m, req
    rid = m.group(1)
    following = [line for line in lines if f" id={rid} " in line]
    if len(following) == 3:   # the stream may stop before this request's rsp/end
        assert re.match(rf"rsp id={rid} proxy=in  .* tls=true :status=(200|500) latency=\d+µs$", following[1])
        assert re.match(rf"end id={rid} proxy=in  .* duration=\d+µs response-length=6B$", following[2])
    assert {line.split()[0] for line in lines} == {"req", "rsp", "end"}


def test_tap_filters_by_path_and_sees_the_failures(traffic: Path) -> None:
    lines = ok(traffic, "tap", "deploy/client", "--path", "/flaky", "--max-events", "36").splitlines()
    reqs = [line for line in lines if line.startswith("req ")]
    assert reqs and all(line.startswith("req id=1:") and " proxy=out " in line and line.endswith(":path=/flaky")
                        for line in reqs)
    assert any(":status=500 " in line for line in lines), lines       # every 4th /flaky fails
    events = [json.loads(line) for line in
              ok(traffic, "tap", "pod", "-o", "json", "--max-events", "6").splitlines()]
    assert {e["type"] for e in events} <= {"req", "rsp", "end"} and all(e["proxy"] for e in events)


# === top ===

def test_top_without_a_terminal_prints_the_table_it_collected(traffic: Path) -> None:
    out = ok(traffic, "top", "--duration", "2")
    lines = out.splitlines()
    assert lines[0].split() == ["Source", "Destination", "Method", "Path", "Count", "Best", "Worst",
                                "Last", "Success", "Rate"]
    rows = {(c[0], c[1], c[3]): c for c in (line.split() for line in lines[1:])}
    assert set(rows) == {("client", "books", "/ok"), ("client", "books", "/flaky")}   # counted once
    assert rows[("client", "books", "/ok")][-1] == "100.00%"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_top_live_in_an_80x24_tmux_pane_quits_on_q(traffic: Path) -> None:
    sock = f"mesh-top-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    cmd = (f"env -u http_proxy -u HTTP_PROXY MESH_HOME={traffic} {' '.join(mesh_argv())} top deploy/books; "
           f"echo EXITED $?; sleep 30")
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "-s", "top", cmd], check=True)

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True,
                              text=True, check=False).stdout

    try:
        screen = wait(lambda: (s if re.search(r"^client\s+books\s+GET\s+/flaky\s+\d+", s := pane(), re.MULTILINE)
                               and re.search(r"^client\s+books\s+GET\s+/ok\s+\d+", s, re.MULTILINE) else None),
                      20, "top to show both paths")
        lines = screen.splitlines()
        assert lines[0] == "(press q to quit)"
        assert lines[1].startswith("deploy/books: 1 proxy tapped, ")
        assert lines[3].split()[:5] == ["Source", "Destination", "Method", "Path", "Count"]
        assert all(len(line) <= 80 for line in lines)
        flaky = next(line.split() for line in lines if "/flaky" in line)
        assert float(flaky[-1].rstrip("%")) < 100.0 or int(flaky[4]) < 4
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
        after = wait(lambda: (s if "EXITED" in (s := pane()) else None), 10, "top to quit on q")
        assert "EXITED 0" in after and "Traceback" not in after
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)
