"""TritonLoraOps: the LoraOps interface (services/engine/ops/base.py) on the Triton kernels.

Two tile shapes over the same kernels:

- decode (max_seg_len <= 16, and always under capture=True): 16-token blocks; shrink covers up to
  128 (slice, rank) rows per program and splits K over several programs (float32 partial sums)
  when the grid is too small to fill the GPU; expand streams a whole rank's B^T over column
  chunks. Memory-bound: each distinct adapter's A/B is streamed once (S-LoRA's MBGMV).
- prefill: 64-token blocks, up to 256 (slice, rank) rows per shrink program (x read once for
  q/k/v): a gathered matrix-matrix product (MBGMM).

NOTE (CUDA graphs): with capture=True every grid comes from static capacities (tokens T = x's
rows, segments G = seg_len's length, rank R = max_rank given here), u is always [T, n, R], and
nothing reads a device value on the host. Replay with other contents by writing the static
LoraBatch tensors in place: padding segments get seg_len 0 and cost one early exit each.
"""

from __future__ import annotations

import torch

from lorafleet.engine.ops.base import LoraContext

from . import lora_kernels as K
from .checks import (
    cdiv,
    check_int_tensor,
    check_kernel_runnable,
    check_pool,
    check_pool_operand,
    check_same_device,
    num_sms,
)
from .lora_tiles import MAX_RANK, LoraLaunch, LoraTiles, choose_tiles, shrink_tile

MAX_FUSED = 4  # slices per launch (q/k/v needs 3)
DECODE_MAX_SEG_LEN = 16
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension (work items)


