"""Tensor parallelism: Megatron sharding of the base model and the LoRA schemes for the adapters.

The decoder's linear layers (linear.py) serve every world size, one included; the rest is what a
tensor-parallel engine adds (EngineConfig(tp_size=W): engine_runtime, engine_workers, wire,
rank_runner, rank_tables, grouped_adapter; imported only when tp_size > 1). See docs/tp.md.
Import from the modules: this package re-exports nothing (a re-export would import linear.py,
and with it the engine's LoraStep, whenever any tp module is imported).
"""
