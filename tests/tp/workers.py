"""What each rank runs in the multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet.engine.memory.layout import PoolGeometry
from lorafleet.engine.model import DOWN, GATE_UP, QKV, LlamaModel, O, TensorParallel
from lorafleet.engine.ops.torch_ref import TorchAttentionOps
from lorafleet.engine.tp.collectives import CommLog, TpComm
from lorafleet.engine.tp.linear import column_parallel, row_parallel
from lorafleet.engine.tp.partition import local_spec, make_plan
from lorafleet.engine.tp.shard_adapters import shard_lora
from lorafleet.engine.tp.shard_weights import shard_layer, shard_model
from lorafleet.engine.weights_loader import load_weights
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from lorafleet.formats.model_spec import ModelSpec, RopeSpec
from tests.tp import paged
from tests.tp.cases import SCHEMES, SPECS, make_case
from tests.tp.lora_math import TpLoraBatch


def spec_to_json(spec: ModelSpec) -> str:
    # Workers rebuild the spec from JSON instead of importing transformers (seconds per process).
    return json.dumps(dataclasses.asdict(spec))


def spec_from_json(raw: str) -> ModelSpec:
    d = json.loads(raw)
    return ModelSpec(**{**d, "rope": RopeSpec(**d["rope"]), "eos_token_ids": tuple(d["eos_token_ids"])})


def layer_worker(rank: int, world: int, out_dir: str) -> None:
    """Every spec x scheme (and a batch without LoRA): the four linear parts of one layer."""
    comm_calls = {}
    for name in SPECS:
        case = make_case(name)
        s, plan = case.spec, make_plan(case.spec, world, rank)
        lw = shard_layer(case.layer, s, plan)
        q_loc, kv_loc, i_loc = plan.heads_per_rank * s.head_dim, plan.kv_heads_per_rank * s.head_dim, s.intermediate_size // world
        x_o, x_down = case.x_o[:, plan.q_cols], case.x_down[:, plan.inter_cols]  # this rank's input columns
        for scheme in (*SCHEMES, None):
            log = CommLog()
            comm = TpComm.from_group(log=log)
            lora = None
            if scheme is not None:
                lora = TpLoraBatch(case.token_adapter, [shard_lora(a, plan, scheme) for a in case.adapters])
            out = {
                "qkv": column_parallel(case.x, lw.qkv, lw.qkv_bias, 0, QKV, (0, q_loc, q_loc + kv_loc), lora, comm),
                "o": row_parallel(x_o, lw.o, 0, O, plan, lora, comm),
                "gate_up": column_parallel(case.x, lw.gate_up, None, 0, GATE_UP, (0, i_loc), lora, comm),
                "down": row_parallel(x_down, lw.down, 0, DOWN, plan, lora, comm),
            }
            tag = f"{name}-{scheme or 'base'}"
            save_file({k: v.contiguous() for k, v in out.items()}, str(Path(out_dir, f"{tag}-rank{rank}.safetensors")))
            comm_calls[tag] = [[c.op, c.elements, c.elem_bytes] for c in log.calls]
    Path(out_dir, f"comm-rank{rank}.json").write_text(json.dumps(comm_calls))


def suite_worker(rank: int, world: int, out_dir: str, decoder_jobs_json: str) -> None:
    """The layer cases, then each decoder job, in one group (process start-up is the slow part).

    decoder_jobs: [{"name", "model_dir", "spec" (spec_to_json), "job"}]; each writes to out_dir/<name>/.
    """
    layer_worker(rank, world, out_dir)
    decoder_worker(rank, world, out_dir, decoder_jobs_json)


def decoder_worker(rank: int, world: int, out_dir: str, decoder_jobs_json: str) -> None:
    """Each decoder job (see suite_worker) in one group, without the layer cases."""
    for d in json.loads(decoder_jobs_json):
        spec = spec_from_json(d["spec"])
        plan = make_plan(spec, world, rank)
        results = run_decoder_job(spec, d["model_dir"], d["job"], plan, TpComm.from_group())
        sub = Path(out_dir, d["name"])
        sub.mkdir(exist_ok=True)
        for scheme, out in results.items():
            save_file(out, str(sub / f"{scheme}-rank{rank}.safetensors"))


def run_decoder_job(spec: ModelSpec, model_dir: str, job: dict, plan, comm: TpComm) -> dict[str, dict[str, torch.Tensor]]:
    """Prefill of several sequences (one adapter each, or none), then one decode step, per scheme.

    job: {"adapters": [dir, ...], "seq_adapter": [index or -1 per sequence], "prompts": [[ids]],
          "next": [id per sequence]}. Returns scheme -> {"prefill": [sum(len), V], "decode": [B, V]}.
    """
    weights = shard_model(load_weights(model_dir, spec, torch.float32, torch.device("cpu")), spec, plan)
    full_adapters = [load_peft_adapter_dir(d, spec) for d in job["adapters"]]
    prompts, seq_adapter = job["prompts"], job["seq_adapter"]
    geom = PoolGeometry.for_model(local_spec(spec, plan.world), paged.num_pages(len(prompts)), paged.BLOCK)
    elementwise = None  # the torch sequence; job "elementwise": "triton" runs the fused kernels
    if job.get("elementwise") == "triton":
        from lorafleet.kernels.fused_ops import TritonElementwiseOps

        elementwise = TritonElementwiseOps()
    model = LlamaModel(spec, weights, TorchAttentionOps(), elementwise, TensorParallel(plan, comm))
    lens = [len(p) for p in prompts]
    results = {}
    for scheme in SCHEMES:
        shares = [shard_lora(a, plan, scheme) for a in full_adapters]
        pool = torch.zeros(spec.num_layers, geom.num_pages, geom.page_elems)  # [L, pages, P_loc]: own KV heads
        # prefill: every prompt in one step
        ids = torch.tensor([t for p in prompts for t in p])
        token_adapter = torch.tensor([a for a, n in zip(seq_adapter, lens) for _ in range(n)])
        positions, meta = paged.step_meta([0] * len(prompts), lens)
        prefill = model.logits(model.forward(ids, positions, pool, meta, TpLoraBatch(token_adapter, shares)))
        # decode: one more token per sequence, attending over the K/V cached in the rank's pool
        positions, meta = paged.step_meta(lens, [1] * len(prompts))
        lora = TpLoraBatch(torch.tensor(seq_adapter), shares)
        decode = model.logits(model.forward(torch.tensor(job["next"]), positions, pool, meta, lora))
        results[scheme] = {"prefill": prefill, "decode": decode}
    return results
