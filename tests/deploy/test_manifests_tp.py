"""Tensor parallelism in the manifests: an engine pod asks for exactly as many GPUs as processes
its LORAFLEET_TP_SIZE starts (one per GPU), and a pod of several ranks has a memory-backed /dev/shm
for NCCL; the tensor-parallel overlay runs 4 ranks, the other overlays one."""

from __future__ import annotations

import pytest

from lorafleet.engine.tp.partition import check_world
from tests.deploy.manifests import OVERLAYS, container_env, lorafleet_containers, quantity, rendered

EXPECTED_TP = {"base": 1, "single-gpu-node": 1, "production": 1, "tensor-parallel": 4}
LLAMA_7B_HEADS = 32  # the degree must divide the served model's heads (checked before the engine starts)


def _engine(overlay: str):
    objects = rendered(overlay)
    (engine,) = [c for c in lorafleet_containers(objects) if c.subcommand == "engine"]
    return engine, container_env(engine, objects)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engine_gpus_equal_its_tensor_parallel_size(overlay):
    engine, env = _engine(overlay)
    tp = int(env.get("LORAFLEET_TP_SIZE", "1"))
    assert tp == EXPECTED_TP[overlay], f"{overlay}: LORAFLEET_TP_SIZE {tp}"
    res = engine.spec["resources"]
    assert quantity(res["requests"]["nvidia.com/gpu"]) == quantity(res["limits"]["nvidia.com/gpu"]) == tp, (
        f"{engine.where}: {tp} ranks need {tp} GPUs, resources {res}")
    assert LLAMA_7B_HEADS % tp == 0


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if EXPECTED_TP[o] > 1])
def test_several_ranks_get_a_memory_backed_dev_shm_and_host_memory_per_rank(overlay):
    engine, env = _engine(overlay)
    tp = int(env["LORAFLEET_TP_SIZE"])
    mounts = {m["mountPath"]: m["name"] for m in engine.spec["volumeMounts"]}
    assert "/dev/shm" in mounts, f"{engine.where}: NCCL needs /dev/shm"
    (volume,) = [v for v in engine.pod["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= tp * 2**30
    assert quantity(engine.spec["resources"]["limits"]["memory"]) >= tp * 16 * 2**30  # a 7B checkpoint per rank, at load
    assert env.get("LORAFLEET_TP_LORA_SCHEME", "fused") in ("fused", "slora")  # production's schemes


def test_the_tp_check_the_engine_makes_refuses_what_the_manifest_must_not_ask_for():
    from lorafleet.formats.model_spec import ModelSpec, RopeSpec

    spec = ModelSpec(model_type="llama", num_layers=1, vocab_size=32, max_position=64, rms_norm_eps=1e-6,
                     rope=RopeSpec(theta=10000.0), tie_word_embeddings=False, eos_token_ids=(1,), bos_token_id=0,
                     hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128,
                     attention_bias=False)
    check_world(spec, 4)
    with pytest.raises(ValueError):
        check_world(spec, 3)
