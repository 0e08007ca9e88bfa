"""Builders of kernel test inputs: a random pool, adapter tables with random pages, LoRA batches
with a chosen adapter popularity, and paged-attention metadata with random block tables.

Everything is random (never zeros) and laid out exactly as services/engine/memory/layout.py says.
"""

from __future__ import annotations

import torch

from lorafleet.engine.memory.layout import AdapterLayout
from lorafleet.engine.ops.base import AdapterTables, AttentionMeta, LoraBatch, LoraContext
from lorafleet.formats.model_spec import LORA_MODULES, MODULE_INDEX, ModelSpec, RopeSpec

POPULARITY = ("distinct", "uniform", "skewed", "one", "none")
QKV = (MODULE_INDEX["q_proj"], MODULE_INDEX["k_proj"], MODULE_INDEX["v_proj"])
GATE_UP = (MODULE_INDEX["gate_proj"], MODULE_INDEX["up_proj"])
O_PROJ = (MODULE_INDEX["o_proj"],)
DOWN = (MODULE_INDEX["down_proj"],)


def make_spec(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, layers: int = 2) -> ModelSpec:
    return ModelSpec(
        model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=128, max_position=4096,
        rms_norm_eps=1e-5, rope=RopeSpec(theta=10000.0), tie_word_embeddings=False, attention_bias=False,
        eos_token_ids=(1,), bos_token_id=0,
    )  # fmt: skip


def module_shapes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    return tuple(spec.module_shape(name) for name in LORA_MODULES)


def make_pool(layers: int, num_pages: int, page_elems: int, dtype, device, gen: torch.Generator) -> torch.Tensor:
    # Drawn on the device itself: GPU cases hold pools of hundreds of MB.
    device_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    pool = torch.randn(layers, num_pages, page_elems, generator=device_gen, device=device) * 0.5  # [L, num_pages, P]
    return pool.to(dtype)


def make_adapter_tables(
    spec: ModelSpec, slot_ranks: list[dict[str, int]], block_size: int, dtype, device, gen: torch.Generator, spare_pages: int = 7
) -> tuple[torch.Tensor, AdapterTables]:
    """A pool holding one adapter per slot on random, shuffled pages (+ spare pages), and its tables.

    Per-layer ranks vary: a module targeted with rank r gets r in layer 0 and, in other layers, r,
    a smaller rank or 0 (PEFT rank_pattern / layers_to_transform).
    """
    page_elems = 2 * block_size * spec.kv_width
    layouts = [AdapterLayout.build(spec, ranks) for ranks in slot_ranks]
    pages_needed = [lay.num_pages(page_elems) for lay in layouts]
    num_pages = sum(pages_needed) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    num_slots, num_layers = len(slot_ranks), spec.num_layers
    page_table = torch.full((num_slots, max(pages_needed)), -1, dtype=torch.int32)
    ranks = torch.zeros(num_slots, num_layers, 7, dtype=torch.int32)
    a_off = torch.zeros(num_slots, 7, dtype=torch.int64)
    b_off = torch.zeros(num_slots, 7, dtype=torch.int64)
    used = 0
    for s, lay in enumerate(layouts):
        page_table[s, : pages_needed[s]] = perm[used : used + pages_needed[s]].to(torch.int32)
        used += pages_needed[s]
        a_off[s], b_off[s] = torch.tensor(lay.a_off), torch.tensor(lay.b_off)
        for m, r in enumerate(lay.ranks):
            if r == 0:
                continue
            ranks[s, 0, m] = r
            for layer in range(1, num_layers):
                choice = int(torch.randint(0, 4, (1,), generator=gen))
                ranks[s, layer, m] = (r, r, int(torch.randint(1, r + 1, (1,), generator=gen)), 0)[choice]
    scales = torch.rand(num_slots, num_layers, 7, generator=gen) * 1.5 + 0.5
    pool = make_pool(num_layers, num_pages, page_elems, dtype, device, gen)
    tables = AdapterTables(
        page_table=page_table.to(device), ranks=ranks.to(device), scales=scales.to(device),
        a_off=a_off.to(device), b_off=b_off.to(device), module_shapes=module_shapes(spec),
    )  # fmt: skip
    return pool, tables


def random_slot_ranks(num_slots: int, rank_choices: tuple[int, ...], gen: torch.Generator) -> list[dict[str, int]]:
    """Each slot targets a random non-empty subset of modules, each with a rank from rank_choices."""
    out = []
    for _ in range(num_slots):
        ranks = {}
        for name in LORA_MODULES:
            if float(torch.rand(1, generator=gen)) < 0.8:
                ranks[name] = rank_choices[int(torch.randint(0, len(rank_choices), (1,), generator=gen))]
        ranks = ranks or {"q_proj": rank_choices[0]}
        out.append(ranks)
    return out


def request_slots(popularity: str, num_requests: int, num_slots: int, gen: torch.Generator) -> list[int]:
    """Adapter slot of each request (-1: base model only) under a popularity pattern."""
    if popularity == "none":
        return [-1] * num_requests
    if popularity == "one":
        return [int(torch.randint(0, num_slots, (1,), generator=gen))] * num_requests
    if popularity == "distinct":
        return [i % num_slots for i in torch.randperm(num_requests, generator=gen).tolist()]
    draw = torch.rand(num_requests, generator=gen)
    if popularity == "skewed":
        draw = draw**4  # most requests hit the first few slots
    slots = (draw * num_slots).long().clamp_max(num_slots - 1).tolist()
    base_only = (torch.rand(num_requests, generator=gen) < 0.2).tolist()
    return [-1 if b else s for s, b in zip(slots, base_only)]


