"""Adapter loads on the CUDA side stream while the main stream is busy: ordering in both directions
(invariants (a), (c) of adapter_upload.py), the host never waiting, and ops reading the result.
Skips without CUDA.

The main stream is kept busy with torch.cuda._sleep, so a load queued meanwhile is still in
flight when the host checks, and a missing wait would let the two streams race.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.engine.memory.adapter_cache import AdapterCache
from lorafleet.engine.memory.allocator import PageAllocator
from lorafleet.engine.ops.base import LoraBatch, LoraContext
from lorafleet.engine.ops.torch_ref import TorchLoraOps
from lorafleet.formats.model_spec import LORA_MODULES
from tests.engine.fakes import SPEC, make_weights
from tests.engine.test_adapter_upload import P, reference_pack

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

SLEEP_CYCLES = 200_000_000  # ~0.1 s of main-stream work on a ~2 GHz GPU
DEV = torch.device("cuda")


def make_cache(num_pages: int = 64, dtype=torch.bfloat16) -> AdapterCache:
    pool = torch.zeros(SPEC.num_layers, num_pages, P, dtype=dtype, device=DEV)
    return AdapterCache(pool, PageAllocator(num_pages), SPEC, max_slots=4, max_rank=64)


def expected_pages(weights, dtype=torch.bfloat16) -> torch.Tensor:
    buf, *_, n = reference_pack(weights, dtype)
    return buf.view(SPEC.num_layers, n, P).to(DEV)


def pages_of(cache: AdapterCache, adapter_id: str) -> list[int]:
    return cache.allocator.pages_of(("adapter", adapter_id))


def test_packed_forms_are_pageable_and_a_load_is_asynchronous():
    cache = make_cache()
    w = make_weights(8, modules=LORA_MODULES)
    cache.acquire("warm-up", make_weights(8, modules=LORA_MODULES, seed=1))  # first device allocations may sync
    torch.cuda.synchronize()
    cache.stage("a", w)  # packed when the request arrives
    assert not cache.host.get("a", w).buf.is_pinned()  # the uploader's ring is the only pinned memory
    torch.cuda._sleep(SLEEP_CYCLES)
    cache.acquire("a", w)
    assert cache.uploader.in_flight == 1, "the host queued the load and went on"
    torch.cuda.synchronize()
    assert cache.uploader.in_flight == 0
    assert torch.equal(cache.pool[:, pages_of(cache, "a")], expected_pages(w))


def test_a_load_lands_after_earlier_main_stream_writes_to_its_pages():
    cache = make_cache()
    w = make_weights(8, modules=LORA_MODULES)
    n = cache.pages_to_load(w)
    cache.stage("a", w)
    torch.cuda._sleep(SLEEP_CYCLES)
    cache.pool[:, :n] = 7.0  # queued behind the sleep: KV of an earlier step in the pages a will get
    slot = cache.acquire("a", w)
    assert pages_of(cache, "a") == list(range(n))
    torch.cuda.synchronize()
    pages = cache.tables.page_table[slot, :n].long()
    assert torch.equal(cache.pool[:, pages], expected_pages(w))


def test_an_eviction_before_the_load_completed_orders_kv_writes_after_it():
    cache = make_cache()
    w = make_weights(8, modules=LORA_MODULES)
    cache.host.get("a", w)  # packed (a prefetch during a pack would be deferred to poll)
    torch.cuda._sleep(SLEEP_CYCLES)
    assert cache.prefetch("a", w)  # load queued, waiting for the sleep
    pages = pages_of(cache, "a")
    slot = cache.slot_of("a")
    cache.evict_for(len(pages))  # a, the only cached adapter, goes before its load completed
    cache.pool[:, pages] = 3.0  # the main stream reuses its pages (KV)
    torch.cuda.synchronize()
    assert bool((cache.pool[:, pages] == 3.0).all()), "the load landed after the main stream reused its pages"
    assert int(cache.tables.ranks[slot].abs().sum()) == 0


def _lora_ops():
    ops = [TorchLoraOps()]
    try:
        from lorafleet.kernels.lora_ops import TritonLoraOps
    except ImportError:
        return ops
    return ops + [TritonLoraOps()]


@pytest.mark.parametrize("ops", _lora_ops(), ids=lambda o: type(o).__name__)
def test_ops_on_the_main_stream_read_an_adapter_loaded_meanwhile(ops):
    cache = make_cache(num_pages=256)
    adapters = {f"x{i}": make_weights(16, modules=LORA_MODULES, seed=10 + i) for i in range(3)}
    for name, w in adapters.items():
        cache.stage(name, w)
        cache.host.get(name, w)  # wait for the worker: the host must not wait inside the timed part
    T, q = 8, LORA_MODULES.index("q_proj")
    in_f, out_f = SPEC.module_shape("q_proj")
    x = torch.randn(T, in_f, generator=torch.Generator().manual_seed(0)).to(DEV, torch.bfloat16)
    for name, w in adapters.items():
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        slot = cache.acquire(name, w)  # load queued on the side stream; the main stream waits for it
        seg = torch.tensor([0], dtype=torch.int32, device=DEV)
        batch = LoraBatch(torch.full((T,), slot, dtype=torch.int32, device=DEV), seg, seg + T, seg + slot,
                          max_rank=16, max_seg_len=T, num_segments=1)
        ctx = LoraContext(cache.pool, cache.tables, batch)
        for layer in range(SPEC.num_layers):
            y = torch.zeros(T, out_f, dtype=torch.bfloat16, device=DEV)
            ops.expand(y, ops.shrink(x, layer, (q,), ctx), layer, (q,), (0,), ctx)
            a = w.a[(layer, "q_proj")].to(DEV, torch.bfloat16).float()
            b = w.b[(layer, "q_proj")].to(DEV, torch.bfloat16).float()
            want = (x.float() @ a.T).to(torch.bfloat16).float() @ b.T * w.config.targets[0].scale
            torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("model,num_pages", [("mha", 10), ("gqa", 20)])
def test_engine_with_evictions_and_reloads_on_the_side_stream_matches_hf_peft(zoo, reference, model, num_pages):
    # test_equivalence's small-pool test on CUDA: every adapter load is a
    # side-stream copy, many are reloads after eviction. float32 and torch ops: no rounding margin.
    from tests.engine.test_equivalence import _check, _run_mixed
    from tests.zoo import ADAPTERS

    eng, results, jobs = _run_mixed(zoo, model, device="cuda", dtype="float32", ops="torch", cuda_graphs=False,
                                    num_pages=num_pages, max_batched_tokens=24)
    _check(zoo, reference, model, results, jobs)
    assert eng.adapters.num_evictions > 0 and eng.adapters.num_loads > len(ADAPTERS)
    assert eng.adapters.host.num_packs == len(ADAPTERS), "reloads copy the packed form; nothing is packed twice"


def test_a_prefetch_during_its_pack_is_deferred_then_loaded_by_poll():
    cache = make_cache()
    w = make_weights(8, modules=LORA_MODULES)
    assert cache.host._worker is not None, "on CUDA packs run in the worker"
    loaded = cache.prefetch("a", w)  # either the pack already finished (loaded) or the load is deferred
    cache.host.get("a", w)
    cache.poll()
    assert cache.is_resident("a") and (loaded or cache.cached_ids() == ["a"])
    torch.cuda.synchronize()
    assert torch.equal(cache.pool[:, pages_of(cache, "a")], expected_pages(w))
