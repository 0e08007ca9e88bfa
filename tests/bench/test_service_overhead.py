"""bench/service_overhead.py runs on the CPU end to end and writes its report: both paths serve
every request (the stack's exactly-once checks pass), and the figures are consistent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_service_overhead_runs_and_reports(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorafleet.bench.service_overhead", "--requests", "12", "--max-tokens", "3",
                           "--device", "cpu", "--commit", "testrun", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "testrun" / "service-overhead.json").read_text())
    (record,) = report["records"]
    assert record["requests"] == record["engine_requests"] == record["stack_requests"] == 12
    assert record["engine_tokens"] == record["stack_tokens"] == 36
    assert record["ratio"] == pytest.approx(record["stack_req_s"] / record["engine_req_s"])
    assert 0 < record["stack_ttft_p50_ms"] <= record["stack_ttft_p99_ms"]
    assert "| 12 | 3 |" in (tmp_path / "testrun" / "service-overhead.md").read_text()
