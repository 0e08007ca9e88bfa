"""The packed host form of adapters, its byte-budgeted LRU, and loads into the pool (CPU path).

The packed page buffer must equal, element for element, the layout the pool always had; the
reference below is the original per-target writer, kept here on purpose (simple and obviously
right) to compare against.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorafleet.engine.memory.adapter_cache import AdapterCache
from lorafleet.engine.memory.adapter_pack import HostAdapterCache, pack_adapter
from lorafleet.engine.memory.adapter_upload import AdapterUploader
from lorafleet.engine.memory.allocator import PageAllocator
from lorafleet.engine.memory.layout import PoolGeometry, adapter_layout
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import LORA_MODULES, MODULE_INDEX
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry
from tests.engine.fakes import BLOCK, SPEC, make_weights

P = PoolGeometry.for_model(SPEC, 1, BLOCK).page_elems


def reference_pack(weights: LoraWeights, dtype: torch.dtype):
    """The per-(layer, module) slice writer the pool layout was defined with."""
    layout = adapter_layout(weights, SPEC)
    L, n = SPEC.num_layers, layout.num_pages(P)
    buf = torch.zeros(L, n * P, dtype=dtype)
    ranks = torch.zeros(L, len(LORA_MODULES), dtype=torch.int32)
    scales = torch.zeros(L, len(LORA_MODULES), dtype=torch.float32)
    for t in weights.config.targets:
        m = MODULE_INDEX[t.module]
        a, b = weights.a[(t.layer, t.module)], weights.b[(t.layer, t.module)]
        buf[t.layer, layout.a_off[m] : layout.a_off[m] + a.numel()] = a.reshape(-1).to(dtype)
        buf[t.layer, layout.b_off[m] : layout.b_off[m] + b.numel()] = b.t().reshape(-1).to(dtype)
        ranks[t.layer, m], scales[t.layer, m] = t.rank, t.scale
    return buf, ranks, scales, torch.tensor([layout.a_off, layout.b_off]), n


def ragged_weights(seed: int = 3) -> LoraWeights:
    """Per-layer ranks (PEFT rank_pattern) and a module in one layer only (layers_to_transform)."""
    g = torch.Generator().manual_seed(seed)
    targets = (TargetEntry(0, "q_proj", 8, 2.0), TargetEntry(1, "q_proj", 3, 0.5), TargetEntry(1, "down_proj", 5, 1.5),
               TargetEntry(0, "o_proj", 2, 4.0), TargetEntry(1, "o_proj", 2, 4.0))
    a, b = {}, {}
    for t in targets:
        in_f, out_f = SPEC.module_shape(t.module)
        a[(t.layer, t.module)] = torch.randn(t.rank, in_f, generator=g)
        b[(t.layer, t.module)] = torch.randn(out_f, t.rank, generator=g)
    return LoraWeights(PeftLoraConfig(8, 16.0, False, targets), a, b)


CASES = {
    "qv_r4": lambda: make_weights(4),
    "all_r8": lambda: make_weights(8, modules=LORA_MODULES, seed=1),
    "all_r64": lambda: make_weights(64, modules=LORA_MODULES, seed=2),
    "ragged": ragged_weights,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_form_equals_the_reference_layout(case, dtype):
    weights = CASES[case]()
    packed = pack_adapter(weights, SPEC, P, dtype)
    buf, ranks, scales, offsets, n = reference_pack(weights, dtype)
    assert packed.n_pages == n and packed.buf.dtype == dtype and packed.buf.shape == buf.shape
    assert torch.equal(packed.buf, buf)
    assert torch.equal(packed.ranks, ranks) and torch.equal(packed.scales, scales)
    assert torch.equal(packed.offsets, offsets)
    assert packed.max_rank == max(t.rank for t in weights.config.targets)


def test_host_lru_keeps_packed_adapters_within_the_byte_budget():
    one = pack_adapter(make_weights(4), SPEC, P, torch.float32).nbytes
    host = HostAdapterCache(SPEC, P, torch.float32, budget_bytes=2 * one + one // 2)
    w = {name: make_weights(4, seed=i) for i, name in enumerate("abcd")}
    first = host.get("a", w["a"])
    host.get("b", w["b"])
    assert host.get("a", w["a"]) is first and host.num_packs == 2  # a hit packs nothing, a is now young
    host.get("c", w["c"])  # over budget: b (least recently used) goes
    assert host.ids() == ["a", "c"] and host.used_bytes == 2 * one
    big = make_weights(64, modules=LORA_MODULES)
    host.get("big", big)  # larger than the whole budget: kept alone until the next one
    assert host.ids() == ["big"] and host.used_bytes > host.budget_bytes
    host.get("d", w["d"])
    assert host.ids() == ["d"] and host.num_packs == 5


def test_packs_reuse_the_buffers_of_evicted_packs_and_clear_them():
    """A new pack goes into an evicted pack's buffer of the same shape; nothing of the old adapter
    survives (the buffer is zero between matrices and past the end, as a fresh one)."""
    one = pack_adapter(make_weights(4), SPEC, P, torch.float32).nbytes
    host = HostAdapterCache(SPEC, P, torch.float32, budget_bytes=16 * one)
    host.budget_bytes = one  # keep one pack: each new one evicts the previous
    ws = [make_weights(4, seed=i) for i in range(4)] + [make_weights(4, modules=("q_proj",), seed=9)]
    bufs = []
    for i, w in enumerate(ws):
        packed = host.get(f"a{i}", w)
        bufs.append(packed.buf.data_ptr())
        assert torch.equal(packed.buf, reference_pack(w, torch.float32)[0])
    # a0, a1 fresh; a2 into a0's buffer (evicted when a1 came), a3 into a1's; a4 has another shape
    assert bufs[2] == bufs[0] and bufs[3] == bufs[1] and host.spares.reused == 2
    with pytest.raises(ValueError, match="out must be"):
        pack_adapter(ws[0], SPEC, P, torch.float32, out=torch.zeros(1, P))


def test_background_packing_hands_out_each_pack_once_and_keeps_the_budget():
    w = {name: make_weights(4, seed=i) for i, name in enumerate("abc")}
    one = pack_adapter(w["a"], SPEC, P, torch.float32).nbytes
    host = HostAdapterCache(SPEC, P, torch.float32, budget_bytes=3 * one, background=True)
    for name in "abc":
        host.stage(name, w[name])  # returns at once: packed in the worker
    host.stage("a", w["a"])  # staged twice: still one pack
    assert all(name in host for name in "abc")
    got = {name: host.get(name, w[name]) for name in "abc"}  # each waits for its own pack only
    for name, packed in got.items():
        assert torch.equal(packed.buf, reference_pack(w[name], torch.float32)[0])
    assert host.num_packs == 3 and host.used_bytes <= 3 * one and host.ids()[-1] == "c"
    assert host.get("c", w["c"]) is got["c"] and host.num_packs == 3


def test_packs_taken_by_a_load_are_evicted_before_staged_ones():
    """Parallel packs settle together: the budget drops a pack a load already took, not one
    staged for a request still waiting (the oldest staged, which LRU order alone would drop)."""
    w = {name: make_weights(4, seed=i) for i, name in enumerate("abc")}
    one = pack_adapter(w["a"], SPEC, P, torch.float32).nbytes
    host = HostAdapterCache(SPEC, P, torch.float32, budget_bytes=2 * one, background=True, workers=2)
    def staged_and_packed(name):
        host.stage(name, w[name])
        while host.packing(name):
            time.sleep(0.001)

    staged_and_packed("b")
    host.get("a", w["a"])  # settles b first, then packs a for a load: LRU order b, a
    staged_and_packed("c")
    host.settle()  # c in: over budget; a goes, although b is older in LRU order
    assert host.ids() == ["b", "c"]
    assert host.get("b", w["b"]) is not None and host.get("c", w["c"]) is not None and host.num_packs == 3


def test_parallel_pack_workers_recycle_buffers_without_mixing_adapters():
    """Several workers pack at once into recycled buffers of several shapes (as on CUDA with
    mixed ranks): every pack handed out is exactly its own adapter's."""
    ws = [make_weights(4 << (i % 3), seed=i) for i in range(24)]  # ranks 4, 8, 16: three buffer shapes
    one = pack_adapter(ws[0], SPEC, P, torch.float32).nbytes
    host = HostAdapterCache(SPEC, P, torch.float32, budget_bytes=64 * one, background=True, workers=3)
    host.budget_bytes = 3 * one  # tight: most admissions evict, and spares get reused
    for start in range(0, len(ws), 6):
        for i in range(start, start + 6):
            host.stage(f"a{i}", ws[i])
        for i in range(start, start + 6):
            assert torch.equal(host.get(f"a{i}", ws[i]).buf, reference_pack(ws[i], torch.float32)[0]), i
    assert host.num_packs >= len(ws) and host.spares.reused > 0  # (a staged pack evicted before its get is repacked)
    with pytest.raises(ValueError, match="pack threads"):
        HostAdapterCache(SPEC, P, torch.float32, budget_bytes=one, background=True, workers=0)


