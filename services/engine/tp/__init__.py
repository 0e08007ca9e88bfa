"""Tensor parallelism: Megatron sharding of the base model and the S-LoRA scheme for the LoRA part.

Built and CPU-tested over gloo: the sharding of weights and adapters, the sharded linear math for
the LoRA schemes compared, and the engine integration (EngineConfig(tp_size=W): engine_runtime,
engine_workers, wire, rank_runner; imported only when tp_size > 1). Next: the rank's Triton ops
reading sharded adapter pages, and GPU runs; see docs/tp.md.
"""

from .collectives import Collective, CommLog, TpComm, single_rank
from .linear import column_parallel, row_parallel
from .partition import (
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    TensorParallelError,
    TpPlan,
    check_world,
    local_rank,
    local_spec,
    make_plan,
    piece_width,
    rank_rows,
)
from .shard_adapters import LoraShard, Scheme, ShardLayout, shard_lora
from .shard_weights import shard_layer, shard_model

__all__ = [
    "COLUMN_PARALLEL", "ROW_PARALLEL", "Collective", "CommLog", "LoraShard", "Scheme", "ShardLayout",
    "TensorParallelError", "TpComm", "TpPlan", "check_world", "column_parallel",
    "local_rank", "local_spec", "make_plan", "piece_width",
    "rank_rows", "row_parallel", "shard_layer", "shard_lora", "shard_model", "single_rank",
]
