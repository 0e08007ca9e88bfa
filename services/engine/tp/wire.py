"""Messages from the driver (rank 0) to the worker ranks: msgspec headers, tensors by broadcast.

Each command is a msgspec-encoded header sent over the worker's pipe (plain bytes: never a
pickle), followed, for a step, by ONE int64 broadcast holding every index tensor of the step and,
when adapters are loaded, ONE broadcast in the pool's dtype holding their full A and B tensors::

    ints  = [ids (T) | positions (T) | token_slot (T) | slot_mapping (T) | query_start (B+1)
             | seq_lens (B) | block_tables (B * max_blocks) | seg_start (G) | seg_len (G) | seg_slot (G)]
    float = [load0: grouped (module, rank): A of its layers, B of its layers, ... | load1: ...]

The step's LoRA segments are the driver's (build_batch made them); their host-side numbers (G,
largest rank, longest segment, modules targeted) ride in the header, so no rank reads a device
tensor back (no host sync) or loops over tokens to rebuild them. Adapters travel whole, in the
pool's dtype (grouped_adapter.py): every rank cuts its own share, so casting first is the same
values at half the bytes of float32 on a bf16 pool.
"""

from __future__ import annotations

import msgspec
import torch

from ..ops.base import AttentionMeta, LoraBatch


class WorkerStart(msgspec.Struct, frozen=True):
    """Everything a worker needs to build its shard (sent as the spawn argument, msgspec bytes)."""

    model_dir: str
    spec_json: bytes  # ModelSpec, msgspec JSON
    world: int
    rank: int
    init_method: str  # tcp://127.0.0.1:PORT
    backend: str  # gloo | nccl
    device: str  # cpu | cuda
    dtype: str  # bfloat16 | float16 | float32
    attn_ops: str  # torch | triton
    scheme: str
    num_pages: int
    block_size: int
    random_weights_seed: int | None
    timeout_s: float
    elementwise_ops: str = "torch"  # torch | triton (the fused kernels)
    # The driver's adapter capacity: every rank's tables are allocated at it once (graphs.py).
    max_slots: int = 64
    max_adapter_pages: int = 1
    # Decode CUDA graphs (graphs.py): batch capacity (0: none) and rank capacity.
    graph_max_batch: int = 0
    graph_max_rank: int = 0


class AdapterLoad(msgspec.Struct, frozen=True):
    """One adapter into `slot` and `pages` on every rank; its tensors: grouped_adapter.py's flat form."""

    slot: int
    pages: list[int]
    ranks_by_module: dict[str, int]
    targets: list[tuple[int, str, int, float]]  # (layer, module, rank, scale)


class StepLora(msgspec.Struct, frozen=True):
    """The host-side numbers of the step's LoRA batch (its tensors are in the ints broadcast)."""

    num_segments: int
    max_rank: int
    max_seg_len: int
    targets: list[str]  # modules any adapter of the batch targets (the same decision on every rank)


class Step(msgspec.Struct, frozen=True, tag="step"):
    num_tokens: int
    num_seqs: int
    max_blocks: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    lora: StepLora | None  # None: no adapter in the step
    loads: list[AdapterLoad]
    graph: bool = False  # a decode-only step every rank replays from its CUDA graph of this size's bucket


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


Command = Step | Shutdown
_decoder = msgspec.msgpack.Decoder(Command)


def encode(cmd: Command) -> bytes:
    return msgspec.msgpack.encode(cmd)


def decode(raw: bytes) -> Command:
    return _decoder.decode(raw)


# --- tensors <-> one flat buffer -----------------------------------------------------------


def num_ints(step: Step) -> int:
    G = step.lora.num_segments if step.lora is not None else 0
    return 4 * step.num_tokens + 2 * step.num_seqs + 1 + step.num_seqs * step.max_blocks + 3 * G


def pack_ints(input_ids, positions, attn: AttentionMeta, lora: LoraBatch | None) -> torch.Tensor:
    """Device tensors in, one device tensor out: no host copy, no sync."""
    parts = [input_ids, positions, lora.token_slot if lora is not None else torch.full_like(input_ids, -1),
             attn.slot_mapping, attn.query_start, attn.seq_lens, attn.block_tables.reshape(-1)]
    if lora is not None:
        parts += [lora.seg_start, lora.seg_len, lora.seg_slot]
    return torch.cat([p.to(torch.int64) for p in parts])


def unpack_ints(flat: torch.Tensor, step: Step):
    """-> input_ids [T], positions [T], AttentionMeta, LoraBatch | None (as build_batch makes them)."""
    T, B, mb = step.num_tokens, step.num_seqs, step.max_blocks
    G = step.lora.num_segments if step.lora is not None else 0
    ids, pos, slot, slot_map, qs, sl, bt, ss, sn, sslot = flat.split((T, T, T, T, B + 1, B, B * mb, G, G, G))
    i32 = torch.int32
    attn = AttentionMeta(
        query_start=qs.to(i32), seq_lens=sl.to(i32), block_tables=bt.view(B, mb).to(i32), slot_mapping=slot_map,
        num_decodes=step.num_decodes, max_query_len=step.max_query_len, max_seq_len=step.max_seq_len,
        block_size=step.block_size,
    )
    lora = None
    if step.lora is not None:
        lora = LoraBatch(token_slot=slot.to(i32), seg_start=ss.to(i32), seg_len=sn.to(i32), seg_slot=sslot.to(i32),
                         max_rank=step.lora.max_rank, max_seg_len=step.lora.max_seg_len, num_segments=G,
                         targets=frozenset(step.lora.targets))
    return ids, pos, attn, lora
