"""Validated LoRA weights in host memory, from a PEFT adapter folder or bytes.

Nothing is trusted before it is checked: safetensors only (never pickle), every tensor name must
map to a (layer, module) the config targets, every shape must match rank and module sizes, every
value must be finite. The adapter store validates once and hands engines a canonical file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from lorafleet.common.adapter_root import CONFIG_FILE, WEIGHTS_FILE

from .model_spec import LORA_MODULES, ModelSpec
from .peft_config import InvalidAdapterError, PeftLoraConfig, parse_peft_config

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.default)?\.weight$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class LoraWeights:
    """One adapter's matrices: a[(layer, module)] is PEFT's lora_A [r, in]; b[...] is lora_B [out, r]."""

    config: PeftLoraConfig
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def save_canonical(self, path: Path) -> None:
        """One safetensors file holding the validated config and tensors (for engines on the node)."""
        tensors = {}
        for (layer, module), t in self.a.items():
            tensors[f"{layer}.{module}.A"] = t.contiguous()
            tensors[f"{layer}.{module}.B"] = self.b[(layer, module)].contiguous()
        meta = {
            "rank": self.config.rank,
            "lora_alpha": self.config.lora_alpha,
            "use_rslora": self.config.use_rslora,
            "targets": [[t.layer, t.module, t.rank, t.scale] for t in self.config.targets],
        }
        st_save_file(tensors, str(path), metadata={"lorafleet": json.dumps(meta)})


def load_canonical(path: Path, spec: ModelSpec, max_rank: int) -> LoraWeights:
    """Read a file written by save_canonical; header, shapes and values are checked again (cheap,
    and files can rot: anything malformed is an InvalidAdapterError).

    The tensors are the file's pages, mapped by the safetensors library, not a copy: an engine's
    adapters in hand are the node store's shared memory (tests/formats guards this)."""
    from safetensors import safe_open

    from .peft_config import TargetEntry

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["lorafleet"])
        targets = tuple(TargetEntry(int(l), str(m), int(r), float(s)) for l, m, r, s in meta["targets"])
        cfg = PeftLoraConfig(int(meta["rank"]), float(meta["lora_alpha"]), bool(meta["use_rslora"]), targets)
        raw = st_load_file(str(path))
        a = {(t.layer, t.module): raw.pop(f"{t.layer}.{t.module}.A") for t in targets}
        b = {(t.layer, t.module): raw.pop(f"{t.layer}.{t.module}.B") for t in targets}
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:  # (json errors are ValueErrors)
        raise InvalidAdapterError(f"canonical adapter file {path.name} is malformed: {exc!r}") from None
    if raw:
        raise InvalidAdapterError(f"canonical adapter file has unexpected tensors: {sorted(raw)[:3]}")
    weights = LoraWeights(cfg, a, b)
    _check_tensors(weights, spec)
    return weights


def load_peft_adapter(config_bytes: bytes, weights_bytes: bytes, spec: ModelSpec, max_rank: int) -> LoraWeights:
    """Validate a PEFT adapter given the bytes of its two files."""
    cfg = parse_peft_config(config_bytes, spec, max_rank)
    try:
        raw = st_load(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    return _from_peft_tensors(cfg, raw, spec)


def load_peft_adapter_dir(path: str | Path, spec: ModelSpec, max_rank: int = 256) -> LoraWeights:
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise InvalidAdapterError(f"{CONFIG_FILE} is missing in {path}")
    if not w_file.is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is missing in {path}{hint}")
    return load_peft_adapter(cfg_file.read_bytes(), w_file.read_bytes(), spec, max_rank)


def _from_peft_tensors(cfg: PeftLoraConfig, raw: dict[str, torch.Tensor], spec: ModelSpec) -> LoraWeights:
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    problems = []
    for name, tensor in raw.items():
        m = _KEY.match(name)
        if m is None:
            problems.append(f"tensor {name!r} is not a LoRA A/B weight of a q/k/v/o/gate/up/down module "
                            "(embedding, lm_head, bias, DoRA and modules_to_save tensors are not supported)")
            continue
        layer, parent, module, which = int(m[1]), m[2], m[3], m[4]
        if (parent == "self_attn") != (module in LORA_MODULES[:4]):
            problems.append(f"tensor {name!r}: {module} does not live under {parent}")
            continue
        (a if which == "A" else b)[(layer, module)] = tensor
    expected = {(t.layer, t.module) for t in cfg.targets}
    for which, found in (("lora_A", a), ("lora_B", b)):
        missing, extra = expected - found.keys(), found.keys() - expected
        if missing:
            layer, module = sorted(missing)[0]
            problems.append(f"{which} weight of layer {layer} {module} is missing ({len(missing)} missing)")
        if extra:
            layer, module = sorted(extra)[0]
            problems.append(f"{which} weight of layer {layer} {module} is not targeted by adapter_config.json")
    _raise_all(problems)
    weights = LoraWeights(cfg, a, b)
    _check_tensors(weights, spec)
    return weights


def _raise_all(problems: list[str], shown: int = 8) -> None:
    """One InvalidAdapterError naming every problem (the first `shown`, then how many more)."""
    if problems:
        more = f"; and {len(problems) - shown} more problems" if len(problems) > shown else ""
        raise InvalidAdapterError("; ".join(problems[:shown]) + more)


def _check_tensors(weights: LoraWeights, spec: ModelSpec) -> None:
    problems = []
    for t in weights.config.targets:
        key = (t.layer, t.module)
        in_f, out_f = spec.module_shape(t.module)
        a, b = weights.a[key], weights.b[key]
        where = f"layer {t.layer} {t.module}"
        if tuple(a.shape) != (t.rank, in_f):
            problems.append(f"lora_A of {where} has shape {tuple(a.shape)}, expected ({t.rank}, {in_f}) from r and the base model")
        if tuple(b.shape) != (out_f, t.rank):
            problems.append(f"lora_B of {where} has shape {tuple(b.shape)}, expected ({out_f}, {t.rank}) from r and the base model")
        for name, x in (("lora_A", a), ("lora_B", b)):
            if x.dtype not in _FLOAT_DTYPES:
                problems.append(f"{name} of {where} has dtype {x.dtype}; expected float16, bfloat16 or float32")
            elif not torch.isfinite(x).all():
                problems.append(f"{name} of {where} holds NaN or Inf values")
    _raise_all(problems)
