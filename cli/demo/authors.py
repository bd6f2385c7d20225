"""authors (:7001): the leaf service; fails ~5 % of requests with 500 ($FAILURE_RATE)."""
from __future__ import annotations

import os
import random
from typing import Any

from demokit import INSTANCE, serve

FAILURE_RATE = float(os.environ.get("FAILURE_RATE", "0.05"))
AUTHORS = {
    "1": {"id": "1", "name": "Ursula K. Le Guin"},
    "2": {"id": "2", "name": "Italo Calvino"},
    "3": {"id": "3", "name": "Toni Morrison"},
}


def route(path: str) -> tuple[int, Any]:
    if random.random() < FAILURE_RATE:
        return 500, {"error": "authors: simulated failure", "instance": INSTANCE}
    parts = path.split("?")[0].strip("/").split("/")
    if parts in ([""], ["authors"]):
        return 200, {"authors": list(AUTHORS.values()), "instance": INSTANCE}
    if len(parts) == 2 and parts[0] == "authors" and parts[1] in AUTHORS:
        return 200, {**AUTHORS[parts[1]], "instance": INSTANCE}
    return 404, {"error": f"no such path {path}"}


if __name__ == "__main__":
    serve("authors", route, 7001)
