"""Messages from the driver (rank 0) to the worker ranks: msgspec headers, tensors by broadcast.

Each command is a msgspec-encoded header sent over the worker's pipe (plain bytes: never a
pickle), followed, for a step, by ONE int64 broadcast holding every index tensor of the step and,
when adapters are loaded, ONE float32 broadcast holding their full A and B tensors::

    ints  = [ids (T) | positions (T) | token_slot (T) | slot_mapping (T) | query_start (B+1)
             | seq_lens (B) | block_tables (B * max_blocks)]
    float = [load0: A(t0), B(t0), A(t1), B(t1), ... | load1: ...]    (targets in header order)
"""

from __future__ import annotations

import msgspec
import torch

from ..adapters.peft_config import TargetEntry
from ..ops.base import AttentionMeta


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


class AdapterLoad(msgspec.Struct, frozen=True):
    slot: int
    pages: list[int]
    ranks_by_module: dict[str, int]
    targets: list[tuple[int, str, int, float]]  # (layer, module, rank, scale)
    a_shapes: list[tuple[int, int]]  # [r, in] per target
    b_shapes: list[tuple[int, int]]  # [out, r] per target


class Step(msgspec.Struct, frozen=True, tag="step"):
    num_tokens: int
    num_seqs: int
    max_blocks: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    has_lora: bool
    loads: list[AdapterLoad]


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


Command = Step | Shutdown
_decoder = msgspec.msgpack.Decoder(Command)


def encode(cmd: Command) -> bytes:
    return msgspec.msgpack.encode(cmd)


def decode(raw: bytes) -> Command:
    return _decoder.decode(raw)


# --- tensors <-> one flat buffer -----------------------------------------------------------


def pack_ints(input_ids, positions, token_slot, attn: AttentionMeta) -> torch.Tensor:
    parts = [input_ids, positions, token_slot, attn.slot_mapping, attn.query_start, attn.seq_lens,
             attn.block_tables.reshape(-1)]
    return torch.cat([p.to(torch.int64) for p in parts])


def unpack_ints(flat: torch.Tensor, step: Step):
    """-> input_ids [T], positions [T], token_slot [T] int32, AttentionMeta (as build_batch makes it)."""
    T, B, mb = step.num_tokens, step.num_seqs, step.max_blocks
    ids, pos, slot, slot_map, qs, sl, bt = flat.split((T, T, T, T, B + 1, B, B * mb))
    i32 = torch.int32
    attn = AttentionMeta(
        query_start=qs.to(i32), seq_lens=sl.to(i32), block_tables=bt.view(B, mb).to(i32), slot_mapping=slot_map,
        num_decodes=step.num_decodes, max_query_len=step.max_query_len, max_seq_len=step.max_seq_len,
        block_size=step.block_size,
    )
    return ids, pos, slot.to(i32), attn


def pack_adapter(targets: list[TargetEntry], a: dict, b: dict) -> tuple[list, list, torch.Tensor]:
    """-> a_shapes, b_shapes, flat float32 [sum of A and B sizes] in target order."""
    a_shapes, b_shapes, parts = [], [], []
    for t in targets:
        at, bt = a[(t.layer, t.module)], b[(t.layer, t.module)]
        a_shapes.append(tuple(at.shape)), b_shapes.append(tuple(bt.shape))
        parts += [at.reshape(-1).float(), bt.reshape(-1).float()]
    return a_shapes, b_shapes, torch.cat(parts) if parts else torch.zeros(0)


def adapter_numel(load: AdapterLoad) -> int:
    return sum(r * c for r, c in load.a_shapes) + sum(r * c for r, c in load.b_shapes)


def unpack_adapter(flat: torch.Tensor, load: AdapterLoad):
    """-> targets, a, b for RankRunner.load_adapter (views into `flat`)."""
    targets = [TargetEntry(layer, module, rank, scale) for layer, module, rank, scale in load.targets]
    sizes = [n for sa, sb in zip(load.a_shapes, load.b_shapes) for n in (sa[0] * sa[1], sb[0] * sb[1])]
    pieces = flat.split(sizes) if sizes else []
    a, b = {}, {}
    for i, t in enumerate(targets):
        a[(t.layer, t.module)] = pieces[2 * i].view(load.a_shapes[i])
        b[(t.layer, t.module)] = pieces[2 * i + 1].view(load.b_shapes[i])
    return targets, a, b
