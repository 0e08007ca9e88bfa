"""Engine parts without a model: a tiny ModelSpec, a CPU pool, and real LoraWeights with random values."""

from __future__ import annotations

import torch

from lorafleet.engine.memory.adapter_cache import AdapterCache
from lorafleet.engine.memory.allocator import PageAllocator
from lorafleet.engine.memory.kv_cache import KVCacheManager
from lorafleet.engine.memory.layout import PoolGeometry
from lorafleet.engine.request import Request, SamplingParams
from lorafleet.engine.scheduler import Scheduler, SchedulerConfig
from lorafleet.formats.lora_weights import LoraWeights
from lorafleet.formats.model_spec import ModelSpec, RopeSpec
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry

SPEC = ModelSpec(
    model_type="llama", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, vocab_size=100, max_position=4096, rms_norm_eps=1e-6, rope=RopeSpec(theta=10000.0),
    tie_word_embeddings=False, attention_bias=False, eos_token_ids=(2,), bos_token_id=1,
)
BLOCK = 4  # tokens per page; page_elems = 2 * 4 * 16 = 128


def make_weights(rank: int, modules=("q_proj", "v_proj"), seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    targets = tuple(TargetEntry(l, m, rank, 2.0) for l in range(SPEC.num_layers) for m in modules)
    a, b = {}, {}
    for t in targets:
        in_f, out_f = SPEC.module_shape(t.module)
        a[(t.layer, t.module)] = torch.randn(rank, in_f, generator=g)
        b[(t.layer, t.module)] = torch.randn(out_f, rank, generator=g)
    return LoraWeights(PeftLoraConfig(rank, 2.0 * rank, False, targets), a, b)


def make_scheduler(num_pages: int, max_batched_tokens: int = 64, max_num_seqs: int = 16, slots: int = 8):
    geom = PoolGeometry.for_model(SPEC, num_pages, BLOCK)
    pool = torch.zeros(SPEC.num_layers, num_pages, geom.page_elems)
    alloc = PageAllocator(num_pages)
    adapters = AdapterCache(pool, alloc, SPEC, max_slots=slots, max_rank=64)
    kv = KVCacheManager(alloc, adapters, BLOCK)
    return Scheduler(SchedulerConfig(max_num_seqs, max_batched_tokens), kv, adapters)


def make_request(rid: str, prompt_len: int, max_tokens: int, adapter: tuple[str, LoraWeights] | None = None) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    aid, w = adapter if adapter else (None, None)
    return Request(rid, list(range(3, 3 + prompt_len)), params, aid, w)


def fake_step(s: Scheduler, token: int = 7):
    """One schedule/update round with a fake model that always samples `token`."""
    out = s.schedule()
    sampled = {e.request.request_id: token for e in out.scheduled if e.samples}
    s.update_from_output(out, sampled, eos_ids=SPEC.eos_token_ids)
    return out


def check_accounting(s: Scheduler) -> None:
    """Every page is free, KV of exactly one request, or one resident adapter's; pins match."""
    alloc = s.kv.allocator
    assert alloc.num_free + alloc.num_used == alloc.num_pages
    assert alloc.num_used == s.kv.used_pages() + s.adapters.resident_pages()
    running_adapters: dict[str, int] = {}
    for r in s.running:
        if r.adapter_id:
            running_adapters[r.adapter_id] = running_adapters.get(r.adapter_id, 0) + 1
    for aid, n in running_adapters.items():
        assert s.adapters.pins(aid) == n
    for aid in s.adapters.cached_ids():
        assert s.adapters.pins(aid) == 0
