"""microproxy: the micromesh sidecar proxy."""
from __future__ import annotations

try:
    from importlib.metadata import version as _version
    __version__ = _version("micromesh")
except Exception:  # noqa: BLE001 - not installed (running from a source tree)
    __version__ = "0.0.0+src"
