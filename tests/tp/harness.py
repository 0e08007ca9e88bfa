"""Run a function on W local processes joined in a gloo group: bounded in time, always torn down.

Workers get only plain arguments (ints, strings) and hand back results as files in out_dir
(safetensors / JSON); a worker's traceback is written to out_dir/error-rank<i>.txt.
"""

from __future__ import annotations

import datetime
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from lorafleet.common.embedded import free_port
from lorafleet.engine.tp.engine_workers import end_process

GROUP_TIMEOUT_S = 60  # a collective waiting longer than this fails instead of hanging


def _entry(target, rank: int, world: int, port: int, out_dir: str, *args) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        target(rank, world, out_dir, *args)
    except BaseException:
        Path(out_dir, f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target, world: int, out_dir: Path, *args, timeout_s: float = 120) -> None:
    """Run target(rank, world, out_dir, *args) on `world` spawned processes; raise if any fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, rank, world, port, str(out_dir), *args), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            end_process(p)
    errors = "\n".join(f.read_text() for f in sorted(out_dir.glob("error-rank*.txt")))
    if hung:
        raise AssertionError(f"ranks {hung} of {world} did not finish within {timeout_s} s\n{errors}")
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise AssertionError(f"worker exit codes {codes}\n{errors}")
