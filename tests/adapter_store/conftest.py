"""Fixtures for the adapter store: a tiny Llama model, real PEFT adapters for it, adapter roots
holding good and deliberately broken adapters, and the shared S3 server fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.demo.tiny_models import build_peft_adapter, build_tiny_model
from lorafleet.formats.model_spec import ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    # Llama, hidden 64, 2 layers, 4 heads, vocab 512 (the shared builder's defaults)
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama", seed=3)


@pytest.fixture(scope="session")
def spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def peft_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Real PEFT save_pretrained folders: 'r4_qv' (rank 4, q/v) and 'r8_all' (rank 8, all seven)."""
    out = tmp_path_factory.mktemp("peft")
    return {
        "r4_qv": build_peft_adapter(tiny_model_dir, out / "r4_qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
        "r8_all": build_peft_adapter(tiny_model_dir, out / "r8_all", r=8, lora_alpha=16, target_modules=ALL_MODULES, seed=2),
    }


class AdapterRoot:
    """A local adapter root folder that tests fill with good and broken adapters."""

    def __init__(self, path: Path, peft_adapters: dict[str, Path]) -> None:
        self.path = path
        self._peft = peft_adapters

    def add(self, adapter_id: str, like: str = "r4_qv") -> Path:
        """Copy a real PEFT adapter under `adapter_id`."""
        folder = self.path / adapter_id
        folder.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, WEIGHTS):
            shutil.copyfile(self._peft[like] / name, folder / name)
        return folder

    def add_files(self, adapter_id: str, files: dict[str, bytes]) -> Path:
        folder = self.path / adapter_id
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder

    def edit_tensors(self, adapter_id: str, edit) -> None:
        """Apply `edit(tensors: dict[name, Tensor]) -> dict` to the adapter's safetensors file."""
        path = self.path / adapter_id / WEIGHTS
        tensors = load_file(str(path))
        save_file(edit(dict(tensors)), str(path))

    def weights_size(self, adapter_id: str) -> int:
        return (self.path / adapter_id / WEIGHTS).stat().st_size

    def remove(self, adapter_id: str) -> None:
        shutil.rmtree(self.path / adapter_id)


@pytest.fixture
def adapter_root(tmp_path, peft_adapters) -> AdapterRoot:
    root = tmp_path / "adapters"
    root.mkdir()
    return AdapterRoot(root, peft_adapters)


def rename_first(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    name = sorted(n for n in tensors if old in n)[0]
    tensors[name.replace(old, new)] = tensors.pop(name)
    return tensors


@pytest.fixture
def broken_adapter_kinds():
    """Each kind of invalid adapter: (how to build it from an AdapterRoot, words its reason names)."""

    def missing_config(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)
        (root.path / adapter_id / CONFIG).unlink()

    def unparseable_config(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)
        (root.path / adapter_id / CONFIG).write_text('{"r": 4, "target_modules": [')

    def pickle_only(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)
        (root.path / adapter_id / WEIGHTS).unlink()
        # Never a real pickle here: the store must not even open it.
        (root.path / adapter_id / "adapter_model.bin").write_bytes(b"\x80\x04not-really-a-pickle")

    def wrong_tensor_names(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)
        root.edit_tensors(adapter_id, lambda t: rename_first(t, "q_proj", "qkv_fused"))

    def module_not_targeted(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)  # q/v adapter; k_proj tensors appear that the config does not target

        def add_k(t):
            for name in [n for n in t if ".q_proj." in n]:
                t[name.replace(".q_proj.", ".k_proj.")] = t[name].clone()
            return t

        root.edit_tensors(adapter_id, add_k)

    def wrong_shapes(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)

        def shrink(t):
            name = sorted(n for n in t if "lora_A" in n)[0]
            t[name] = t[name][:-1].clone()  # lora_A: [r, in] -> [r - 1, in]
            return t

        root.edit_tensors(adapter_id, shrink)

    def nan_values(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)

        def poison(t):
            name = sorted(n for n in t if "lora_B" in n)[-1]
            t[name] = t[name].clone()
            t[name][0, 0] = float("nan")
            return t

        root.edit_tensors(adapter_id, poison)

    def config_rank_too_big(root: AdapterRoot, adapter_id: str) -> None:
        root.add(adapter_id)
        path = root.path / adapter_id / CONFIG
        cfg = json.loads(path.read_text())
        cfg["r"] = 100_000
        path.write_text(json.dumps(cfg))

    return {
        "missing_config": (missing_config, ["adapter_config.json", "missing"]),
        "unparseable_config": (unparseable_config, ["adapter_config.json", "not valid JSON"]),
        "pickle_only": (pickle_only, ["adapter_model.safetensors", "missing", "adapter_model.bin", "pickle"]),
        "wrong_tensor_names": (wrong_tensor_names, ["qkv_fused", "not a LoRA"]),
        "module_not_targeted": (module_not_targeted, ["k_proj", "not targeted"]),
        "wrong_shapes": (wrong_shapes, ["shape", "expected"]),
        "nan_values": (nan_values, ["NaN"]),
        "rank_over_max": (config_rank_too_big, ["rank 100000", "outside"]),
    }
