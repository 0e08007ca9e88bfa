"""`lorafleet adapters validate | push | ls`, run as a user runs them, against a folder root and a
real S3 API (moto's server): what push uploads is what the adapter store then serves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import obstore
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapter_store.errors import AdapterNotFoundError
from lorafleet.adapter_store.store import AdapterStore
from lorafleet.common.adapter_root import CONFIG_FILE, WEIGHTS_FILE, S3Options
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from lorafleet.formats.model_spec import ModelSpec


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafleet.cli", "adapters", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture
def adapter_dir(zoo, tmp_path):
    folder = tmp_path / "a"
    shutil.copytree(zoo.adapter("mha", "r4-pattern"), folder)
    return folder


def test_validate_says_ok_or_the_reason(zoo, adapter_dir, tmp_path):
    done = _cli("validate", str(adapter_dir), "--model", str(zoo.model("mha")))
    assert done.returncode == 0 and done.stdout.startswith("ok:") and "rank 4" in done.stdout, done.stderr
    two = tmp_path / "two-problems"  # every problem is named, not only the first
    shutil.copytree(adapter_dir, two)
    tensors = load_file(str(two / WEIGHTS_FILE))
    names = sorted(tensors)
    tensors[names[0]] = tensors[names[0]][:, :-1].contiguous()  # a wrong shape
    tensors[names[-1]] = torch.full_like(tensors[names[-1]], float("nan"))  # non-finite values
    save_file(tensors, str(two / WEIGHTS_FILE))
    done = _cli("validate", str(two), "--model", str(zoo.model("mha")))
    assert done.returncode == 1 and "has shape" in done.stderr and "NaN" in done.stderr, done.stderr
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    (bad / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    done = _cli("validate", str(bad), "--model", str(zoo.model("mha")))
    assert done.returncode == 1 and done.stderr.startswith("invalid:"), done.stderr
    (bad / WEIGHTS_FILE).unlink()
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    done = _cli("validate", str(bad), "--model", str(zoo.model("mha")))
    assert done.returncode == 1 and done.stderr.startswith("invalid:") and WEIGHTS_FILE in done.stderr, done.stderr


async def test_push_to_a_folder_then_the_store_serves_it(zoo, adapter_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    done = _cli("push", str(adapter_dir), f"file://{root}/tenant/pirate", "--model", str(zoo.model("mha")))
    assert done.returncode == 0 and "pushed:" in done.stdout, done.stderr
    again = _cli("push", str(adapter_dir), f"file://{root}/tenant/pirate", "--model", str(zoo.model("mha")))
    assert again.returncode == 1 and "--replace" in again.stderr
    assert _cli("push", str(adapter_dir), f"file://{root}/tenant/pirate", "--model", str(zoo.model("mha")),
                "--replace").returncode == 0
    listed = _cli("ls", f"file://{root}")
    assert listed.returncode == 0 and listed.stdout.split("\t")[0] == "tenant/pirate", listed.stdout
    spec = ModelSpec.from_pretrained(zoo.model("mha"))
    store = AdapterStore.from_root(f"file://{root}", spec, memory_bytes=1 << 24, max_adapter_bytes=1 << 24,
                                   negative_ttl_s=0.0, max_rank=64)
    got, want = await store.get("tenant/pirate"), load_peft_adapter_dir(adapter_dir, spec)
    assert got.config == want.config and all(got.a[k].equal(want.a[k]) for k in want.a)


async def test_push_to_s3_then_the_store_serves_it_and_a_half_push_is_no_adapter(
        zoo, adapter_dir, s3_server, s3_bucket):
    env = {"LORAFLEET_S3_ENDPOINT": s3_server.endpoint, "LORAFLEET_S3_ALLOW_HTTP": "1"}
    target = f"s3://{s3_bucket}/fleet/tenant/pirate"
    done = _cli("push", str(adapter_dir), target, "--model", str(zoo.model("mha")), env=env)
    assert done.returncode == 0, done.stderr
    assert _cli("ls", f"s3://{s3_bucket}/fleet", env=env).stdout.split("\t")[0] == "tenant/pirate"
    spec = ModelSpec.from_pretrained(zoo.model("mha"))
    s3 = S3Options(endpoint=s3_server.endpoint, allow_http=True)
    store = AdapterStore.from_root(f"s3://{s3_bucket}/fleet", spec, memory_bytes=1 << 24, max_adapter_bytes=1 << 24,
                                   negative_ttl_s=0.0, max_rank=64, s3=s3)
    assert (await store.get("tenant/pirate")).config == load_peft_adapter_dir(adapter_dir, spec).config
    # A push cut short after the weights (the config goes last) leaves no adapter, not an invalid one.
    raw = s3_server.obstore(s3_bucket)
    obstore.put(raw, f"fleet/tenant/cut/{WEIGHTS_FILE}", (adapter_dir / WEIGHTS_FILE).read_bytes())
    with pytest.raises(AdapterNotFoundError, match=CONFIG_FILE):
        await store.get("tenant/cut")
    assert _cli("ls", f"s3://{s3_bucket}/fleet", env=env).stdout.count("\n") == 1  # only the whole adapter
