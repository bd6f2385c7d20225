"""perf/inproc.py, the in-process rig of a meshed request: two real proxies (outbound and
inbound routers, pools, pipelining, metrics, policy) over fake transports. Checks that what it
measures is the real path (every request answered by the fake app, counted once by each
proxy, pipelined between them, seen inbound with the client's identity); not a measurement."""
from __future__ import annotations

import asyncio

import pytest
import uvloop

from perf import inproc

pytestmark = pytest.mark.perf


def _run(n: int, concurrency: int) -> dict[str, float]:
    async def go() -> dict[str, float]:
        rig = inproc.Rig(asyncio.get_running_loop(), 0, concurrency)
        await rig.run(n)
        assert sum(c.got for c in rig.clients) == n   # each client got each of its responses
        return rig.counts()
    return uvloop.run(go())


def test_every_request_crosses_both_proxies() -> None:
    c = _run(3000, 32)
    assert c["outbound_requests"] == c["inbound_mtls_requests"] == c["inbound_responses"] == 3000
    assert c["pipelined"] > 1000          # most GETs shared a connection between the proxies
    assert 2 <= c["peer_connections"] <= 32


def test_one_connection_at_a_time_is_not_pipelined() -> None:
    c = _run(500, 1)
    assert c["outbound_requests"] == c["inbound_mtls_requests"] == 500
    assert c["pipelined"] == 0 and c["peer_connections"] == 1


def test_the_cli_reports_time_calls_and_bytecodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert inproc.run(["--requests", "500", "--rounds", "1"]) == 0
    assert "µs per request through both proxies in-process" in capsys.readouterr().out
    assert inproc.run(["--requests", "200", "--calls"]) == 0
    assert "Python calls" in capsys.readouterr().out
    assert inproc.run(["--requests", "200", "--bytecodes", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "bytecodes per request" in out and "microproxy/" in out
