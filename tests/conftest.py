"""Shared fixtures. Control-plane process helpers live in tests/controlplane_helpers.py."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from identity.store import MeshHome
from tests.controlplane_helpers import Component, make_home, start_component


@pytest.fixture
def mesh_home(tmp_path: Path) -> MeshHome:
    """A fresh mesh home with a CA (anchor, issuer, token secret)."""
    return make_home(tmp_path / "mesh")


@pytest.fixture
def start_controlplane() -> Iterator[Callable[..., Component]]:
    """``start_controlplane("identity", home, *args)``: started processes are stopped at teardown."""
    started: list[Component] = []

    def start(module: str, home: MeshHome, *args: str, **kw: object) -> Component:
        comp = start_component(module, home, *args, **kw)  # type: ignore[arg-type]
        started.append(comp)
        return comp

    yield start
    for comp in started:
        comp.stop()
