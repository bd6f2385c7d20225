"""Golden-signal metrics with Linkerd's names, counted in plain dicts and rendered at scrape.

Why not prometheus_client's Counter/Histogram objects on the data path: on this machine
``labels().observe()`` per request costs 16-20 % of proxy throughput and rendering 300
label sets with ``generate_latest`` blocks the loop for ~76 ms (see PERF-LAB.md). Here a
request costs two dict lookups and a bisect; label sets are pre-rendered strings cached on
the connection/endpoint, and the text exposition is rendered from them in one pass.

Counters are *cells*: one-element lists (``[value]``) in ``requests`` and ``counters``. The
data path keeps the cells of what it counts on objects it already holds (an endpoint, a
route, a connection's per-host cache) and adds to ``cell[0]``: no call, no key to build. The
output follows the Prometheus text format 0.0.4 and passes ``promtool check metrics``.

Families: request_total, response_total, response_latency_ms (time to response headers),
tcp_open_total, tcp_close_total, tcp_open_connections, tcp_read_bytes_total,
tcp_write_bytes_total, identity_cert_expiration_timestamp_seconds,
identity_cert_refresh_count, control_request_total.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

# Linkerd's latency buckets, in milliseconds (linkerd/metrics/src/latency.rs).
BUCKETS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000,
           4000, 5000, 10000, 20000, 30000, 40000, 50000)
_BUCKET_LABELS = tuple(f'le="{b}"' for b in BUCKETS) + ('le="+Inf"',)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**kv: str | None) -> str:
    """Render a label set once: ``direction="outbound",authority="..."`` (None values dropped)."""
    return ",".join(f'{k}="{escape(v)}"' for k, v in kv.items() if v is not None)


class _Response:
    __slots__ = ("buckets", "count", "sum", "lines")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.lines: tuple[list[str], str, str] | None = None  # rendered label prefixes, cached


class Metrics:
    """All of a proxy's counters. Keys are pre-rendered label strings."""

    def __init__(self, base: str = "") -> None:
        self.base = base  # labels on every sample, e.g. namespace/workload of this proxy
        self.requests: dict[str, list[int]] = {}            # cells
        self.responses: dict[tuple[str, int, str], _Response] = {}
        self.tcp_open: dict[str, int] = {}
        self.tcp_close: dict[str, int] = {}
        self.tcp_read: dict[str, int] = {}
        self.tcp_write: dict[str, int] = {}
        self.tcp_current: dict[str, int] = {}
        from .observe import Window  # (observe imports BUCKETS from here)
        self.window = Window()  # per-second rolling stats for `mesh stat`
        self.gauges: dict[tuple[str, str], float] = {}
        self.counters: dict[tuple[str, str], list[float]] = {}   # cells

    # --- HTTP
    def request(self, key: str) -> None:
        self.request_cell(key)[0] += 1

    def request_cell(self, key: str) -> list[int]:
        """The request_total cell of ``key``, for a caller that counts on it directly."""
        c = self.requests.get(key)
        if c is None:
            c = self.requests[key] = [0]
        return c

    def record(self, key: str, status: int, failure: bool, latency_ms: float, now: float,
               grpc_status: int | None | bool = False) -> None:
        """A response for the Prometheus histogram (response_total, response_latency_ms) and
        the ``/stats`` window, with one bisect. A gRPC response passes its ``grpc_status``
        (None when missing), a label of its histogram series (not of its window row)."""
        if grpc_status is not False:
            gs = f'grpc_status="{"" if grpc_status is None else grpc_status}"'
            k = (f"{key},{gs}" if key else gs, status, "failure" if failure else "success")
        else:
            k = (key, status, "failure" if failure else "success")
        r = self.responses.get(k)
        if r is None:
            r = self.responses[k] = _Response()
        b = bisect_left(BUCKETS, latency_ms)
        r.buckets[b] += 1
        r.count += 1
        r.sum += latency_ms
        self.window.add(key, failure, latency_ms, now, b)

    # --- TCP (per accepted connection, keyed by its label string)
    def tcp_opened(self, key: str) -> None:
        self.tcp_open[key] = self.tcp_open.get(key, 0) + 1
        self.tcp_current[key] = self.tcp_current.get(key, 0) + 1

    def tcp_closed(self, key: str, read: int, written: int) -> None:
        self.tcp_close[key] = self.tcp_close.get(key, 0) + 1
        self.tcp_current[key] = self.tcp_current.get(key, 0) - 1
        self.tcp_read[key] = self.tcp_read.get(key, 0) + read
        self.tcp_write[key] = self.tcp_write.get(key, 0) + written

    # --- misc
    def set_gauge(self, name: str, key: str, value: float) -> None:
        self.gauges[(name, key)] = value

    def inc(self, name: str, key: str = "", by: float = 1) -> None:
        self.cell(name, key)[0] += by

    def cell(self, name: str, key: str = "") -> list[float]:
        """The cell of counter ``name{key}``, for a caller that counts on it directly."""
        c = self.counters.get((name, key))
        if c is None:
            c = self.counters[(name, key)] = [0]
        return c

    def counter(self, name: str, key: str = "") -> float:
        """The value of counter ``name{key}`` (0 if never counted)."""
        c = self.counters.get((name, key))
        return c[0] if c is not None else 0

    # --- exposition
    def render(self) -> bytes:
        return b"".join(self.render_chunks())

    def render_chunks(self, series_per_chunk: int = 16) -> Iterator[bytes]:
        """The exposition in chunks of a bounded number of series, so a caller on the event
        loop can yield between chunks (a scrape never stalls the loop for long)."""
        out: list[str] = []
        base = self.base

        def lbl(key: str, extra: str = "") -> str:
            parts = [p for p in (base, key, extra) if p]
            return "{" + ",".join(parts) + "}" if parts else ""

        def family(name: str, kind: str, help_: str, rows: Iterable[tuple[str, float]]) -> Iterator[bytes]:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for i, (key, value) in enumerate(rows):
                out.append(f"{name}{lbl(key)} {_num(value)}")
                if i % series_per_chunk == series_per_chunk - 1:
                    yield _flush(out)

        yield from family("request_total", "counter", "Total count of HTTP requests.",
                          [(k, c[0]) for k, c in list(self.requests.items()) if c[0]])
        out.append("# HELP response_latency_ms Elapsed times between a request's headers being "
                   "received and its response's headers being sent.")
        out.append("# TYPE response_latency_ms histogram")
        resp_rows: list[tuple[str, float]] = []
        for i, ((key, status, cls), r) in enumerate(list(self.responses.items())):
            rk = f'{key},status_code="{status}",classification="{cls}"' if key else \
                f'status_code="{status}",classification="{cls}"'
            if r.lines is None:
                r.lines = ([f"response_latency_ms_bucket{lbl(rk, le)} " for le in _BUCKET_LABELS],
                           f"response_latency_ms_sum{lbl(rk)} ", f"response_latency_ms_count{lbl(rk)} ")
            prefixes, sum_prefix, count_prefix = r.lines
            cum = 0
            for prefix, n in zip(prefixes, r.buckets):
                cum += n
                out.append(prefix + str(cum))
            out.append(sum_prefix + _num(r.sum))
            out.append(count_prefix + str(r.count))
            resp_rows.append((rk, r.count))
            if i % series_per_chunk == series_per_chunk - 1:
                yield _flush(out)
        yield from family("response_total", "counter", "Total count of HTTP responses.", resp_rows)
        yield from family("tcp_open_total", "counter", "Total count of opened connections.",
                          list(self.tcp_open.items()))
        yield from family("tcp_close_total", "counter", "Total count of closed connections.",
                          list(self.tcp_close.items()))
        yield from family("tcp_open_connections", "gauge", "Number of currently-open connections.",
                          list(self.tcp_current.items()))
        yield from family("tcp_read_bytes_total", "counter", "Total count of bytes read from peers.",
                          list(self.tcp_read.items()))
        yield from family("tcp_write_bytes_total", "counter", "Total count of bytes written to peers.",
                          list(self.tcp_write.items()))
        names: dict[str, list[tuple[str, float]]] = {}
        for (name, key), v in self.gauges.items():
            names.setdefault(name, []).append((key, v))
        for name, rows in sorted(names.items()):
            yield from family(name, "gauge", name.replace("_", " ") + ".", rows)
        names = {}
        for (name, key), c in list(self.counters.items()):
            if c[0]:   # a cell made ahead of its first count is not a series yet
                names.setdefault(name, []).append((key, c[0]))
        for name, rows in sorted(names.items()):
            yield from family(name, "counter", name.replace("_", " ") + ".", rows)
        yield _flush(out)


def _flush(out: list[str]) -> bytes:
    data = ("\n".join(out) + "\n").encode() if out else b""
    out.clear()
    return data


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))
