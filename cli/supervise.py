"""The supervisor of one replica: token -> proxy -> app -> wait -> clean up.

``mesh run`` (foreground) calls ``supervise()`` in its own process; ``mesh run --detach``
starts ``python -m cli.supervise --detached ...`` as the leader of a new session.

Sequence:

1. write ``workloads/<instance>.json`` (not ready) so that `mesh down` can find us;
2. mint the workload's token and start the proxy (``python -m microproxy``, configured
   by environment; its own process group; log ``logs/<instance>-proxy.log``);
3. wait for the proxy's ports file (it has a certificate and its listeners are bound);
4. start the app with ``http_proxy`` pointing at the outbound listener. A workload
   with an app port starts the app first and then waits for the proxy's /ready (the
   proxy registers only once the app port accepts connections); a client-only
   workload waits for /ready first, so its first request already finds the mesh;
5. mark the record ready, then wait for the app to exit;
6. SIGTERM the app (if still running), then the proxy; SIGKILL after a grace period;
   remove the record; exit with the app's exit code (128+N if killed by signal N).

SIGTERM, SIGINT and SIGHUP to the supervisor jump to step 6; a second one skips the
grace periods. If the proxy dies while the app runs, the app is stopped and the
supervisor exits 1.
"""
from __future__ import annotations

import argparse
import os
import select
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from identity import tokens
from identity.store import MeshHome, write_json

from . import local
from .workloads import Launch

T = TypeVar("T")

READY_TIMEOUT = 30.0        # seconds for the proxy to listen and then be ready
APP_GRACE = 10.0            # seconds between SIGTERM and SIGKILL for the app
PROXY_GRACE = 5.0           # local default for MESH_SHUTDOWN_GRACE_PERIOD
TOKEN_TTL = 30 * 24 * 3600  # the proxy renews its certificate with this token
PROXY_TUNABLES = ("MESH_LOG_LEVEL", "MESH_ACCESS_LOG", "MESH_SHUTDOWN_GRACE_PERIOD",
                  "MESH_FAILFAST_TIMEOUT", "MESH_CONNECT_TIMEOUT", "MESH_DEFAULT_INBOUND_POLICY",
                  # resilience (microproxy/resilience.py)
                  "MESH_FAILURE_ACCRUAL", "MESH_MAX_PENDING_REQUESTS", "MESH_MAX_CONNECTIONS_PER_SERVICE",
                  "MESH_DEFAULT_RETRY",
                  # tracing (microproxy/tracing.py) and pipelining (microproxy/upstream.py)
                  "MESH_TRACE_COLLECTOR", "MESH_TRACE_SAMPLE",
                  "MESH_PIPELINE_DEPTH", "MESH_PIPELINE_AFTER", "MESH_PIPELINE_MAX_AGE_MS")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Wakeup:
    """Wakes the supervisor's waits on a stop signal or a child's exit (a self-pipe fed
    by ``signal.set_wakeup_fd``), so nothing polls faster than it has to."""

    def __init__(self) -> None:
        self.stops = 0              # how many stop signals arrived
        self.signum = 0             # the first one
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w)
        self._old: dict[int, Any] = {}
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._on_stop)
        self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)

    def _on_stop(self, signum: int, _frame: Any) -> None:
        self.stops += 1
        self.signum = self.signum or signum

    def wait(self, timeout: float) -> None:
        select.select([self._r], [], [], max(timeout, 0.0))
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass  # drained

    def close(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)


