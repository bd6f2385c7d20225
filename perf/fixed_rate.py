"""Open-loop, fixed-rate HTTP/1.1 load client with coordinated-omission correction.

    python -m perf.fixed_rate URL RATE DURATION CONNS [--host HOST] [--spin-us 150]

Theory of operation (wrk2-style):

- Request ``i`` is *due* at ``t0 + i / RATE``. The schedule never waits for the server.
- Due requests queue in FIFO order and go out on any idle keep-alive connection (one
  request in flight per connection, no pipelining). When all CONNS connections are busy,
  requests wait in the queue; their latency still counts from the time they were *due*, so
  a stall shows up as the latency every queued request really saw (no coordinated omission).
- Latency = time the last byte of the response was read - due time. It therefore includes
  the client's own send lag (reported separately; p50 is ~20-30 µs on this machine).
- The loop sleeps in ``epoll`` until shortly before the next due time, then spins for the
  last ``--spin-us`` microseconds to send on time.
- The run is bounded: the schedule lasts DURATION seconds; requests still unanswered
  ``--drain`` seconds after that count as timeouts.

Prints one JSON object on stdout: percentiles in µs, counts, errors, achieved rate.
"""
from __future__ import annotations

import argparse
import collections
import json
import select
import socket
import sys
import time
from urllib.parse import urlsplit

import httptools

NS = 1_000_000_000


class Conn:
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("sock", "parser", "due", "done", "status", "fd")

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.parser = httptools.HttpResponseParser(self)
        self.due = 0          # due time (ns) of the request in flight; 0 = idle
        self.done = False
        self.status = 0

    # httptools callbacks
    def on_message_complete(self) -> None:
        self.done = True
        self.status = self.parser.get_status_code()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass  # already closed


def percentile(sorted_vals: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    if not sorted_vals:
        return 0
    rank = max(1, -(-len(sorted_vals) * q // 100))   # ceil(n*q/100)
    return sorted_vals[int(rank) - 1]


def run(url: str, rate: float, duration: float, nconns: int, host: str | None = None,
        spin_us: int = 150, drain: float = 5.0) -> dict:
    parts = urlsplit(url)
    addr = (parts.hostname or "127.0.0.1", parts.port or 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_hdr = host or parts.netloc
    request = f"GET {path} HTTP/1.1\r\nHost: {host_hdr}\r\n\r\n".encode()

    conns = [Conn(addr) for _ in range(nconns)]
    by_fd = {c.fd: c for c in conns}
    # select(), not epoll: epoll's timeout has 1 ms granularity, select's 1 µs.
    fds = list(by_fd)

    interval = NS / rate
    total = int(rate * duration)
    spin = spin_us * 1000
    idle = collections.deque(conns)
    queue: collections.deque[int] = collections.deque()
    latencies: list[int] = []
    lags: list[int] = []
    errors = {"non2xx": 0, "conn": 0, "timeout": 0}
    inflight = 0
    nxt = 0
    clock = time.perf_counter_ns
    t0 = clock() + 10_000_000          # start 10 ms from now, after setup
    end_by = t0 + int(duration * NS) + int(drain * NS)

    def reconnect(c: Conn) -> Conn:
        del by_fd[c.fd]
        c.close()
        fresh = Conn(addr)
        by_fd[fresh.fd] = fresh
        fds[:] = list(by_fd)
        return fresh

    while True:
        now = clock()
        while nxt < total and t0 + int(nxt * interval) <= now:
            queue.append(t0 + int(nxt * interval))
            nxt += 1
        while queue and idle:
            c = idle.popleft()
            due = queue.popleft()
            c.due, c.done = due, False
            try:
                sent = c.sock.send(request)
                if sent != len(request):            # never on loopback with 50 bytes, but be exact
                    c.sock.setblocking(True)
                    c.sock.sendall(request[sent:])
                    c.sock.setblocking(False)
            except OSError:
                errors["conn"] += 1
                c = reconnect(c)
                idle.append(c)
                continue
            lags.append(clock() - due)
            inflight += 1
        if nxt >= total and not queue and inflight == 0:
            break
        if now > end_by:
            errors["timeout"] += inflight + len(queue)
            break
        # Sleep until shortly before the next due time, then spin.
        if nxt < total:
            wait_ns = t0 + int(nxt * interval) - clock()
            timeout = (wait_ns - spin) / NS if wait_ns > spin else 0
        else:
            timeout = 0.001
        readable, _, _ = select.select(fds, (), (), timeout)
        for fd in readable:
            c = by_fd.get(fd)
            if c is None:
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            t = clock()
            if not data:
                if c.due:
                    errors["conn"] += 1
                    inflight -= 1
                else:
                    idle.remove(c)              # an idle connection the server closed
                c = reconnect(c)
                idle.append(c)
                continue
            try:
                c.parser.feed_data(data)
            except httptools.HttpParserError:
                errors["conn"] += 1
                inflight -= 1
                c = reconnect(c)
                idle.append(c)
                continue
            if c.done:
                if 200 <= c.status < 400:
                    latencies.append(t - c.due)
                else:
                    errors["non2xx"] += 1
                c.due, c.done = 0, False
                inflight -= 1
                idle.append(c)

    for c in by_fd.values():
        c.close()
    latencies.sort()
    lags.sort()
    us = 1000
    return {
        "url": url, "host": host_hdr, "rate": rate, "duration_s": duration, "connections": nconns,
        "scheduled": total, "completed": len(latencies), "errors": errors,
        "achieved_rps": len(latencies) / duration if duration else 0.0,
        "latency_us": {
            "p50": percentile(latencies, 50) / us, "p90": percentile(latencies, 90) / us,
            "p99": percentile(latencies, 99) / us, "p99.9": percentile(latencies, 99.9) / us,
            "max": (latencies[-1] / us) if latencies else 0.0,
            "mean": (sum(latencies) / len(latencies) / us) if latencies else 0.0,
        },
        "send_lag_us": {"p50": percentile(lags, 50) / us, "p99": percentile(lags, 99) / us},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("rate", type=float, help="requests per second")
    ap.add_argument("duration", type=float, help="seconds of scheduled sending")
    ap.add_argument("conns", type=int, help="keep-alive connections")
    ap.add_argument("--host", help="Host header (default: from the URL)")
    ap.add_argument("--spin-us", type=int, default=150)
    ap.add_argument("--drain", type=float, default=5.0, help="seconds to wait for answers after the schedule")
    a = ap.parse_args(argv)
    if a.rate <= 0 or a.duration <= 0 or a.conns <= 0:
        ap.error("rate, duration and conns must be positive")
    json.dump(run(a.url, a.rate, a.duration, a.conns, a.host, a.spin_us, a.drain), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
