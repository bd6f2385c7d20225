"""`mesh top`: a full-screen live table of the busiest paths, like `linkerd viz top`.

Built from the same tap streams as `mesh tap` (``cli/tap.py``). A request is counted when
its ``end`` event arrives; rows are keyed by (Source, Destination, Method, Path) and keep
Count, Best, Worst, Last (total duration) and the success rate (status < 500, no proxy
error, no failing gRPC status), sorted by Count as Linkerd does (``viz/cmd/top.go``).

One request is seen twice when both its client's and its server's proxies are tapped
(outbound at one, inbound at the other). Linkerd counts it twice; here the outbound event
is dropped when the destination workload is itself tapped, so each request counts once.

Pure: ``TopTable`` (events in, rows out) and ``render_screen`` (rows, terminal size ->
lines). I/O: ``run`` drives the tap streams, a rich ``Live`` screen and the keyboard
(cbreak mode, read without blocking; ``q`` quits).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from . import tap

GRPC_FAILURES = frozenset({2, 4, 13, 14, 15})   # Unknown, DeadlineExceeded, Internal, Unavailable, DataLoss
GAP = 2                                         # Linkerd's columnSpacing
HEADER_LINES = 4                                # hint, status, blank, column headers
REFRESH = 0.5                                   # seconds between redraws


def format_duration(us: int) -> str:
    """Go's ``Duration.String()`` after Linkerd's rounding: µs below 1 ms, ms below 1 s, else s."""
    if us <= 0:
        return "0s"
    if us < 1000:
        return f"{us}µs"
    if us < 1_000_000:
        ms = (us + 500) // 1000
        return f"{ms}ms" if ms < 1000 else "1s"
    s = (us + 500_000) // 1_000_000
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    return f"{m}m{sec}s" if m else f"{sec}s"


@dataclass(slots=True)
class TopRow:
    source: str
    destination: str
    method: str
    path: str
    count: int = 0
    best: int = 0          # µs
    worst: int = 0
    last: int = 0
    successes: int = 0
    failures: int = 0

    def add(self, duration_us: int, success: bool) -> None:
        if self.count == 0 or duration_us < self.best:
            self.best = duration_us
        self.worst = max(self.worst, duration_us)
        self.last = duration_us
        self.count += 1
        if success:
            self.successes += 1
        else:
            self.failures += 1

    @property
    def success_rate(self) -> str:
        done = self.successes + self.failures
        return f"{100.0 * self.successes / done:.2f}%" if done else "-"


def _name(peer: dict[str, Any] | None) -> str:
    peer = peer or {}
    if peer.get("workload"):
        return str(peer["workload"])
    return str(peer.get("addr") or "-").rsplit(":", 1)[0]   # an unmeshed peer: its IP


class TopTable:
    """Tap events in; one row per (source, destination, method, path)."""

    def __init__(self, tapped: frozenset[tuple[str, str]] = frozenset(),
                 max_pending: int = tap.MAX_PENDING) -> None:
        self.tapped = tapped            # (namespace, workload) of every tapped proxy
        self.max_pending = max_pending
        self.pending: OrderedDict[tuple[int, str], dict[str, Any]] = OrderedDict()
        self.rows: dict[tuple[str, str, str, str], TopRow] = {}
        self.seen = 0                   # requests counted

    def _duplicate(self, req: dict[str, Any]) -> bool:
        dst = req.get("dst") or {}
        return req.get("direction") == "outbound" and \
            (dst.get("namespace"), dst.get("workload")) in self.tapped

    def feed(self, no: int, ev: dict[str, Any]) -> None:
        key = (no, str(ev.get("id")))
        kind = ev.get("type")
        if kind == "req":
            if not self._duplicate(ev):
                self.pending[key] = {"req": ev}
                while len(self.pending) > self.max_pending:
                    self.pending.popitem(last=False)
        elif kind == "rsp":
            entry = self.pending.get(key)
            if entry is not None:
                entry["rsp"] = ev
        elif kind == "end":
            entry = self.pending.pop(key, None)
            if entry is not None:
                self._count(entry["req"], entry.get("rsp"), ev)

    def _count(self, req: dict[str, Any], rsp: dict[str, Any] | None, end: dict[str, Any]) -> None:
        status = int((rsp or {}).get("status") or 0)
        success = (0 < status < 500 and not end.get("error")
                   and end.get("grpc_status") not in GRPC_FAILURES)
        k = (_name(req.get("src")), _name(req.get("dst")), str(req.get("method") or ""),
             str(req.get("path") or ""))
        row = self.rows.get(k)
        if row is None:
            row = self.rows[k] = TopRow(*k)
        row.add(int(end.get("duration_us") or 0), success)
        self.seen += 1

    def sorted_rows(self) -> list[TopRow]:
        """By count, busiest first; ties keep first-seen order (a stable sort)."""
        return sorted(self.rows.values(), key=lambda r: -r.count)


# === layout (pure) ===

COLUMNS = (  # header, right-aligned
    ("Source", False), ("Destination", False), ("Method", False), ("Path", False),
    ("Count", True), ("Best", True), ("Worst", True), ("Last", True), ("Success Rate", True),
)
SHRINK_ORDER = (3, 0, 1)    # Path first, then Source, then Destination
MIN_WIDTH = 4


def _cells(r: TopRow) -> list[str]:
    return [r.source, r.destination, r.method, r.path, str(r.count), format_duration(r.best),
            format_duration(r.worst), format_duration(r.last), r.success_rate]


def _fit(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[:max(width - 1, 0)] + "…"
    return text.rjust(width) if right else text.ljust(width)


def render_table(rows: Sequence[TopRow], width: int, max_rows: int | None = None) -> list[str]:
    """Column headers and rows, fitted to ``width`` (truncating Path, then Source, then
    Destination with an ellipsis); no trailing blanks."""
    grid = [_cells(r) for r in (rows if max_rows is None else rows[:max_rows])]
    widths = [max([len(h)] + [len(line[i]) for line in grid]) for i, (h, _) in enumerate(COLUMNS)]
    excess = sum(widths) + GAP * (len(widths) - 1) - width
    for i in SHRINK_ORDER:
        if excess <= 0:
            break
        cut = min(excess, widths[i] - MIN_WIDTH)
        if cut > 0:
            widths[i] -= cut
            excess -= cut
    lines = []
    for line in [[h for h, _ in COLUMNS]] + grid:
        cells = [_fit(c, w, right) for c, w, (_, right) in zip(line, widths, COLUMNS)]
        lines.append((" " * GAP).join(cells).rstrip()[:width])
    return lines


def render_screen(table: TopTable, width: int, height: int, status: str) -> list[str]:
    """The whole screen: ``(press q to quit)``, a status line, a blank, the table; at most
    ``height - 1`` lines (the last terminal line stays free, so nothing scrolls)."""
    head = ["(press q to quit)", status[:width], ""]
    body = render_table(table.sorted_rows(), width, max_rows=max(height - 1 - HEADER_LINES, 0))
    return head + body


def status_line(target: str, proxies: int, table: TopTable, max_rps: float, notes: int) -> str:
    noun = "proxy" if proxies == 1 else "proxies"
    line = f"{target}: {proxies} {noun} tapped, {table.seen} requests, max {max_rps:g} rps per proxy"
    return line + (f", {notes} not tapped" if notes else "")


# === the live view (I/O) ===

@contextlib.contextmanager
def cbreak(stream: TextIO) -> Iterator[int | None]:
    """Put a terminal in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still works);
    yields its fd, or None when it is not a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def tapped_set(records: Sequence[dict[str, Any]]) -> frozenset[tuple[str, str]]:
    return frozenset((r.get("namespace", ""), r.get("name", "")) for r in records)


