"""bench/tp_bench.py on the CPU with the tiny shape (gloo, W = 1 and 2): arguments, engine plan,
the run loop over settings, the budget, and the report files, so the device run cannot fail on them."""

from __future__ import annotations

import json

import pytest

from lorafleet.bench.tp_bench import EnginePlan, main, parse_args, plan_engines
from lorafleet.bench.tp_report import scaling_rows

TINY = ["--settings", "tiny", "--n", "3", "--rate", "50", "--duration", "0.2", "--max-len", "12", "--device", "cpu",
        "--probe-batch", "4", "--probe-adapters", "2"]


def test_engine_plan_puts_each_worlds_base_and_first_scheme_before_the_other_schemes():
    plans = plan_engines([1, 2, 4], ["fused", "slora"])
    assert plans == [EnginePlan(1, "base-only", "-"), EnginePlan(1, "lora", "-"), EnginePlan(2, "base-only", "-"),
                     EnginePlan(2, "lora", "fused"), EnginePlan(4, "base-only", "-"), EnginePlan(4, "lora", "fused"),
                     EnginePlan(2, "lora", "slora"), EnginePlan(4, "lora", "slora")]


def test_arguments_are_checked():
    assert parse_args([]).settings == ["S1", "S2"]
    from pathlib import Path

    from lorafleet.bench.tp_bench import _config

    # (flags, world) -> (cuda_graphs, tp_cuda_graphs): --w1-graphs only at W = 1, --graphs at every W
    for flags, world, want in (([], 2, (False, False)), (["--w1-graphs"], 1, (True, False)),
                               (["--w1-graphs"], 2, (False, False)), (["--graphs"], 2, (True, True))):
        cfg = _config(parse_args(flags), Path("m"), EnginePlan(world=world, mode="lora", scheme="fused"), 8)
        assert (cfg.cuda_graphs, cfg.tp_cuda_graphs) == want, (flags, world)
    with pytest.raises(SystemExit):
        parse_args(["--settings", "S1", "S4"])  # two model shapes in one run


@pytest.mark.timeout(300)
def test_tp_bench_runs_on_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "tp"
    records = main([*TINY, "--worlds", "1", "2", "--schemes", "fused", "slora", "--out", str(out), "--commit", "abc"])
    got = [(r["world"], r["mode"], r["scheme"], r["setting"]) for r in records]
    assert got == [(1, "base-only", "-", "base"), (1, "lora", "-", "tiny"), (2, "base-only", "-", "base"),
                   (2, "lora", "fused", "tiny"), (2, "lora", "slora", "tiny")]
    assert all(r["requests"] == 10 and r["throughput_req_s"] > 0 for r in records)
    assert all(r["probe_step_ms_p50"] > 0 and r["probe_full_batch_steps"] == r["probe_steps"] for r in records)
    payload = json.loads((out / "tp-engine.json").read_text())
    assert payload["environment"]["commit"] == "abc" and len(payload["records"]) == 5 and not payload["skipped"]
    md = (out / "tp-engine.md").read_text()
    assert "| 2 | tp | tiny | lora | slora |" in md and "LoRA cost vs base" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "tp-engine.png").stat().st_size > 0
    rows = {(r["scheme"], r["world"]): r for r in scaling_rows(records) if r["setting"] == "tiny"}
    assert rows[("-", 1)]["speedup_vs_w1"] == pytest.approx(1.0)
    assert rows[("fused", 2)]["lora_cost_vs_base"] is not None and rows[("fused", 2)]["step_lora_cost"] is not None


def test_a_spent_budget_skips_engines_and_still_writes_the_report(tmp_path):
    records = main([*TINY, "--worlds", "1", "--budget-s", "0", "--out", str(tmp_path)])
    assert records == []
    payload = json.loads((tmp_path / "tp-engine.json").read_text())
    assert [s["mode"] for s in payload["skipped"]] == ["base-only", "lora"]


@pytest.mark.timeout(300)
def test_w1_tp_runs_world_one_through_the_tp_runtime(tmp_path):
    import lorafleet.bench.tp_bench as tp_bench
    from lorafleet.engine.tp.engine_runtime import TpDriverModel

    seen = []
    real = tp_bench.run_once

    def spy(engine, *a, **k):
        seen.append(type(engine.model).__name__)
        return real(engine, *a, **k)

    tp_bench.run_once = spy
    try:
        records = main([*TINY, "--worlds", "1", "--w1-tp", "--out", str(tmp_path), "--commit", "abc", "--warmup", "0"])
    finally:
        tp_bench.run_once = real
    assert [(r["world"], r["mode"], r["runtime"]) for r in records] == [(1, "base-only", "tp"), (1, "lora", "tp")]
    assert set(seen) == {TpDriverModel.__name__}
