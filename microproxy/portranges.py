"""Port lists as environment variables give them: ``"25,587,4000-4010"`` -> inclusive ranges.

Used for ``MESH_OPAQUE_PORTS`` (config.py; the injector copies the
``config.micromesh.io/opaque-ports`` annotation into it). The grammar and its errors are
``microproxy init``'s (``init.parse_ports``): items ``N`` or ``A-B``, 1..65535, no
backwards ranges; ``""`` is no ports.
"""
from __future__ import annotations

from .init import parse_ports

PortRanges = tuple[tuple[int, int], ...]


def parse_port_ranges(text: str, name: str) -> PortRanges:
    """``"25, 587,4000-4010"`` -> ((25, 25), (587, 587), (4000, 4010)). Raises ValueError
    naming ``name``."""
    return tuple((r.first, r.last) for r in parse_ports(text, name))


def in_ranges(port: int, ranges: PortRanges) -> bool:
    return any(first <= port <= last for first, last in ranges)
