"""The engine's tensor-parallel processes: rank 0 is the driver (the LLMEngine's process), ranks
1..W-1 are workers spawned here, each running the same steps on its own shard.

    driver (rank 0)                                    worker (rank i)
    scheduler -> build_batch -> TpDriverModel.forward
      pipe: header bytes (wire.Step, msgspec)   ---->  recv header (poll, parent liveness checked)
      broadcast ints [, adapter floats]         <--->  broadcast into fresh buffers
      run_step: loads, then the forward          <-->  run_step: the same loads, the same forward
      (collectives inside the forward)                 (hidden states dropped; rank 0 samples)

Every wait is bounded: the group's collective timeout, the worker's start-up wait, and the joins
at close. A worker polls its pipe once a second and exits when the driver process is gone, so an
idle engine never times a collective out and a crashed driver never leaves workers behind.
"""

from __future__ import annotations

import atexit
import datetime
import faulthandler
import os
import signal
import sys
import threading
import traceback

import msgspec
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lorafleet.formats.model_spec import ModelSpec

from ..cuda_graphs import DecodeGraphs
from ..weights_loader import load_weights, random_weights
from . import wire
from .collectives import TpComm
from .grouped_adapter import grouped_numel
from .partition import local_spec, make_plan
from .rank_runner import RankRunner
from .shard_adapters import Scheme
from .shard_weights import shard_layer

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TensorParallelWorkerError(RuntimeError):
    """A worker rank failed to start, died, or stopped answering."""


def end_process(p) -> None:
    """Stop a process still alive after its join: SIGTERM, then SIGKILL, 5 s for each."""
    for stop in (p.terminate, p.kill):
        if p.is_alive():
            stop()
            p.join(5)


def rank_device(start: wire.WorkerStart) -> torch.device:
    return torch.device(f"cuda:{start.rank}") if start.device == "cuda" else torch.device("cpu")


def init_group(start: wire.WorkerStart) -> None:
    if dist.is_initialized():
        raise TensorParallelWorkerError("torch.distributed is already initialised in this process: one TP engine per process")
    if start.device == "cuda":
        torch.cuda.set_device(rank_device(start))
    dist.init_process_group(start.backend, init_method=start.init_method, rank=start.rank, world_size=start.world,
                            timeout=datetime.timedelta(seconds=start.timeout_s))


def build_runner(start: wire.WorkerStart, spec: ModelSpec) -> RankRunner:
    """This rank's shard of the weights, its pool (own KV heads), its model; no collective here."""
    from ..memory.layout import PoolGeometry
    from ..ops.select import select_elementwise_ops, select_ops

    device, dtype = rank_device(start), _DTYPES[start.dtype]
    plan = make_plan(spec, start.world, start.rank)
    if start.random_weights_seed is None:  # only this rank's slices are read from the files
        weights = load_weights(start.model_dir, spec, dtype, device, slices=plan.weight_slices())
    else:  # made on the device as the single-GPU engine makes them, each layer sharded as it is made
        weights = random_weights(spec, dtype, device, start.random_weights_seed,
                                 per_layer=lambda layer: shard_layer(layer, spec, plan))
    if device.type == "cuda":
        # The full layers made (or read) on the way are garbage now; hand their cached blocks back
        # so the pool, sized for the shard only, gets them (the allocator would otherwise hold them).
        torch.cuda.empty_cache()
    geom = PoolGeometry.for_model(local_spec(spec, start.world), start.num_pages, start.block_size)
    pool = torch.zeros(spec.num_layers, start.num_pages, geom.page_elems, dtype=dtype, device=device)
    shrink_ops, attn_ops = select_ops(start.attn_ops, device)
    expand_ops = select_ops(start.attn_ops, device)[0]  # its own instance: its own cached table checks
    comm = TpComm.from_group()
    return RankRunner(spec, plan, weights, attn_ops, comm, pool, Scheme(start.scheme), (shrink_ops, expand_ops),
                      select_elementwise_ops(start.elementwise_ops, start.elementwise_ops, device), start.max_slots, start.max_adapter_pages)


def build_graphs(runner: RankRunner, start: wire.WorkerStart) -> DecodeGraphs | None:
    """This rank's decode graphs when the driver asked for them (every rank in the same order:
    the warm-up and captures run collectives). On the CPU: the same padded steps, run eagerly."""
    if start.graph_max_batch <= 0:
        return None
    t = runner.tables
    return DecodeGraphs(runner.model, runner.pool, (t.shrink_tables, t.expand_tables), start.graph_max_batch,
                        start.graph_max_rank, start.block_size, scheme=runner.scheme,
                        capture=start.device == "cuda", with_logits=start.rank == 0)


def run_step(runner: RankRunner, step: wire.Step, ints: torch.Tensor | None = None,
             adapter_flat: torch.Tensor | None = None, graphs: DecodeGraphs | None = None) -> torch.Tensor:
    """One step on this rank: receive (or, on rank 0, send) the step's tensors, apply the adapter
    loads, run the forward (or replay the decode graph: step.graph). Every rank calls this with the
    same header. -> hidden [T, H] (a graph step: rank 0's logits [T, V], the others' hidden).

    Nothing here reads a device tensor back: the header carries every host-side number."""
    device = runner.pool.device
    if ints is None:
        ints = torch.empty(wire.num_ints(step), dtype=torch.int64, device=device)
    dist.broadcast(ints, src=0)
    if step.loads:
        sizes = [grouped_numel(runner.spec, load.targets) for load in step.loads]
        if adapter_flat is None:
            adapter_flat = torch.empty(sum(sizes), dtype=runner.pool.dtype, device=device)
        dist.broadcast(adapter_flat, src=0)
        for load, piece in zip(step.loads, adapter_flat.split(sizes)):
            runner.load_grouped(load.slot, load.pages, load.ranks_by_module, load.targets, piece)
    ids, pos, attn, lora = wire.unpack_ints(ints, step)
    if step.graph:
        if graphs is None:
            raise RuntimeError("a graph step reached a rank that captured no decode graphs")
        return graphs.run(ids, pos, attn, lora)
    return runner.forward(ids, pos, attn, lora)


