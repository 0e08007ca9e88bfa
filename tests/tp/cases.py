"""Deterministic inputs for the sharded layer tests, and the unsharded per-token reference math.

Workers (other processes) and the test process rebuild the same inputs from the same seeds, so
nothing but results crosses process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.engine.weights_loader import LayerWeights, random_weights
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import LORA_MODULES, ModelSpec, RopeSpec
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry

SPECS = {
    # MHA; intermediate 96 splits over 2 and 4 ranks.
    "mha": dict(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=4, head_dim=16, attention_bias=False),
    # GQA (8 heads over 2 KV heads: KV heads replicated at W=4) with Qwen2-style q/k/v biases.
    "gqa": dict(hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, head_dim=8, attention_bias=True),
}
ATTN, MLP = LORA_MODULES[:4], LORA_MODULES[4:]
# adapter -> {module: rank}: ranks 1, 2, 3, 8 on attention and MLP modules, and one with mixed ranks
ADAPTER_RANKS = [
    {m: 1 for m in LORA_MODULES},
    {m: 2 for m in ATTN},
    {m: 3 for m in MLP},
    {m: 8 for m in LORA_MODULES},
    {"q_proj": 5, "v_proj": 3, "o_proj": 1, "gate_proj": 1, "down_proj": 8},
]
# Mixed adapters per token (not grouped), -1: base only.
TOKEN_ADAPTER = [3, 3, 0, -1, 1, 1, 2, 4, 4, -1, 0, 3, 2]
SCHEMES = ("slora", "replicated_a", "gather_outputs", "fused")


def make_spec(name: str, num_layers: int = 1) -> ModelSpec:
    kw = SPECS[name]
    return ModelSpec(model_type="llama", num_layers=num_layers, vocab_size=32, max_position=64, rms_norm_eps=1e-6,
                     rope=RopeSpec(theta=10000.0), tie_word_embeddings=False, eos_token_ids=(1,), bos_token_id=0, **kw)


def make_adapter(spec: ModelSpec, ranks: dict[str, int], seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    targets, a, b = [], {}, {}
    for module in LORA_MODULES:
        if module not in ranks:
            continue
        r = ranks[module]
        in_f, out_f = spec.module_shape(module)
        targets.append(TargetEntry(0, module, r, scale=2.0 / r + 0.1 * seed))
        a[(0, module)] = torch.randn(r, in_f, generator=g) / in_f ** 0.5  # [r, in]
        b[(0, module)] = torch.randn(out_f, r, generator=g) * 0.5  # [out, r]
    return LoraWeights(PeftLoraConfig(8, 16.0, False, tuple(targets)), a, b)


@dataclass
class LayerCase:
    spec: ModelSpec
    layer: LayerWeights
    adapters: list[LoraWeights]
    token_adapter: torch.Tensor  # [T]
    x: torch.Tensor  # [T, H]: input of q/k/v and of gate/up
    x_o: torch.Tensor  # [T, q]: full input of o_proj (rank i holds its heads' columns)
    x_down: torch.Tensor  # [T, I]: full input of down_proj


def make_case(name: str) -> LayerCase:
    spec = make_spec(name)
    layer = random_weights(spec, torch.float32, torch.device("cpu"), seed=7).layers[0]
    if layer.qkv_bias is not None:
        layer.qkv_bias = torch.randn(layer.qkv_bias.shape, generator=torch.Generator().manual_seed(8))
    adapters = [make_adapter(spec, ranks, seed=20 + i) for i, ranks in enumerate(ADAPTER_RANKS)]
    g = torch.Generator().manual_seed(9)
    T = len(TOKEN_ADAPTER)
    return LayerCase(spec, layer, adapters, torch.tensor(TOKEN_ADAPTER), torch.randn(T, spec.hidden_size, generator=g),
                     torch.randn(T, spec.q_width, generator=g), torch.randn(T, spec.intermediate_size, generator=g))


def reference_outputs(case: LayerCase) -> dict[str, torch.Tensor]:
    """Unsharded outputs, token by token: y[t] = W x[t] + sum_m scale_m * B_m (A_m x[t])."""
    s, lw = case.spec, case.layer
    out = {"qkv": torch.nn.functional.linear(case.x, lw.qkv, lw.qkv_bias), "o": case.x_o @ lw.o.T,
           "gate_up": case.x @ lw.gate_up.T, "down": case.x_down @ lw.down.T}
    where = {  # module -> (output, input, first column in the fused output)
        "q_proj": ("qkv", case.x, 0), "k_proj": ("qkv", case.x, s.q_width), "v_proj": ("qkv", case.x, s.q_width + s.kv_width),
        "o_proj": ("o", case.x_o, 0), "gate_proj": ("gate_up", case.x, 0),
        "up_proj": ("gate_up", case.x, s.intermediate_size), "down_proj": ("down", case.x_down, 0),
    }
    for t, a in enumerate(case.token_adapter.tolist()):
        if a < 0:
            continue
        ad = case.adapters[a]
        for target in ad.config.targets:
            name, x, off = where[target.module]
            A, B = ad.a[(0, target.module)], ad.b[(0, target.module)]
            delta = target.scale * (B @ (A @ x[t]))  # [out]
            out[name][t, off : off + B.shape[0]] += delta
    return out


def local_columns(spec: ModelSpec, world: int, rank: int) -> dict[str, torch.Tensor]:
    """Columns of the full qkv / gate_up outputs that rank `rank` computes (written out here, not
    taken from TpPlan, so the test does not trust the code under test)."""
    D, nh, nkv, I = spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    hq = nh // world
    q = torch.arange(rank * hq * D, (rank + 1) * hq * D)
    if nkv >= world:
        heads = range(rank * nkv // world, (rank + 1) * nkv // world)
    else:
        heads = [rank // (world // nkv)]
    kv = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    qkv = torch.cat([q, spec.q_width + kv, spec.q_width + spec.kv_width + kv])
    n = I // world
    gate_up = torch.cat([torch.arange(rank * n, (rank + 1) * n), I + torch.arange(rank * n, (rank + 1) * n)])
    return {"qkv": qkv, "gate_up": gate_up}
