"""The few collectives tensor parallelism needs, over a torch.distributed group (NCCL or gloo).

`group=None` with `world == 1` runs without torch.distributed at all (no process group needed).
An optional CommLog records every call (op, elements, element size) so tests can check the
communication model in bench/tp_comm_model.py against what the code really sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Collective:
    op: str  # "all_gather" | "all_reduce"
    elements: int  # elements of the full (gathered / reduced) tensor
    elem_bytes: int


@dataclass
class CommLog:
    calls: list[Collective] = field(default_factory=list)

    def record(self, op: str, t: torch.Tensor) -> None:
        self.calls.append(Collective(op, t.numel(), t.element_size()))


@dataclass
class TpComm:
    """The rank's view of its tensor-parallel group."""

    world: int
    rank: int
    group: dist.ProcessGroup | None = None
    log: CommLog | None = None

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None, log: CommLog | None = None) -> "TpComm":
        return cls(dist.get_world_size(group), dist.get_rank(group), group, log)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place."""
        if self.log is not None:
            self.log.record("all_reduce", t)
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def gather_rank_pieces(self, u_local: torch.Tensor) -> torch.Tensor:
        """u_local: [T, M, p] this rank's strided rank rows -> [T, M, p * W] in rank order.

        Rank i's entry j is row j*W + i of the intermediate (partition.rank_rows), so the
        gathered [W, T, M, p] read as [T, M, p, W] is the intermediate in order.
        """
        T, M, p = u_local.shape
        out = self._gather(u_local)  # [W, T, M, p]
        return out.permute(1, 2, 3, 0).reshape(T, M, p * self.world)

    def gather_columns(self, x_local: torch.Tensor) -> torch.Tensor:
        """x_local: [T, n] this rank's column block -> [T, n * W] (blocks in rank order)."""
        T, n = x_local.shape
        out = self._gather(x_local)  # [W, T, n]
        return out.permute(1, 0, 2).reshape(T, n * self.world)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """t: [n, ...] -> [W, n, ...] (gathered in the concatenated form, which every backend takes)."""
        out = torch.empty((self.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        if self.log is not None:
            self.log.record("all_gather", out)
        if self.world > 1:
            _all_gather(out, t.contiguous(), group=self.group)
        else:
            out.copy_(t)
        return out.view(self.world, *t.shape)


def single_rank() -> TpComm:
    """World of one: every collective is the identity (the unsharded engine's math)."""
    return TpComm(world=1, rank=0)
