"""Process management for the local mesh: `mesh up`, `run`, `ps`, `down`, as functions.

Theory of operation
-------------------
Everything a mesh home starts is findable from files in that home, so any later
``mesh`` invocation (or a test, or a benchmark) can inspect and stop it:

- ``controlplane.json`` keeps, per component (identity, destination), the loopback port
  chosen the first time (reused on every later ``up``, so the addresses proxies were
  given stay valid across restarts) and, while it runs, its pid and kernel start time.
- ``workloads/<instance>.json`` is written by the supervisor of each replica from the
  moment it starts, and removed by it when it exits.

Process layout (Linux sessions and process groups are the unit of cleanup):

- identity and destination each lead their own session.
- A detached ``mesh run`` supervisor leads its own session; inside it the proxy and the
  app each lead a process group, so everything a detached workload ever forks lives in
  one session that ``down`` can sweep.
- A foreground ``mesh run`` is the supervisor itself: the app stays in the terminal's
  process group (it reads the terminal and gets Ctrl-C), the proxy leads its own session
  (the terminal's signals never reach it; the supervisor stops it after the app).

A pid is only trusted together with its start time (procutil.py), so
a recycled pid is never signalled. Zombies count as dead.

Nothing here prints or exits: failures raise ``MeshError`` with a one-line message that
the CLI shows as is.

This module drives up, down and run; the control plane's records and TLS are in
controlplane.py, the workloads' records and planning in workloads.py.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from identity.store import MeshHome

# The CLI and the tests reach the whole local mesh as local.X: the control plane's records
# (controlplane.py), the workloads' (workloads.py) and the process, clock, port and file
# helpers (procutil.py) are re-exported here.
from .controlplane import (CLI_IDENTITY, COMPONENTS, CONTROL_STOP_TIMEOUT, TRUST_DOMAIN,  # noqa: F401
                           UP_TIMEOUT, Component, ControlPlaneTLS, UpResult, child_env, control_plane,
                           read_controlplane, require_up, run_dir, spawn_component, wait_component,
                           write_controlplane)
from .procutil import (LOOPBACK, POLL, MeshError, _reap, _signal, alive, failure,  # noqa: F401
                       free_port, log_tail, members, monotonic, port_free, proc_info, read_json_file,
                       signal_pids, sleep, start_time, utcnow, wait_for, wait_gone, wall)
from .workloads import (INBOUND_POLICIES, NAME_HELP, Launch, WorkloadSpec, admin_get,  # noqa: F401
                        app_log, demo_port, list_workloads, new_instance, plan, proxy_log, proxy_ready,
                        read_workload_files, service_urls, supervisor_log, workload_alive,
                        workload_file)

RUN_TIMEOUT = 30.0          # seconds for a detached workload to become ready
DOWN_TIMEOUT = 15.0         # seconds for workloads to stop before SIGKILL


@contextmanager
def locked(home: MeshHome) -> Iterator[None]:
    """Serialise `up` and `down` of one mesh home."""
    home.root.mkdir(parents=True, exist_ok=True)
    with open(home.root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prepare_home(home: MeshHome) -> bool:
    """Create the home, its CA (first time) and directories. Returns True if the CA was created."""
    home.root.mkdir(parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    created = home.ensure_ca(utcnow())
    for d in (home.logs_dir, home.workloads_dir, run_dir(home)):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return created


# === the control plane: up ===

def _port_for(home: MeshHome, name: str, previous: Component | None) -> int:
    if previous is None:
        return free_port()
    if port_free(previous.port):
        return previous.port
    if any(w["alive"] for w in list_workloads(home, probe=False)):
        raise MeshError(f"{name}'s port {previous.addr} is taken by another process, and running "
                        f"workloads were configured with it: free the port or run `mesh down`")
    return free_port()  # no proxy depends on the old address: move


def up(home: MeshHome, timeout: float = UP_TIMEOUT) -> UpResult:
    """Start identity and destination (those not already running); return when both are
    ready. Raises MeshError, after stopping what it started, if either fails."""
    with locked(home):
        ca_created = prepare_home(home)
        comps = read_controlplane(home)
        cptls = ControlPlaneTLS(home)
        deadline = monotonic() + timeout
        started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        for name in COMPONENTS:
            current = comps.get(name)
            if current is not None and current.running():
                continue
            port = _port_for(home, name, current)
            proc, offset = spawn_component(home, name, port)
            comps[name] = Component(name, LOOPBACK, port, proc.pid, start_time(proc.pid))
            started[name] = (proc, offset)
            write_controlplane(home, comps)  # so that `down` finds it whatever happens next
        try:
            for name in COMPONENTS:
                if name in started:
                    proc, offset = started[name]
                    port = wait_component(home, name, proc, offset, cptls, deadline)
                    comps[name] = Component(name, LOOPBACK, port, proc.pid, comps[name].start)
                else:
                    c = comps[name]
                    ok = wait_for(lambda: True if cptls.ready(name, (c.host, c.port)) else None,
                                  max(deadline - monotonic(), 0.5))
                    if not ok:
                        raise MeshError(f"{name} (pid {c.pid}) is running but not ready at "
                                        f"{c.addr} (log: {home.logs_dir / (name + '.log')})")
        except BaseException:
            for name, (proc, _) in started.items():
                _stop_session(proc.pid, CONTROL_STOP_TIMEOUT)
                comps[name] = Component(name, LOOPBACK, comps[name].port)
            write_controlplane(home, comps)
            raise
        write_controlplane(home, comps)
    return UpResult(home.root, comps, tuple(started), ca_created)


# === down ===

@dataclass(frozen=True, slots=True)
class DownResult:
    home: Path
    workloads: tuple[str, ...]          # instances stopped
    control_plane: tuple[str, ...]      # components stopped
    killed: tuple[int, ...] = ()        # pids that needed SIGKILL

    @property
    def nothing(self) -> bool:
        return not (self.workloads or self.control_plane)


def _stop_session(sid: int, timeout: float) -> list[int]:
    """SIGTERM every process in session ``sid``; SIGKILL what is left after ``timeout``."""
    signal_pids(members(session=sid), signal.SIGTERM)
    left = wait_gone(lambda: members(session=sid), timeout)
    signal_pids(left, signal.SIGKILL)
    wait_gone(lambda: members(session=sid), 2.0)
    return left


def _ours(leader: int, start: int | None) -> bool:
    """May we sweep the group or session ``leader`` leads? Yes unless the pid now belongs
    to another process (while a group or session has members, its id is never reused)."""
    info = proc_info(leader)
    return info is None or start is None or info.start == start


def _workload_pids(rec: dict[str, Any]) -> list[int]:
    """Every live process belonging to one workload record."""
    pids: set[int] = set()
    sup, app, proxy = rec.get("supervisor_pid"), rec.get("pid"), rec.get("proxy_pid")
    detached = bool(rec.get("detached"))
    if isinstance(sup, int) and _ours(sup, rec.get("supervisor_start")):
        pids.update(members(session=sup) if detached else [sup] if alive(sup) else [])
    if isinstance(proxy, int) and _ours(proxy, rec.get("proxy_start")):
        pids.update(members(pgrp=proxy))
    if isinstance(app, int) and _ours(app, rec.get("app_start")):
        pids.update(members(pgrp=app) if detached else [app] if alive(app) else [])
    return sorted(pids)


def stop_workloads(home: MeshHome, records: Sequence[dict[str, Any]],
                   timeout: float = DOWN_TIMEOUT) -> list[int]:
    """Stop workloads: SIGTERM the supervisors (which stop app then proxy), or the app and
    proxy directly when the supervisor is gone; SIGKILL what is left after ``timeout``.
    Removes their files. Returns the pids that needed SIGKILL."""
    for rec in records:
        if alive(rec.get("supervisor_pid"), rec.get("supervisor_start")):
            _signal(rec["supervisor_pid"], signal.SIGTERM)
        else:
            signal_pids(_workload_pids(rec), signal.SIGTERM)

    def everything() -> list[int]:
        return sorted({pid for rec in records for pid in _workload_pids(rec)})

    left = wait_gone(everything, timeout)
    signal_pids(left, signal.SIGKILL)
    wait_gone(everything, 2.0)
    for rec in records:
        instance = rec.get("instance", "")
        (home.workloads_dir / f"{instance}.json").unlink(missing_ok=True)
        (run_dir(home) / f"{instance}-proxy.json").unlink(missing_ok=True)
    return left


def down(home: MeshHome, timeout: float = DOWN_TIMEOUT) -> DownResult:
    """Stop every workload, then destination and identity, of this mesh home. Idempotent."""
    if not home.root.exists():
        return DownResult(home.root, (), ())
    with locked(home):
        records = [r for r in read_workload_files(home)]
        killed = stop_workloads(home, records, timeout)
        comps = read_controlplane(home)
        stopped = []
        for name in reversed(COMPONENTS):   # destination first: proxies deregistered above
            c = comps.get(name)
            if c is None:
                continue
            if c.running() or (c.pid and members(session=c.pid)):
                assert c.pid is not None
                killed += _stop_session(c.pid, CONTROL_STOP_TIMEOUT)
                stopped.append(name)
            comps[name] = Component(name, c.host, c.port)
            (run_dir(home) / f"{name}.json").unlink(missing_ok=True)
        if comps:
            write_controlplane(home, comps)
        from .netns import teardown   # `mesh run --netns` pods left behind, the node namespace
        teardown(home)
    return DownResult(home.root, tuple(r.get("instance", "?") for r in records),
                      tuple(reversed(stopped)), tuple(killed))


# === workloads: run ===

def run_detached(home: MeshHome, spec: WorkloadSpec | Launch,
                 timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Start a replica in the background (its supervisor leads its own session) and return
    its workload record once it is ready. On failure the replica is stopped and MeshError
    carries the tails of its logs."""
    require_up(home)
    launch = spec if isinstance(spec, Launch) else plan(home, spec)
    prepare_home(home)
    sup_log = supervisor_log(home, launch.instance)
    with open(sup_log, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.supervise", "--home", str(home.root), "--detached",
             "--timeout", str(timeout), *launch.argv()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=home.root, env=child_env(home))
    path = workload_file(home, launch.instance)
    logs = ((sup_log, 0), (proxy_log(home, launch.instance), 0), (app_log(home, launch.instance), 0))
    try:
        deadline = monotonic() + timeout + 10.0   # the supervisor reports its own timeout first
        while True:
            if proc.poll() is not None:
                raise failure(f"{launch.instance} failed to start (exit code {proc.returncode})", *logs)
            rec = read_json_file(path)
            if isinstance(rec, dict) and rec.get("ready"):
                return rec
            if monotonic() >= deadline:
                _stop_session(proc.pid, 10.0)
                raise failure(f"{launch.instance} was not ready within {timeout:g} s", *logs)
            sleep(POLL)
    except KeyboardInterrupt:
        _stop_session(proc.pid, 10.0)
        raise
    finally:
        _reap(proc.pid)


def run_foreground(home: MeshHome, spec: WorkloadSpec | Launch, timeout: float = RUN_TIMEOUT) -> int:
    """Run a replica attached to this terminal; returns the app's exit code."""
    from . import supervise  # late: supervise imports this module
    require_up(home)
    launch = spec if isinstance(spec, Launch) else plan(home, spec)
    return supervise.supervise(home, launch, detached=False, timeout=timeout)
