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
                           "--repeat", "2", "--device", "cpu", "--commit", "testrun", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "testrun" / "service-overhead.json").read_text())
    assert [r["repeat"] for r in report["records"]] == [0, 1]
    for record in report["records"]:
        assert record["requests"] == record["engine_requests"] == record["stack_requests"] == 12
        assert record["engine_tokens"] == record["stack_tokens"] == 36
        assert record["ratio"] == pytest.approx(record["stack_req_s"] / record["engine_req_s"])
        assert 0 < record["stack_ttft_p50_ms"] <= record["stack_ttft_p99_ms"]
        # where the CPU went: every service of the stack, and the in-process engine, by name
        roles = {row["role"] for row in record["stack_processes"]}
        assert {"engine", "ingest", "redis", "broker", "client"} <= roles, roles
        assert [row["role"] for row in record["engine_processes"]] == ["in-process engine"]
    table = (tmp_path / "testrun" / "service-overhead.md").read_text()
    assert "| 12 | 3 | 0 |" in table and "| 12 | 3 | 1 |" in table
    median = sorted(r["ratio"] for r in report["records"])
    assert f"| 12 | 2 | {sum(median) / 2:.3f} |" in table
