"""Compile every kernel for Hopper (sm_90) on a machine without a GPU and report its resources.

    python -m lorafleet.bench.kernels.compile_check

Uses the ptxas bundled with Triton: catches compile errors before any device time is spent and
shows registers, spills, shared memory and whether the paged loads became 16-byte vector loads
(ld.global.v4 / cp.async 16) in the PTX.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorafleet.kernels import attention_kernels as A
from lorafleet.kernels import lora_kernels as L
from lorafleet.kernels.lora_tiles import choose_tiles, shrink_tile

TARGET = GPUTarget("cuda", 90, 32)
DIV16 = [["tt.divisibility", 16]]


def compile_one(fn, args: dict, num_warps: int = 4):
    args = dict(args)
    num_warps = args.pop("_warps", num_warps)
    """args: name -> type string ("*bf16", "i32", ...; a trailing '/16' marks divisible by 16) or constexpr value."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        spec = args[name]
        if isinstance(spec, str) and (spec.startswith("*") or spec[:1] in "ifu"):
            kind = spec.split("/")[0]
            signature[name] = kind
            if spec.startswith("*") or spec.endswith("/16"):
                attrs[(i,)] = DIV16
        else:
            signature[name] = "constexpr"
            constexprs[name] = spec
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps})


def report(name: str, kernel) -> str:
    ptx = kernel.asm["ptx"]
    meta = kernel.metadata
    vec = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)) + len(re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", ptx))
    scalar16 = len(re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx))
    usage = _resource_usage(kernel.asm["cubin"])
    return f"{name:40s} {usage} smem={meta.shared:6d} vec16B_loads={vec:3d} b16_loads={scalar16:3d}"


