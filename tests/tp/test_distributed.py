"""Sharded math on 2 and 4 gloo processes equals the unsharded computation (fp32)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.bench.tp_comm_model import layer_collectives
from lorafleet.formats.model_spec import ModelSpec
from tests.tp import workers
from tests.tp.cases import SCHEMES, SPECS, TOKEN_ADAPTER, local_columns, make_case, reference_outputs
from tests.tp.harness import run_ranks
from tests.tp.reference import DECODER_JOB, reference_logits
from tests.zoo import ADAPTERS

TOL = dict(atol=2e-5, rtol=2e-5)
# world -> zoo models whose full decoder runs there (gqa at W=4: KV heads replicated)
DECODERS = {2: ["mha", "gqa"], 4: ["gqa"]}


@pytest.fixture(scope="module", params=[2, 4], ids=["W2", "W4"])
def group_run(request, zoo, tmp_path_factory):
    """One process group per world size runs every case (layer math, then the decoders)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"tp-w{world}")
    jobs = []
    for model in DECODERS[world]:
        adapters = [str(zoo.adapter(model, name)) for name in ADAPTERS]
        jobs.append({"name": model, "model_dir": str(zoo.model(model)), "job": dict(DECODER_JOB, adapters=adapters),
                     "spec": workers.spec_to_json(ModelSpec.from_pretrained(zoo.model(model)))})
    run_ranks(workers.suite_worker, world, out, json.dumps(jobs))
    return world, out, {j["name"]: j for j in jobs}


@pytest.mark.parametrize("scheme", [*SCHEMES, "base"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_sharded_layer_matches_unsharded(group_run, spec_name, scheme):
    world, out, _ = group_run
    case = make_case(spec_name)
    if scheme == "base":
        case.token_adapter = torch.full_like(case.token_adapter, -1)
    want = reference_outputs(case)
    for rank in range(world):
        got = load_file(str(out / f"{spec_name}-{scheme}-rank{rank}.safetensors"))
        cols = local_columns(case.spec, world, rank)
        for name in ("qkv", "gate_up"):  # column-parallel: the rank's own columns
            torch.testing.assert_close(got[name], want[name][:, cols[name]], **TOL, msg=lambda m: f"{name} rank {rank}: {m}")
        for name in ("o", "down"):  # row-parallel: the full output, on every rank
            torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name} rank {rank}: {m}")


@pytest.mark.parametrize("scheme", [*SCHEMES, "base"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_collectives_match_the_comm_model(group_run, spec_name, scheme):
    world, out, _ = group_run
    spec = make_case(spec_name).spec
    max_rank = 8  # the largest rank among the case's adapters
    planned = layer_collectives(spec, world, None if scheme == "base" else scheme, max_rank, len(TOKEN_ADAPTER), 4)
    want = [[c.call.op, c.call.elements, c.call.elem_bytes] for c in planned]
    for rank in range(world):
        calls = json.loads((out / f"comm-rank{rank}.json").read_text())
        assert calls[f"{spec_name}-{scheme}"] == want


def test_sharded_decoder_matches_hf_peft(group_run):
    """Prefill of six sequences (five adapters of ranks 1-16 and one base-only) then a decode step
    through each rank's own KV pool; every scheme's logits equal HF + PEFT's on every rank."""
    world, out, jobs = group_run
    assert sorted(jobs) == sorted(DECODERS[world])
    for model, d in jobs.items():
        _check_decoder(out, model, world, reference_logits(d["model_dir"], d["job"]["adapters"], d["job"]), "")


def _check_decoder(out, model: str, world: int, want: tuple, label: str) -> None:
    """Every scheme's prefill and decode logits on every rank equal the reference's."""
    want_prefill, want_decode = want
    for scheme in SCHEMES:
        for rank in range(world):
            got = load_file(str(out / model / f"{scheme}-rank{rank}.safetensors"))
            where = f"{label}{model} W={world} rank {rank} {scheme}"
            torch.testing.assert_close(got["prefill"], want_prefill, atol=1e-4, rtol=1e-4, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(got["decode"], want_decode, atol=1e-4, rtol=1e-4, msg=lambda m: f"{where}: {m}")


def test_sharded_decoder_with_the_fused_elementwise_kernels_matches_hf_peft(zoo, tmp_path):
    """The ranks' model with the fused Triton kernels (add + RMSNorm, RoPE on the rank's q/k heads,
    SiLU * up) instead of the torch sequence, W = 2: the same logits as HF + PEFT. On the CPU the
    spawned ranks run the kernels under the Triton interpreter (set for the children only)."""
    world, model = 2, "mha"
    adapters = [str(zoo.adapter(model, name)) for name in ADAPTERS]
    job = dict(DECODER_JOB, adapters=adapters, elementwise="triton")
    jobs = [{"name": model, "model_dir": str(zoo.model(model)), "job": job,
             "spec": workers.spec_to_json(ModelSpec.from_pretrained(zoo.model(model)))}]
    interpret = not torch.cuda.is_available()
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read by the spawned ranks when they import the kernels
    try:
        run_ranks(workers.decoder_worker, world, tmp_path, json.dumps(jobs))
    finally:
        if interpret and saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        elif interpret:
            os.environ["TRITON_INTERPRET"] = saved
    _check_decoder(tmp_path, model, world, reference_logits(str(zoo.model(model)), adapters, job), "fused ")
