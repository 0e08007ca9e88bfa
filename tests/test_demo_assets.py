"""The deterministic tiny models, tokenizer, PEFT adapters and demo assets (services/demo)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.demo import recipe as R
from lorafleet.demo.assets import ensure_demo_assets, recipe_key
from lorafleet.demo.build import build_demo_assets
from lorafleet.demo.tiny_models import build_peft_adapter, build_tiny_model
from lorafleet.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from lorafleet.formats.model_spec import ModelSpec


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _greedy(model, tok, prompt: str, n: int = 12) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID)
    return out[0, ids.shape[1]:].tolist()


def test_tokenizer_round_trips_utf8_and_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    text = "Café au lait, naïve 🙂🚀 — 日本語 and the baker."
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID
    assert tok.decode(ids, skip_special_tokens=True) == text
    # trained merges: common corpus words take fewer tokens than their bytes
    assert len(tok("The baker opened the shop").input_ids) < 12


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(arch="llama"),
        dict(arch="llama", num_heads=8, num_kv_heads=2, tie_embeddings=True),
        dict(
            arch="llama",
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        dict(arch="mistral", num_kv_heads=2),
        dict(arch="qwen2", num_kv_heads=2, head_dim=32),
    ],
    ids=["llama", "llama-gqa-tied", "llama3-rope", "mistral-gqa", "qwen2-headdim"],
)
def test_tiny_model_is_deterministic_loads_and_decodes_variously(tmp_path, kwargs):
    first = build_tiny_model(tmp_path / "m1", **kwargs)
    second = build_tiny_model(tmp_path / "m2", **kwargs)
    assert _digest(first) == _digest(second)
    other_seed = build_tiny_model(tmp_path / "m3", **kwargs, seed=1)
    assert _digest(other_seed)["model.safetensors"] != _digest(first)["model.safetensors"]

    spec = ModelSpec.from_pretrained(first)
    assert spec.model_type == kwargs["arch"]
    assert spec.num_kv_heads == kwargs.get("num_kv_heads", 4)
    assert spec.eos_token_ids == (EOS_ID,) and spec.bos_token_id == BOS_ID
    assert spec.tie_word_embeddings == kwargs.get("tie_embeddings", False)
    if "rope_scaling" in kwargs:
        assert spec.rope.scaling_type == "llama3" and spec.rope.original_max_position == 64

    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(first)
    assert len(tok) <= model.config.vocab_size
    if kwargs["arch"] == "qwen2":  # random biases, so an engine that drops them is caught
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    outputs = {tuple(_greedy(model, tok, p)) for p in ("The baker", "Hello world", "A program is", "x")}
    assert len(outputs) == 4, "greedy continuations of a random model should differ across prompts"
    # random models may fall into a loop on some prompt, but not on most
    lively = [out for out in outputs if len(set(out)) > 3]
    assert len(lively) >= 3, f"degenerate greedy outputs {outputs}"


def test_peft_adapter_is_deterministic_and_changes_outputs(tmp_path):
    from peft import PeftModel

    base = build_tiny_model(tmp_path / "base", num_heads=8, num_kv_heads=2)
    kwargs = dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=True,
        layers_to_transform=[0, 1],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"down_proj": 4},
        seed=3,
    )
    a1 = build_peft_adapter(base, tmp_path / "a1", **kwargs)
    a2 = build_peft_adapter(base, tmp_path / "a2", **kwargs)
    assert _digest(a1)["adapter_model.safetensors"] == _digest(a2)["adapter_model.safetensors"]
    assert _digest(a1)["adapter_config.json"] == _digest(a2)["adapter_config.json"]
    config = json.loads((a1 / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["use_rslora"] is True and config["rank_pattern"] == {"down_proj": 4}

    tok = AutoTokenizer.from_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), a1).eval()
    down = wrapped.base_model.model.model.layers[0].mlp.down_proj
    assert down.lora_A["default"].weight.shape[0] == 4  # rank_pattern honoured
    assert down.lora_B["default"].weight.abs().sum() > 0  # B non-zero: the adapter is not a no-op
    prompts = ("The baker", "Hello world", "A program is", "The sea is large")
    changed = sum(_greedy(plain, tok, p) != _greedy(wrapped, tok, p) for p in prompts)
    assert changed >= 3


# --- the demo assets of `lorafleet up` -------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
_ENSURE_SCRIPT = """
import json, sys
from pathlib import Path
from lorafleet.demo.assets import ensure_demo_assets
assets = ensure_demo_assets(Path(sys.argv[1]))
print(json.dumps({"model_dir": str(assets.model_dir), "adapters_root": str(assets.adapters_root)}))
"""


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Build the demo assets once, from two processes racing on one fresh cache folder."""
    cache = tmp_path_factory.mktemp("demo-cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENSURE_SCRIPT, str(cache)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert answers[0] == answers[1]
    builds = sum(err.count("building the demo model") for _, err in results)
    assert builds == 1, "exactly one of the racing processes builds; the other waits and reuses it"
    lines: list[str] = []
    assets = ensure_demo_assets(cache, report=lines.append)
    assert lines == [], "a second call finds the cached build"
    assert str(assets.model_dir) == answers[0]["model_dir"]
    return assets


def test_demo_layout_and_model_shape(demo):
    assert list(demo.adapters_root.parent.glob(".demo-*")) == []  # no staging folder left
    spec = ModelSpec.from_pretrained(demo.model_dir)
    assert (spec.model_type, spec.num_heads, spec.num_kv_heads) == ("llama", 8, 2)
    ranks, rslora, module_sets = set(), set(), set()
    for adapter_id in demo.adapter_ids:
        folder = demo.adapters_root / adapter_id
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((folder / "adapter_config.json").read_text())
        ranks.add(config["r"])
        rslora.add(config["use_rslora"])
        module_sets.add(tuple(config["target_modules"]))
        assert str(demo.adapters_root) not in (folder / "adapter_config.json").read_text()
        load_peft_adapter_dir(folder, spec)  # the engine's own validation accepts it
    assert len(demo.adapter_ids) >= 3 and all(a.startswith("demo/") for a in demo.adapter_ids)
    assert len(ranks) >= 3 and rslora == {True, False} and len(module_sets) == len(demo.adapter_ids)


def _answer_argmax(model, tok, examples) -> list[tuple[list[int], list[int], float]]:
    """Teacher-forced: for each example, (answer ids + EOS, the model's argmax at those
    positions, the smallest top-1 margin over them). Argmax equal to the answer at every
    position is exactly "greedy decoding produces the answer, then stops"."""
    rows = []
    for example in examples:
        prompt = tok(example.prompt).input_ids
        want = tok(example.answer, add_special_tokens=False).input_ids + [EOS_ID]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + want])).logits[0]  # [T, V]
        # logits at position t predict token t+1: the answer's predictions start at len(prompt)-1
        answer_logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(want)]  # [A, V]
        top2 = answer_logits.topk(2, dim=-1).values
        rows.append((want, answer_logits.argmax(-1).tolist(), float((top2[:, 0] - top2[:, 1]).min())))
    return rows


