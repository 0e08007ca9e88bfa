"""The built-in demo model and demo adapters that `lorafleet up` serves when given no --model or
--adapters: built locally on first use (nothing is downloaded) and cached.

Cache layout (one folder per recipe; a changed recipe or corpus gets a new key, old ones stay):

    <cache_dir>/demo-<key>/model/                        HF model folder (config, safetensors, tokenizer)
    <cache_dir>/demo-<key>/adapters/demo/pirate/...      adapter root: <root>/<adapter id>/adapter_*.*
    <cache_dir>/demo-<key>/manifest.json                 the recipe it was built from
    <cache_dir>/demo-<key>.lock                          held (flock) while one process builds

NOTE: the final folder only ever appears through an atomic rename of a finished build, so its
existence means complete. Two processes calling at once: the lock makes the second wait, then
find the folder. A build killed midway leaves a `.demo-<key>.tmp-*` folder, removed by the
next build under the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from lorafleet.common import settings
from lorafleet.demo import recipe as R
from lorafleet.demo.corpus import CORPUS
from lorafleet.demo.recipe import DemoExample

# Bump when the build code changes what it writes for the same recipe (training loop, layout).
BUILDER_VERSION = 2


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path  # a Hugging Face model folder, as `--model` takes
    adapters_root: Path  # a plain path, as `--adapters` takes
    adapter_ids: tuple[str, ...]
    # adapter id -> prompts with the answer the adapter gives greedily (then EOS)
    adapter_examples: Mapping[str, tuple[DemoExample, ...]]
    base_prompts: tuple[str, ...]  # prompts the base model continues readably

    def adapter_dir(self, adapter_id: str) -> Path:
        if adapter_id not in self.adapter_ids:
            raise KeyError(f"{adapter_id!r} is not a demo adapter; demo adapters: {', '.join(self.adapter_ids)}")
        return self.adapters_root / adapter_id


def recipe_key() -> str:
    """A short hash of everything that decides the built bytes: recipe, corpus, builder version."""
    payload = json.dumps(
        {"builder": BUILDER_VERSION, "recipe": R.recipe_as_dict(), "corpus": CORPUS},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _stderr_report(line: str) -> None:
    print(f"[lorafleet demo] {line}", file=sys.stderr, flush=True)


def ensure_demo_assets(cache_dir: Path, report: Callable[[str], None] | None = None) -> DemoAssets:
    """The demo assets under `cache_dir`, built first if missing (about a minute on 2 idle CPU cores).

    Safe to call from several processes at once; `report` receives progress lines (default:
    printed to stderr)."""
    report = report or _stderr_report
    cache_dir = Path(cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = recipe_key()
    final = cache_dir / f"demo-{key}"
    if not final.is_dir():
        with _exclusive_lock(cache_dir / f"demo-{key}.lock"):
            if not final.is_dir():  # another process may have built it while we waited
                _build_into(final, cache_dir, key, report)
    _check_manifest(final, key)
    return _assets_at(final)


def _build_into(final: Path, cache_dir: Path, key: str, report: Callable[[str], None]) -> None:
    from lorafleet.demo.build import build_demo_assets

    for stale in cache_dir.glob(f".demo-{key}.tmp-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    report(f"building the demo model and adapters into {final} (first use only)")
    staging = Path(tempfile.mkdtemp(prefix=f".demo-{key}.tmp-", dir=cache_dir))
    try:
        build_demo_assets(staging, report)
        manifest = {"key": key, "builder": BUILDER_VERSION, "recipe": R.recipe_as_dict()}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        _fsync_tree(staging)
        os.rename(staging, final)  # atomic; fails if `final` appeared meanwhile (then we keep that one)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"demo assets ready in {time.monotonic() - started:.0f} s")


def _assets_at(root: Path) -> DemoAssets:
    return DemoAssets(
        model_dir=root / "model",
        adapters_root=root / "adapters",
        adapter_ids=tuple(a.adapter_id for a in R.ADAPTERS),
        adapter_examples={a.adapter_id: a.examples for a in R.ADAPTERS},
        base_prompts=R.BASE_PROMPTS,
    )


def _check_manifest(root: Path, key: str) -> None:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"demo assets folder {root} has no readable manifest.json; delete the folder to rebuild") from exc
    if manifest.get("key") != key:
        raise RuntimeError(f"demo assets folder {root} holds key {manifest.get('key')!r}, expected {key!r}; delete it to rebuild")


class _exclusive_lock:
    """flock on a lock file: blocks until no other process holds it; released on close/exit."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _fsync_tree(root: Path) -> None:
    # A crash right after the rename must not leave a "complete" folder with empty files.
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def demo_model_and_adapters(model: str, adapters: str) -> tuple[str, str]:
    """Fill in the built-in demo model / adapters where none is given (built once, cached under
    LORAFLEET_CACHE_DIR)."""
    if model and adapters:
        return model, adapters
    demo = ensure_demo_assets(Path(settings.read("CACHE_DIR")).expanduser())
    return model or str(demo.model_dir), adapters or str(demo.adapters_root)