def exit_code(returncode: int) -> int:
    """A shell-style exit code: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    def __init__(self, home: MeshHome, launch: Launch, detached: bool, out: IO[str],
                 timeout: float = READY_TIMEOUT) -> None:
        self.home, self.launch, self.detached, self.out = home, launch, detached, out
        self.deadline = 0.0     # for the proxy to be ready: set by run()
        self.timeout = timeout
        self.wake: Wakeup | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.app: subprocess.Popen[bytes] | None = None
        self.ports_file = local.run_dir(home) / f"{launch.instance}-proxy.json"
        self.record: dict[str, Any] = {
            "name": launch.name, "namespace": launch.namespace,
            "service": (launch.service or launch.name) if launch.app_port is not None else None,
            "service_account": launch.service_account, "identity": launch.identity,
            "instance": launch.instance, "pid": None, "app_start": None,
            "proxy_pid": None, "proxy_start": None,
            "supervisor_pid": os.getpid(), "supervisor_start": local.start_time(os.getpid()),
            "detached": detached, "app_port": launch.app_port,
            "service_port": launch.service_port, "inbound_port": None, "outbound_port": None,
            "default_inbound_policy": launch.default_inbound_policy,
            "admin_port": None, "ready": False, "started": round(local.wall(), 3),
            "cmd": list(launch.cmd), "cwd": launch.cwd,
            "logs": {"proxy": str(local.proxy_log(home, launch.instance)),
                     "app": str(local.app_log(home, launch.instance)) if detached else None},
        }

    # --- helpers

    def say(self, message: str) -> None:
        print(f"mesh: {self.launch.instance}: {message}", file=self.out, flush=True)

    def save(self) -> None:
        write_json(local.workload_file(self.home, self.launch.instance), self.record)

    def until(self, check: Callable[[], T | None], deadline: float, interval: float = 0.1) -> T | None:
        """Wait for ``check()`` until ``deadline`` (monotonic); stop early (returning None)
        on a stop signal or the exit of the proxy or the app."""
        assert self.wake is not None
        while True:
            if self.wake.stops or self._exited(self.proxy) or self._exited(self.app):
                return None
            result = check()
            if result is not None:
                return result
            left = deadline - local.monotonic()
            if left <= 0:
                return None
            self.wake.wait(min(interval, left))

    @staticmethod
    def _exited(proc: subprocess.Popen[bytes] | None) -> bool:
        return proc is not None and proc.poll() is not None

    def _proxy_env(self, token: str) -> dict[str, str]:
        comps = local.require_up(self.home)
        launch = self.launch
        env = {k: v for k, v in local.child_env(self.home).items()
               if not (k.startswith("MESH_") and k not in PROXY_TUNABLES and k != "MESH_HOME")
               and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
        env.setdefault("MESH_LOG_LEVEL", "info")
        env.setdefault("MESH_SHUTDOWN_GRACE_PERIOD", str(PROXY_GRACE))
        env.update({
            "MESH_IDENTITY_ADDR": comps["identity"].addr,
            "MESH_DESTINATION_ADDR": comps["destination"].addr,
            "MESH_TRUST_ANCHORS_FILE": str(self.home.trust_file()),  # the bundle (rotation)
            "MESH_TOKEN": token,
            "MESH_WORKLOAD": launch.name,
            "MESH_NAMESPACE": launch.namespace,
            "MESH_SERVICE_ACCOUNT": launch.service_account,
            "MESH_INSTANCE": launch.instance,
            "MESH_OUTBOUND_ADDR": f"{local.LOOPBACK}:0",
            "MESH_INBOUND_ADDR": f"{local.LOOPBACK}:0",
            "MESH_ADMIN_ADDR": f"{local.LOOPBACK}:0",
            "MESH_PORTS_FILE": str(self.ports_file),
        })
        if launch.app_port is not None:
            env["MESH_APP_PORT"] = str(launch.app_port)
            env["MESH_SERVICE_PORT"] = str(launch.service_port or launch.app_port)
            if launch.service and launch.service != launch.name:
                env["MESH_SERVICE"] = launch.service
        if launch.default_inbound_policy is not None:
            env["MESH_DEFAULT_INBOUND_POLICY"] = launch.default_inbound_policy
        return env

    def _app_env(self, outbound: int) -> dict[str, str]:
        proxy_url = f"http://{local.LOOPBACK}:{outbound}"
        env = local.child_env(self.home, {
            "http_proxy": proxy_url, "HTTP_PROXY": proxy_url,
            "no_proxy": "localhost,127.0.0.1,::1", "NO_PROXY": "localhost,127.0.0.1,::1",
            "MESH_WORKLOAD": self.launch.name, "MESH_NAMESPACE": self.launch.namespace,
            "MESH_INSTANCE": self.launch.instance,
        })
        if self.launch.app_port is not None:
            env["PORT"] = str(self.launch.app_port)
        else:
            env.pop("PORT", None)
        return env

    # --- the sequence

    def start_proxy(self) -> None:
        token = tokens.mint(self.home.secret(), self.launch.namespace,
                            self.launch.service_account, local.wall(), ttl=TOKEN_TTL)
        self.ports_file.unlink(missing_ok=True)
        with open(local.proxy_log(self.home, self.launch.instance), "wb") as log:
            self.proxy = subprocess.Popen(
                [sys.executable, "-m", "microproxy"], env=self._proxy_env(token),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.home.root,
                # foreground: its own session, out of reach of the terminal's signals
                start_new_session=not self.detached,
                process_group=0 if self.detached else None)
        self.record.update(proxy_pid=self.proxy.pid, proxy_start=local.start_time(self.proxy.pid))
        self.save()

    def proxy_ports(self) -> dict[str, Any] | None:
        assert self.proxy is not None
        data = local.read_json_file(self.ports_file)
        if isinstance(data, dict) and data.get("pid") == self.proxy.pid and data.get("admin"):
            return data
        return None

    def start_app(self, outbound: int) -> bool:
        kw: dict[str, Any] = {}
        if self.detached:
            log = open(local.app_log(self.home, self.launch.instance), "wb")
            kw = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT,
                  "process_group": 0}
        try:
            self.app = subprocess.Popen(list(self.launch.cmd), env=self._app_env(outbound),
                                        cwd=self.launch.cwd, **kw)
        except OSError as e:
            self.say(f"cannot run {shlex.join(self.launch.cmd)}: {e.strerror or e}")
            return False
        finally:
            if self.detached:
                log.close()
        self.record.update(pid=self.app.pid, app_start=local.start_time(self.app.pid))
        self.save()
        return True

    def wait_ready(self) -> bool:
        admin = self.record["admin_port"]
        return self.until(lambda: True if local.proxy_ready(admin) else None, self.deadline) is not None

    def explain_not_ready(self, state: str) -> int:
        """Say why the proxy never got to ``state`` ("listening", "ready"); returns the exit code."""
        assert self.wake is not None
        if self.wake.stops:
            return 128 + self.wake.signum
        if self.app is not None and self.app.poll() is not None:
            code = exit_code(self.app.returncode)
            if self.launch.app_port is not None or code != 0:
                self.say(f"the app exited with code {code} before the proxy was {state}")
            return code
        log = local.proxy_log(self.home, self.launch.instance)
        if self.proxy is not None and self.proxy.poll() is not None:
            self.say(f"the proxy exited with code {self.proxy.returncode} before it was {state} "
                     f"(log: {log})")
        else:
            hint = ""
            if state == "ready" and self.launch.app_port is not None:
                hint = (f"; it registers the workload once the app accepts connections on "
                        f"{local.LOOPBACK}:{self.launch.app_port}: does the app listen there?")
            self.say(f"the proxy was not {state} within {self.timeout:g} s{hint} (log: {log})")
        if not self.detached:
            tail = local.log_tail(log)
            if tail:
                print(tail, file=self.out, flush=True)
        return 1

    def run(self) -> int:
        self.wake = Wakeup()
        self.deadline = local.monotonic() + self.timeout
        try:
            self.save()
            self.start_proxy()
            ports = self.until(self.proxy_ports, self.deadline)
            if ports is None:
                return self.explain_not_ready("listening")
            self.record.update(inbound_port=ports.get("inbound"), outbound_port=ports.get("outbound"),
                               admin_port=ports.get("admin"))
            self.save()
            if self.launch.app_port is None:
                if not self.wait_ready():
                    return self.explain_not_ready("ready")
                if not self.start_app(int(ports["outbound"])):
                    return 127
            else:
                if not self.start_app(int(ports["outbound"])):
                    return 127
                if not self.wait_ready():
                    return self.explain_not_ready("ready")
            self.record["ready"] = True
            self.save()
            if self.detached:
                self.say(f"ready: app pid {self.app.pid if self.app else '-'}, "
                         f"proxy pid {self.proxy.pid if self.proxy else '-'}")
            self.until(lambda: None, float("inf"), interval=5.0)  # until the app or proxy exits
            return self.explain_exit()
        finally:
            self.stop()
            self.wake.close()

    def explain_exit(self) -> int:
        assert self.wake is not None and self.app is not None and self.proxy is not None
        if self.app.poll() is not None:
            return exit_code(self.app.returncode)
        if self.wake.stops:
            self.stop()
            return exit_code(self.app.returncode) if self.app.returncode is not None else 128 + self.wake.signum
        self.say(f"the proxy exited unexpectedly with code {self.proxy.returncode}; stopping the app "
                 f"(log: {local.proxy_log(self.home, self.launch.instance)})")
        return 1

    # --- shutdown

    def _terminate(self, proc: subprocess.Popen[bytes] | None, group: bool, grace: float) -> None:
        """SIGTERM ``proc`` (its group if it leads one), SIGKILL after ``grace`` or a second
        stop signal, then sweep leftovers of its group."""
        assert self.wake is not None
        if proc is None:
            return
        pids = (lambda: local.members(pgrp=proc.pid)) if group else (lambda: [proc.pid])
        if proc.poll() is None:
            stops = self.wake.stops
            local.signal_pids(pids(), signal.SIGTERM)
            deadline = local.monotonic() + grace
            while proc.poll() is None and local.monotonic() < deadline and self.wake.stops <= max(stops, 1):
                self.wake.wait(min(0.1, deadline - local.monotonic()))
            if proc.poll() is None:
                local.signal_pids(pids(), signal.SIGKILL)
                proc.wait()
        if group:  # the leader is gone; anything it left behind goes too
            left = local.members(pgrp=proc.pid)
            if left:
                local.signal_pids(left, signal.SIGTERM)
                local.signal_pids(local.wait_gone(lambda: local.members(pgrp=proc.pid), 2.0),
                                  signal.SIGKILL)

    def proxy_grace(self) -> float:
        """The proxy's own drain period (what we told it, or what the user set)."""
        try:
            return float(os.environ.get("MESH_SHUTDOWN_GRACE_PERIOD", PROXY_GRACE))
        except ValueError:
            return PROXY_GRACE  # the proxy refuses to start with it anyway

    def stop(self) -> None:
        self._terminate(self.app, group=self.detached, grace=APP_GRACE)
        self._terminate(self.proxy, group=True, grace=self.proxy_grace() + 5.0)
        self.ports_file.unlink(missing_ok=True)
        local.workload_file(self.home, self.launch.instance).unlink(missing_ok=True)
        if not self.detached and self.app is not None and self.app.returncode == 0:
            # a one-shot client that succeeded: its proxy log is noise (failed runs keep theirs)
            local.proxy_log(self.home, self.launch.instance).unlink(missing_ok=True)