def adapter_contents(cache: AdapterCache, adapter_id: str, n_pages: int):
    """What the ops read for one adapter: its pages' contents (page-table order) and table rows."""
    t, slot = cache.tables, cache.slot_of(adapter_id)
    pages = t.page_table[slot, :n_pages].long()
    return [cache.pool[:, pages].clone(), *(x[slot].clone() for x in (t.ranks, t.scales, t.a_off, t.b_off))]


def test_evict_and_reload_round_trips_give_identical_pool_contents_without_a_repack():
    w = {"a": make_weights(8, modules=LORA_MODULES, seed=5), "b": make_weights(16, seed=6), "c": ragged_weights()}
    n = {k: pack_adapter(v, SPEC, P, torch.float32).n_pages for k, v in w.items()}
    assert n["c"] <= n["a"]
    pool = torch.zeros(SPEC.num_layers, n["a"] + n["b"], P)
    cache = AdapterCache(pool, PageAllocator(pool.shape[1]), SPEC, max_slots=4, max_rank=64)
    cache.acquire("a", w["a"])
    before = adapter_contents(cache, "a", n["a"])
    buf, ranks, scales, offsets, _ = reference_pack(w["a"], torch.float32)
    assert torch.equal(before[0], buf.view(SPEC.num_layers, n["a"], P)) and torch.equal(before[1], ranks)
    assert torch.equal(before[2], scales) and torch.equal(torch.stack(before[3:]), offsets)
    cache.release("a")
    for name in ("b", "c"):  # the pool is full after b; c evicts a, the least recently used
        cache.acquire(name, w[name])
        cache.release(name)
    assert not cache.is_resident("a") and cache.num_evictions == 1
    others = [p for p in range(pool.shape[1]) if cache.allocator.owner_of(p) != ("adapter", "c")]
    pool[:, others] = -1.0  # whatever KV or b left there: the reload must overwrite it all
    packs = cache.host.num_packs
    cache.acquire("a", w["a"])  # evicts b (LRU), then one copy of the packed form
    after = adapter_contents(cache, "a", n["a"])
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert cache.host.num_packs == packs == 3, "a reload copies the packed form, it does not repack"
    assert cache.num_loads == 4 and cache.num_evictions == 2 and cache.is_resident("c")


