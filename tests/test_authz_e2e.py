"""Authorization policy end to end: `mesh up`, real workloads (`mesh run --detach`, real
proxies and apps), policies applied with `mesh apply -f`, requests over the mesh.

The seed's two examples, each with the allowed and the denied caller:

- "only allow requests to billing from payment; deny all others"
- "only allow GET /metrics from prometheus" (on the workload ``web``)

plus: opaque TCP (CONNECT) denied before a byte reaches the app, gRPC PERMISSION_DENIED,
updates applied within about a second, the last policy kept while destination is down
(and the resources surviving its restart), fail closed before the first policy, the
default inbound policy flag, AUDIT logging, the authz metrics, `mesh authz` and a bad
resource refused with one line. Every wait polls against a deadline.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli import local
from identity import tokens
from identity.store import MeshHome
from tests.harness import Conn, Response, clean_env, metric_sum, read_ports, wait_until as until
from tests.test_cli_local import mesh, needs_proxy, sweep

pytestmark = [pytest.mark.timeout(240), needs_proxy]



# --- an app that counts what reaches it (for opaque TCP)

COUNTING_APP = """\
import os, socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(64)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            log.write(f"bytes {len(data)}\\n")
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    log.write("open\\n")
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class CountingApp:
    """The vault app: an echo server that logs every connection and the bytes it receives."""

    def __init__(self, tmp: Path) -> None:
        self.script = tmp / "counting_app.py"
        self.script.write_text(COUNTING_APP)
        self.log = tmp / "counting_app.log"
        self.log.touch()

    def cmd(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.log)]

    def snapshot(self) -> tuple[int, int]:
        """(connections accepted, bytes received) so far."""
        lines = self.log.read_text().splitlines()
        return (sum(1 for ln in lines if ln == "open"),
                sum(int(ln.split()[1]) for ln in lines if ln.startswith("bytes ")))


# --- the mesh for this module

