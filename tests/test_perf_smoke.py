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


def _h2c_app_missing() -> bool:
    return (shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists()
            and shutil.which("nghttpd") is None and not Path("/usr/sbin/nghttpd").exists())


@pytest.mark.timeout(40)
@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (apt nghttp2-client) is not installed")
@pytest.mark.skipif(_h2c_app_missing(), reason="no h2c app: neither nginx nor nghttpd (apt nghttp2-server)")
def test_quick_h2bench_direct_and_meshed(tmp_path: Path) -> None:
    """perf/h2bench.py --quick: h2load against the h2c app, directly and through two proxies."""
    out, raw = tmp_path / "RESULTS-h2.md", tmp_path / "h2bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "perf.h2bench", "--quick", "--only", "h2-direct,h2-meshed",
         "--out", str(out), "--json", str(raw)],
        cwd=REPO, capture_output=True, text=True, timeout=35,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = out.read_text()
    assert "| h2 direct (h2load → h2c app) |" in report
    assert "| h2 meshed (h2load → proxy → mTLS h2 → proxy → h2c app) | HTTP/2 |" in report

    res = json.loads(raw.read_text())
    assert set(res["routes"]) == {"h2-direct", "h2-meshed"}, res["skipped"]
    for key in ("h2-direct", "h2-meshed"):
        s = res["summary"][key]
        assert s["rps"] > 0 and s["errors"] == 0 and s["rate_errors"] == 0
        assert 0 < s["max_p50_us"] <= s["max_p99_us"] and 0 < s["rate_p50_us"] <= s["rate_p99_us"]
    meshed = res["summary"]["h2-meshed"]
    assert meshed["proxy_labels"] == ["outbound", "inbound"]
    assert meshed["cpu_us_max"]["total"] > 0
    assert all(meshed["rss_peak_mb"][k] > 0 for k in meshed["proxy_labels"])
    assert res["routes"]["h2-meshed"]["counters"]["mtls_requests"] > 0    # really went over mTLS
    assert res["ratios"]["h2 meshed/direct throughput"] > 0
    assert "cleanup" not in " ".join(res["problems"])