class TritonLoraOps:
    """shrink/expand per LoraOps; see lora_kernels.py for the kernels' torch semantics.

    capture: static-capacity mode for CUDA graphs (requires max_rank, the rank capacity).
    launch: how far decode grids are split (LoraLaunch; the default is the measured choice).
    """

    backend = "triton"  # ops/select.is_triton

    def __init__(self, *, capture: bool = False, max_rank: int | None = None, launch: LoraLaunch = LoraLaunch()) -> None:
        if capture and (max_rank is None or max_rank < 1):
            raise ValueError("capture=True needs max_rank (the largest rank any resident adapter may have)")
        self.capture = capture
        self.max_rank = max_rank
        self.launch = launch
        self._plan_batch = None  # the LoraBatch whose work lists are cached in _plans
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept alive for graph replays
        self._validated: tuple = ()  # the objects _check_common last checked
        self._views_of: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []

    # -- interface -------------------------------------------------------------------------

    def shrink(self, x: torch.Tensor, layer: int, modules: tuple[int, ...], ctx: LoraContext) -> torch.Tensor:
        """u[t, i, :r] = x[t] @ A_{modules[i]}^T of token t's adapter (see lora_shrink_kernel).

        u is float32 when K was split over programs (their partial sums meet there), else x's
        dtype; expand takes either and rounds float32 u to y's dtype as it loads it, so no cast
        runs in between (one graph node less per shrink)."""
        pool, tables, batch = ctx.pool, ctx.tables, ctx.batch
        self._check_common(pool, layer, modules, ctx)
        check_pool_operand(x, "x", "K", pool)
        num_tokens, k = x.shape
        for m in modules:
            if not (tables.module_shapes[m][0] == k):
                raise ValueError(f"module {m} takes in_features {tables.module_shapes[m][0]}, x has K={k}")
        rank_cap = self._rank_cap(batch.max_rank)
        if not self._has_work(ctx, num_tokens):
            return torch.empty(num_tokens, len(modules), rank_cap, dtype=x.dtype, device=x.device)  # nothing defined
        tiles = self._tiles(ctx, rank_cap)
        work_seg, work_blk = self._work_list(ctx, num_tokens, tiles.block_t)
        num_work = work_seg.shape[0]
        block_r, block_k, num_warps = shrink_tile(tiles, len(modules) * rank_cap, pool.shape[2], x.element_size())
        row_blocks = cdiv(len(modules) * rank_cap, block_r)
        k_splits, k_per_split = (_splits(cdiv(k, block_k), block_k, row_blocks * num_work, self.launch.shrink_programs_per_sm,
                                         pool.device) if tiles.name == "decode" else (1, k))
        # Split-K partial sums meet in a float32 u, zeroed for the atomics. Otherwise u is stored
        # directly, and only where it is defined (rows of segments, columns below each rank): the
        # rest stays unwritten, as LoraOps.shrink allows, which saves a memset per call.
        u_shape, u_dtype = (num_tokens, len(modules), rank_cap), torch.float32 if k_splits > 1 else x.dtype
        u = torch.zeros(u_shape, dtype=u_dtype, device=x.device) if k_splits > 1 else torch.empty(u_shape, dtype=u_dtype, device=x.device)
        widths = [k] + [tables.module_shapes[m][0] for m in modules]
        K.lora_shrink_kernel[(row_blocks * k_splits, num_work)](
            x, u, self._layer_view(pool, layer), tables.page_table, tables.ranks, tables.a_off,
            work_seg, work_blk, batch.seg_start, batch.seg_len, batch.seg_slot,
            layer, k, tables.page_table.shape[1], pool.shape[2], rank_cap, len(modules), k_splits, k_per_split,
            x.stride(0), u.stride(0),
            tables.page_table.stride(0), tables.ranks.stride(0), tables.ranks.stride(1), tables.a_off.stride(0),
            *_padded(modules),
            BLOCK_T=tiles.block_t, BLOCK_R=block_r, BLOCK_K=block_k,
            ALIGNED=_aligned(pool, widths), ROW_IN_TWO_PAGES=k <= pool.shape[2], ATOMIC=k_splits > 1,
            DOT_PRECISION=_dot_precision(x.dtype), num_warps=num_warps,
        )  # fmt: skip
        return u

    def expand(
        self,
        y: torch.Tensor,
        u: torch.Tensor,
        layer: int,
        modules: tuple[int, ...],
        out_offsets: tuple[int, ...],
        ctx: LoraContext,
    ) -> None:
        """y[t, off_i : off_i + out_i] += scale_i * u[t, i, :r_i] @ B_i^T in place (lora_expand_kernel)."""
        pool, tables, batch = ctx.pool, ctx.tables, ctx.batch
        self._check_common(pool, layer, modules, ctx)
        check_pool_operand(y, "y", "N", pool)
        check_same_device(u, "u", pool.device)
        num_tokens = y.shape[0]
        if not (u.dim() == 3 and u.shape[0] == num_tokens and u.shape[1] == len(modules)):
            raise ValueError(f"u must be [T={num_tokens}, n={len(modules)}, R], got shape {tuple(u.shape)}")
        if not (u.is_contiguous() and u.dtype in (y.dtype, torch.float32)):
            raise ValueError(f"u must be contiguous in y's dtype {y.dtype} or float32; got {u.dtype}, contiguous={u.is_contiguous()}")
        if not (batch.max_rank <= u.shape[2]):
            raise ValueError(f"batch.max_rank {batch.max_rank} exceeds u's rank capacity {u.shape[2]}")
        if not (u.shape[2] <= MAX_RANK):
            raise ValueError(f"u's rank capacity {u.shape[2]} exceeds the largest supported rank {MAX_RANK}")
        if not (len(out_offsets) == len(modules)):
            raise ValueError(f"{len(out_offsets)} out_offsets for {len(modules)} modules")
        widths = [tables.module_shapes[m][1] for m in modules]
        for m, off, n_out in zip(modules, out_offsets, widths):
            if not (0 <= off and off + n_out <= y.shape[1]):
                raise ValueError(f"module {m} writes y[:, {off}:{off + n_out}] past N={y.shape[1]}")
        if not self._has_work(ctx, num_tokens):
            return
        tiles = self._tiles(ctx, u.shape[2])
        work_seg, work_blk = self._work_list(ctx, num_tokens, tiles.block_t)
        num_work = work_seg.shape[0]
        col_splits, cols_per_split = _splits(cdiv(max(widths), tiles.expand_block_n), tiles.expand_block_n,
                                             num_work * len(modules), self.launch.expand_programs_per_sm, pool.device)
        K.lora_expand_kernel[(len(modules) * col_splits, num_work)](
            y, u, self._layer_view(pool, layer), tables.page_table, tables.ranks, tables.scales, tables.b_off,
            work_seg, work_blk, batch.seg_start, batch.seg_len, batch.seg_slot,
            layer, tables.page_table.shape[1], pool.shape[2], u.shape[2], col_splits, cols_per_split,
            y.stride(0), u.stride(0), u.stride(1),
            tables.page_table.stride(0), tables.ranks.stride(0), tables.ranks.stride(1), tables.b_off.stride(0),
            *_padded(modules), *_padded(widths), *_padded(out_offsets),
            BLOCK_T=tiles.block_t, BLOCK_R=tiles.expand_block_r, BLOCK_N=tiles.expand_block_n,
            SMALL_R=tiles.expand_small_r, SMALL_N=tiles.expand_small_n, ALIGNED=_aligned(pool, widths), Y_ALIGNED=y.stride(0) % 16 == 0 and all(o % 16 == 0 for o in out_offsets),
            ROW_IN_TWO_PAGES=max(widths) <= pool.shape[2], DOT_PRECISION=_dot_precision(y.dtype), num_warps=tiles.expand_num_warps,
        )  # fmt: skip

    # -- helpers ---------------------------------------------------------------------------

    def _rank_cap(self, batch_max_rank: int) -> int:
        if self.capture:
            if not (batch_max_rank <= self.max_rank):
                raise ValueError(f"batch.max_rank {batch_max_rank} exceeds the capture capacity {self.max_rank}")
            return self.max_rank
        return max(batch_max_rank, 1)

    def _has_work(self, ctx: LoraContext, num_tokens: int) -> bool:
        # NOTE: under capture the batch's python counts describe the capture-time contents only,
        # so launch whenever the static buffers could hold work.
        if num_tokens == 0 or ctx.batch.seg_len.shape[0] == 0:
            return False
        return self.capture or not ctx.batch.empty

    def _tiles(self, ctx: LoraContext, rank_cap: int) -> LoraTiles:
        decode = self.capture or ctx.batch.max_seg_len <= DECODE_MAX_SEG_LEN
        return choose_tiles(rank_cap, decode, ctx.pool.shape[2])

    def _work_list(self, ctx: LoraContext, num_tokens: int, block_t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(work_seg, work_blk) of the batch, built once per batch contents and reused by every layer.

        Keyed on the LoraBatch object and the version counter of seg_len (bumped by any in-place
        write), and on whether a graph is being captured (a capture must record its own plan launch).
        An inference tensor has no version counter (the TP workers build their batches under
        inference_mode): its batch is taken as unchanged while the LoraBatch object is the same.
        """
        batch = ctx.batch
        if self._plan_batch is not batch:
            self._plan_batch, self._plans = batch, {}
        capturing = ctx.pool.is_cuda and torch.cuda.is_current_stream_capturing()
        version = None if batch.seg_len.is_inference() else batch.seg_len._version
        key = (version, batch.seg_len.data_ptr(), num_tokens, block_t, capturing)
        plan = self._plans.get(key)
        if plan is None:
            num_segs = batch.seg_len.shape[0]
            num_work = cdiv(num_tokens, block_t) + num_segs
            if not (num_work <= MAX_GRID_Y):
                raise ValueError(f"{num_tokens} tokens in {num_segs} segments exceed the grid limit ({MAX_GRID_Y} blocks)")
            work_seg = torch.empty(num_work, dtype=torch.int32, device=ctx.pool.device)
            work_blk = torch.empty(num_work, dtype=torch.int32, device=ctx.pool.device)
            K.lora_plan_kernel[(cdiv(num_work, 128),)](
                batch.seg_len, work_seg, work_blk, num_segs, num_work, BLOCK_T=block_t, BLOCK_W=128, BLOCK_G=32
            )
            plan = self._plans[key] = (work_seg, work_blk)
            if capturing:
                self._captured.append(plan)
        return plan

    def _layer_view(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        """pool[layer], cached per pool (a view per call costs host time on every launch)."""
        if self._views_of is not pool:
            self._views_of, self._views = pool, [pool[i] for i in range(pool.shape[0])]
        return self._views[layer]

    def _check_common(self, pool: torch.Tensor, layer: int, modules: tuple[int, ...], ctx: LoraContext) -> None:
        if not (0 <= layer < pool.shape[0]):
            raise ValueError(f"layer {layer} out of range [0, {pool.shape[0]})")
        if not (1 <= len(modules) <= MAX_FUSED):
            raise ValueError(f"{len(modules)} modules fused; 1..{MAX_FUSED} supported")
        if not (all(0 <= m < 7 for m in modules)):
            raise ValueError(f"module indices {modules} out of range 0..6")
        t, b = ctx.tables, ctx.batch
        # NOTE: the pool, tables and batch tensors are checked once per set of objects (every layer
        # and call of a step reuses them); a replaced tensor is a new object and is checked again.
        key = (pool, t.page_table, t.ranks, t.scales, t.a_off, t.b_off, b.seg_start, b.seg_len, b.seg_slot)
        if len(key) == len(self._validated) and all(a is c for a, c in zip(key, self._validated)):
            return
        check_pool(pool, layer)
        check_kernel_runnable(K.lora_shrink_kernel, pool.device)
        if not (pool.shape[2] >= 16):
            raise ValueError(f"page_elems {pool.shape[2]} < 16")
        num_layers = pool.shape[0]
        check_int_tensor(t.page_table, "tables.page_table", torch.int32, 2, pool.device)
        check_int_tensor(t.ranks, "tables.ranks", torch.int32, 3, pool.device)
        check_int_tensor(t.a_off, "tables.a_off", torch.int64, 2, pool.device)
        check_int_tensor(t.b_off, "tables.b_off", torch.int64, 2, pool.device)
        num_slots = t.page_table.shape[0]
        if not (t.ranks.shape == (num_slots, num_layers, 7)):
            raise ValueError(f"tables.ranks must be [S={num_slots}, L={num_layers}, 7], got {tuple(t.ranks.shape)}")
        if not (t.scales.shape == t.ranks.shape and t.scales.dtype == torch.float32 and t.scales.is_contiguous()):
            raise ValueError("tables.scales must be a contiguous float32 tensor shaped like tables.ranks")
        if not (t.a_off.shape == (num_slots, 7) and t.b_off.shape == (num_slots, 7)):
            raise ValueError("tables.a_off/b_off must be [S, 7]")
        if not (len(t.module_shapes) == 7):
            raise ValueError("tables.module_shapes must list the 7 modules")
        for name in ("seg_start", "seg_len", "seg_slot"):
            check_int_tensor(getattr(b, name), f"batch.{name}", torch.int32, 1, pool.device)
        if not (b.seg_start.shape == b.seg_len.shape == b.seg_slot.shape):
            raise ValueError("batch.seg_start/seg_len/seg_slot differ in length")
        self._validated = key


def _splits(blocks: int, block: int, programs_per_split: int, programs_per_sm: int, device: torch.device) -> tuple[int, int]:
    """(splits, elements per split) of a loop over `blocks` chunks of `block` elements (shrink's K,
    expand's output columns) in decode: about programs_per_sm programs per multiprocessor, from
    static sizes only (a captured grid never depends on the batch's contents)."""
    want = cdiv(programs_per_sm * num_sms(device), max(programs_per_split, 1))
    blocks_per_split = cdiv(blocks, min(blocks, max(want, 1)))
    return cdiv(blocks, blocks_per_split), blocks_per_split * block


def _padded(values) -> list[int]:
    values = [int(v) for v in values]
    return values + [0] * (MAX_FUSED - len(values))


def _aligned(pool: torch.Tensor, widths: list[int]) -> bool:
    """Whether 16-element runs of A/B rows are contiguous and 16-aligned (vectorization hints)."""
    return pool.shape[2] % 16 == 0 and all(w % 16 == 0 for w in widths)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"

