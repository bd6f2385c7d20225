"""Process, clock, port and file helpers of the local mesh (cli/local.py and friends).

A pid is only trusted together with its start time (``/proc/<pid>/stat`` field 22), so
a recycled pid is never signalled. Zombies count as dead. The clock functions are the only
place in cli/ that reads time or sleeps.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from identity.store import read_json

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
POLL = 0.05                 # seconds between checks while waiting


class MeshError(Exception):
    """A failure the CLI reports as one line (plus, sometimes, a log tail)."""


# === clock: the only place in cli/ that reads time or sleeps ===

def monotonic() -> float:
    return time.monotonic()


def wall() -> float:
    return time.time()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def wait_for(check: Callable[[], T | None], timeout: float, interval: float = POLL) -> T | None:
    """Call ``check`` until it returns something other than None, or ``timeout`` passes."""
    deadline = monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if monotonic() >= deadline:
            return None
        sleep(interval)


# === processes ===

@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    state: str
    pgrp: int
    session: int
    start: int      # clock ticks after boot


def _parse_stat(text: str) -> Proc:
    # "pid (comm) state ppid pgrp session ... starttime ...": comm may hold spaces and ')'
    pid = int(text[: text.index(" ")])
    rest = text[text.rindex(")") + 2:].split()
    return Proc(pid=pid, state=rest[0], pgrp=int(rest[2]), session=int(rest[3]), start=int(rest[19]))


def proc_info(pid: int) -> Proc | None:
    """The process ``pid`` (None if it does not exist or is a zombie)."""
    try:
        info = _parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    return None if info.state in ("Z", "X") else info


def procs() -> Iterator[Proc]:
    """Every live (non-zombie) process on the machine."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = proc_info(int(entry.name))
            if info is not None:
                yield info


def start_time(pid: int) -> int | None:
    info = proc_info(pid)
    return info.start if info else None


def alive(pid: int | None, start: int | None = None) -> bool:
    """Is ``pid`` running, and (when ``start`` is known) still the same process?"""
    if not pid:
        return False
    _reap(pid)
    info = proc_info(pid)
    return info is not None and (start is None or info.start == start)


def members(*, pgrp: int | None = None, session: int | None = None) -> list[int]:
    """Live pids in a process group or a session (which cannot be recycled while in use)."""
    return [p.pid for p in procs()
            if (pgrp is not None and p.pgrp == pgrp) or (session is not None and p.session == session)]


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (tests call these functions in-process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False  # already gone
    except PermissionError:
        return False  # not ours (a recycled pid would be caught by the start check first)


def signal_pids(pids: Sequence[int], sig: int) -> int:
    return sum(_signal(pid, sig) for pid in pids)


def wait_gone(pids_of: Callable[[], list[int]], timeout: float) -> list[int]:
    """Wait until ``pids_of()`` is empty; returns what is left after ``timeout``."""
    left: list[int] = []

    def check() -> bool | None:
        nonlocal left
        left = pids_of()
        for pid in left:
            _reap(pid)
        left = pids_of()
        return True if not left else None

    wait_for(check, timeout)
    return left


# === ports and files ===

def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Could a server bind ``port`` now (with SO_REUSEADDR, as servers do)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
        return True


def read_json_file(path: Path) -> Any | None:
    """JSON from ``path``, or None if it is missing or half-written."""
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def log_tail(path: Path, lines: int = 15, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()[-32768:]
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:])


def failure(message: str, *logs: tuple[Path, int]) -> MeshError:
    """A MeshError whose message ends with the tail of each non-empty log."""
    parts = [message]
    for path, offset in logs:
        tail = log_tail(path, offset=offset)
        if tail:
            parts.append(f"--- last lines of {path} ---\n{tail}")
    return MeshError("\n".join(parts))
