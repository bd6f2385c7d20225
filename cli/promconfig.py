"""A Prometheus scrape config for the local mesh: one target per proxy admin port.

``targets(records)`` turns workload records (``cli.local.list_workloads``) into
file_sd/static_config groups with the labels Linkerd's scrape config gives a pod:
``namespace``, ``workload`` and ``pod`` (the replica's instance id). ``config(...)``
builds a whole ``prometheus.yml`` around them, either with the targets inline
(``static_configs``) or pointing at a file_sd JSON file, which Prometheus re-reads by
itself whenever it changes (so re-running ``mesh prometheus-config --file-sd PATH``
after ``mesh run`` updates a running Prometheus).

The proxies already label every sample with ``namespace`` and ``workload``, so the job
uses ``honor_labels: true`` (their labels win; without it Prometheus would rename them
``exported_namespace``...). No I/O here except ``write_file_sd``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

JOB = "micromesh-proxy"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")   # Prometheus' duration syntax
LOOPBACK = "127.0.0.1"


def valid_duration(text: str) -> bool:
    return bool(DURATION.match(text))


def targets(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One target group per live proxy, sorted by namespace, workload and pod."""
    groups = []
    for rec in records:
        if not rec.get("alive", True) or not rec.get("admin_port"):
            continue
        groups.append({
            "targets": [f"{LOOPBACK}:{int(rec['admin_port'])}"],
            "labels": {"namespace": str(rec.get("namespace", "default")),
                       "workload": str(rec.get("name", "")),
                       "pod": str(rec.get("instance", ""))},
        })
    groups.sort(key=lambda g: (g["labels"]["namespace"], g["labels"]["workload"], g["labels"]["pod"]))
    return groups


def config(groups: list[dict[str, Any]], interval: str = "1s", file_sd: Path | None = None) -> dict[str, Any]:
    """A whole prometheus.yml: the global interval and the ``micromesh-proxy`` job."""
    job: dict[str, Any] = {
        "job_name": JOB,
        "scrape_interval": interval,
        "metrics_path": "/metrics",
        "honor_labels": True,
    }
    if file_sd is not None:
        job["file_sd_configs"] = [{"files": [str(file_sd)], "refresh_interval": "5s"}]
    else:
        job["static_configs"] = groups
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [job]}


def render(cfg: dict[str, Any]) -> str:
    return str(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))


def write_file_sd(path: Path, groups: list[dict[str, Any]]) -> None:
    """Atomically (Prometheus watches the file and must never read half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, path)
