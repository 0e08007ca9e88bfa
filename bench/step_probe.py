"""The cost of one decode step at a fixed batch: what LoRA adds to a step, without the trace's noise.

A trace run's throughput mixes prefill, decode, arrivals and the drain of its longest requests;
this probe holds the batch still: `batch` requests with prompts of `prompt_len` tokens (each on
adapter i % adapters of the bank, or none), admitted together; once every one has its first
token, every step is a decode step of the whole batch (split phases replay it from a CUDA graph
where the engine has them), and `steps` of them are timed one by one (each engine step ends with
the host reading the sampled ids, so its wall time is the step's). The requests are then aborted.

    decode_step_ms(engine, bank, batch=64, adapters=32)   # -> {"step_ms_p50": ..., ...}
    with decoding_batch(engine, bank, 256, 200, 32, 40, "h"): ...   # time what you need (host_step.py)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from lorafleet.bench.adapters import AdapterBank
from lorafleet.engine.engine import LLMEngine, SamplingParams

ADAPTER_BASE = 5_000_000  # probe adapters' numbers in the bank (apart from any trace's)


@contextmanager
def decoding_batch(engine: LLMEngine, bank: AdapterBank | None, batch: int, adapters: int, prompt_len: int,
                   steps: int, tag: str) -> Iterator[None]:
    """`batch` requests (request i on adapter i % adapters of the bank, or none) admitted and all
    decoding, for `steps` more steps at least; on exit they are aborted and the engine is idle."""
    assert not engine.has_unfinished(), "the probe needs an idle engine"
    rng = np.random.default_rng(11)
    vocab = engine.spec.vocab_size
    # Long enough that no request finishes while the batch is timed (prefills interleave with
    # decode steps, so the first admitted are some tokens ahead); aborted after.
    params = SamplingParams(max_tokens=steps + 256, temperature=0, ignore_eos=True)
    for i in range(batch):
        number = ADAPTER_BASE + i % adapters
        engine.add_request(f"{tag}-{i}", prompt_token_ids=rng.integers(3, vocab, prompt_len).tolist(), params=params,
                           adapter_id=None if bank is None else f"{tag}-a{number}",
                           adapter=None if bank is None else bank.get(number))
    started: set[str] = set()
    for _ in range(4 * batch):  # prefill: every request gets its first token
        started.update(o.request_id for o in engine.step() if o.num_output_tokens > 0)
        if len(started) == batch:
            break
    else:
        raise RuntimeError(f"only {len(started)} of {batch} probe requests started (pool too small?)")
    try:
        yield
    finally:
        for i in range(batch):
            engine.abort_request(f"{tag}-{i}")
        while engine.has_unfinished():
            engine.step()


def decode_step_ms(engine: LLMEngine, bank: AdapterBank | None, batch: int = 64, adapters: int = 32,
                   prompt_len: int = 128, steps: int = 32, tag: str = "probe") -> dict:
    with decoding_batch(engine, bank, batch, adapters, prompt_len, steps, tag):
        graphs0, times, full = engine.graph_steps, [], 0
        for _ in range(steps):
            t = time.perf_counter()
            outs = engine.step()
            times.append(time.perf_counter() - t)
            full += len(outs) == batch  # a token for every request: the whole batch decoded
        graph_steps = engine.graph_steps - graphs0
    times.sort()
    return {"step_ms_p50": 1e3 * statistics.median(times), "step_ms_p10": 1e3 * times[len(times) // 10],
            "step_ms_p90": 1e3 * times[(9 * len(times)) // 10], "batch": batch,
            "adapters": 0 if bank is None else min(adapters, batch), "prompt_len": prompt_len, "steps": steps,
            "graph_steps": graph_steps, "full_batch_steps": full}