def _resource_usage(cubin: bytes) -> str:
    """REG / STACK / spill figures from the cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={m.group(1):>3s} stack={m.group(2):>3s}" if m else "regs=?"


def lora_cases(dtype: str):
    common = {
        "page_table_ptr": "*i32", "ranks_ptr": "*i32", "work_seg_ptr": "*i32", "work_blk_ptr": "*i32",
        "seg_start_ptr": "*i32", "seg_len_ptr": "*i32", "seg_slot_ptr": "*i32", "pool_layer": f"*{dtype}",
        "u_ptr": f"*{dtype}", "layer": "i32", "max_pages": "i32", "page_elems": "i32/16", "rank_cap": "i32/16",
        "stride_u_t": "i32/16", "stride_u_m": "i32/16", "stride_pt_s": "i32", "stride_rank_s": "i32", "stride_rank_l": "i32",
        "stride_off_s": "i32", "num_rank_blocks": "i32", "num_col_splits": "i32", "cols_per_split": "i32/16", "M0": "i32", "M1": "i32", "M2": "i32", "M3": "i32", "ALIGNED": True,
        "ROW_IN_TWO_PAGES": True, "DOT_PRECISION": "tf32",
    }  # fmt: skip
    elem = 4 if dtype == "fp32" else 2
    for decode, rank in ((True, 8), (True, 64), (True, 128), (False, 8), (False, 64)):
        tiles = choose_tiles(rank, decode, 131072)
        br, bk, shrink_warps = shrink_tile(tiles, 3 * rank, 131072, elem)
        bt, ebr, ebn = tiles.block_t, tiles.expand_block_r, tiles.expand_block_n
        tiles_name = f"{tiles.name} r{rank} (BR{br} BK{bk} w{shrink_warps})"
        shrink = {**common, "x_ptr": f"*{dtype}", "a_off_ptr": "*i64", "K": "i32/16", "stride_x_t": "i32/16",
                  "num_mods": "i32", "num_k_splits": "i32", "k_per_split": "i32/16", "ATOMIC": decode,
                  "BLOCK_T": bt, "BLOCK_R": br, "BLOCK_K": bk, "_warps": shrink_warps}  # fmt: skip
        if shrink["ATOMIC"]:
            shrink["u_ptr"] = "*fp32"
        yield f"lora_shrink {tiles_name}", L.lora_shrink_kernel, shrink
        expand = {**common, "y_ptr": f"*{dtype}", "scales_ptr": "*fp32", "b_off_ptr": "*i64", "stride_y_t": "i32/16",
                  "N0": "i32/16", "N1": "i32/16", "N2": "i32/16", "N3": "i32/16", "O0": "i32/16", "O1": "i32/16", "O2": "i32/16",
                  "O3": "i32/16", "Y_ALIGNED": True, "BLOCK_T": bt, "BLOCK_R": ebr, "BLOCK_N": ebn,
                  "SMALL_R": tiles.expand_small_r, "SMALL_N": tiles.expand_small_n,
                  "_warps": tiles.expand_num_warps}  # fmt: skip
        yield f"lora_expand {tiles_name}", L.lora_expand_kernel, expand
    yield "lora_plan", L.lora_plan_kernel, {"seg_len_ptr": "*i32", "work_seg_ptr": "*i32", "work_blk_ptr": "*i32", "G": "i32",
                                            "W": "i32", "BLOCK_T": 16, "BLOCK_W": 128, "BLOCK_G": 32}  # fmt: skip


def attention_cases(dtype: str):
    common = {
        "q_ptr": f"*{dtype}", "pool_layer": f"*{dtype}", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
        "query_start_ptr": "*i32", "out_ptr": f"*{dtype}", "scale_log2": "fp32", "stride_q_t": "i32/16", "stride_q_h": "i32/16",
        "stride_bt_b": "i32", "stride_o_t": "i32/16", "stride_o_h": "i32/16", "block_size": "i32/16", "page_elems": "i32/16",
        "kv_width": "i32/16", "DOT_PRECISION": "tf32",
    }  # fmt: skip
    for d, group in ((128, 1), (128, 4), (64, 8), (256, 4)):
        dec = {**common, "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "n_heads": "i32", "chunk": "i32/16", "num_splits": "i32",
               "GROUP": group, "GROUP_PAD": max(16, group), "HEAD_DIM": d, "BLOCK_N": 64 if d <= 128 else 32, "SINGLE_SPLIT": False}  # fmt: skip
        yield f"decode_attention D{d} group{group}", A.decode_attention_kernel, dec
        pre = {**common, "first_seq": "i32", "GROUP": group, "HEAD_DIM": d, "BLOCK_M": 64 if d <= 128 else 32, "BLOCK_N": 64 if d <= 128 else 32}
        yield f"prefill_attention D{d} group{group}", A.prefill_attention_kernel, pre
    yield "decode_reduce D128", A.decode_reduce_kernel, {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "query_start_ptr": "*i32",
                                                         "out_ptr": f"*{dtype}", "n_heads": "i32", "num_splits": "i32", "stride_o_t": "i32/16",
                                                         "stride_o_h": "i32/16", "HEAD_DIM": 128, "SPLITS_PAD": 16}  # fmt: skip
    yield "write_kv 4096", A.write_kv_kernel, {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "pool_layer": f"*{dtype}", "slot_mapping_ptr": "*i64",
                                               "stride_k_t": "i32/16", "stride_v_t": "i32/16", "block_size": "i32/16", "page_elems": "i32/16",
                                               "kv_width": "i32/16", "BLOCK": 4096}  # fmt: skip


def main() -> None:
    failures = 0
    for dtype in sys.argv[1:] or ("bf16", "fp32"):
        for name, fn, args in list(lora_cases(dtype)) + list(attention_cases(dtype)):
            warps = 8 if "D256" in name and "prefill" in name else 4
            try:
                print(report(f"{name} {dtype}", compile_one(fn, args, warps)), flush=True)
            except Exception as exc:  # noqa: BLE001 - report every failing kernel, then fail
                failures += 1
                print(f"{name} {dtype}: FAILED {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
