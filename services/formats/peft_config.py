"""Reading a PEFT LoRA adapter_config.json: which (layer, module) pairs it targets, at which rank
and scaling, computed exactly as PEFT does; everything the engine cannot serve is rejected.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .model_spec import LORA_MODULES, ModelSpec


class InvalidAdapterError(ValueError):
    """The adapter exists but cannot be served; the message names the field or limit at fault."""


# Fields that change the computation in ways this engine does not implement. Each maps to a
# predicate on the value that is true when the field is in use.
_UNSUPPORTED = {
    "use_dora": lambda v: bool(v),
    "modules_to_save": lambda v: bool(v),
    "layer_replication": lambda v: bool(v),
    "lora_bias": lambda v: bool(v),
    "target_parameters": lambda v: bool(v),
    "trainable_token_indices": lambda v: bool(v),
    "alora_invocation_tokens": lambda v: bool(v),
    "fan_in_fan_out": lambda v: bool(v),
    "use_qalora": lambda v: bool(v),
}


@dataclass(frozen=True)
class TargetEntry:
    layer: int
    module: str  # short name, one of LORA_MODULES
    rank: int
    scale: float


@dataclass(frozen=True)
class PeftLoraConfig:
    rank: int
    lora_alpha: float
    use_rslora: bool
    targets: tuple[TargetEntry, ...]  # sorted by (layer, module order)

    def ranks_by_module(self) -> dict[str, int]:
        """Largest rank per module over layers (the adapter's layout ranks)."""
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.module] = max(out.get(t.module, 0), t.rank)
        return out


def module_path(layer: int, module: str) -> str:
    """The HF module name of one of the seven linear modules, as PEFT keys and targets use it."""
    parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{module}"


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: exact key, else a key matching the name's tail."""
    if key in patterns:
        return patterns[key]
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _is_targeted(target_modules: Any, key: str) -> bool:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return True  # all linear layers but the output head: exactly our seven modules
        return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith("." + t) for t in target_modules)


def parse_peft_config(raw: bytes | str | dict, spec: ModelSpec, max_rank: int) -> PeftLoraConfig:
    """Parse and validate adapter_config.json against the base model."""
    try:
        cfg = raw if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapterError(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapterError("adapter_config.json must hold a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InvalidAdapterError(f"peft_type {peft_type!r} is not supported (only LORA)")
    for field, in_use in _UNSUPPORTED.items():
        if field in cfg and in_use(cfg[field]):
            raise InvalidAdapterError(f"adapter_config.json field {field!r} is not supported by this engine")
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"bias={cfg['bias']!r} is not supported (only 'none')")
    r = _positive_int(cfg, "r")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapterError(f"lora_alpha must be a finite number, got {alpha!r}")
    use_rslora = bool(cfg.get("use_rslora", False))
    target_modules = cfg.get("target_modules")
    if not target_modules or not isinstance(target_modules, (str, list)):
        raise InvalidAdapterError("target_modules must be a non-empty list or a regex string")
    if isinstance(target_modules, list):
        unknown = [t for t in target_modules if t.split(".")[-1] not in LORA_MODULES]
        if unknown:
            raise InvalidAdapterError(
                f"target_modules {unknown} are not LoRA-servable here (embedding/lm_head LoRA and other "
                f"modules are not supported; allowed: {', '.join(LORA_MODULES)})"
            )
    layers = _layers(cfg, spec)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    exclude = cfg.get("exclude_modules")
    targets = []
    for layer in layers:
        for module in LORA_MODULES:
            key = module_path(layer, module)
            if not _is_targeted(target_modules, key) or (exclude and _is_targeted(exclude, key)):
                continue
            rank = int(_pattern_value(rank_pattern, key, r))
            a = float(_pattern_value(alpha_pattern, key, alpha))
            if rank < 1 or rank > max_rank:
                raise InvalidAdapterError(f"rank {rank} of {key} is outside [1, {max_rank}]")
            scale = a / math.sqrt(rank) if use_rslora else a / rank
            targets.append(TargetEntry(layer, module, rank, scale))
    if not targets:
        raise InvalidAdapterError(f"target_modules {target_modules!r} match none of the model's linear modules")
    return PeftLoraConfig(rank=r, lora_alpha=float(alpha), use_rslora=use_rslora, targets=tuple(targets))


def _positive_int(cfg: dict, field: str) -> int:
    v = cfg.get(field)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InvalidAdapterError(f"{field} must be an integer >= 1, got {v!r}")
    return v


def _layers(cfg: dict, spec: ModelSpec) -> list[int]:
    chosen = cfg.get("layers_to_transform")
    if chosen is None:
        return list(range(spec.num_layers))
    pattern = cfg.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
    if patterns and "layers" not in patterns:
        raise InvalidAdapterError(f"layers_pattern {pattern!r} does not name this model's decoder layers ('layers')")
    chosen = [chosen] if isinstance(chosen, int) else chosen
    if not isinstance(chosen, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in chosen):
        raise InvalidAdapterError(f"layers_to_transform must be an int or a list of ints, got {chosen!r}")
    bad = [i for i in chosen if not 0 <= i < spec.num_layers]
    if bad:
        raise InvalidAdapterError(f"layers_to_transform {bad} outside the model's {spec.num_layers} layers")
    return sorted(set(chosen))
