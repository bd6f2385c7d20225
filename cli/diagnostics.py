"""`mesh diagnostics proxy-metrics NAME`: the raw /metrics of each matching proxy.

Printed as `linkerd diagnostics proxy-metrics` prints them (``cli/cmd/metrics.go``): a
``# POD <instance> (i of n)`` header before each proxy's exposition, ``# ERROR ...`` for
a proxy that did not answer.
"""
from __future__ import annotations

import http.client
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import local
from .targets import Target

TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Result:
    pod: str
    metrics: str | None
    error: str | None = None


def matching(name: Target | str, records: Sequence[dict[str, Any]], namespace: str | None) -> list[dict[str, Any]]:
    """Replicas named by ``deploy/N``, ``pod/N``, or a bare N (a workload or an instance)."""
    def hit(r: dict[str, Any]) -> bool:
        if isinstance(name, Target) and name.kind == "ns":
            return r.get("namespace") == name.name
        if namespace is not None and r.get("namespace") != namespace:
            return False
        if isinstance(name, Target):
            return r.get("name" if name.kind == "deploy" else "instance") == name.name
        return name in (r.get("name"), r.get("instance"))
    return sorted((r for r in records if hit(r)), key=lambda r: str(r.get("instance")))


def fetch(records: Sequence[dict[str, Any]], timeout: float = TIMEOUT) -> list[Result]:
    def one(rec: dict[str, Any]) -> Result:
        pod = str(rec.get("instance"))
        port = rec.get("admin_port")
        if not port:
            return Result(pod, None, "no admin port")
        try:
            status, body = local.admin_get(int(port), "/metrics", timeout=timeout)
        except (OSError, http.client.HTTPException) as e:
            return Result(pod, None, f"127.0.0.1:{port}: {e or type(e).__name__}")
        if status != 200:
            return Result(pod, None, f"127.0.0.1:{port}/metrics answered {status}")
        return Result(pod, body.decode("utf-8", "replace"))
    if not records:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(records))) as pool:
        return list(pool.map(one, records))


def render(results: Sequence[Result]) -> str:
    out = []
    for i, r in enumerate(results):
        out.append(f"#\n# POD {r.pod} ({i + 1} of {len(results)})\n#\n")
        out.append(r.metrics if r.error is None and r.metrics is not None else f"# ERROR {r.error}\n")
    return "".join(out)
