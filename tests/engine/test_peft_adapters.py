"""PEFT adapter reading: scaling as PEFT computes it; what cannot be served is rejected by name."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.formats.lora_weights import load_canonical, load_peft_adapter_dir
from lorafleet.formats.model_spec import ModelSpec
from lorafleet.formats.peft_config import InvalidAdapterError, parse_peft_config


@pytest.fixture(scope="module")
def spec(zoo):
    return ModelSpec.from_pretrained(zoo.model("mha"))


def _copy(zoo, tmp_path, name="r8-all-rslora"):
    dst = tmp_path / name
    shutil.copytree(zoo.adapter("mha", name), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_scaling_matches_peft(zoo, spec):
    """Each module's rank and scale, as PEFT's layers hold them: alpha / r, or alpha / sqrt(r) with
    rsLoRA, each from the module's own rank_pattern / alpha_pattern entry when it has one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = ("r8-all-rslora", "r4-pattern", "r16-qv-layer1")
    configs = [json.loads((zoo.adapter("mha", name) / "adapter_config.json").read_text()) for name in names]
    # the combinations that matter: patterns with and without rsLoRA
    assert {c["use_rslora"] for c in configs if c["rank_pattern"] and c["alpha_pattern"]} == {True, False}
    for name in names:
        w = load_peft_adapter_dir(zoo.adapter("mha", name), spec)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.model("mha")), zoo.adapter("mha", name))
        expected = {}
        for mod_name, mod in peft_model.named_modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
                layer = int(mod_name.split("layers.")[1].split(".")[0])
                expected[(layer, mod_name.rsplit(".", 1)[1])] = (mod.r["default"], mod.scaling["default"])
        got = {(t.layer, t.module): (t.rank, t.scale) for t in w.config.targets}
        assert got.keys() == expected.keys(), name
        for key, (r, s) in expected.items():
            assert got[key][0] == r and math.isclose(got[key][1], s, rel_tol=1e-9), (name, key)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="lora_only"), "bias"),
        (dict(target_modules=["embed_tokens"]), "embedding"),
        (dict(target_modules=["lm_head", "q_proj"]), "lm_head"),
        (dict(peft_type="PREFIX_TUNING"), "peft_type"),
        (dict(r=0), "r must be"),
        (dict(r=999), "rank 999"),
        (dict(layers_to_transform=[7]), "layers_to_transform"),
        (dict(layers_pattern="h", layers_to_transform=[0]), "layers_pattern"),
    ],
)
def test_config_rejections_name_the_reason(zoo, spec, tmp_path, change, reason):
    path = _copy(zoo, tmp_path)
    _edit_config(path, **change)
    with pytest.raises(InvalidAdapterError, match=reason):
        load_peft_adapter_dir(path, spec)


def test_tensor_rejections(zoo, spec, tmp_path):
    path = _copy(zoo, tmp_path)
    f = path / "adapter_model.safetensors"
    good = load_file(f)
    a_key = next(k for k in good if "q_proj.lora_A" in k)

    def write(tensors):
        save_file(tensors, f)

    write({**good, a_key: torch.zeros(3, 64)})
    with pytest.raises(InvalidAdapterError, match=r"shape \(3, 64\), expected \(8, 64\)"):
        load_peft_adapter_dir(path, spec)
    bad = dict(good)
    bad[a_key] = good[a_key].clone()
    bad[a_key][0, 0] = float("nan")
    write(bad)
    with pytest.raises(InvalidAdapterError, match="NaN"):
        load_peft_adapter_dir(path, spec)
    write({k: v for k, v in good.items() if k != a_key})
    with pytest.raises(InvalidAdapterError, match="missing"):
        load_peft_adapter_dir(path, spec)
    write({**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)})
    with pytest.raises(InvalidAdapterError, match="lm_head|not a LoRA"):
        load_peft_adapter_dir(path, spec)
    write({**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)})
    with pytest.raises(InvalidAdapterError, match="DoRA|not a LoRA"):
        load_peft_adapter_dir(path, spec)
    f.write_bytes(b"\x00not safetensors")
    with pytest.raises(InvalidAdapterError, match="safetensors"):
        load_peft_adapter_dir(path, spec)


def test_pickle_only_adapter_is_never_loaded(zoo, spec, tmp_path):
    path = _copy(zoo, tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="pickle files are never loaded"):
        load_peft_adapter_dir(path, spec)


