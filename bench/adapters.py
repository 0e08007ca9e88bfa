"""Random LoRA adapters, made deterministically from (adapter number, rank), kept in host memory.

Weights are drawn on the GPU (fast) and kept on the host as bf16, which is what an engine gets
from its node's adapter store; values are scaled so outputs stay finite.
"""

from __future__ import annotations

import torch

from services.engine.adapters.peft_config import PeftLoraConfig, TargetEntry, module_path
from services.engine.adapters.weights import LoraWeights
from services.engine.model_spec import ModelSpec


class AdapterBank:
    def __init__(self, spec: ModelSpec, ranks: tuple[int, ...], modules: tuple[str, ...], device: torch.device,
                 dtype: torch.dtype = torch.bfloat16):
        self.spec, self.ranks, self.modules, self.device, self.dtype = spec, ranks, modules, device, dtype
        self._made: dict[int, LoraWeights] = {}

    def rank_of(self, number: int) -> int:
        return self.ranks[number % len(self.ranks)]  # round robin, as the paper's settings

    def get(self, number: int) -> LoraWeights:
        w = self._made.get(number)
        if w is None:
            w = self._made[number] = self._make(number)
        return w

    def _make(self, number: int) -> LoraWeights:
        r = self.rank_of(number)
        g = torch.Generator(device=self.device).manual_seed(1_000_003 * number + r)
        targets = tuple(TargetEntry(l, m, r, 16.0 / r) for l in range(self.spec.num_layers) for m in self.modules)
        a, b = {}, {}
        for t in targets:
            in_f, out_f = self.spec.module_shape(t.module)
            a[(t.layer, t.module)] = (torch.randn(r, in_f, generator=g, device=self.device) / in_f ** 0.5).to(self.dtype).cpu()
            b[(t.layer, t.module)] = (torch.randn(out_f, r, generator=g, device=self.device) * 0.01).to(self.dtype).cpu()
        return LoraWeights(PeftLoraConfig(r, 16.0, False, targets), a, b)

    @property
    def host_bytes(self) -> int:
        return sum(w.nbytes for w in self._made.values())


def save_peft(weights: LoraWeights, folder, modules: tuple[str, ...]) -> None:
    """Write `weights` as PEFT's save_pretrained does (adapter_config.json + safetensors), so the
    service path can fetch it from an adapter root like any user's adapter."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = weights.config
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
        "target_modules": list(modules), "bias": "none", "task_type": "CAUSAL_LM",
    }))
    tensors = {k: v.contiguous() for k, v in peft_state_dict(weights).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def peft_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """PEFT's tensor names for the adapter's A and B (as save_pretrained writes them)."""
    out = {}
    for (layer, module), a in weights.a.items():
        prefix = f"base_model.model.{module_path(layer, module)}"
        out[f"{prefix}.lora_A.weight"] = a
        out[f"{prefix}.lora_B.weight"] = weights.b[(layer, module)]
    return out
