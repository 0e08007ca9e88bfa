"""Tile sizes of the multi-LoRA kernels (lora_kernels.py) for a rank capacity and a phase.

Measured on an H200 (bench/results/kernels): decode streams each distinct adapter's matrices
(memory-bound, 16-token blocks); prefill is a gathered matrix-matrix product (64-token blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import floor_pow2, next_pow2

MAX_RANK = 256
SHRINK_SMEM_BUDGET = 200 * 1024  # bytes; the H100/H200 limit per block is 227 KiB


@dataclass(frozen=True)
class LoraLaunch:
    """How far decode grids are split to fill the GPU (programs per multiprocessor aimed at).

    Decode grids are small (tokens / 16 + segments work items): shrink splits K over programs
    (float32 partial sums), expand splits each slice's output columns. More splits mean shorter
    serial loops per program but more programs that each pay the chain of index loads at their
    start. bench/kernels/launch_sweep.py measures the trade on a GPU.
    """

    shrink_programs_per_sm: int = 4
    expand_programs_per_sm: int = 4


@dataclass(frozen=True)
class LoraTiles:
    name: str  # "decode" or "prefill"
    block_t: int
    expand_block_r: int  # >= the rank capacity: expand handles a whole rank per program
    expand_block_n: int
    expand_num_warps: int
    # Segments of rank <= expand_small_r stream [small_r, small_n] B^T tiles instead (wider: fewer
    # chunks) when the capacity is larger; small_r == block_r: no such path compiled.
    expand_small_r: int = 16
    expand_small_n: int = 256


def choose_tiles(rank_cap: int, decode: bool, page_elems: int) -> LoraTiles:
    """Tile sizes for a rank capacity; K/N chunks never exceed a page (<= 2 pages per chunk)."""
    if rank_cap > MAX_RANK:
        raise ValueError(f"rank capacity {rank_cap} exceeds the largest supported rank {MAX_RANK}")
    pow2 = max(next_pow2(rank_cap), 16)
    expand_n = min(256, max(16, 8192 // pow2), floor_pow2(page_elems))  # B^T tile of about 8K elements
    if not decode:
        return LoraTiles("prefill", 64, pow2, expand_n, 8, pow2, expand_n)
    # Decode under a larger capacity (CUDA graphs capture at the largest rank): a segment of rank
    # <= 16 streams 16 x 256 tiles, so a rank-8 adapter under capacity 64 walks half the chunks
    # of 128 columns. (The [16, 256] float32 accumulator keeps to the registers the [64, 128]
    # B^T tile of the capacity path already needs.)
    small_n = min(256, floor_pow2(page_elems))
    small_r = 16 if small_n > expand_n else pow2
    return LoraTiles("decode", 16, pow2, expand_n, 4, small_r, small_n)


def shrink_tile(tiles: LoraTiles, rows: int, page_elems: int, elem_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps) of shrink for `rows` = slices * rank capacity.

    Measured on an H200 (bench/results/kernels): decode gains from up to 128 fused (slice, rank)
    rows per program with ~8K-element A tiles; prefill from fused rows at small rank (x read once,
    256-wide K chunks, 8 warps), while at rank 64 one slice of 64 rows per program (64-wide K,
    4 warps) beats 256 fused rows.
    """
    if tiles.name == "decode":
        block_r = min(max(next_pow2(rows), 16), 128)
        block_k, warps = min(max(8192 // block_r, 32), 256), 4
    else:
        block_r = min(max(next_pow2(rows), 16), 64)
        block_k, warps = (256, 8) if block_r <= 32 else (64, 4)
    block_k = min(block_k, floor_pow2(page_elems))
    # Pipelined copies of the x and A tiles (3 stages) must fit in shared memory (fp32: half the K).
    while 3 * (tiles.block_t + block_r) * block_k * elem_size > SHRINK_SMEM_BUDGET and block_k > 32:
        block_k //= 2
    return block_r, block_k, warps