def test_prefetch_packs_at_once_even_when_no_pages_are_free():
    num_pages = 3
    pool = torch.zeros(SPEC.num_layers, num_pages, P)
    cache = AdapterCache(pool, PageAllocator(num_pages), SPEC, max_slots=4, max_rank=64)
    cache.allocator.allocate(num_pages, ("kv", "r0"))
    assert cache.prefetch("a", make_weights(4)) is False
    assert "a" in cache.host and cache.host.num_packs == 1 and not cache.is_resident("a")


def test_prefetch_leaves_the_reserve_of_free_pages_to_kv():
    """A prefetch into the last free pages would be evicted by the next KV growth and loaded again."""
    weights = make_weights(4)
    n = pack_adapter(weights, SPEC, P, torch.float32).n_pages
    num_pages = 32 + n
    pool = torch.zeros(SPEC.num_layers, num_pages, P)
    cache = AdapterCache(pool, PageAllocator(num_pages), SPEC, max_slots=4, max_rank=64)
    reserve = cache.prefetch_reserve_pages
    assert reserve == num_pages // 16 > 0
    kv = cache.allocator.allocate(num_pages - (n + reserve - 1), ("kv", "r0"))  # one page short of n + reserve
    assert cache.prefetch("a", weights) is False and not cache.is_resident("a") and "a" in cache.host
    cache.allocator.free(kv[:1], ("kv", "r0"))
    assert cache.prefetch("a", weights) is True and cache.allocator.num_free == reserve
    assert cache.num_loads == 1 and cache.num_evictions == 0


