"""bench/host_step.py runs on the CPU and reports each part of a decode step in both scheduling
modes; the engine's own step_seconds account for every part of every step, and its
device_idle_seconds counts the host work a GPU would wait for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorafleet.engine.engine import STEP_PHASES, EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.timeout(300)


def test_host_step_runs_and_reports(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lorafleet.bench.host_step", "--batch", "8", "--adapters", "4",
                           "--steps", "3", "--repeat", "1", "--commit", "testrun", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "testrun" / "host-step.json").read_text())["records"]
    assert [r["mode"] for r in records] == ["sync", "async"]
    for record in records:
        assert (record["batch"], record["adapters"], record["steps"]) == (8, 4, 3)
        assert all(record[f"{phase}_ms_p50"] >= 0 for phase in STEP_PHASES)
        assert record["host_ms_p50"] > 0 and record["launch_ms_p50"] > 0
    sync, asynced = records
    assert sync["exposed_ms_p50"] > 0 and asynced["exposed_ms_p50"] == 0  # decoding: always a step in flight
    md = (tmp_path / "testrun" / "host-step.md").read_text()
    assert "| mode | host_ms_p50 |" in md and "async / sync" in md


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_seconds_cover_the_step(zoo, async_scheduling):
    engine = LLMEngine(EngineConfig(model_dir=str(zoo.model("mha")), num_pages=64, async_scheduling=async_scheduling))
    engine.add_request("r", prompt="The fox", params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert set(engine.step_seconds) == set(STEP_PHASES)
    assert engine.step_seconds["launch"] > 0 and all(v >= 0 for v in engine.step_seconds.values())
    assert engine.step_seconds["wait"] > 0 and engine.step_seconds["outputs"] > 0
    # one step at a time the device waits for the host between every two steps; asynchronous
    # steps only when a step is launched with none in flight (never here: one request, no gaps)
    assert (engine.device_idle_seconds > 0) == (not async_scheduling)
