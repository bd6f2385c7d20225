"""microproxy: the micromesh sidecar proxy."""
from __future__ import annotations

# The package version (pyproject.toml reads it from here). Not importlib.metadata: that
# import pulls in email, zipfile, csv and more, ~1 MB of every proxy's RSS and 30 ms of start-up.
__version__ = "0.1.0"
