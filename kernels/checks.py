"""Precondition checks run before every launch: shapes, dtypes, devices, layouts (never values).

NOTE: nothing here reads tensor values, so the checks cost no host sync and are safe inside CUDA
graph capture. Value-level invariants (slots in range, ranks <= the rank capacity, offsets
16-aligned) are the metadata builder's contract, stated in each kernel's docstring.
"""

from __future__ import annotations

from functools import lru_cache

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_kernel_runnable(kernel, device: torch.device) -> None:
    """Compiled Triton kernels need CUDA tensors; on the CPU only the interpreter can run them."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"Triton kernels got tensors on {device}: set TRITON_INTERPRET=1 before `kernels` is imported "
            "to run them on the CPU, or use lorafleet.engine.ops.torch_ref"
        )


def check_pool(pool: torch.Tensor, layer: int) -> None:
    require(pool.dim() == 3, f"pool must be [L, num_pages, P], got shape {tuple(pool.shape)}")
    require(pool.is_contiguous(), "pool must be contiguous")
    require(pool.dtype in FLOAT_DTYPES, f"pool dtype {pool.dtype} is not one of fp16/bf16/fp32")
    require(0 <= layer < pool.shape[0], f"layer {layer} out of range [0, {pool.shape[0]})")


def check_int_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, dim: int, device: torch.device) -> None:
    require(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
    require(t.dim() == dim, f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    require(t.device == device, f"{name} is on {t.device}, the pool on {device}")
    require(t.is_contiguous(), f"{name} must be contiguous")


def check_same_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    require(t.device == device, f"{name} is on {t.device}, the pool on {device}")


def check_pool_operand(t: torch.Tensor, name: str, cols: str, pool: torch.Tensor) -> None:
    """A [T, cols] activation the LoRA kernels read or write next to the pool: 2-D, the pool's dtype
    and device, unit stride along its last dim."""
    if not (t.dim() == 2):
        raise ValueError(f"{name} must be [T, {cols}], got shape {tuple(t.shape)}")
    if not (t.dtype == pool.dtype):
        raise ValueError(f"{name} dtype {t.dtype} differs from the pool's {pool.dtype}")
    check_same_device(t, name, pool.device)
    if not (t.stride(1) == 1):
        raise ValueError(f"{name} must have unit stride along {cols}")


@lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 for the CPU interpreter: small grids)."""
    return _device_sms(device.index or 0) if device.type == "cuda" else 4


def floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
