"""The benchmark harness itself: the S-LoRA workload as specified, and an engine-level run on CPU."""

from __future__ import annotations

import numpy as np
import torch

from bench.adapters import AdapterBank
from bench.engine_bench import run_once
from bench.shapes import make_model_folder
from bench.workload import SETTINGS, generate_trace
from services.engine.engine import EngineConfig, LLMEngine


def test_trace_is_deterministic_and_follows_the_distributions():
    a = generate_trace(100, alpha=1.0, rate=20.0, cv=1.0, duration=200)
    assert a == generate_trace(100, alpha=1.0, rate=20.0, cv=1.0, duration=200)  # seed 42
    assert len(a) == 4000
    gaps = np.diff([0.0] + [r.arrival for r in a])
    assert abs(gaps.mean() - 1 / 20) < 0.005 and abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # Gamma, cv 1
    assert min(r.input_len for r in a) >= 8 and max(r.input_len for r in a) < 512
    assert min(r.output_len for r in a) >= 8 and max(r.output_len for r in a) < 512
    counts = np.bincount([r.adapter for r in a], minlength=100)
    assert counts.min() > 15  # alpha = 1: uniform popularity
    skewed = np.bincount([r.adapter for r in generate_trace(100, 0.1, 20.0, 1.0, 200)], minlength=100)
    assert skewed[:50].sum() > 5 * skewed[50:].sum()  # power(0.1) piles up near adapter 0
    bursty = np.diff([r.arrival for r in generate_trace(10, 1.0, 20.0, 4.0, 200)])
    assert bursty.std() / bursty.mean() > 2.5


def test_engine_level_run_on_cpu(tmp_path):
    model_dir = make_model_folder("tiny", tmp_path / "tiny")
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), random_weights_seed=0, num_pages=256))
    setting = SETTINGS["tiny"]
    bank = AdapterBank(engine.spec, setting.ranks, setting.modules, torch.device("cpu"))
    trace = generate_trace(3, 1.0, 50.0, 1.0, 0.2, input_range=(8, 16), output_range=(4, 8))
    result = run_once(engine, bank, trace, engine.spec.vocab_size)
    assert result["requests"] == len(trace) and result["throughput_req_s"] > 0
    assert result["adapter_loads"] == len({r.adapter for r in trace})
    assert 0.0 <= result["slo_6s"] <= 1.0 and result["ttft_p50_s"] <= result["ttft_p99_s"]
