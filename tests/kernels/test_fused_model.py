"""LlamaModel.forward with the fused elementwise kernels equals it with the torch sequence (same
weights, pool and batch), and the engine picks the elementwise ops as EngineConfig says."""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.config import EngineConfig
from lorafleet.engine.model import LlamaModel, TorchElementwiseOps
from lorafleet.engine.ops.select import select_elementwise_ops
from lorafleet.engine.ops.torch_ref import TorchAttentionOps
from lorafleet.engine.weights_loader import random_weights
from lorafleet.kernels.fused_ops import TritonElementwiseOps

from .conftest import DEVICE
from .kernel_fixtures import make_attention_case, make_spec, rel_err
from .test_fused_kernels import INTERPRETED  # noqa: F401  (reloads the kernels for the interpreter first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_fused_equals_torch_elementwise(dtype):
    spec = make_spec(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=192, layers=2)
    weights = random_weights(spec, dtype, torch.device(DEVICE), seed=4)
    with torch.no_grad():  # norms at 1 would hide a wrong weight index: make them differ per layer
        for i, lw in enumerate(weights.layers):
            lw.input_norm.copy_(torch.linspace(0.5, 1.5, spec.hidden_size) + 0.1 * i)
            lw.post_norm.copy_(torch.linspace(1.5, 0.5, spec.hidden_size) - 0.1 * i)
    # Two decodes and a prefill of 6 new tokens after a cached prefix of 5: 8 tokens in all.
    pool, meta, _, _, _ = make_attention_case([7, 12], [(5, 6)], spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                              block_size=4, dtype=dtype, device=DEVICE, seed=2, layers=spec.num_layers)  # fmt: skip
    positions = torch.tensor([6, 11] + list(range(5, 11)), device=DEVICE)
    input_ids = torch.tensor([3, 17, 5, 9, 44, 2, 100, 71], device=DEVICE)
    outs, pools = [], []
    for ew in (TorchElementwiseOps(), TritonElementwiseOps()):
        model = LlamaModel(spec, weights, TorchAttentionOps(), ew)
        p = pool.clone()
        outs.append(model.forward(input_ids, positions, p, meta, None))
        pools.append(p)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the interpreter truncates where the GPU rounds
    assert rel_err(outs[1], outs[0]) <= tol
    assert rel_err(pools[1], pools[0]) <= tol  # the K written to the pool was rotated alike


def test_engine_config_selects_elementwise_ops():
    cpu = torch.device("cpu")
    assert type(select_elementwise_ops("auto", "auto", cpu)) is TorchElementwiseOps
    assert type(select_elementwise_ops("auto", "torch", cpu)) is TorchElementwiseOps
    assert type(select_elementwise_ops("auto", "triton", cpu)) is TritonElementwiseOps
    assert type(select_elementwise_ops("torch", "triton", cpu)) is TorchElementwiseOps
    assert type(select_elementwise_ops("triton", "torch", cpu)) is TritonElementwiseOps
    with pytest.raises(ValueError, match="elementwise_ops"):
        EngineConfig(model_dir="x", elementwise_ops="fused")
