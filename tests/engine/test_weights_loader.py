"""Checkpoint loading: the whole model, a tensor-parallel rank's slices read straight from the files
(equal to sharding the whole model, and holding no more than the slice), random weights sharded
layer by layer (the same values), and the checkpoint errors that name the tensor at fault."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.engine.tp.partition import make_plan
from lorafleet.engine.tp.shard_weights import shard_layer, shard_model
from lorafleet.engine.weights_loader import CheckpointError, ModelWeights, load_weights, random_weights
from lorafleet.formats.model_spec import ModelSpec

CPU = torch.device("cpu")


def _tensors(w: ModelWeights) -> dict[str, torch.Tensor]:
    out = {"embed": w.embed, "final_norm": w.final_norm, "lm_head": w.lm_head}
    for i, layer in enumerate(w.layers):
        for name, t in vars(layer).items():
            if t is not None:
                out[f"{i}.{name}"] = t
    return out


def _assert_same(got: ModelWeights, want: ModelWeights) -> None:
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (got.lm_head is got.embed) == (want.lm_head is want.embed)


# mha: 4 KV heads; gqa: 2 KV heads (replicated at W = 4); qwen2: q/k/v biases, tied embeddings
CASES = [("mha", 2), ("mha", 4), ("gqa", 2), ("gqa", 4), ("qwen2", 2), ("qwen2", 4)]


@pytest.mark.parametrize("model,world", CASES, ids=[f"{m}-W{w}" for m, w in CASES])
def test_a_rank_reads_its_shard_straight_from_the_files(zoo, model, world):
    spec = ModelSpec.from_pretrained(zoo.model(model))
    whole = load_weights(zoo.model(model), spec, torch.float32, CPU)
    for rank in range(world):
        plan = make_plan(spec, world, rank)
        got = load_weights(zoo.model(model), spec, torch.float32, CPU, slices=plan.weight_slices())
        _assert_same(got, shard_model(whole, spec, plan))
        for name, t in _tensors(got).items():  # nothing keeps a whole matrix alive behind a slice
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def test_random_weights_sharded_layer_by_layer_are_the_sharded_random_model(zoo):
    spec = ModelSpec.from_pretrained(zoo.model("gqa"))
    plan = make_plan(spec, 4, 3)
    got = random_weights(spec, torch.float32, CPU, seed=5, per_layer=lambda layer: shard_layer(layer, spec, plan))
    _assert_same(got, shard_model(random_weights(spec, torch.float32, CPU, seed=5), spec, plan))


def _copy(zoo, tmp_path, model="mha"):
    folder = tmp_path / model
    shutil.copytree(zoo.model(model), folder)
    spec = ModelSpec.from_pretrained(folder)
    (weights_file,) = folder.glob("*.safetensors")
    return folder, spec, weights_file, load_file(weights_file)


def test_a_missing_tensor_is_named(zoo, tmp_path):
    folder, spec, f, tensors = _copy(zoo, tmp_path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight is missing"):
        load_weights(folder, spec, torch.float32, CPU)


def test_a_wrong_shape_is_named_even_when_only_a_slice_is_read(zoo, tmp_path):
    folder, spec, f, tensors = _copy(zoo, tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = torch.cat([tensors[name], tensors[name]], dim=1)  # [H, 2q]
    save_file(tensors, f)
    plan = make_plan(spec, 2, 0)
    with pytest.raises(CheckpointError, match=rf"{name} has shape .* config.json implies"):
        load_weights(folder, spec, torch.float32, CPU, slices=plan.weight_slices())


def test_an_unexpected_tensor_and_a_pickle_only_folder_are_refused(zoo, tmp_path):
    folder, spec, f, tensors = _copy(zoo, tmp_path)
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra"):
        load_weights(folder, spec, torch.float32, CPU)
    f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_weights(folder, spec, torch.float32, CPU)
