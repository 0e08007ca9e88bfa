"""Fetching and validating adapters from a local root: every rejection reason, sizes checked
before reading, pickle never read, and the three root spellings."""

from __future__ import annotations

import pytest
import torch

from lorafleet.adapter_store.errors import AdapterNotFoundError, InvalidAdapterError
from lorafleet.adapter_store.source import AdapterSource
from lorafleet.adapter_store.store import AdapterStore
from lorafleet.formats.lora_weights import load_peft_adapter_dir

KINDS = [
    "unparseable_config",
    "pickle_only",
    "wrong_tensor_names",
    "module_not_targeted",
    "wrong_shapes",
    "nan_values",
    "rank_over_max",
]


def make_store(root: str, spec, *, max_adapter_bytes: int = 1 << 20, negative_ttl_s: float = 0.0) -> AdapterStore:
    return AdapterStore.from_root(
        root, spec, memory_bytes=1 << 24, max_adapter_bytes=max_adapter_bytes, negative_ttl_s=negative_ttl_s, max_rank=256
    )


def assert_same_weights(got, expected) -> None:
    assert got.config == expected.config
    assert got.a.keys() == expected.a.keys() and got.b.keys() == expected.b.keys()
    for key in expected.a:
        torch.testing.assert_close(got.a[key], expected.a[key], rtol=0, atol=0)
        torch.testing.assert_close(got.b[key], expected.b[key], rtol=0, atol=0)


async def test_good_adapters_load_exactly_as_peft_saved_them(adapter_root, spec, peft_adapters):
    adapter_root.add("tenant-a/q-v", like="r4_qv")
    adapter_root.add("tenant-b/all", like="r8_all")
    store = make_store(str(adapter_root.path), spec)
    for adapter_id, like in (("tenant-a/q-v", "r4_qv"), ("tenant-b/all", "r8_all")):
        weights = await store.get(adapter_id)
        assert_same_weights(weights, load_peft_adapter_dir(peft_adapters[like], spec))
    assert (await store.get("tenant-b/all")).config.rank == 8
    assert {t.module for t in (await store.get("tenant-a/q-v")).config.targets} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("kind", KINDS)
async def test_each_invalid_adapter_is_rejected_with_its_reason(kind, adapter_root, spec, broken_adapter_kinds):
    build, words = broken_adapter_kinds[kind]
    build(adapter_root, f"bad/{kind}")
    store = make_store(str(adapter_root.path), spec)
    with pytest.raises(InvalidAdapterError) as info:
        await store.get(f"bad/{kind}")
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert f"bad/{kind}" not in store.cache


async def test_pickle_files_are_never_read(adapter_root, spec, broken_adapter_kinds):
    build, _ = broken_adapter_kinds["pickle_only"]
    build(adapter_root, "pickled")
    store = make_store(str(adapter_root.path), spec)
    with pytest.raises(InvalidAdapterError):
        await store.get("pickled")
    assert store.source.stats.lists == 1
    assert store.source.stats.gets == 0 and store.source.stats.bytes_read == 0


async def test_oversize_adapter_is_rejected_before_any_read(adapter_root, spec):
    adapter_root.add("big", like="r8_all")
    adapter_root.add("small", like="r4_qv")
    size = adapter_root.weights_size("big")
    assert adapter_root.weights_size("small") < size
    store = make_store(str(adapter_root.path), spec, max_adapter_bytes=size - 1)
    with pytest.raises(InvalidAdapterError) as info:
        await store.get("big")
    message = str(info.value)
    assert f"{size} bytes" in message and "LORAFLEET_STORE_MAX_ADAPTER_BYTES" in message and "not read" in message
    assert store.source.stats.gets == 0 and store.source.stats.bytes_read == 0
    await store.get("small")  # under the limit: accepted, so the limit is what rejected "big"
    assert store.source.stats.gets == 2


async def test_missing_adapter_and_namespace_folder_are_not_found(adapter_root, spec):
    adapter_root.add("tenant-a/x")
    store = make_store(str(adapter_root.path), spec)
    for adapter_id in ("nobody", "tenant-a", "tenant-a/x/deeper"):
        with pytest.raises(AdapterNotFoundError, match=adapter_id):
            await store.get(adapter_id)
    assert store.source.stats.gets == 0


async def test_malformed_id_is_refused_without_touching_storage(adapter_root, spec):
    store = make_store(str(adapter_root.path), spec)
    for bad in ("../etc", "a//b", ""):
        with pytest.raises(ValueError):
            await store.get(bad)
    assert store.source.stats.lists == 0


async def test_file_url_plain_path_and_relative_path_roots_agree(adapter_root, spec, monkeypatch):
    adapter_root.add("t/a")
    monkeypatch.chdir(adapter_root.path.parent)
    roots = [f"file://{adapter_root.path}", str(adapter_root.path), adapter_root.path.name]
    loaded = [await make_store(root, spec).get("t/a") for root in roots]
    for weights in loaded[1:]:
        assert_same_weights(weights, loaded[0])


@pytest.mark.parametrize(
    "root, words",
    [
        ("gs://bucket/x", ["'gs'", "not supported"]),
        ("file://host/abs", ["file:///absolute/path"]),
        ("/nonexistent/adapters/root", ["not an existing folder"]),
        ("s3:///prefix-without-bucket", ["no bucket"]),
    ],
)
def test_bad_roots_are_refused_at_start(root, words):
    with pytest.raises(ValueError) as info:
        AdapterSource(root, max_adapter_bytes=1 << 20)
    for word in words:
        assert word in str(info.value)


async def test_weights_without_a_config_are_not_an_adapter_yet(adapter_root, spec, broken_adapter_kinds):
    """A push writes the config last: a folder with weights only is an upload under way, answered
    not found (retried later), never remembered as an invalid adapter."""
    build, _ = broken_adapter_kinds["missing_config"]
    build(adapter_root, "bad/half-pushed")
    store = make_store(str(adapter_root.path), spec)
    with pytest.raises(AdapterNotFoundError, match="no adapter_config.json .yet"):
        await store.get("bad/half-pushed")
