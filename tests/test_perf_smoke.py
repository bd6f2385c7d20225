"""Smoke test of the benchmark harness (perf/): a --quick run of the direct and nginx
rows, so the harness cannot rot. Not a measurement. Deselect with ``-m "not perf"``."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.perf,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
    pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                       reason="nginx is not installed"),
]

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_quick_bench_direct_and_nginx(tmp_path: Path) -> None:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "perf.bench", "--quick", "--only", "direct,nginx",
         "--out", str(out), "--json", str(raw)],
        cwd=REPO, capture_output=True, text=True, timeout=55,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    report = out.read_text()
    assert "| direct (client → app) |" in report
    assert "| nginx two-hop mTLS |" in report
    assert "## Targets" in report and "not measured" in report   # no meshed row was asked for

    res = json.loads(raw.read_text())
    assert set(res["routes"]) == {"direct", "nginx"}
    for key in ("direct", "nginx"):
        s = res["summary"][key]
        assert s["rps"] > 0 and s["wrk_errors"] == 0
        assert s["fixed_completed"] == s["fixed_scheduled"] > 0 and s["fixed_errors"] == 0
        assert 0 < s["p50_us"] <= s["p99_us"]
    nginx = res["summary"]["nginx"]
    assert nginx["proxy_labels"] == ["outbound", "inbound"]
    assert all(nginx["rss_peak_mb"][k] > 0 for k in nginx["proxy_labels"])
    assert nginx["cpu_us_max"]["total"] > 0
    assert res["ratios"]["nginx/direct throughput"] > 0
    assert "cleanup" not in " ".join(res["problems"])