# --- the worker process ----------------------------------------------------------------------


def worker_main(start_raw: bytes, conn) -> None:
    """Entry point of a spawned worker rank (start_raw: wire.WorkerStart, msgspec bytes)."""
    start = msgspec.msgpack.decode(start_raw, type=wire.WorkerStart)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: this rank's stacks to stderr
    try:
        init_group(start)
        runner = build_runner(start, msgspec.json.decode(start.spec_json, type=ModelSpec))
        conn.send_bytes(b"ready")
    except BaseException:
        conn.send_bytes(("error: " + traceback.format_exc()).encode())
        _leave()
        raise
    try:
        graphs = build_graphs(runner, start)  # with the driver, which starts its own once all are ready
    except BaseException:
        _exit_on_error()
    try:
        _serve(runner, conn, graphs)
    finally:
        if graphs is not None:
            graphs.release()  # before the group (DecodeGraphs.release)
        _leave()


def _serve(runner: RankRunner, conn, graphs: DecodeGraphs | None) -> None:
    parent = mp.parent_process()
    while True:
        while not conn.poll(1.0):
            if parent is not None and not parent.is_alive():
                return  # the driver is gone: nobody will send another command
        cmd = wire.decode(conn.recv_bytes())
        if isinstance(cmd, wire.Shutdown):
            return
        try:
            with torch.inference_mode():
                run_step(runner, cmd, graphs=graphs)
        except BaseException:
            _exit_on_error()


def _exit_on_error() -> None:
    """Print the error first and leave at once: destroying the group (worker_main's `finally`)
    waits for the collectives the other ranks are blocked in, so the traceback never came out
    (an H200 run at 897744e showed only the driver's all-reduce timing out)."""
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


def _leave(timeout_s: float = 30.0) -> None:
    """Destroy this process's group, waiting at most timeout_s: a teardown that blocks (a peer
    gone, NCCL resources still referenced) must not keep a worker or the driver's close() alive."""
    if not dist.is_initialized():
        return
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def destroy() -> None:
        if device is not None:
            torch.cuda.set_device(device)  # the CUDA device is per thread: this rank's, not GPU 0
        dist.destroy_process_group()

    done = threading.Thread(target=destroy, name="lorafleet-tp-leave", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        print(f"lorafleet TP: destroy_process_group did not return within {timeout_s} s; leaving it",
              file=sys.stderr, flush=True)


# --- the driver's side -----------------------------------------------------------------------


class TpWorkerGroup:
    """Spawns ranks 1..W-1, joins the group as rank 0, sends each step's header; close() ends all."""

    def __init__(self, start: wire.WorkerStart):
        """start: rank 0's WorkerStart (workers get the same with their rank)."""
        self.world, self.timeout_s = start.world, start.timeout_s
        ctx = mp.get_context("spawn")
        # NVLink SHARP / symmetric-memory multicast stays off under our NCCL groups (see the device
        # notes); spawned workers inherit the driver's environment. This writes, it reads nothing.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        self._procs, self._conns = [], []
        for rank in range(1, start.world):
            ours, theirs = ctx.Pipe(duplex=True)
            raw = msgspec.msgpack.encode(msgspec.structs.replace(start, rank=rank))
            p = ctx.Process(target=worker_main, args=(raw, theirs), daemon=True, name=f"lorafleet-tp-rank{rank}")
            p.start()
            theirs.close()
            self._procs.append(p), self._conns.append(ours)
        self._closed = False
        atexit.register(self.close)
        try:
            init_group(start)  # the rendezvous: returns once every rank has joined
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        """Wait (bounded) until every worker has built its shard; raise with its traceback if one failed."""
        for rank, conn in enumerate(self._conns, start=1):
            if not conn.poll(self.timeout_s):
                raise TensorParallelWorkerError(f"worker rank {rank} did not start within {self.timeout_s} s")
            msg = conn.recv_bytes().decode()
            if msg != "ready":
                raise TensorParallelWorkerError(f"worker rank {rank} failed to start:\n{msg}")

    def send(self, cmd: wire.Command) -> None:
        raw = wire.encode(cmd)
        for rank, (p, conn) in enumerate(zip(self._procs, self._conns), start=1):
            if not p.is_alive():
                raise TensorParallelWorkerError(f"worker rank {rank} exited (code {p.exitcode})")
            conn.send_bytes(raw)

    @property
    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self._procs]

    def close(self) -> None:
        """Stop every worker (shutdown message, group destroyed with them, bounded join, then
        terminate / kill); idempotent.

        The driver destroys its group while the workers destroy theirs, before joining them:
        NCCL's communicator destroy is an intra-node collective, so a rank that destroys alone
        waits for the others. Joining first stalled every close: the worker waited in destroy for
        the driver, which waited in join for the worker, until the worker's bounded _leave gave
        up (docs/tp.md)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for conn in self._conns:
            try:
                conn.send_bytes(wire.encode(wire.Shutdown()))
            except (BrokenPipeError, OSError):
                pass  # that worker is already gone
        _leave()
        for p in self._procs:
            p.join(self.timeout_s)
            end_process(p)
        for conn in self._conns:
            conn.close()
