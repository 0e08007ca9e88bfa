"""The node store at fleet scale: 10,000 distinct adapters streamed through a host-memory budget
that holds 1% of them, with the rest spilled to local disk and restored without a second read
from the adapter root. Real files, real validation, real canonical files; only small adapters
(rank 1 on q_proj, one weights file) so the test stays fast."""

from __future__ import annotations

import asyncio
import json
import os

import torch
from safetensors.torch import save_file
from structlog.testing import capture_logs

from lorafleet.adapter_store.shm import FILE_SUFFIX, SharedMemoryStore
from lorafleet.adapter_store.source import AdapterSource
from lorafleet.adapter_store.spill import DiskSpill
from lorafleet.formats.lora_weights import load_canonical

NUM_ADAPTERS = 10_000
IN_MEMORY = 100  # adapters the memory budget holds
ALPHA0 = 1_000_000
WINDOW = 20  # gets in flight at once (< IN_MEMORY, so a window's files are all still there)


def adapter_id(i: int) -> str:
    # 100 tenants of 100 adapters: folders stay small, as a listing of the root walks the parent folder
    return f"t{i // 100}/a{i}"


def write_adapters(root, spec, n: int) -> None:
    """n PEFT folders sharing one weights file (hard links); adapter i's lora_alpha is ALPHA0 + i
    (same number of digits for all: every canonical file has the same size), so every file read
    back names its adapter."""
    in_f, out_f = spec.module_shape("q_proj")
    tensors = {}
    for layer in range(spec.num_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.full((1, in_f), 0.25)
        tensors[f"{prefix}.lora_B.weight"] = torch.full((out_f, 1), 0.5)
    shared = root / "weights.safetensors"
    root.mkdir(parents=True)
    save_file(tensors, str(shared))
    for i in range(n):
        folder = root / adapter_id(i)
        folder.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": ALPHA0 + i, "target_modules": ["q_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        os.link(shared, folder / "adapter_model.safetensors")


def adapter_index(path, spec) -> int:
    return int(load_canonical(path, spec, max_rank=8).config.lora_alpha) - ALPHA0


async def test_ten_thousand_adapters_stream_through_memory_and_disk(tmp_path, spec):
    root = tmp_path / "root"
    write_adapters(root, spec, NUM_ADAPTERS)
    shm, spill_dir = tmp_path / "shm", tmp_path / "spill"
    source = AdapterSource(str(root), max_adapter_bytes=1 << 20)
    probe = SharedMemoryStore(source, spec, tmp_path / "probe", memory_bytes=1 << 20, negative_ttl_s=0)
    one = (await probe.get_path(adapter_id(0))).stat().st_size  # every file has this size
    await probe.aclose()
    spill = DiskSpill(spill_dir, budget_bytes=NUM_ADAPTERS * one)
    store = SharedMemoryStore(source, spec, shm, memory_bytes=IN_MEMORY * one, negative_ttl_s=0, spill=spill)
    fetches_before = source.stats.fetches
    with capture_logs():  # ~40,000 log lines stay off the console
        for start in range(0, NUM_ADAPTERS, WINDOW):  # WINDOW requests in flight, like a busy node
            ids = range(start, min(start + WINDOW, NUM_ADAPTERS))
            paths = await asyncio.gather(*(store.get_path(adapter_id(i)) for i in ids))
            assert adapter_index(paths[0], spec) == start  # the file may be evicted already: read the first
            in_shm = [p for p in shm.iterdir() if p.name.endswith(FILE_SUFFIX)]
            assert len(in_shm) <= IN_MEMORY and store.cache.used_bytes <= IN_MEMORY * one  # the memory budget holds
        assert source.stats.fetches - fetches_before == NUM_ADAPTERS
        assert len(store.cache) == IN_MEMORY and len(list(spill_dir.glob("*.spill"))) == NUM_ADAPTERS - IN_MEMORY
        # Stream them again in another order: every one comes back from memory or disk, none from the root.
        order = list(range(0, NUM_ADAPTERS, 7)) + list(range(NUM_ADAPTERS - 1, NUM_ADAPTERS - IN_MEMORY, -1))
        for i in order:
            path = await store.get_path(adapter_id(i))
            assert adapter_index(path, spec) == i
        assert source.stats.fetches - fetches_before == NUM_ADAPTERS, "a spilled adapter was downloaded again"
        assert spill.restores >= len(order) - IN_MEMORY
        assert len([p for p in shm.iterdir() if p.name.endswith(FILE_SUFFIX)]) == IN_MEMORY
        await store.aclose()
    assert not list(spill_dir.glob("*.spill")) and not list(shm.glob(f"*{FILE_SUFFIX}"))