def test_adapter_of_another_model_shape_is_rejected(zoo):
    gqa = ModelSpec.from_pretrained(zoo.model("gqa"))
    with pytest.raises(InvalidAdapterError, match="shape"):
        load_peft_adapter_dir(zoo.adapter("mha", "r1-attn"), gqa)


def test_full_name_and_regex_target_modules(spec):
    full = parse_peft_config({"r": 2, "lora_alpha": 4, "target_modules": ["model.layers.0.self_attn.q_proj"]}, spec, 64)
    assert [(t.layer, t.module) for t in full.targets] == [(0, "q_proj")]
    regex = parse_peft_config({"r": 2, "lora_alpha": 4, "target_modules": r".*\.1\.mlp\.(gate|up)_proj"}, spec, 64)
    assert [(t.layer, t.module) for t in regex.targets] == [(1, "gate_proj"), (1, "up_proj")]
    allin = parse_peft_config({"r": 2, "target_modules": "all-linear"}, spec, 64)
    assert len(allin.targets) == 7 * spec.num_layers


def test_canonical_round_trip(zoo, spec, tmp_path):
    w = load_peft_adapter_dir(zoo.adapter("mha", "r4-pattern"), spec)
    w.save_canonical(tmp_path / "c.safetensors")
    back = load_canonical(tmp_path / "c.safetensors", spec, 64)
    assert back.config == w.config
    assert all(torch.equal(back.a[k], w.a[k]) and torch.equal(back.b[k], w.b[k]) for k in w.a)


def test_absent_fields_take_peft_defaults(spec):
    """A hand-written config holding only what it must: PEFT's LoraConfig defaults (lora_alpha 8,
    no rsLoRA) apply, as PEFT itself would load it."""
    config = parse_peft_config({"r": 4, "target_modules": ["q_proj"]}, spec, 64)
    assert (config.lora_alpha, config.use_rslora) == (8.0, False)
    assert {t.scale for t in config.targets} == {8 / 4}


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe{", "not valid JSON"),
    ({"r": 4, "target_modules": ["q_proj"], "lora_alpha": "8"}, "lora_alpha must be a finite number"),
    ({"r": 4, "target_modules": ["q_proj"], "lora_alpha": True}, "lora_alpha must be a finite number"),
    ({"r": 4, "target_modules": ["q_proj"], "lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"r": 4, "target_modules": []}, "target_modules must be"),
    ({"r": 4, "target_modules": 5}, "target_modules must be"),
    ({"r": True, "target_modules": ["q_proj"]}, "r must be an integer"),
    ({"r": "4", "target_modules": ["q_proj"]}, "r must be an integer"),
])
def test_malformed_fields_are_rejected_by_name(spec, raw, reason):
    with pytest.raises(InvalidAdapterError, match=reason):
        parse_peft_config(raw, spec, 64)


def test_a_parsed_config_is_frozen(spec):
    config = parse_peft_config({"r": 4, "target_modules": ["q_proj"]}, spec, 64)
    with pytest.raises(AttributeError):
        config.rank = 8
    with pytest.raises(AttributeError):
        config.targets[0].scale = 1.0


def test_rank_and_layer_limits_are_exact(spec):
    """The last valid and first invalid rank (per module, through rank_pattern) and layer index."""
    last = spec.num_layers - 1

    def parse(**fields):
        return parse_peft_config({"r": 4, "target_modules": ["q_proj", "v_proj"], **fields}, spec, 16)

    ranks = parse(r=16, rank_pattern={"v_proj": 1}).ranks_by_module()
    assert ranks == {"q_proj": 16, "v_proj": 1}  # the largest rank per module, over layers
    assert {t.layer for t in parse(layers_to_transform=[0, last], layers_pattern=None).targets} == {0, last}
    assert {t.layer for t in parse(layers_to_transform=last, layers_pattern=["layers"]).targets} == {last}
    for fields, reason in [(dict(rank_pattern={"v_proj": 0}), r"rank 0 of .*v_proj"),
                           (dict(r=17), r"rank 17 of .*outside \[1, 16\]"),
                           (dict(layers_to_transform=[-1]), r"\[-1\] outside"),
                           (dict(layers_to_transform=[last + 1]), "outside the model"),
                           (dict(layers_to_transform=[True]), "must be an int or a list of ints"),
                           (dict(layers_to_transform="0"), "must be an int or a list of ints"),
                           (dict(layers_to_transform=[0], layers_pattern=["h"]), "layers_pattern")]:
        with pytest.raises(InvalidAdapterError, match=reason):
            parse(**fields)