def test_chunked_uploads_equal_one_shot_uploads():
    weights = make_weights(16, modules=LORA_MODULES, seed=9)
    packed = pack_adapter(weights, SPEC, P, torch.float32)
    pools = []
    for staging in (1, 1 << 30):  # one layer per chunk, then all layers at once
        pool = torch.zeros(SPEC.num_layers, 3 + packed.n_pages, P)
        cache = AdapterCache(pool, PageAllocator(pool.shape[1]), SPEC, max_slots=2, max_rank=64)
        up = AdapterUploader(pool, cache.tables, max_staging_bytes=staging)
        pages = list(range(pool.shape[1] - 1, 2, -1))  # descending, not contiguous from 0
        assert up.load(1, pages, packed) is None and up.in_flight == 0
        pools.append((pool, cache.tables.page_table[1].clone()))
        assert torch.equal(pool[:, pages], packed.buf.view(SPEC.num_layers, packed.n_pages, P))
        assert torch.equal(pool[:, :3], torch.zeros(SPEC.num_layers, 3, P)), "pages not given are untouched"
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    with pytest.raises(ValueError, match="pages"):
        up.load(0, [0], packed)


def test_a_prefetch_whose_pack_is_still_running_is_loaded_by_poll_once_packed():
    weights = make_weights(4)
    n = pack_adapter(weights, SPEC, P, torch.float32).n_pages
    pool = torch.zeros(SPEC.num_layers, n + 2, P)
    cache = AdapterCache(pool, PageAllocator(pool.shape[1]), SPEC, max_slots=4, max_rank=64)
    cache.host = HostAdapterCache(SPEC, P, torch.float32, budget_bytes=1 << 30, background=True, workers=1)  # as on CUDA
    gate = threading.Event()
    cache.host._worker.submit(gate.wait)  # the one worker is busy: a's pack waits behind this
    assert cache.prefetch("a", weights) is False  # returns at once, load deferred
    cache.poll()
    assert not cache.is_resident("a") and cache.host.packing("a")
    gate.set()
    cache.host._pending["a"].result()
    cache.poll()
    assert cache.is_resident("a") and cache.cached_ids() == ["a"] and cache.pins("a") == 0
    assert torch.equal(adapter_contents(cache, "a", n)[0], reference_pack(weights, torch.float32)[0].view(SPEC.num_layers, n, P))
    cache.poll()  # nothing deferred any more: a no-op
    assert cache.num_loads == 1 and cache.host.num_packs == 1


def test_prefetch_ahead_packs_only_what_half_the_host_budget_holds_in_queue_order():
    """Adapters deeper in the queue are not packed yet: the host LRU would drop them before use."""
    ws = {f"a{i}": make_weights(4, seed=i) for i in range(6)}
    one = pack_adapter(ws["a0"], SPEC, P, torch.float32).nbytes
    pool = torch.zeros(SPEC.num_layers, 2, P)  # no room in the pool: prefetch only packs
    cache = AdapterCache(pool, PageAllocator(2), SPEC, max_slots=4, max_rank=64, packed_bytes=6 * one + one // 2)
    cache.allocator.allocate(2, ("kv", "r0"))
    queue = [("a0", ws["a0"]), ("a1", ws["a1"]), ("a0", ws["a0"]), ("a2", ws["a2"]), ("a3", ws["a3"]), ("a4", ws["a4"])]
    cache.prefetch_ahead(iter(queue))
    assert cache.host.ids() == ["a0", "a1", "a2"]  # 3 packs = half the budget; a repeat costs nothing
    cache.prefetch_ahead(iter(queue[3:]))  # the queue moved on
    assert cache.host.ids() == ["a0", "a1", "a2", "a3", "a4"]
