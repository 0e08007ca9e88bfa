"""One adapter's share on one tensor-parallel rank, for each of the three LoRA schemes compared.

PEFT shapes: A = lora_A [r, in], B = lora_B [out, r]. Rank i of W holds (slices from TpPlan)::

    scheme          column-parallel q/k/v/gate/up          row-parallel o/down
    --------------  -------------------------------------  ---------------------------------------
    slora           A[i::W]  [ceil((r-i)/W), H]            A[:, in_cols]  [r, in/W]
                    B[out_cols]  [out/W, r]                B[hidden_cols] [H/W, r]
    replicated_a    A        [r, H]                        (as slora)
                    B[out_cols]  [out/W, r]
    gather_outputs  A        [r, H]                        A  [r, in]  (whole)
                    B[out_cols]  [out/W, r]                B  [H, r]   (whole)
    fused           A        [r, H]                        A[:, in_cols]  [r, in/W]
                    B[out_cols]  [out/W, r]                B  [H, r]   (whole)

slora is the S-LoRA paper's scheme: A's rank split for column-parallel modules (an all-gather of
the rank-sized intermediate follows), A's input rows for row-parallel ones (an all-reduce of the
rank-sized intermediate), B always split by output columns. replicated_a keeps A whole for the
column-parallel modules (no collective for their shrink, W-fold A reads and memory).
gather_outputs keeps the adapter whole on every rank and all-gathers the full-width inputs of
o/down instead. fused (ours) is replicated_a for the column-parallel modules, and for o/down sends
the partial intermediate in the SAME all-reduce as the base model's partial sum, then applies the
whole B on every rank: no collective beyond the base model's own two per layer. Scales are the adapter's own on every rank (B's output is scaled, never A's).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import LORA_MODULES, ModelSpec

from ..memory.layout import ALIGN
from .partition import COLUMN_PARALLEL, TpPlan, local_rank, rank_rows


class Scheme(str, Enum):
    SLORA = "slora"
    REPLICATED_A = "replicated_a"
    GATHER_OUTPUTS = "gather_outputs"
    FUSED = "fused"

    @property
    def splits_column_rank(self) -> bool:
        """Column-parallel A split along the rank (else held whole by every rank)."""
        return self == Scheme.SLORA

    @property
    def whole_row_a(self) -> bool:
        return self == Scheme.GATHER_OUTPUTS

    @property
    def whole_row_b(self) -> bool:
        return self in (Scheme.GATHER_OUTPUTS, Scheme.FUSED)


@dataclass
class LoraShard:
    """The matrices of one adapter that one rank holds, keyed by (layer, module name)."""

    scheme: Scheme
    a: dict[tuple[int, str], torch.Tensor]  # see the module table; slora column A may have 0 rows
    b: dict[tuple[int, str], torch.Tensor]  # lora_B rows this rank applies: [out_loc, r]
    ranks: dict[tuple[int, str], int]  # the adapter's full rank r of the module in that layer
    scales: dict[tuple[int, str], float]

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def a_part(a: torch.Tensor, module: str, plan: TpPlan, scheme: Scheme) -> torch.Tensor:
    """This rank's part of lora_A: a [..., r, in] -> a view [..., a_rows, a_cols] (leading dims: layers)."""
    if module in COLUMN_PARALLEL:
        return a[..., rank_rows(a.shape[-2], plan.world, plan.rank), :] if scheme.splits_column_rank else a
    return a if scheme.whole_row_a else a[..., plan.in_cols(module)]


def b_part(b: torch.Tensor, module: str, plan: TpPlan, scheme: Scheme) -> torch.Tensor:
    """This rank's part of lora_B: b [..., out, r] -> a view [..., out_loc, r]."""
    if module not in COLUMN_PARALLEL and scheme.whole_row_b:
        return b
    return b[..., plan.out_cols(module), :]


def share_rows(module: str, rank: int, plan: TpPlan, scheme: Scheme) -> int:
    """Rows of this rank's A share of a module of rank `rank` (slora column-parallel: strided rows)."""
    if module in COLUMN_PARALLEL and scheme.splits_column_rank:
        return local_rank(rank, plan.world, plan.rank)
    return rank


def shard_lora(weights: LoraWeights, plan: TpPlan, scheme: Scheme | str) -> LoraShard:
    """Rank plan.rank's share of a validated adapter (copies: the full adapter may be dropped)."""
    scheme = Scheme(scheme)
    a, b, ranks, scales = {}, {}, {}, {}
    for t in weights.config.targets:
        key = (t.layer, t.module)
        a[key] = a_part(weights.a[key], t.module, plan, scheme).contiguous().clone()
        b[key] = b_part(weights.b[key], t.module, plan, scheme).contiguous().clone()
        ranks[key] = t.rank
        scales[key] = t.scale
    return LoraShard(scheme, a, b, ranks, scales)


# ---------------------------------------------------------------------------------------------
# Pages: each rank's adapter virtual buffer holds only its share (same format as memory/layout.py)
# ---------------------------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ShardLayout:
    """Where each module's A share ([a_rows, a_cols] row-major) and B share transposed
    ([r, b_cols], as memory/layout.py stores B^T) live in one rank's per-layer virtual buffer."""

    a_shape: tuple[tuple[int, int], ...]  # [7] (rows, cols) of this rank's A, (0, 0) if untargeted
    b_shape: tuple[tuple[int, int], ...]  # [7] (r, out_loc) of this rank's B^T
    a_off: tuple[int, ...]
    b_off: tuple[int, ...]
    layer_elems: int

    def num_pages(self, page_elems: int) -> int:
        return max(1, -(-self.layer_elems // page_elems))

    @classmethod
    def build(cls, spec: ModelSpec, ranks: dict[str, int], plan: TpPlan, scheme: Scheme | str) -> "ShardLayout":
        """ranks: the adapter's layout rank per module (LoraWeights.config.ranks_by_module())."""
        scheme = Scheme(scheme)
        pos, a_shape, b_shape, a_off, b_off = 0, [], [], [], []
        for name in LORA_MODULES:
            r = ranks.get(name, 0)
            in_f, out_f = spec.module_shape(name)
            if r == 0:
                a_shape.append((0, 0)), b_shape.append((0, 0)), a_off.append(0), b_off.append(0)
                continue
            column = name in COLUMN_PARALLEL
            a_rows = share_rows(name, r, plan, scheme)
            a_cols = in_f if column or scheme.whole_row_a else in_f // plan.world
            whole_b = not column and scheme.whole_row_b
            out_loc = _span(plan.out_cols(name), out_f) if not whole_b else out_f
            a_off.append(pos)
            pos = _align(pos + a_rows * a_cols)
            b_off.append(pos)
            pos = _align(pos + r * out_loc)
            a_shape.append((a_rows, a_cols)), b_shape.append((r, out_loc))
        return cls(tuple(a_shape), tuple(b_shape), tuple(a_off), tuple(b_off), pos)


def _span(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))
