"""Layout of the unified pool: one tensor of equal pages for KV blocks and adapter weights.

::

    pool: [L, num_pages, P]          P = page_elems = 2 * block_size * kv_width  (model dtype)

               page 0        page 1        page 2        page 3        page 4   ...
    layer 0  [ KV seq7 b0 ][ ad#3 vp0  ][ KV seq2 b0 ][ ad#3 vp1  ][  free    ]
    layer 1  [ KV seq7 b0 ][ ad#3 vp0  ][ KV seq2 b0 ][ ad#3 vp1  ][  free    ]
      ...        (a page id is valid in every layer: one allocation covers all L layers)

    KV page p, layer l:      pool[l, p].view(2, block_size, n_kv_heads, head_dim)   K then V
    adapter page, layer l:   P consecutive elements of the adapter's per-layer virtual buffer

An adapter's weights for ONE layer form a virtual buffer (same layout in every layer)::

    [ A_q: r_q x in_q ][ B_q^T: r_q x out_q ][ A_k ... ][ B_k^T ... ] ... [ A_down ][ B_down^T ]
      ^a_off[q]          ^b_off[q]                  (only targeted modules; starts 16-aligned)

    virtual element v  ->  pool[l, page_table[slot, v // P], v % P]

NOTE: rows of A are rows of PEFT's lora_A.weight ([r, in]); rows of B^T are columns of PEFT's
lora_B.weight ([out, r]). Ranks are the adapter's own (no padding to a maximum rank); a row may
straddle two pages, so readers compute the page of every element (the page table is tiny and
stays in cache). Grouped-query attention only changes P (kv_width = n_kv_heads * head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.formats.model_spec import LORA_MODULES, ModelSpec

ALIGN = 16  # elements; every matrix starts on a 16-element boundary (vector loads)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class PoolGeometry:
    num_layers: int
    num_pages: int
    block_size: int  # tokens per KV page
    num_kv_heads: int
    head_dim: int

    @property
    def page_elems(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim

    @classmethod
    def for_model(cls, spec: ModelSpec, num_pages: int, block_size: int) -> "PoolGeometry":
        return cls(spec.num_layers, num_pages, block_size, spec.num_kv_heads, spec.head_dim)

    def page_bytes(self, dtype_bytes: int) -> int:
        return self.num_layers * self.page_elems * dtype_bytes


@dataclass(frozen=True)
class AdapterLayout:
    """Where each targeted module's A and B^T live in the adapter's per-layer virtual buffer.

    ranks[m] is the rank of module m (0: not targeted in any layer). Per-layer ranks (PEFT's
    rank_pattern with layer keys, layers_to_transform) are <= ranks[m]; the adapter tables
    carry them per layer.
    """

    ranks: tuple[int, ...]  # [7]
    a_off: tuple[int, ...]  # [7] element offset of A_m (0 where untargeted)
    b_off: tuple[int, ...]  # [7] element offset of B_m^T
    layer_elems: int  # size of one layer's virtual buffer

    def num_pages(self, page_elems: int) -> int:
        return max(1, -(-self.layer_elems // page_elems))

    @classmethod
    def build(cls, spec: ModelSpec, ranks: dict[str, int]) -> "AdapterLayout":
        pos = 0
        r_out, a_out, b_out = [], [], []
        for name in LORA_MODULES:
            r = ranks.get(name, 0)
            in_f, out_f = spec.module_shape(name)
            if r == 0:
                r_out.append(0), a_out.append(0), b_out.append(0)
                continue
            a_out.append(pos)
            pos = _align(pos + r * in_f)
            b_out.append(pos)
            pos = _align(pos + r * out_f)
            r_out.append(r)
        return cls(tuple(r_out), tuple(a_out), tuple(b_out), pos)


def adapter_layout(weights, spec: ModelSpec) -> AdapterLayout:
    """The AdapterLayout of LoraWeights `weights` under `spec`, memoized on the weights for the last
    spec: the scheduler and the prefetch ask every step for the requests near the queue head, and
    building one takes ~50 us. (Weights are never mutated after validation, so the layout of a
    given spec never changes; the memo is the engine's, kept off the format's own fields.)"""
    cached = weights.__dict__.get("_engine_layout")
    if cached is None or cached[0] is not spec:
        cached = weights.__dict__["_engine_layout"] = (spec, AdapterLayout.build(spec, weights.config.ranks_by_module()))
    return cached[1]