async def run(records: Sequence[dict[str, Any]], params: tap.TapParams, target: str,
              table: TopTable, notes: list[str], duration: float | None = None) -> None:
    """Fill ``table`` and show it live until `q`, Ctrl-C, ``duration`` or the end of every
    stream; a proxy that cannot be tapped adds a line to ``notes``. Without a terminal on
    stdout it only collects (the caller prints the table)."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    console = Console()
    live_screen = console.is_terminal

    def on_key(fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data or b"q" in data.lower():
            stop.set()

    def screen() -> Text:
        w, h = console.size
        lines = render_screen(table, w, h, status_line(target, len(records), table,
                                                       params.max_rps, len(notes)))
        text = Text("\n".join(lines))
        text.stylize("bold", sum(len(x) + 1 for x in lines[:3]), sum(len(x) + 1 for x in lines[:4]) - 1)
        return text

    async def refresh(live: Any) -> None:
        while True:
            live.update(screen(), refresh=True)
            await asyncio.sleep(REFRESH)

    def on_event(no: int, _rec: dict[str, Any], ev: dict[str, Any]) -> None:
        table.feed(no, ev)

    with cbreak(sys.stdin) as key_fd:
        if key_fd is not None:
            loop.add_reader(key_fd, on_key, key_fd)
        try:
            if not live_screen:
                await tap.run(records, params, on_event, notes.append, stop, duration)
                return
            with Live(screen(), console=console, screen=True, auto_refresh=False) as live:
                painter = asyncio.create_task(refresh(live))
                try:
                    await tap.run(records, params, on_event, notes.append, stop, duration)
                finally:
                    painter.cancel()
                    await asyncio.gather(painter, return_exceptions=True)
        finally:
            if key_fd is not None:
                loop.remove_reader(key_fd)
