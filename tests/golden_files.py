"""Golden files: ``assert_golden("stat_deploy.txt", text)`` compares with tests/golden/.

Regenerate them after an intended change of output with ``UPDATE_GOLDEN=1 pytest ...``,
then read the diff before committing it.
"""
from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"output differs from {path} (UPDATE_GOLDEN=1 regenerates it)"