@dataclass
class Env:
    home: Path
    tmp: Path
    vault: CountingApp
    ports: dict[str, int]                      # app ports of the servers
    w: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> workload record

    def refresh(self) -> None:
        self.w = {r["name"]: r for r in json.loads(mesh(self.home, "ps", "-o", "json").stdout)}

    def via(self, client: str) -> int:
        """The outbound port of a client workload's proxy."""
        return int(self.w[client]["outbound_port"])

    def inbound(self, server: str) -> int:
        return int(self.w[server]["inbound_port"])

    def admin(self, name: str) -> int:
        return int(self.w[name]["admin_port"])

    def authority(self, server: str) -> str:
        return f"{server}.default:{self.ports[server]}"

    def call(self, client: str, server: str, path: str = "/", method: str = "GET",
             headers: dict[str, str] | None = None) -> Response:
        auth = self.authority(server)
        with Conn(self.via(client)) as c:
            return c.request(method, f"http://{auth}{path}", {"Host": auth, **(headers or {})})

    def plain(self, server: str, path: str = "/", method: str = "GET") -> Response:
        """A plaintext (unauthenticated) request straight to the server's inbound port."""
        with Conn(self.inbound(server)) as c:
            return c.request(method, path, {"Host": self.authority(server)})

    def apply(self, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        path = self.tmp / f"policy-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        return mesh(self.home, "apply", "-f", str(path), check=check)

    def metrics(self, name: str) -> str:
        return local.admin_get(self.admin(name), "/metrics")[1].decode()

    def proxy_log(self, name: str) -> str:
        return Path(self.w[name]["logs"]["proxy"]).read_text(errors="replace")


def http_server(port: int, www: Path) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(www)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("authz")
    home = tmp / "mesh-home"
    www = tmp / "www"
    www.mkdir()
    for name in ("charge", "metrics", "other", "index.html"):
        (www / name).write_text(f"{name}\n")
    vault = CountingApp(tmp)
    ports = {name: local.free_port() for name in ("billing", "web", "strict", "vault")}
    mesh(home, "up")
    runs = [
        ("billing", ["--port", str(ports["billing"])], http_server(ports["billing"], www)),
        ("web", ["--port", str(ports["web"])], http_server(ports["web"], www)),
        ("strict", ["--port", str(ports["strict"]), "--default-inbound-policy", "all-authenticated"],
         http_server(ports["strict"], www)),
        ("vault", ["--port", str(ports["vault"])], vault.cmd()),
        ("payment", [], ["sleep", "600"]),
        ("other", [], ["sleep", "600"]),
        ("prometheus", [], ["sleep", "600"]),
    ]
    e = Env(home, tmp, vault, ports)
    try:
        procs = [subprocess.Popen(["mesh", "run", "--name", name, *flags, "--detach", "--", *cmd],
                                  env={**clean_env(), "MESH_HOME": str(home),
                                       "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
                 for name, flags, cmd in runs]
        for p, (name, _, _) in zip(procs, runs):
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, f"mesh run {name}: {out}"
        e.refresh()
        yield e
    finally:
        mesh(home, "down", check=False)
        sweep(home)


BILLING_FROM_PAYMENT = """\
apiVersion: policy.micromesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: billing-from-payment, namespace: default}
spec:
  targetRef: {kind: Workload, name: billing}
  action: ALLOW
  rules:
  - from: {serviceAccounts: [payment%s]}
"""

METRICS_FROM_PROMETHEUS = """\
apiVersion: policy.micromesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: metrics-from-prometheus}
spec:
  targetRef: {kind: Workload, name: web}
  rules:
  - from: {serviceAccounts: [prometheus]}
    to: {methods: [GET], paths: [/metrics]}
"""


def denied(r: Response, reason: str) -> bool:
    return r.status == 403 and reason in r.headers.get("x-mesh-proxy-error")


# --- the seed's examples

def test_only_payment_may_call_billing(env: Env) -> None:
    assert env.call("other", "billing", "/charge").status == 200    # default: all-unauthenticated
    out = env.apply(BILLING_FROM_PAYMENT % "").stdout
    assert out.strip() == "authorizationpolicy/billing-from-payment created"
    until(lambda: env.call("other", "billing", "/charge").status == 403, 5, "the policy to apply")
    r = env.call("payment", "billing", "/charge")
    assert r.status == 200 and r.body == b"charge\n"
    r = env.call("other", "billing", "/charge")
    assert denied(r, "denied by policy billing-from-payment"), (r.status, r.headers.items)
    r = env.plain("billing", "/charge")                               # no identity at all
    assert denied(r, "denied by policy billing-from-payment")
    r = env.call("other", "billing", "/charge", "POST", {"content-type": "application/grpc",
                                                           "content-length": "0"})
    assert (r.status, r.headers.get("grpc-status")) == (200, "7")     # PERMISSION_DENIED
    assert "billing-from-payment" in r.headers.get("grpc-message")
    assert env.apply(BILLING_FROM_PAYMENT % "").stdout.strip().endswith("unchanged")


def test_only_prometheus_may_get_metrics(env: Env) -> None:
    env.apply(METRICS_FROM_PROMETHEUS)
    until(lambda: env.call("other", "web", "/metrics").status == 403, 5, "the policy to apply")
    assert env.call("prometheus", "web", "/metrics").status == 200
    assert denied(env.call("prometheus", "web", "/metrics", "POST"), "metrics-from-prometheus")
    assert denied(env.call("prometheus", "web", "/other"), "metrics-from-prometheus")
    assert denied(env.call("prometheus", "web", "/metrics/../other"), "metrics-from-prometheus")
    assert denied(env.call("other", "web", "/metrics"), "metrics-from-prometheus")
    assert denied(env.plain("web", "/metrics"), "metrics-from-prometheus")


# --- opaque TCP

VAULT_FROM_PAYMENT = """\
apiVersion: policy.micromesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: vault-from-payment}
spec:
  targetRef: {kind: Workload, name: vault}
  rules: [{from: {serviceAccounts: [payment]}}]
"""


def test_opaque_tcp_denied_before_any_byte_reaches_the_app(env: Env) -> None:
    env.apply(VAULT_FROM_PAYMENT)
    auth = env.authority("vault")
    connect = f"CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\n".encode()
    until(lambda: b"vault-from-payment" in local.admin_get(env.admin("vault"), "/config")[1],
          5, "vault's proxy to know the policy")
    # allowed: payment's tunnel reaches the app (proves the counter counts)
    before = env.vault.snapshot()
    with Conn(env.via("payment")) as c:
        c.send(connect)
        assert c.read_head()[0] == 200
        c.send(b"hello vault")
        assert c.read_exact(11) == b"hello vault"
    assert env.vault.snapshot()[1] == before[1] + 11
    # denied through the mesh: other's tunnel is closed, nothing reaches the app
    before = env.vault.snapshot()
    with Conn(env.via("other")) as c:
        c.send(connect + b"secret bytes sent right behind the CONNECT")
        assert c.closed_by_peer()
        assert b"200" not in c.buf.split(b"\r\n", 1)[0]
    # denied at the inbound port itself (plaintext, no identity): 403, then closed
    with Conn(env.inbound("vault")) as c:
        c.send(connect + b"more secret bytes")
        status, _, headers = c.read_head()
        assert status == 403 and ("x-mesh-proxy-error", "denied by policy vault-from-payment") in headers
        assert c.closed_by_peer()
    assert env.vault.snapshot() == before    # no new connection, no byte
    text = env.metrics("vault")
    assert metric_sum(text, "inbound_tcp_authz_deny_total", authz_name="vault-from-payment") >= 2
    assert metric_sum(text, "inbound_tcp_authz_allow_total", authz_name="vault-from-payment") >= 1


# --- changes over time

def test_policy_update_applies_within_a_second(env: Env) -> None:
    assert env.call("other", "billing").status == 403
    t0 = time.monotonic()
    env.apply(BILLING_FROM_PAYMENT % ", other")            # `mesh apply` itself included
    until(lambda: env.call("other", "billing").status == 200, 3, "other to be allowed")
    took = time.monotonic() - t0
    print(f"policy update applied after {took * 1000:.0f} ms (mesh apply included)")
    assert took < 1.5, f"the update took {took:.2f}s"
    env.apply(BILLING_FROM_PAYMENT % "")
    until(lambda: env.call("other", "billing").status == 403, 3, "other to be denied again")
    assert env.call("payment", "billing").status == 200


def test_destination_down_keeps_the_last_policy(env: Env) -> None:
    dest = local.read_controlplane(MeshHome(env.home))["destination"]
    assert dest.pid is not None
    os.kill(dest.pid, signal.SIGTERM)
    until(lambda: not local.alive(dest.pid, dest.start), 10, "destination to stop")
    until(lambda: not json.loads(local.admin_get(env.admin("billing"), "/config")[1])["policy"]["connected"],
          5, "billing's policy watch to notice")
    for _ in range(5):
        assert env.call("payment", "billing").status == 200
        assert denied(env.call("other", "billing"), "billing-from-payment")
        assert denied(env.plain("billing"), "billing-from-payment")
    mesh(env.home, "up")                                  # restarts destination on its port
    out = mesh(env.home, "get", "policies").stdout         # the resources survived the restart
    assert "billing-from-payment" in out and "metrics-from-prometheus" in out
    # the proxies reconnect (backoff at most 3 s) and follow new versions again
    env.apply(BILLING_FROM_PAYMENT % ", other")
    until(lambda: env.call("other", "billing").status == 200, 10, "the update after the restart")
    env.apply(BILLING_FROM_PAYMENT % "")
    until(lambda: env.call("other", "billing").status == 403, 5, "the revert after the restart")


def test_fail_closed_before_the_first_policy(env: Env) -> None:
    """A proxy that never reached destination denies every inbound request."""
    home = MeshHome(env.home)
    comps = local.read_controlplane(home)
    ports_file = env.tmp / "lonely.ports.json"
    token = tokens.mint(home.secret(), "default", "lonely", time.time(), 600)
    proc = subprocess.Popen([sys.executable, "-m", "microproxy"], env=clean_env(
        MESH_IDENTITY_ADDR=comps["identity"].addr,
        MESH_DESTINATION_ADDR=f"127.0.0.1:{local.free_port()}",        # nobody there
        MESH_TRUST_ANCHORS_FILE=str(home.anchor_crt), MESH_TOKEN=token, MESH_WORKLOAD="lonely",
        MESH_APP_PORT=str(env.ports["billing"]), MESH_OUTBOUND_ADDR="127.0.0.1:0",
        MESH_INBOUND_ADDR="127.0.0.1:0", MESH_ADMIN_ADDR="127.0.0.1:0", MESH_PORTS_FILE=str(ports_file),
        MESH_LOG_LEVEL="info"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ports = until(lambda: read_ports(ports_file, proc.pid), 20, "the lonely proxy to listen")
        with Conn(int(ports["inbound"])) as c:
            r = c.request("GET", "/charge", {"Host": "lonely.default"})
        assert denied(r, "policy not yet known")
        status, body = local.admin_get(int(ports["admin"]), "/ready")
        assert status == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_default_inbound_policy_flag(env: Env) -> None:
    assert env.call("payment", "strict").status == 200
    assert denied(env.plain("strict"), "default policy all-authenticated")
    text = env.metrics("strict")
    assert metric_sum(text, "inbound_http_authz_deny_total", authz_name="default:all-authenticated") >= 1
    assert metric_sum(text, "inbound_http_authz_allow_total", authz_name="default:all-authenticated") >= 1
    out = mesh(env.home, "authz", "strict").stdout
    assert "default inbound policy all-authenticated" in out


def test_audit_policy_logs_and_allows(env: Env) -> None:
    env.apply("""\
apiVersion: policy.micromesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-charges}
spec:
  targetRef: {kind: Workload, name: billing}
  action: AUDIT
  rules: [{to: {paths: ["/charge*"]}}]
""")
    log_has = lambda: "authz=audit-charges" in env.proxy_log("billing")  # noqa: E731
    until(lambda: env.call("payment", "billing", "/charge?n=1").status == 200 and log_has(), 5,
          "an audit line in billing's proxy log")
    assert denied(env.call("other", "billing", "/charge"), "billing-from-payment")  # audit changes nothing
    mesh(env.home, "delete", "policy", "audit-charges")


# --- observability and the CLI

def test_authz_metrics_and_mesh_authz(env: Env) -> None:
    text = env.metrics("billing")
    assert metric_sum(text, "inbound_http_authz_allow_total", authz_name="billing-from-payment") >= 1
    assert metric_sum(text, "inbound_http_authz_deny_total", authz_name="billing-from-payment") >= 1
    assert metric_sum(text, "inbound_http_authz_allow_total", authz_name="default:all-unauthenticated") >= 1
    out = mesh(env.home, "authz", "billing").stdout
    lines = out.splitlines()
    assert "default inbound policy all-unauthenticated" in lines[0]
    row = next(line for line in lines if line.startswith("billing-from-payment"))
    assert "ALLOW" in row and "sa:default/payment" in row
    assert any(line.startswith("[default]") for line in lines)
    view = json.loads(mesh(env.home, "authz", "billing", "-o", "json").stdout)
    assert [p["name"] for p in view["policies"]] == ["billing-from-payment"]
    assert view["default"] == "all-unauthenticated" and view["default_applies"] is False
    items = json.loads(mesh(env.home, "get", "authorizationpolicies", "-o", "json").stdout)
    assert {i["metadata"]["name"] for i in items} == {"billing-from-payment", "metrics-from-prometheus",
                                                      "vault-from-payment"}
    # round trip: what `get -o yaml` prints can be applied again, unchanged
    yaml_out = mesh(env.home, "get", "policies", "-o", "yaml").stdout
    again = env.apply(yaml_out).stdout.splitlines()
    assert again and all(line.endswith(" unchanged") for line in again)


def test_bad_resource_is_refused_with_one_line(env: Env) -> None:
    good_then_bad = """\
apiVersion: policy.micromesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: would-be-applied}
spec: {targetRef: {name: billing}}
---
apiVersion: policy.micromesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken}
spec:
  action: PERMIT
"""
    r = env.apply(good_then_bad, check=False)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "document 2 (broken): spec.action: must be ALLOW, DENY or AUDIT" in err
    assert "would-be-applied" not in mesh(env.home, "get", "policies").stdout   # nothing applied
    r = env.apply("kind: [unclosed", check=False)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "not valid YAML" in r.stderr
    r = mesh(env.home, "delete", "policy", "no-such-policy", check=False)
    assert r.returncode == 1 and "not found" in r.stderr
    assert mesh(env.home, "delete", "policy", "no-such-policy", "--ignore-not-found").returncode == 0


def test_no_tracebacks_in_any_log(env: Env) -> None:
    logs = sorted((env.home / "logs").glob("*.log"))
    assert logs
    bad = [p.name for p in logs if "Traceback" in p.read_text(errors="replace")]
    assert not bad, f"tracebacks in {bad}"
