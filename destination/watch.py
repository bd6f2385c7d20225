"""The NDJSON watch loop shared by ``/v1/endpoints``, ``/v1/policy`` and ``/v1/profile``."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import WatchHub


def json_line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def watch_lines(hub: "WatchHub", key: str | Callable[[], str], snapshot: Callable[[], dict[str, Any]],
                      compare: str | None = None) -> AsyncIterator[bytes]:
    """The current ``snapshot()`` as a line, then the latest one each time ``key`` changes
    and the snapshot (or only its ``compare`` field) differs; ends when the hub closes.
    A callable ``key`` is asked when the stream starts, together with the first snapshot."""
    def part(snap: dict[str, Any]) -> Any:
        return snap if compare is None else snap[compare]

    w = hub.subscribe(key if isinstance(key, str) else key())
    try:
        snap = snapshot()
        yield json_line(snap)
        while True:
            await w.changed.wait()
            w.changed.clear()
            if hub.closed:
                return
            latest = snapshot()
            if part(latest) != part(snap):
                snap = latest
                yield json_line(snap)
    finally:
        hub.unsubscribe(w)
