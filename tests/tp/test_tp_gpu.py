"""On W GPUs (NCCL, bf16, Triton ops on the rank's pages): the TP engine's greedy tokens equal the
single-GPU engine's (tp_size=1), for both LoRA schemes, W = 1 (the TP code path in one process),
2 and 4. Skips when fewer than W GPUs are visible.

bf16 sums in another order (sharded matmuls, all-reduces) may flip a near-tie, so a request is
compared token by token up to its first difference, which must sit where the reference's top-2
logit margin (HF PEFT, teacher-forced on the reference's own tokens) is below MARGIN; most tokens
must be compared. A wrong shard, page or table gives differences at clear margins and fails.

Time (each new (W, scheme, graphs) compiles its Triton kernels on every rank, ~50 s for W = 2 at
862f829, so the file takes several minutes on a 4-GPU machine; the first device run, with an
HF + PEFT pass per request up front, had time for one case in 250 s):
- the reference tokens come from one single-GPU engine per model, made once for the session;
- the HF margins are computed only for a request that differs, the HF model loaded on the first
  such request (an equal run never loads HF; the rule is the same: it is only asked where used);
- one TP engine per (model, W, scheme), 12 requests, all admitted together;
- every wait of a TP engine is bounded by WAIT_S here (collectives, start-up, joins), and each case
  by CASE_TIMEOUT_S, so a stuck case fails with its stack in the log and the next case still runs.
"""

from __future__ import annotations

import time

import pytest
import torch

import lorafleet.engine.tp.engine_runtime as tp_runtime
from lorafleet.engine.engine import EngineConfig, LLMEngine, SamplingParams, generated_ids
from lorafleet.engine.tp.engine_runtime import build_tp_runtime
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.zoo import ADAPTERS

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

MAX_TOKENS = 12
MARGIN = 0.1  # top-2 logit gaps below this may flip under bf16 rounding
PROMPT_LENGTHS = (5, 29)
WAIT_S = 50.0  # a TP engine's collective / start-up / join bound in this test (the engine's is 180 s)
CASE_TIMEOUT_S = 150  # a new (W, scheme, graphs) compiles its Triton kernels on every rank: ~50 s at W = 2 (862f829)
_reference: dict[str, dict[str, list[int]]] = {}
_hf: dict[str, torch.nn.Module] = {}
_margin_cache: dict[tuple[str, str], list[float]] = {}


def _jobs():
    for salt, n in enumerate(PROMPT_LENGTHS):
        for i, name in enumerate((None, *ADAPTERS)):
            yield f"{name}-{n}", name, [(17 * i + 3 * j + 11 * salt) % 500 + 4 for j in range(n)]


def _run(zoo, model: str, build=None, **cfg) -> dict[str, list[int]]:
    config = EngineConfig(model_dir=str(zoo.model(model)), device="cuda", dtype="bfloat16", num_pages=256, ops="triton",
                          max_num_seqs=16, **cfg)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    t = time.monotonic()
    with LLMEngine(config, build) as eng:
        up = time.monotonic() - t
        for rid, name, prompt in _jobs():
            w = None if name is None else load_peft_adapter_dir(zoo.adapter(model, name), eng.spec)
            eng.add_request(rid, prompt_token_ids=prompt, params=params, adapter_id=name, adapter=w)
        out = {rid: generated_ids(outs) for rid, outs in eng.run_to_completion().items()}
    print(f"[{model} {cfg or 'single'}] engine up {up:.1f} s, served and closed {time.monotonic() - t - up:.1f} s")
    return out


@torch.inference_mode()
def _margins(model_dir, adapter_dir, prompt: list[int], generated: list[int]) -> list[float]:
    """Top-2 logit gap (HF PEFT, bf16) at each generated position, fed the reference's tokens.
    The base model is loaded once per model; an adapter is attached for the call and removed
    again (unload, no merge)."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _hf:
        _hf[key] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    m = _hf[key]
    if adapter_dir is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter_dir)
    try:
        ids = torch.tensor([prompt + generated], device="cuda")
        top = m(ids).logits[0, len(prompt) - 1 : -1].float().topk(2, dim=-1).values  # [n, 2]
    finally:
        if adapter_dir is not None:
            _hf[key] = m.unload()  # the base model again, without LoRA layers
    return (top[:, 0] - top[:, 1]).tolist()


def _single(zoo, model: str) -> dict[str, list[int]]:
    """The single-GPU engine's tokens (CUDA graphs as deployed), once per model."""
    if model not in _reference:
        _reference[model] = _run(zoo, model)
    return _reference[model]


# (model, world, scheme): mha has 4 heads, gqa 8 heads over 2 KV heads (replicated at W = 4).
# Cheapest first (W = 1 runs in this process, no spawn), so a short budget loses the least.
# "+graphs": decode steps replayed from CUDA graphs on every rank (tp_cuda_graphs).
CASES = [("mha", 1, "fused"), ("mha", 1, "slora"), ("mha", 1, "slora+graphs"), ("mha", 2, "fused"), ("mha", 2, "fused+graphs"),
         ("mha", 2, "slora"), ("mha", 2, "slora+graphs"), ("gqa", 2, "replicated_a+graphs"),
         ("mha", 4, "fused"), ("mha", 4, "slora+graphs"), ("mha", 4, "slora"), ("gqa", 4, "slora")]


@pytest.mark.timeout(CASE_TIMEOUT_S)
@pytest.mark.parametrize("model,world,scheme", CASES, ids=[f"{m}-W{w}-{s}" for m, w, s in CASES])
def test_tp_engine_on_gpus_matches_single_gpu(zoo, model, world, scheme, monkeypatch):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
    want = _single(zoo, model)
    monkeypatch.setattr(tp_runtime, "COLLECTIVE_TIMEOUT_S", WAIT_S)
    scheme, _, graphs = scheme.partition("+")
    # W = 1: the TP runtime itself (shards of one, pages read by rank-local tables, NCCL of one)
    got = _run(zoo, model, build_tp_runtime if world == 1 else None, tp_size=world, tp_lora_scheme=scheme, tp_research_schemes=True,
               tp_cuda_graphs=bool(graphs))
    assert sorted(got) == sorted(want)
    compared = total = 0
    for rid, name, prompt in _jobs():
        total += len(want[rid])
        for t, (g, w) in enumerate(zip(got[rid], want[rid])):
            if g != w:
                key = (model, rid)
                if key not in _margin_cache:
                    _margin_cache[key] = _margins(zoo.model(model), name and zoo.adapter(model, name), prompt, want[rid])
                margin = _margin_cache[key][t]
                assert margin < MARGIN, (
                    f"{model} W={world} {scheme} {rid} token {t}: TP {g} != single {w} at a clear margin "
                    f"{margin:.3f} (TP {got[rid]}, single {want[rid]})")
                break
            compared += 1
    assert compared >= 3 * total // 4, f"only {compared} of {total} tokens equal before a near-tie"
