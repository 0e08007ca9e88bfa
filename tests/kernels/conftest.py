"""Kernel tests run on the GPU when there is one, else under the Triton interpreter on the CPU.

NOTE: TRITON_INTERPRET is read when a kernel is decorated, so it must be set before `kernels` is
imported; if another test module imported `kernels` first, its kernel modules are reloaded here.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("lorafleet.kernels.lora_kernels", "lorafleet.kernels.attention_kernels"):
        module = sys.modules.get(name)
        if module is not None:
            importlib.reload(module)

DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def device() -> str:
    return DEVICE