def supervise(home: MeshHome, launch: Launch, detached: bool, out: IO[str] | None = None,
              timeout: float = READY_TIMEOUT) -> int:
    """Run one replica to completion; returns its exit code. ``timeout``: seconds for the
    proxy to be ready."""
    if launch.netns:   # its own network namespace, transparent interception (cli/netns.py)
        from .netns import NetnsSupervisor
        return NetnsSupervisor(home, launch, detached, out or sys.stderr, timeout).run()
    return Supervisor(home, launch, detached, out or sys.stderr, timeout).run()


def parse_args(argv: list[str]) -> tuple[MeshHome, Launch, bool, float]:
    p = argparse.ArgumentParser(prog="python -m cli.supervise",
                                description="Supervise one mesh workload replica (used by `mesh run`).")
    p.add_argument("--home", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--service-account")
    p.add_argument("--instance", required=True)
    p.add_argument("--cwd", default=os.getcwd())
    p.add_argument("--port", type=int)
    p.add_argument("--service-port", type=int)
    p.add_argument("--default-inbound-policy")
    p.add_argument("--service", default="")
    p.add_argument("--detached", action="store_true")
    p.add_argument("--netns", action="store_true")
    p.add_argument("--skip-inbound-ports", default="")
    p.add_argument("--skip-outbound-ports", default="")
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT)
    p.add_argument("cmd", nargs="+")
    a = p.parse_args(argv)
    launch = Launch(name=a.name, namespace=a.namespace, service_account=a.service_account or a.name,
                    instance=a.instance, cmd=tuple(a.cmd), cwd=a.cwd, app_port=a.port,
                    service_port=a.service_port, default_inbound_policy=a.default_inbound_policy,
                    service=a.service, netns=a.netns, skip_inbound_ports=a.skip_inbound_ports,
                    skip_outbound_ports=a.skip_outbound_ports)
    return MeshHome(Path(a.home)), launch, a.detached, a.timeout


def main(argv: list[str] | None = None) -> int:
    home, launch, detached, timeout = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return supervise(home, launch, detached, timeout=timeout)
    except local.MeshError as e:
        print(f"mesh: {launch.instance}: {e}", file=sys.stderr, flush=True)
        local.workload_file(home, launch.instance).unlink(missing_ok=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
