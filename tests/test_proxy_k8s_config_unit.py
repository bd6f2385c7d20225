"""The proxy's Kubernetes-facing configuration: MESH_OPAQUE_PORTS (parsing, and the
transparent outbound skipping detection for those ports) and MESH_TOKEN_FILE re-read at
every certification (projected ServiceAccount tokens rotate)."""
from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest

from microproxy import transparent
from microproxy.config import Config
from microproxy.identity_client import current_token
from microproxy.portranges import in_ranges, parse_port_ranges

BASE = {"MESH_IDENTITY_ADDR": "127.0.0.1:1", "MESH_DESTINATION_ADDR": "127.0.0.1:2",
        "MESH_TRUST_ANCHORS": "PEM", "MESH_TOKEN": "literal"}


@pytest.mark.parametrize("text,want", [
    ("", ()),
    ("  ", ()),
    ("3306", ((3306, 3306),)),
    ("25, 587,4000-4010", ((25, 25), (587, 587), (4000, 4010))),
    ("1-65535", ((1, 65535),)),
])
def test_parse_port_ranges(text: str, want: tuple[tuple[int, int], ...]) -> None:
    assert parse_port_ranges(text, "MESH_OPAQUE_PORTS") == want


@pytest.mark.parametrize("text,message", [
    ("0", "outside 1-65535"), ("65536", "outside 1-65535"), ("10-5", "runs backwards"),
    ("a", "bad port"), ("25,,26", "empty item"), ("-5", "bad port"), ("5-", "bad port"),
])
def test_parse_port_ranges_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        parse_port_ranges(text, "MESH_OPAQUE_PORTS")
    assert "MESH_OPAQUE_PORTS" in str(e.value)


def test_in_ranges() -> None:
    r = parse_port_ranges("25,4000-4010", "x")
    assert [p for p in (24, 25, 26, 3999, 4000, 4005, 4010, 4011) if in_ranges(p, r)] == [25, 4000, 4005, 4010]
    assert not in_ranges(80, ())


def test_config_opaque_ports() -> None:
    assert Config.from_env(BASE).opaque_ports == ()
    cfg = Config.from_env({**BASE, "MESH_OPAQUE_PORTS": "3306,5432,6379-6380"})
    assert cfg.opaque_ports == ((3306, 3306), (5432, 5432), (6379, 6380))
    with pytest.raises(ValueError, match="MESH_OPAQUE_PORTS"):
        Config.from_env({**BASE, "MESH_OPAQUE_PORTS": "99999"})


def test_token_file_is_read_at_every_certification(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    env = {k: v for k, v in BASE.items() if k != "MESH_TOKEN"} | {"MESH_TOKEN_FILE": str(token)}
    cfg = Config.from_env(env)
    assert (cfg.token, cfg.token_file) == ("first", str(token))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.token = "x"  # type: ignore[misc]
    assert current_token(cfg) == "first"
    token.write_text("rotated\n")                 # the kubelet rotated the projected token
    assert current_token(cfg) == "rotated"
    token.write_text("")                          # mid-write / empty: the start-up token
    assert current_token(cfg) == "first"
    token.unlink()                                # unreadable: the start-up token
    assert current_token(cfg) == "first"


def test_literal_token_wins_and_has_no_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-file\n")
    cfg = Config.from_env({**BASE, "MESH_TOKEN_FILE": str(token)})
    assert cfg.token_file is None and current_token(cfg) == "literal"


# --- the transparent outbound: a declared opaque port is not peeked at

class _Proto(asyncio.Protocol):
    def __init__(self, *args: Any) -> None:
        pass


def _handled(monkeypatch: pytest.MonkeyPatch, opaque: str, dst_port: int) -> tuple[list[Any], list[Any]]:
    """Run TransparentOutbound._handle on a connection 'originally' to 10.96.0.9:dst_port
    whose client sends nothing (a server-speaks-first protocol); (opaque calls, peeks)."""
    cfg = Config.from_env({**BASE, "MESH_OPAQUE_PORTS": opaque})
    calls: list[Any] = []
    peeks: list[Any] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        proxy = type("P", (), {"cfg": cfg, "loop": loop, "stopping": asyncio.Event(),
                               "outbound": None, "metrics": None, "conns": None})()
        out = transparent.TransparentOutbound(proxy)

        async def opaque(conn: Any, orig: Any) -> None:
            calls.append(orig)

        async def peek(sock: socket.socket) -> bytes:
            peeks.append(sock)
            return b""   # as if DETECT_TIMEOUT ran out
        monkeypatch.setattr(out, "_opaque", opaque)
        monkeypatch.setattr(out, "_peek", peek)
        monkeypatch.setattr(transparent, "original_dst", lambda s: ("10.96.0.9", dst_port))
        monkeypatch.setattr(transparent, "OpaqueConn", _Proto)
        a, b = socket.socketpair()
        a.setblocking(False)
        try:
            await out._handle(a)
        finally:
            a.close()
            b.close()
    asyncio.run(scenario())
    return calls, peeks


def test_opaque_port_skips_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, peeks = _handled(monkeypatch, "25,5432-5433", 5432)
    assert calls == [("10.96.0.9", 5432)] and peeks == []


def test_other_ports_are_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, peeks = _handled(monkeypatch, "25,5432-5433", 5434)
    assert calls == [("10.96.0.9", 5434)] and len(peeks) == 1   # peeked, then opaque by timeout
