"""The light install: `pip install lorafleet` (no `engine` extra) gives the client, the gateway and
the command line without torch, triton or transformers, as the README says.

Two proofs: in this environment, a subprocess whose imports of the engine's packages fail imports
the client and the gateway and builds every command's parser; and a fresh virtualenv installs
the project without extras, through the lock, and runs them (slow: it installs from the index).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE_PACKAGES = ("torch", "triton", "transformers", "tokenizers", "safetensors", "peft", "numpy")
LIGHT_MODULES = ("lorafleet.client", "lorafleet.client_cli", "lorafleet.gateway.service", "lorafleet.gateway.app",
                 "lorafleet.common.adapter_root", "lorafleet.cli", "lorafleet.health")
# What the light install must run: the parsers of every command (their --help), and a probe.
CHECK = f"""
import sys
for module in {LIGHT_MODULES!r}:
    __import__(module)
from lorafleet import cli
for command in ("gateway", "send", "tail", "cancel", "up", "ingest", "engine", "adapters"):
    try:
        cli.build_parser().parse_args([command, "--help"])
    except SystemExit:
        pass
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {ENGINE_PACKAGES!r})
assert not loaded, loaded
print("light ok")
"""
BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ENGINE_PACKAGES!r}:
            raise ImportError("the light install has no " + name)
sys.meta_path.insert(0, Block())
"""


def test_the_core_dependencies_hold_none_of_the_engines_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert not core & set(ENGINE_PACKAGES), core & set(ENGINE_PACKAGES)
    engine = {dep.split(">")[0].strip() for dep in project["optional-dependencies"]["engine"]}
    assert {"torch", "triton", "transformers"} <= engine


def test_client_gateway_and_cli_import_without_the_engines_packages(tmp_path):
    ran = subprocess.run([sys.executable, "-c", BLOCKER + CHECK], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0 and "light ok" in ran.stdout, ran.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_fresh_virtualenv_installs_the_light_client_through_the_lock(tmp_path):
    source = tmp_path / "src"  # a copy: pip's build writes into the tree it installs
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy(REPO / name, source / name)
    for folder in ("services", "kernels", "bench"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(source / "requirements.lock"),
                              str(source)], capture_output=True, text=True, timeout=800)
    assert install.returncode == 0, install.stderr[-3000:]
    for package in ENGINE_PACKAGES:
        missing = subprocess.run([str(python), "-c", f"import {package}"], capture_output=True, timeout=60)
        assert missing.returncode != 0, f"the light install pulled {package}"
    ran = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "light ok" in ran.stdout, ran.stderr[-3000:]
    probe = subprocess.run([str(venv / "bin" / "lorafleet"), "gateway", "--check", "live", "--ready-file",
                            str(tmp_path / "none.json")], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1 and "unhealthy" in probe.stdout, probe.stdout + probe.stderr
