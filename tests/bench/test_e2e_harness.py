"""The end-to-end benchmark's plumbing: the kit's redis-server is found, an explicit one wins;
and one short run through `lorafleet up` on the CPU (slow: starts a broker and redis-server)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from lorafleet.bench import e2e_bench


def test_stack_env_uses_the_kit_redis_unless_one_is_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAFLEET_REDIS_SERVER_BIN", raising=False)
    assert "LORAFLEET_REDIS_SERVER_BIN" not in e2e_bench.stack_env(64, 8, kit=tmp_path)  # no kit: PATH
    (tmp_path / "redis-server").write_text("#!/bin/sh\n")
    env = e2e_bench.stack_env(64, 16, kit=tmp_path)
    assert env["LORAFLEET_REDIS_SERVER_BIN"] == str((tmp_path / "redis-server").resolve())
    assert env["LORAFLEET_MAX_ADAPTER_RANK"] == "16" and env["LORAFLEET_RANDOM_WEIGHTS_SEED"] == "0"
    monkeypatch.setenv("LORAFLEET_REDIS_SERVER_BIN", "/opt/redis")
    assert e2e_bench.stack_env(64, 8, kit=tmp_path)["LORAFLEET_REDIS_SERVER_BIN"] == "/opt/redis"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None and not (e2e_bench.KIT / "redis-server").exists(),
                    reason="needs redis-server (or bench/devkit.sh's kit)")
def test_tiny_end_to_end_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["e2e", "--setting", "tiny", "--n", "3", "7", "--warmup", "0.2", "--rate", "20",
                                      "--duration", "0.4", "--max-len", "12", "--device", "cpu", "--out", str(tmp_path)])
    e2e_bench.main()
    records = json.loads((tmp_path / "e2e-tiny.json").read_text())["records"]
    assert [r["n"] for r in records] == [3, 7] and all(r["requests"] == 8 for r in records)
    assert all(r["throughput_req_s"] > 0 and 0 <= r["slo_6s"] <= 1 for r in records)
    assert (tmp_path / "e2e-tiny-up.log").exists()
