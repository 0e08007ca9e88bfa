"""Triton kernels of lorafleet: multi-LoRA shrink/expand and paged attention over the unified pool.

Both classes implement the interfaces in services/engine/ops/base.py; the torch reference they
are tested against is services/engine/ops/torch_ref.py.
"""

from .attention_ops import TritonAttentionOps
from .lora_ops import TritonLoraOps

__all__ = ["TritonAttentionOps", "TritonLoraOps"]
