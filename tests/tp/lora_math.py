"""Plain-torch LoRA shrink/expand over one rank's adapter shares, for a batch mixing adapters.

Same semantics as the engine's LoraOps (ops/base.py), but reading LoraShard tensors instead of
pool pages. The engine uses lora_step.LoraStep instead (the same interface: scheme, max_rank,
empty, targets_any, shrink, expand; module groups as index tuples into LORA_MODULES), which runs
the engine's LoraOps on the pages::

    shrink:  u[t, i, :n] = x[t] @ A_i^T          A_i: this rank's A share of modules[i], n rows
    expand:  y[t, off_i : off_i + out_i] += scale_i * u[t, i, :r] @ B_i^T      B_i: [out_i, r]

Tokens whose adapter does not target a module, and tokens with no adapter, are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafleet.engine.tp.shard_adapters import LoraShard, Scheme
from lorafleet.formats.model_spec import LORA_MODULES


@dataclass
class TpLoraBatch:
    """Which adapter each token of the step uses; the same on every rank (the collectives rely on it).

    token_adapter[t] indexes `adapters` (this rank's shares), -1 for a base-only token.
    """

    token_adapter: torch.Tensor  # [T] int64
    adapters: list[LoraShard]
    _groups: list[tuple[LoraShard, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        return not self.groups()

    @property
    def max_rank(self) -> int:
        """R: the largest rank of any module of any adapter used by the batch."""
        return max((ad.max_rank for ad, _ in self.groups()), default=0)

    @property
    def targets(self) -> frozenset[str]:
        """Modules any adapter of the batch targets (in any layer)."""
        return frozenset(m for ad, _ in self.groups() for (_, m), r in ad.ranks.items() if r > 0)

    def targets_any(self, modules: tuple[int, ...]) -> bool:
        return any(LORA_MODULES[m] in self.targets for m in modules)

    @property
    def scheme(self) -> Scheme:
        schemes = {ad.scheme for ad, _ in self.groups()}
        if len(schemes) != 1:
            raise ValueError(f"a batch mixes adapters sharded for different schemes: {sorted(s.value for s in schemes)}")
        return schemes.pop()

    def shrink(self, x: torch.Tensor, layer: int, modules: tuple[int, ...], width: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        names = tuple(LORA_MODULES[m] for m in modules)
        return shrink(x, layer, names, self, self.max_rank if width is None else width, dtype)

    def expand(self, y: torch.Tensor, u: torch.Tensor, layer: int, modules: tuple[int, ...],
               out_offsets: tuple[int, ...]) -> None:
        expand(y, u, layer, tuple(LORA_MODULES[m] for m in modules), out_offsets, self)

    def groups(self) -> list[tuple[LoraShard, torch.Tensor]]:
        """(adapter, its token indices [n] int64) for each adapter the batch uses."""
        if self._groups is None:
            ids = self.token_adapter.tolist()
            self._groups = []
            for a in sorted(set(ids) - {-1}):
                if not 0 <= a < len(self.adapters):
                    raise ValueError(f"token_adapter holds {a}, but only {len(self.adapters)} adapters are given")
                idx = torch.tensor([t for t, v in enumerate(ids) if v == a], dtype=torch.int64,
                                   device=self.token_adapter.device)
                self._groups.append((self.adapters[a], idx))
        return self._groups


def shrink(x: torch.Tensor, layer: int, modules: tuple[str, ...], batch: TpLoraBatch, width: int,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: [T, K] -> u: [T, len(modules), width] (fp32 accumulation, `dtype` or x's dtype)."""
    u = torch.zeros(x.shape[0], len(modules), width, dtype=dtype or x.dtype, device=x.device)
    for adapter, idx in batch.groups():
        xs = x[idx].float()  # [n, K]
        for i, m in enumerate(modules):
            a = adapter.a.get((layer, m))  # [rows, K]
            if a is None or a.shape[0] == 0:
                continue
            if a.shape[0] > width:
                raise ValueError(f"layer {layer} {m}: A share has {a.shape[0]} rows, intermediate width is {width}")
            u[idx, i, : a.shape[0]] = (xs @ a.float().T).to(u.dtype)
    return u


def expand(y: torch.Tensor, u: torch.Tensor, layer: int, modules: tuple[str, ...],
           out_offsets: tuple[int, ...], batch: TpLoraBatch) -> None:
    """y: [T, N] += scaled u @ B^T into each module's columns, in place. u: [T, len(modules), >= r]."""
    for adapter, idx in batch.groups():
        for i, (m, off) in enumerate(zip(modules, out_offsets)):
            b = adapter.b.get((layer, m))  # [out, r]
            if b is None:
                continue
            r, scale = adapter.ranks[(layer, m)], adapter.scales[(layer, m)]
            delta = (u[idx, i, :r].float() @ b.float().T) * scale  # [n, out]
            cols = slice(off, off + b.shape[0])
            y[idx, cols] = (y[idx, cols].float() + delta).to(y.dtype)
