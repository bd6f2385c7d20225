"""Pre-install checks (category micromesh-pre-install, `mesh check --pre`): what a
machine needs before `mesh up`."""
from __future__ import annotations

import importlib
import tempfile

from .. import local
from ..check import CheckFailed, Status, error, ok, warn
from .context import CheckContext
from .control_plane import components

MIN_PYTHON = (3, 11)


def python_version(ctx: CheckContext) -> Status:
    if ctx.python < MIN_PYTHON:
        return error(f"this is Python {ctx.python[0]}.{ctx.python[1]}: micromesh needs "
                     f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")
    return ok()


def packages_importable(ctx: CheckContext) -> Status:
    missing = []
    for name in ctx.modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"cannot import {name}: {e}")
    return error("\n".join(missing)) if missing else ok()


def home_writable(ctx: CheckContext) -> Status:
    root = ctx.home.root
    existing = root
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise CheckFailed(f"cannot create {root}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CheckFailed(f"cannot write in {existing}: {e.strerror}") from None
    return ok()


def ports_free(ctx: CheckContext) -> Status:
    try:
        local.free_port()
    except OSError as e:
        raise CheckFailed(f"cannot listen on {local.LOOPBACK}: {e.strerror}") from None
    comps = components(ctx)
    busy = []
    for name in local.COMPONENTS:
        comp = comps.get(name)
        if comp is None or comp.running() or local.port_free(comp.port):
            continue  # new, ours, or free
        busy.append(f"{name}'s port {comp.addr} is in use by another process")
    if not busy:
        return ok()
    live = [w for w in local.list_workloads(ctx.home, probe=False) if w.get("alive")]
    if live:
        return error("\n".join(busy) + "\nand running workloads were configured with it")
    return warn("\n".join(busy) + "\n`mesh up` will move it to a free port")


def iptables_present(ctx: CheckContext) -> Status:
    if ctx.which("iptables") is None:
        return warn("iptables is not installed: netns mode (transparent interception) needs it")
    return ok()
