"""bench/step_probe.py on the CPU (tiny shape): every timed step decodes the whole batch, with and
without adapters, and the engine is idle (nothing left running, no adapter pinned) afterwards."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.bench.adapters import AdapterBank
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.step_probe import decode_step_ms
from lorafleet.engine.engine import EngineConfig, LLMEngine


def test_probe_times_full_decode_batches_and_leaves_the_engine_idle(tmp_path: Path):
    folder = make_model_folder("tiny", tmp_path / "tiny")
    with LLMEngine(EngineConfig(model_dir=str(folder), device="cpu", random_weights_seed=0, num_pages=256,
                                max_num_seqs=8, max_batched_tokens=64)) as engine:
        bank = AdapterBank(engine.spec, (8, 4), ("q_proj", "v_proj"), torch.device("cpu"))
        for b in (None, bank):
            got = decode_step_ms(engine, b, batch=6, adapters=3, prompt_len=20, steps=5)
            assert got["full_batch_steps"] == 5 and got["batch"] == 6 and got["adapters"] == (0 if b is None else 3)
            assert 0 < got["step_ms_p10"] <= got["step_ms_p50"] <= got["step_ms_p90"]
            assert not engine.has_unfinished()
        assert all(engine.adapters.pins(a) == 0 for a in engine.adapters.cached_ids())
        assert len(engine.adapters.cached_ids()) == 3
