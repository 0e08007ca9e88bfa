"""Random LoRA adapters, made deterministically from (adapter number, rank), kept in host memory.

Weights are drawn on the GPU (fast) and kept on the host as bf16, which is what an engine gets
from its node's adapter store; values are scaled so outputs stay finite.
"""

from __future__ import annotations

import torch

from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import ModelSpec
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry, module_path


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
        # One draw on the device and one copy to the host per adapter (hundreds of small copies
        # made n = 10000 runs spend minutes here); a and b are views into that one host buffer.
        r = self.rank_of(number)
        g = torch.Generator(device=self.device).manual_seed(1_000_003 * number + r)
        targets = tuple(TargetEntry(l, m, r, 16.0 / r) for l in range(self.spec.num_layers) for m in self.modules)
        shapes = [self.spec.module_shape(t.module) for t in targets]  # (in, out) per target
        total = sum(r * (in_f + out_f) for in_f, out_f in shapes)
        flat = torch.randn(total, generator=g, device=self.device)
        chunks, off = [], 0
        for in_f, out_f in shapes:  # A ~ N(0, 1/in) keeps x A^T at unit scale; B small keeps outputs finite
            chunks += [flat[off : off + r * in_f] / in_f ** 0.5, flat[off + r * in_f : off + r * (in_f + out_f)] * 0.01]
            off += r * (in_f + out_f)
        host = torch.cat(chunks).to(self.dtype).cpu()
        a, b, off = {}, {}, 0
        for t, (in_f, out_f) in zip(targets, shapes):
            a[(t.layer, t.module)] = host[off : off + r * in_f].view(r, in_f)  # [r, in]
            b[(t.layer, t.module)] = host[off + r * in_f : off + r * (in_f + out_f)].view(out_f, r)  # [out, r]
            off += r * (in_f + out_f)
        return LoraWeights(PeftLoraConfig(r, 16.0, False, targets), a, b)

    def forget(self) -> None:
        """Drop every adapter made so far (the next run's adapters are other numbers)."""
        self._made.clear()

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
