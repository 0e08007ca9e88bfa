"""The one place that picks op implementations: Triton kernels on CUDA (lorafleet.kernels), the
torch reference ops elsewhere or when asked for. Every caller (single-GPU runtime, tensor-parallel
ranks, benchmarks) goes through select_ops / select_elementwise_ops, and asks is_triton instead of
reading class names."""

from __future__ import annotations

import torch

from ..model import TorchElementwiseOps


def is_triton(ops) -> bool:
    """True for the Triton implementations (they carry backend = "triton")."""
    return getattr(ops, "backend", "torch") == "triton"


class TritonOpsUnavailable(RuntimeError):
    """The Triton ops were due (a CUDA device, ops auto or triton) but could not be imported."""


def _triton_ops_import_error(exc: ImportError) -> TritonOpsUnavailable:
    # Loud on purpose: a silent fall back to the torch reference ops on a GPU serves at a fraction
    # of the speed (a shadowed or broken install looked like a healthy engine before).
    return TritonOpsUnavailable(
        f"the Triton ops (lorafleet.kernels) could not be imported on a CUDA device: {exc}; "
        "fix the install, or ask for the torch reference ops with --ops torch (LORAFLEET_OPS=torch)")


def _triton_classes():
    """(TritonLoraOps, TritonAttentionOps, TritonElementwiseOps); a failed import raises
    TritonOpsUnavailable, never a fall back to the torch ops."""
    try:
        from lorafleet.kernels.attention_ops import TritonAttentionOps
        from lorafleet.kernels.fused_ops import TritonElementwiseOps
        from lorafleet.kernels.lora_ops import TritonLoraOps
    except ImportError as exc:
        raise _triton_ops_import_error(exc) from exc
    return TritonLoraOps, TritonAttentionOps, TritonElementwiseOps


def select_ops(kind: str, device: torch.device):
    """(lora_ops, attention_ops): Triton on CUDA unless ``kind`` is "torch"; torch elsewhere.

    "triton" on the CPU runs the kernels under the Triton interpreter (tests). A failed Triton
    import raises TritonOpsUnavailable; it never falls back to torch ops by itself.
    """
    from .torch_ref import TorchAttentionOps, TorchLoraOps

    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchLoraOps(), TorchAttentionOps()
    lora_ops, attention_ops, _ = _triton_classes()
    return lora_ops(), attention_ops()


def graph_ops(max_rank: int, max_seq_len: int):
    """(lora_ops, attention_ops) for CUDA-graph capture: the Triton ops in static-capacity mode
    (decode graphs replay only these)."""
    lora_ops, attention_ops, _ = _triton_classes()
    return lora_ops(capture=True, max_rank=max_rank), attention_ops(capture=True, max_seq_len=max_seq_len)


def select_elementwise_ops(kind: str, ops_kind: str, device: torch.device):
    """TritonElementwiseOps or TorchElementwiseOps, chosen like select_ops (kind auto: as ops_kind)."""
    if kind == "auto":
        kind = ops_kind
    if kind == "torch" or (kind == "auto" and device.type != "cuda"):
        return TorchElementwiseOps()
    return _triton_classes()[2]()