def make_lora_batch(slots: list[int], lengths: list[int], tables: AdapterTables, device, gen: torch.Generator) -> tuple[LoraBatch, int]:
    """Requests grouped by slot (base-only requests land between groups); segments = runs of one slot."""
    keys = [s + 0.5 if s >= 0 else float(torch.rand(1, generator=gen)) * (max(slots) + 1) for s in slots]
    order = sorted(range(len(slots)), key=lambda i: keys[i])
    token_slot: list[int] = []
    seg_start: list[int] = []
    seg_len: list[int] = []
    seg_slot: list[int] = []
    for i in order:
        s, n = slots[i], lengths[i]
        if s >= 0 and seg_slot and seg_slot[-1] == s and seg_start[-1] + seg_len[-1] == len(token_slot):
            seg_len[-1] += n
        elif s >= 0:
            seg_start.append(len(token_slot)), seg_len.append(n), seg_slot.append(s)
        token_slot += [s] * n
    ranks = tables.ranks.cpu()
    max_rank = max((int(ranks[s].max()) for s in set(seg_slot)), default=0)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    batch = LoraBatch(
        token_slot=i32(token_slot), seg_start=i32(seg_start), seg_len=i32(seg_len), seg_slot=i32(seg_slot),
        max_rank=max_rank, max_seg_len=max(seg_len, default=0), num_segments=len(seg_len),
    )  # fmt: skip
    return batch, len(token_slot)


def make_lora_case(spec, popularity, phase, rank_choices, num_slots, num_requests, block_size, dtype, device, seed, max_prefill=40):
    """(LoraContext, num_tokens) for one test case: decode (1 token/request) or prefill (1..max_prefill)."""
    gen = torch.Generator().manual_seed(seed)
    pool, tables = make_adapter_tables(spec, random_slot_ranks(num_slots, rank_choices, gen), block_size, dtype, device, gen)
    slots = request_slots(popularity, num_requests, num_slots, gen)
    if phase == "decode":
        lengths = [1] * num_requests
    else:
        lengths = torch.randint(1, max_prefill + 1, (num_requests,), generator=gen).tolist()
    batch, num_tokens = make_lora_batch(slots, lengths, tables, device, gen)
    return LoraContext(pool=pool, tables=tables, batch=batch), num_tokens


def make_decode_round_robin(spec, ranks: tuple[int, ...], num_adapters: int, num_tokens: int, dtype, device,
                            gen: torch.Generator) -> LoraContext:
    """A decode batch as the engine's benchmarks make it: num_tokens requests on adapters
    i % num_adapters, adapter j of rank ranks[j % len(ranks)] on q/k/v/o (the S-LoRA settings)."""
    slot_ranks = [dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), ranks[i % len(ranks)]) for i in range(num_adapters)]
    pool, tables = make_adapter_tables(spec, slot_ranks, 16, dtype, device, gen)
    batch, _ = make_lora_batch([i % num_adapters for i in range(num_tokens)], [1] * num_tokens, tables, device, gen)
    return LoraContext(pool, tables, batch)


# ---------------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------------


def make_attention_case(decode_lens, prefill, heads, kv_heads, head_dim, block_size, dtype, device, seed, layers=2):
    """(pool, meta, q, k, v) for decodes with context lengths decode_lens (the new token included)
    and prefills given as (cached_prefix, new_tokens) pairs; blocks on random distinct pages."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = list(decode_lens) + [c + n for c, n in prefill]
    q_lens = [1] * len(decode_lens) + [n for _, n in prefill]
    blocks = [-(-s // block_size) for s in seq_lens]
    num_pages = sum(blocks) + 5
    perm = torch.randperm(num_pages, generator=gen).tolist()
    max_blocks = max(blocks + [1])
    block_tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    slot_mapping = []
    used = 0
    for b, (s, q) in enumerate(zip(seq_lens, q_lens)):
        block_tables[b, : blocks[b]] = torch.tensor(perm[used : used + blocks[b]], dtype=torch.int32)
        used += blocks[b]
        for pos in range(s - q, s):
            slot_mapping.append(int(block_tables[b, pos // block_size]) * block_size + pos % block_size)
    page_elems = 2 * block_size * kv_heads * head_dim
    pool = make_pool(layers, num_pages, page_elems, dtype, device, gen)
    num_tokens = sum(q_lens)
    query_start = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMeta(
        query_start=query_start.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device), slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        num_decodes=len(decode_lens), max_query_len=max(q_lens + [0]), max_seq_len=max(seq_lens + [0]), block_size=block_size,
    )  # fmt: skip
    q = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return pool, meta, q, k, v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere fails)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def defined_entries(ctx: LoraContext, layer: int, modules: tuple[int, ...], width: int) -> torch.Tensor:
    """[T, M, width] bool: the entries of u that shrink defines (token t has an adapter whose
    module modules[i] has rank r in `layer`, column < r)."""
    slot = ctx.batch.token_slot.long()  # [T]
    ranks = ctx.tables.ranks[slot.clamp(min=0), layer][:, list(modules)]  # [T, M]
    ranks = torch.where((slot >= 0)[:, None], ranks, 0)
    return torch.arange(width, device=slot.device)[None, None, :] < ranks[:, :, None]
