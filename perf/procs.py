"""Processes the benchmark starts, and what /proc says about them.

Everything the bench starts goes through a :class:`Supervisor`, which puts each child in
its own session (so a Ctrl-C at the terminal reaches only the bench, which then cleans up
in order) and, on :meth:`Supervisor.close`, sends SIGTERM to each child's process group,
waits, and SIGKILLs what is left. Processes started indirectly (the mesh's proxies and
apps, via ``mesh run``) are registered by pid with :meth:`Supervisor.adopt` so that they
are reaped too if ``mesh down`` fails to.

CPU and memory come from ``/proc/PID/stat`` (utime + stime, in clock ticks) and
``/proc/PID/status`` (VmRSS), the same accounting PERF-LAB used.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
RSS_INTERVAL_S = 0.25


# === /proc readers ===

def cpu_split(pid: int) -> tuple[int, int]:
    """(utime, stime) of ``pid`` (all its threads), in clock ticks; (0, 0) if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return (0, 0)
    # The command name (field 2) may contain spaces: split after its closing paren.
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]), int(fields[12])    # fields 14 and 15 of the whole line


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid``, in clock ticks; 0 if it is gone."""
    return sum(cpu_split(pid))


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (over all its threads)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return kids


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            nums = [int(v) for v in vals]
            idle = nums[3] + nums[4]          # idle + iowait
            out[int(name[3:])] = (sum(nums[:8]) - idle, sum(nums[:8]))
    return out


def softirq_steal_jiffies() -> tuple[int, int]:
    """(interrupt + softirq, steal) time over all CPUs from /proc/stat, in jiffies. On
    loopback much of TCP's receive work runs in softirq; with tick-based accounting a softirq
    tick is also charged to the process it interrupted (so it is in the proxies' kernel time
    at saturation), and one that interrupted an idle CPU to no process. Steal: time the
    hypervisor gave to other guests."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            nums = [int(v) for v in line.split()[1:]]
            return nums[5] + nums[6], nums[7]
    return 0, 0


def all_cpu_ticks() -> dict[int, int]:
    """utime + stime of every live process, in clock ticks."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            out[int(entry)] = cpu_ticks(int(entry))
    return out


def cpu_util(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Busy fraction of each CPU between two :func:`cpu_times` snapshots."""
    util = {}
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before.get(cpu, (0, 0))
        util[cpu] = (busy1 - busy0) / max(1, total1 - total0)
    return util


def wait_quiet(limit_cpus: float, timeout: float, window: float = 3.0) -> float:
    """Wait until the whole machine is busy for less than ``limit_cpus`` CPUs over one
    ``window``, or until ``timeout``; returns the last window's busy CPUs."""
    deadline = time.monotonic() + timeout
    while True:
        before = cpu_times()
        time.sleep(window)
        after = cpu_times()
        busy = sum(cpu_util(before, after).values())
        if busy < limit_cpus or time.monotonic() >= deadline:
            return busy


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's pick; racy but fine on a quiet box)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.05)


# === CPU pinning (PERF-LAB layout: load generator on CPU0, proxies on CPU1) ===

@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPUs to pin to, or ``enabled=False`` when taskset or a second CPU is missing."""
    enabled: bool
    load_cpu: int = 0
    proxy_cpu: int = 1
    why_not: str = ""

    @staticmethod
    def detect(want: bool = True) -> "Pinning":
        if not want:
            return Pinning(False, why_not="disabled with --no-pin")
        if shutil.which("taskset") is None:
            return Pinning(False, why_not="taskset not found")
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return Pinning(False, why_not=f"only {len(cpus)} CPU available")
        return Pinning(True, load_cpu=cpus[0], proxy_cpu=cpus[1])

    def prefix(self, cpu: int) -> list[str]:
        """Command prefix that starts a program on ``cpu``."""
        return ["taskset", "-c", str(cpu)] if self.enabled else []

    def move(self, pids: list[int], cpu: int) -> None:
        """Re-pin every thread of each pid (``taskset -a -p``)."""
        if not self.enabled:
            return
        for pid in pids:
            subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def describe(self) -> str:
        if not self.enabled:
            return f"off ({self.why_not})"
        return (f"load generator (wrk / fixed_rate) on CPU{self.load_cpu}; proxies on CPU{self.proxy_cpu}; "
                f"app on CPU{self.proxy_cpu} for the direct path, re-pinned to CPU{self.load_cpu} for proxied paths")


# === Supervisor ===

@dataclass(slots=True)
class Supervisor:
    """Owns every process the bench starts; :meth:`close` leaves none behind."""
    procs: list[subprocess.Popen] = field(default_factory=list)
    adopted: list[int] = field(default_factory=list)
    closers: list = field(default_factory=list)   # callables run first, newest first (e.g. `mesh down`)

    def start(self, argv: list[str], *, env: dict[str, str] | None = None,
              log: Path | None = None, cwd: Path | None = None) -> subprocess.Popen:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not None:
                out.close()
        self.procs.append(p)
        return p

    def adopt(self, pid: int) -> None:
        if pid and pid not in self.adopted:
            self.adopted.append(pid)

    def on_close(self, fn) -> None:
        self.closers.append(fn)

    def close(self, grace: float = 5.0) -> list[str]:
        """Stop everything; returns problems met (never raises)."""
        problems: list[str] = []
        # Signals during cleanup would leave orphans: hold them off until done.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
        try:
            while self.closers:
                fn = self.closers.pop()
                try:
                    fn()
                except Exception as e:          # cleanup must go on whatever one step does
                    problems.append(f"{getattr(fn, '__name__', fn)}: {e}")
            for p in self.procs:
                if p.poll() is None:
                    _signal_group(p.pid, signal.SIGTERM)
            for pid in self.adopted:
                if alive(pid):
                    _signal_pid(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in self.procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    problems.append(f"pid {p.pid} ({p.args[0]}) ignored SIGTERM: killed")
                    _signal_group(p.pid, signal.SIGKILL)
                    p.wait()
                else:
                    _signal_group(p.pid, signal.SIGKILL)   # stragglers left in its group
            for pid in self.adopted:
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if alive(pid):
                    problems.append(f"pid {pid} ignored SIGTERM: killed")
                    _signal_pid(pid, signal.SIGKILL)
            self.procs.clear()
            self.adopted.clear()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        return problems


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


# === RSS sampler ===

class RssSampler:
    """Samples VmRSS of named process groups every 0.25 s in a thread; keeps the max.

    ``targets`` maps a label (e.g. "outbound") to the pids whose RSS is summed for it.
    """

    def __init__(self, targets: dict[str, list[int]], interval: float = RSS_INTERVAL_S) -> None:
        self.targets = targets
        self.interval = interval
        self.peak_kb: dict[str, int] = {k: 0 for k in targets}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> dict[str, int]:
        now = {k: sum(rss_kb(p) for p in pids) for k, pids in self.targets.items()}
        for k, v in now.items():
            self.peak_kb[k] = max(self.peak_kb[k], v)
        self.samples += 1
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
