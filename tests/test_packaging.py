"""One import root: everything lorafleet installs imports as `lorafleet.…`, and nothing of the
repository shadows a PyPI distribution of the same name (transformers 5.25 imports Hugging Face's
`kernels`, which the repository's kernels/ folder used to shadow from the repository root).

The subprocesses run from the repository root on purpose: that is where pytest and `python -m`
put the root on sys.path, where the old clash happened.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from lorafleet.engine.ops.select import TritonOpsUnavailable, select_elementwise_ops, select_ops

REPO = Path(__file__).resolve().parents[1]
# Folders the layout keeps, and the import name each one is installed under.
FOLDER_ROOTS = {"services": "lorafleet", "kernels": "lorafleet.kernels", "bench": "lorafleet.bench"}
TAKEN_ON_PYPI = ("kernels", "services", "bench")


def _python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _packages_on_disk() -> set[str]:
    names = set()
    for folder, root in FOLDER_ROOTS.items():
        for d in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or "results" in d.relative_to(REPO).parts:
                continue
            if any(d.glob("*.py")):
                rel = d.relative_to(REPO / folder).parts
                names.add(".".join((root, *rel)))
    return names


def test_pyproject_lists_every_package_folder_under_the_lorafleet_root():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {root: folder for folder, root in FOLDER_ROOTS.items()}
    assert set(tool["packages"]) == _packages_on_disk()
    assert all(p == "lorafleet" or p.startswith("lorafleet.") for p in tool["packages"])


@pytest.mark.parametrize("folder", sorted(FOLDER_ROOTS))
def test_top_level_folders_are_not_regular_packages(folder):
    # An __init__.py here would make `import kernels` (or services, bench) from the repo root load
    # this folder instead of the PyPI distribution of that name.
    assert not (REPO / folder / "__init__.py").exists()


@pytest.mark.parametrize("name", TAKEN_ON_PYPI)
def test_names_taken_on_pypi_resolve_to_their_distribution_from_the_repo_root(name):
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"no distribution named {name!r} installed here")
    out = _python(f"import {name}; print({name}.__file__)")
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout and str(REPO / name) not in out.stdout


def test_hf_kernels_transformers_and_peft_load_beside_lorafleet_from_the_repo_root():
    # transformers >= 5.25 imports `kernels` when a Llama config or PEFT loads; the lock installs it.
    importlib.metadata.distribution("kernels")
    code = ("import lorafleet.kernels.lora_ops, lorafleet.engine.model, peft, kernels;"
            "from transformers import LlamaConfig;"
            "c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4);"
            "print(c.model_type, kernels.__file__, lorafleet.kernels.lora_ops.__file__)")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    model_type, hf_kernels, ours = out.stdout.split()
    assert model_type == "llama" and "site-packages" in hf_kernels
    assert Path(ours) == REPO / "kernels" / "lora_ops.py"


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_console_script_imports_the_projects_kernels(cwd, tmp_path):
    exe = shutil.which("lorafleet", path=str(Path(sys.executable).parent))
    assert exe, "the lorafleet console script is not installed beside this python"
    code = "import lorafleet.kernels.lora_ops as m, lorafleet.cli; print(m.__file__)"
    out = _python(code, cwd=REPO if cwd == "repo" else tmp_path)
    assert out.returncode == 0 and Path(out.stdout.strip()) == REPO / "kernels" / "lora_ops.py", out.stderr
    helped = subprocess.run([exe, "--help"], cwd=REPO if cwd == "repo" else tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "engine" in helped.stdout, helped.stderr


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version.split(";")[0].strip()
    return pins


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@pytest.mark.skipif(bool(os.environ.get("LORAFLEET_UNLOCKED")), reason="scripts/test-deps.sh installs without the lock")
def test_installed_versions_are_the_locked_ones():
    # What scripts/setup.sh installs is what the lock says; a stale .venv fails here, not in a user's.
    lock = _lock()
    assert lock["torch"] == "2.13.0" and "triton" in lock and "transformers" in lock
    wrong = {}
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        if name in lock and dist.version.split("+")[0] != lock[name]:
            wrong[name] = (dist.version, lock[name])
    assert not wrong, f"installed (version, locked): {wrong}; run bash scripts/setup.sh"
    for name in ("torch", "transformers", "peft", "aiokafka", "msgspec"):
        assert _canonical(name) in lock, f"{name} is not in requirements.lock"


def test_select_ops_imports_the_triton_ops_from_lorafleet_kernels():
    # "triton" on the CPU is the same import path auto takes on a CUDA device (it runs under the
    # Triton interpreter here); the classes must come from this project's kernels/.
    lora, attn = select_ops("triton", torch.device("cpu"))
    assert type(lora).__module__ == "lorafleet.kernels.lora_ops"
    assert type(attn).__module__ == "lorafleet.kernels.attention_ops"
    assert type(select_elementwise_ops("auto", "triton", torch.device("cpu"))).__module__ == "lorafleet.kernels.fused_ops"
    lora, attn = select_ops("auto", torch.device("cpu"))
    assert type(lora).__module__.endswith("ops.torch_ref")


@pytest.mark.parametrize("kind", ["auto", "triton"])
def test_triton_import_failure_on_a_gpu_is_an_error_not_a_silent_fallback(kind, monkeypatch):
    for mod in ("lorafleet.kernels.lora_ops", "lorafleet.kernels.attention_ops", "lorafleet.kernels.fused_ops"):
        monkeypatch.setitem(sys.modules, mod, None)  # the next import of it raises ImportError
    cuda = torch.device("cuda")  # only its type is read before the import
    with pytest.raises(TritonOpsUnavailable, match="LORAFLEET_OPS=torch"):
        select_ops(kind, cuda)
    with pytest.raises(TritonOpsUnavailable, match="--ops torch"):
        select_elementwise_ops("auto", kind, cuda)
    lora, _ = select_ops("torch", cuda)  # asked for: no error
    assert type(lora).__module__.endswith("ops.torch_ref")
