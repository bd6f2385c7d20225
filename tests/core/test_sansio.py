"""microproxy/core stays sans-IO: no event loop, no clock, no sockets, no hidden randomness."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import microproxy.core

CORE = Path(microproxy.core.__file__).parent
BANNED = {"asyncio", "time", "socket", "random", "os", "threading", "uvloop", "ssl", "selectors"}


@pytest.mark.parametrize("module", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_nothing_that_does_io(module: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & BANNED
    assert "datetime.now" not in module.read_text() and "utcnow" not in module.read_text()
