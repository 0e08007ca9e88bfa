"""How many pages the unified pool gets when the config does not say."""

from __future__ import annotations

import torch

from ..config import EngineConfig
from .layout import PoolGeometry


def pool_pages(cfg: EngineConfig, geom_one: PoolGeometry, dtype: torch.dtype, device: torch.device) -> int:
    if cfg.num_pages:
        return cfg.num_pages
    page_bytes = geom_one.page_bytes(torch.tensor([], dtype=dtype).element_size())
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.gpu_memory_fraction) - (1 << 30)  # headroom for activations
    else:
        budget = cfg.cpu_pool_bytes
    return max(1, budget // page_bytes)
