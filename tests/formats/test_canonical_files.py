"""An engine's adapters in hand are the node store's canonical files mapped, not copied (no second
copy of an adapter in host memory beside its pack); a rotten canonical file is refused as an
invalid adapter with the reason, whatever the corruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lorafleet.formats.lora_weights import InvalidAdapterError, LoraWeights, load_canonical
from lorafleet.formats.model_spec import ModelSpec, RopeSpec
from lorafleet.formats.peft_config import PeftLoraConfig, TargetEntry

SPEC = ModelSpec(
    model_type="llama", hidden_size=1024, intermediate_size=2048, num_layers=4, num_heads=8, num_kv_heads=8,
    head_dim=128, vocab_size=100, max_position=256, rms_norm_eps=1e-6, rope=RopeSpec(theta=10000.0),
    tie_word_embeddings=False, attention_bias=False, eos_token_ids=(2,), bos_token_id=1,
)


def _mapped_file(ptr: int) -> str:
    """The file whose mapping holds address `ptr` in this process ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= ptr < end:
            return parts[5] if len(parts) == 6 else ""
    raise AssertionError(f"address {ptr:#x} is not mapped")


def _canonical(path: Path, rank: int = 64, layers: int = 4) -> LoraWeights:
    g = torch.Generator().manual_seed(0)
    targets = tuple(TargetEntry(l, m, rank, 0.5) for l in range(layers) for m in ("q_proj", "v_proj"))
    a = {(t.layer, t.module): torch.randn(rank, 1024, generator=g).to(torch.bfloat16) for t in targets}
    b = {(t.layer, t.module): torch.randn(1024, rank, generator=g).to(torch.bfloat16) for t in targets}
    w = LoraWeights(PeftLoraConfig(rank, 32.0, False, targets), a, b)
    w.save_canonical(path)
    return w


def test_a_canonical_file_is_read_equal_and_mapped_not_copied(tmp_path):
    path = tmp_path / "a.safetensors"
    want = _canonical(path)
    got = load_canonical(path, SPEC, max_rank=64)
    assert got.config == want.config
    tensors = [*got.a.values(), *got.b.values()]
    assert all(torch.equal(got.a[k], want.a[k]) and torch.equal(got.b[k], want.b[k]) for k in want.a)
    assert {_mapped_file(t.data_ptr()) for t in tensors} == {str(path)}  # the file's own pages
    assert _mapped_file(tensors[0].clone().data_ptr()) != str(path)  # (the check tells a copy apart)


def test_a_canonical_file_without_its_metadata_is_an_invalid_adapter(tmp_path):
    save_file({"0.q_proj.A": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(InvalidAdapterError, match="malformed"):
        load_canonical(tmp_path / "c.safetensors", SPEC, max_rank=64)


@pytest.fixture(scope="module")
def small_canonical(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("canon") / "s.safetensors"
    _canonical(path, rank=2, layers=1)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_is_refused_as_invalid_or_read_whole(tmp_path, small_canonical, data):
    blob = bytearray(small_canonical)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "f.safetensors"
    path.write_bytes(bytes(blob[: data.draw(st.integers(0, len(blob)))]))
    try:
        w = load_canonical(path, SPEC, max_rank=64)
    except InvalidAdapterError:
        return
    assert w.nbytes > 0 and all(torch.isfinite(t.float()).all() for t in (*w.a.values(), *w.b.values()))
