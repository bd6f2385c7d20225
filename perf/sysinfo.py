"""What machine and which software a result was measured on."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import ssl
import subprocess
from pathlib import Path

from perf import loadgen, nginx

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    info: dict = {"cpus": os.cpu_count(), "kernel": platform.release(), "arch": platform.machine()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("model name", "?")
        info["cpu_family_model"] = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
        info["hypervisor"] = "hypervisor" in fields.get("flags", "").split()
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        osr = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        info["os"] = osr.get("PRETTY_NAME", "?").strip('"')
    except OSError:
        pass
    return info


def loadavg() -> float:
    """1-minute load average: how busy the (shared) machine was."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(nginx_bin: str | None) -> dict:
    out = {
        "python": platform.python_version(),
        "ssl (stdlib)": ssl.OPENSSL_VERSION,
        "micromesh": _dist("micromesh"),
        "uvloop": _dist("uvloop"),
        "httptools": _dist("httptools"),
        "cryptography": _dist("cryptography"),
        "wrk": loadgen.wrk_version(),
        "nginx": nginx.nginx_version(nginx_bin) if nginx_bin else "not installed",
    }
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        out["cryptography"] += f" ({backend.openssl_version_text()})"
    except Exception:   # informational only; never fail a run for a version string
        pass
    out["git"] = _git()
    return out


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")
