"""bench/host_step.py runs on the CPU and reports each part of a decode step; the engine's own
step_seconds account for every part of every step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorafleet.engine.engine import STEP_PHASES, EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.timeout(300)


def test_host_step_runs_and_reports(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorafleet.bench.host_step", "--batch", "8", "--adapters", "4",
                           "--steps", "3", "--commit", "testrun", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "testrun" / "host-step.json").read_text())["record"]
    assert (record["batch"], record["adapters"], record["steps"]) == (8, 4, 3)
    assert all(record[f"{phase}_ms_p50"] >= 0 for phase in STEP_PHASES)
    assert record["host_ms_p50"] > 0 and record["launch_ms_p50"] > 0
    assert "| host_ms_p50 |" in (tmp_path / "testrun" / "host-step.md").read_text()


def test_step_seconds_cover_the_step(zoo):
    engine = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=64))
    engine.add_request("r", prompt="The fox", params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert set(engine.step_seconds) == set(STEP_PHASES)
    assert engine.step_seconds["launch"] > 0 and all(v >= 0 for v in engine.step_seconds.values())