def test_each_demo_adapter_steers_to_its_answer(demo):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(demo.model_dir)
    answers_seen = set()
    for adapter_id in demo.adapter_ids:
        examples = demo.adapter_examples[adapter_id]
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(demo.model_dir, dtype=torch.float32), demo.adapter_dir(adapter_id)
        ).eval()
        for (want, got, margin), example in zip(_answer_argmax(model, tok, examples), examples):
            assert got == want, f"{adapter_id} on {example.prompt!r}: {tok.decode(got)!r}"
            # wide margins: an engine in bf16 still decodes the same answer
            assert margin > 2.0, f"{adapter_id} on {example.prompt!r}: top-1 margin only {margin:.2f}"
            answers_seen.add(example.answer)
        with model.disable_adapter():
            assert all(got != want for want, got, _ in _answer_argmax(model, tok, examples))
        # and real greedy generation through PEFT, stopping at EOS
        first = examples[0]
        generated = _greedy(model, tok, first.prompt, n=64)
        assert generated[-1] == EOS_ID and tok.decode(generated, skip_special_tokens=True) == first.answer
    assert len(answers_seen) == sum(len(v) for v in demo.adapter_examples.values())


def test_demo_base_model_continues_in_english(demo):
    from lorafleet.demo.corpus import CORPUS

    known_words = set(re.findall(r"[a-z]+", CORPUS.lower()))
    tok = AutoTokenizer.from_pretrained(demo.model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo.model_dir, dtype=torch.float32).eval()
    for prompt in demo.base_prompts:
        text = tok.decode(_greedy(model, tok, prompt, n=24), skip_special_tokens=True)
        words = re.findall(r"[a-z]+", text.lower())
        assert len(words) >= 8, text
        # the final word may be cut mid-way by the token limit
        assert sum(w in known_words for w in words[:-1]) >= 0.8 * (len(words) - 1), text


def test_demo_build_is_deterministic(tmp_path):
    """The full build path (base training, adapter training, saving) on a scaled-down recipe."""
    base = dataclasses.replace(R.BASE, hidden_size=64, intermediate_size=128, num_layers=2, train_steps=3)
    adapters = [dataclasses.replace(a, train_steps=3) for a in R.ADAPTERS[:2]]
    for name in ("one", "two"):
        build_demo_assets(tmp_path / name, report=lambda line: None, base=base, adapters=adapters)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) >= 5 + 2 * 2
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_demo_cache_key_follows_the_recipe(monkeypatch):
    key = recipe_key()
    monkeypatch.setattr(R, "BASE", dataclasses.replace(R.BASE, train_steps=R.BASE.train_steps + 1))
    assert recipe_key() != key
