"""Which slice of the model each tensor-parallel rank holds (Megatron-style), and the LoRA rank split.

Base model, W ranks, rank i::

    column-parallel (output columns split):   q_proj  heads  [i*nh/W, (i+1)*nh/W)
                                              k/v     KV heads [i*nkv/W, ...)  (or one replicated head)
                                              gate/up intermediate columns [i*I/W, (i+1)*I/W)
    row-parallel (input columns split):       o_proj  the same q columns as q_proj
                                              down    the same intermediate columns as gate/up

Grouped-query attention with fewer KV heads than ranks (nkv < W, W % nkv == 0) replicates each KV
head on W/nkv consecutive ranks, as Megatron does: rank i holds KV head i*nkv//W, which is exactly
the head its query heads read. Any other (nh, nkv, W) is rejected with TensorParallelError.

LoRA rank split (column-parallel A under the S-LoRA scheme) is STRIDED: rank i holds rows
i, i+W, i+2W, ... of A. All ranks pad their piece of the intermediate to p = ceil(R/W) (R: the
largest rank in the batch); the all-gather stacks the pieces as [W, p], and reading that as
[p, W] puts row j*W + i at position j*W + i: the full intermediate in rank order, zeros past each
adapter's rank. So ranks not divisible by W (1, 3, ...) need no special case: with r = 1 and
W = 4 ranks 1-3 simply hold no rows, and only the intermediate is padded (never A or B).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lorafleet.formats.model_spec import ModelSpec

from ..weights_loader import WeightSlices

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks; the message names the size at fault."""


@dataclass(frozen=True)
class TpPlan:
    """Rank `rank` of `world`: the slices of each module it holds. Build with make_plan."""

    world: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.world

    @property
    def kv_heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.world)

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold a copy of each KV head (1 unless nkv < W)."""
        return max(1, self.world // self.num_kv_heads)

    @property
    def q_cols(self) -> slice:
        """This rank's columns of q (and input columns of o_proj)."""
        n = self.heads_per_rank * self.head_dim
        return slice(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_cols(self) -> slice:
        """This rank's columns of k and of v."""
        first = self.rank * self.num_kv_heads // self.world
        n = self.kv_heads_per_rank * self.head_dim
        return slice(first * self.head_dim, first * self.head_dim + n)

    @property
    def inter_cols(self) -> slice:
        """This rank's columns of gate and of up (and input columns of down_proj)."""
        n = self.intermediate_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def weight_slices(self) -> WeightSlices:
        """What this rank reads of a checkpoint (weights_loader.load_weights)."""
        return WeightSlices(q=self.q_cols, kv=self.kv_cols, inter=self.inter_cols)

    @property
    def hidden_cols(self) -> slice:
        """The hidden columns whose LoRA output this rank adds for o/down (S-LoRA's B split)."""
        n = self.hidden_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def out_cols(self, module: str) -> slice:
        """Output columns of `module` whose LoRA B rows this rank applies."""
        if module == "q_proj":
            return self.q_cols
        if module in ("k_proj", "v_proj"):
            return self.kv_cols
        if module in ("gate_proj", "up_proj"):
            return self.inter_cols
        return self.hidden_cols

    def in_cols(self, module: str) -> slice:
        """Input columns this rank sees: a slice for row-parallel modules, everything otherwise."""
        if module == "o_proj":
            return self.q_cols
        if module == "down_proj":
            return self.inter_cols
        return slice(None)


def make_plan(spec: ModelSpec, world: int, rank: int) -> TpPlan:
    check_world(spec, world)
    if not 0 <= rank < world:
        raise TensorParallelError(f"rank {rank} is outside 0..{world - 1}")
    return TpPlan(world, rank, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size,
                  spec.intermediate_size)


def check_world(spec: ModelSpec, world: int) -> None:
    """Raise TensorParallelError unless every sharded size divides by `world`."""
    if world < 1:
        raise TensorParallelError(f"tensor-parallel size must be >= 1, got {world}")
    nh, nkv = spec.num_heads, spec.num_kv_heads
    if nh % world:
        raise TensorParallelError(f"num_attention_heads {nh} is not divisible by tensor-parallel size {world}")
    if nkv % world and world % nkv:
        raise TensorParallelError(
            f"num_key_value_heads {nkv} and tensor-parallel size {world}: one must divide the other "
            "(KV heads are split when nkv >= W, replicated when W is a multiple of nkv)"
        )
    if spec.intermediate_size % world:
        raise TensorParallelError(f"intermediate_size {spec.intermediate_size} is not divisible by tensor-parallel size {world}")
    if spec.hidden_size % world:
        raise TensorParallelError(f"hidden_size {spec.hidden_size} is not divisible by tensor-parallel size {world}")


def local_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """The shapes one rank computes with: its heads, KV heads and intermediate columns.

    Use it to size the rank's pool (PoolGeometry.for_model: pages of the rank's KV heads only);
    hidden_size stays whole (activations between blocks are replicated).
    """
    check_world(spec, world)
    return dataclasses.replace(
        spec,
        num_heads=spec.num_heads // world,
        num_kv_heads=max(1, spec.num_kv_heads // world),
        intermediate_size=spec.intermediate_size // world,
    )


def rank_rows(rank_r: int, world: int, rank: int) -> slice:
    """Rows of a column-parallel LoRA A (PEFT lora_A [r, in]) that `rank` holds: strided."""
    return slice(rank, rank_r, world)


def local_rank(rank_r: int, world: int, rank: int) -> int:
    """Number of A rows `rank` holds for an adapter of rank `rank_r` (0 when rank_r <= rank)."""
    return len(range(rank, rank_r, world))


def piece_width(max_rank: int, world: int) -> int:
    """Width every rank pads its piece of the column-parallel intermediate to: ceil(R / W)."""
    return -(-max_rank // world)
