"""Decode graphs under tensor parallelism (cuda_graphs.DecodeGraphs on every rank) on the CPU: no CUDA graph can be captured
here, so every rank runs the graph steps' padded static-buffer forward eagerly (capture=False).
That is everything of a graph step but the capture: the bucket chosen the same way on every rank,
the inert padding rows, the capacity-mode Triton ops (under the interpreter), the rank-0 logits,
the adapter tables allocated at the driver's capacity. Greedy tokens must equal the TP engine's
eager steps, with adapters loaded and evicted while the graphs are in use.

The driver runs in a fresh interpreter with TRITON_INTERPRET=1 (read when the kernels are first
imported; the spawned ranks inherit it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run_case(model_dir: str, adapter_dirs: list[str]) -> dict:
    """(In the child.) The same requests through the TP engine (W = 2, Triton ops) without and
    with decode graphs -> {"eager": tokens, "graphs": tokens, "replays": n}."""
    from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
    from lorafleet.formats.lora_weights import load_peft_adapter_dir

    out = {}
    for mode in ("eager", "graphs"):
        cfg = EngineConfig(model_dir=model_dir, device="cpu", num_pages=40, max_num_seqs=6, max_batched_tokens=24,
                           ops="triton", elementwise_ops="triton", tp_size=2, tp_lora_scheme="fused",
                           tp_cuda_graphs=mode == "graphs", decode_steps_per_prefill=2, max_adapter_rank=16)
        with LLMEngine(cfg) as eng:
            weights = [load_peft_adapter_dir(d, eng.spec) for d in adapter_dirs]
            params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            for i in range(9):  # base-only and adapter requests mixed; 9 > 6 seqs: some wait for a slot
                adapter = None if i % 3 == 0 else weights[i % len(weights)]
                eng.add_request(f"r{i}", prompt_token_ids=[(5 * i + 7 * k) % 400 + 4 for k in range(3 + 4 * i)],
                                params=params, adapter_id=None if adapter is None else f"a{i % len(weights)}",
                                adapter=adapter)
            results = eng.run_to_completion()
            out[mode] = {rid: generated_ids(outs) for rid, outs in results.items()}
            if mode == "graphs":
                out["replays"] = sum(eng.decode_graphs.graphs.variant_replays)
                out["buckets"] = eng.decode_graphs.graphs.buckets
    return out


@pytest.mark.timeout(600)
def test_tp_decode_graph_steps_equal_the_eager_steps(zoo):
    from tests.zoo import ADAPTERS

    if torch.cuda.is_available():
        pytest.skip("on a GPU the graphs are captured: tests/tp/test_tp_gpu.py")
    args = json.dumps([str(zoo.model("mha")), [str(zoo.adapter("mha", name)) for name in list(ADAPTERS)[:3]]])
    code = f"import json, tests.tp.test_tp_graphs as t; print('RESULT', json.dumps(t.run_case(*json.loads({args!r}))))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the child's environment only
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["replays"] > 5 and result["buckets"] == [1, 2, 4, 6]
    assert sorted(result["graphs"]) == [f"r{i}" for i in range(9)]
    assert all(len(ids) == 6 for ids in result["graphs"].values())
    assert result["graphs"] == result["eager"]
