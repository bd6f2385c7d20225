"""What every check gets: ``CheckContext`` (the mesh home, an injectable clock, limits
and a per-run cache) and small formatting helpers.

Time is never read in ``cli/checks/`` except through ``ctx.now()``, so tests move it
freely: an issuer that expires in 30 days is one whose ``now`` is 335 days later.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from identity.store import MeshHome

from .. import local
from ..check import CheckFailed

REQUIRED_MODULES = ("uvloop", "httptools", "h11", "h2", "cryptography", "OpenSSL", "click",
                    "prometheus_client", "rich", "yaml")
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def cli_version() -> str:
    try:
        return importlib.metadata.version("micromesh")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+src"


def which_with_sbin(name: str) -> str | None:
    """shutil.which, also looking in the sbin directories a user's PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


@dataclass(slots=True)
class CheckContext:
    home: MeshHome
    now: Callable[[], dt.datetime] = local.utcnow
    cli_version: str = field(default_factory=cli_version)
    timeout: float = 2.0
    which: Callable[[str], str | None] = which_with_sbin
    modules: Sequence[str] = REQUIRED_MODULES
    python: tuple[int, int] = (sys.version_info.major, sys.version_info.minor)
    cache: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per run; a CheckFailed is cached and raised again."""
        if key not in self.cache:
            try:
                self.cache[key] = make()
            except CheckFailed as e:
                self.cache[key] = e
        value = self.cache[key]
        if isinstance(value, CheckFailed):
            raise value
        return value

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.home.root))
        except ValueError:
            return str(path)


def when(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def span(d: dt.timedelta) -> str:
    s = abs(d.total_seconds())
    if s >= 2 * 86400:
        return f"{s / 86400:.0f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:.0f} hours"
    if s >= 120:
        return f"{s / 60:.0f} minutes"
    return f"{s:.0f} s"
