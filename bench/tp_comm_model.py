"""What each scheme communicates, from shapes alone (no GPU): the collectives of one decoder layer.

`layer_collectives` lists, in call order, the collectives that linear.py makes for one layer of
a step of T tokens whose LoRA batch has largest rank R (tests check it against CommLog). Bytes
each GPU sends follow the ring algorithms NCCL uses for large messages (its "bus bytes"):

    all_gather of n elements (each rank contributes n/W):  (W-1)/W * n * elem_bytes
    all_reduce of n elements:                              2 (W-1)/W * n * elem_bytes
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.engine.tp.collectives import Collective
from lorafleet.engine.tp.partition import piece_width
from lorafleet.engine.tp.shard_adapters import Scheme
from lorafleet.formats.model_spec import ModelSpec

FP32 = 4


@dataclass(frozen=True)
class PlannedCollective:
    purpose: str  # "base" (the base model's own) or "lora"
    call: Collective


def layer_collectives(spec: ModelSpec, world: int, scheme: Scheme | str | None, max_rank: int, tokens: int,
                      elem_bytes: int) -> list[PlannedCollective]:
    """Collectives of one layer in call order; scheme None (or max_rank 0): a batch without LoRA."""
    T, H, W = tokens, spec.hidden_size, world
    base = PlannedCollective("base", Collective("all_reduce", T * H, elem_bytes))
    if scheme is None or max_rank == 0:
        return [base, base]
    scheme, R = Scheme(scheme), max_rank
    out: list[PlannedCollective] = []

    def lora(op: str, n: int, nbytes: int = elem_bytes) -> None:
        out.append(PlannedCollective("lora", Collective(op, n, nbytes)))

    def column(num_modules: int) -> None:
        if scheme.splits_column_rank:
            lora("all_gather", W * T * num_modules * piece_width(R, W))

    def row(in_features: int) -> None:
        if scheme == Scheme.FUSED:
            out.append(PlannedCollective("base+lora", Collective("all_reduce", T * (H + R), elem_bytes)))
        elif scheme == Scheme.GATHER_OUTPUTS:
            out.append(base)
            lora("all_gather", T * in_features)
        else:
            lora("all_reduce", T * R, FP32)
            out.append(base)

    column(3)  # q, k, v
    row(spec.q_width)  # o
    column(2)  # gate, up
    row(spec.intermediate_size)  # down
    return out


def bytes_sent(c: Collective, world: int) -> float:
    """Bytes one GPU sends for the collective (ring algorithm)."""
    factor = {"all_gather": (world - 1) / world, "all_reduce": 2 * (world - 1) / world}[c.op]
    return factor * c.elements * c.elem_bytes


def per_token_bytes(spec: ModelSpec, world: int, scheme: Scheme | str, max_rank: int, elem_bytes: int = 2) -> dict:
    """Bytes one GPU sends per token over the whole model: the LoRA part and the base model's part.

    (For the fused scheme the R extra elements of each o/down all-reduce count as LoRA.)
    """
    plan = layer_collectives(spec, world, scheme, max_rank, 1, elem_bytes)
    base_alone = sum(bytes_sent(c.call, world) for c in layer_collectives(spec, world, None, 0, 1, elem_bytes))
    total = sum(bytes_sent(c.call, world) for c in plan)
    L = spec.num_layers
    return {"lora": (total - base_alone) * L, "base": base_alone * L,
            "lora_collectives_per_layer": sum(c.purpose == "lora" for c in plan)}


def adapter_bytes_per_rank(spec: ModelSpec, world: int, scheme: Scheme | str, rank: int, elem_bytes: int = 2) -> int:
    """Bytes of one adapter (rank `rank` on all seven modules, every layer) that each rank holds.

    For slora the column-parallel A rows are counted at the busiest rank, ceil(r/W).
    """
    scheme, W, total = Scheme(scheme), world, 0
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        in_f, out_f = spec.module_shape(name)
        a_rows = piece_width(rank, W) if scheme.splits_column_rank else rank
        kv = name in ("k_proj", "v_proj") and spec.num_kv_heads < W  # one replicated KV head
        out_loc = spec.head_dim if kv else out_f // W
        total += a_rows * in_f + rank * out_loc
    for name in ("o_proj", "down_proj"):
        in_f, out_f = spec.module_shape(name)
        total += rank * (in_f if scheme.whole_row_a else in_f // W)
        total += rank * (out_f if scheme.whole_row_b else out_f // W)
    return total * spec.num_layers * elem_bytes
