"""Local-disk spill tier of the node store: adapters evicted from the host-memory budget are kept
as canonical files on local disk (LRU, own byte budget), so a node can serve many more adapters
than fit in memory without downloading or validating them again.

    object storage --fetch+validate--> shm (memory budget) --evict--> spill dir (disk budget)
                                         ^-------------------- restore -----------------'

The spill owns its folder; files are written atomically (temp + rename) and removed when its own
LRU evicts them or the store stops.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path


class DiskSpill:
    def __init__(self, folder: Path, budget_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self._files: OrderedDict[str, tuple[Path, int]] = OrderedDict()  # adapter id -> (path, bytes)
        self.used_bytes = 0
        self.restores = 0
        for stale in self.folder.glob("*.spill"):  # a previous run's files are not in the LRU
            stale.unlink(missing_ok=True)

    def keep(self, adapter_id: str, shm_file: Path, name: str) -> None:
        """Copy an evicted shm file to disk (before the shm copy is deleted)."""
        if adapter_id in self._files:
            self._files.move_to_end(adapter_id)
            return
        size = shm_file.stat().st_size
        if size > self.budget_bytes:
            return
        while self.used_bytes + size > self.budget_bytes:
            self._drop(next(iter(self._files)))
        target = self.folder / f"{name}.spill"
        temp = self.folder / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(shm_file, temp)
        os.replace(temp, target)
        self._files[adapter_id] = (target, size)
        self.used_bytes += size

    def restore(self, adapter_id: str, shm_path: Path) -> int | None:
        """Copy a spilled adapter back into shm at `shm_path` (atomically); its size, or None."""
        entry = self._files.get(adapter_id)
        if entry is None or not entry[0].exists():
            if entry is not None:
                self._drop(adapter_id)
            return None
        temp = shm_path.with_name(f".{shm_path.name}.{os.getpid()}.tmp")
        shutil.copyfile(entry[0], temp)
        os.replace(temp, shm_path)
        self._files.move_to_end(adapter_id)
        self.restores += 1
        return entry[1]

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._files

    def clear(self) -> None:
        for adapter_id in list(self._files):
            self._drop(adapter_id)

    def _drop(self, adapter_id: str) -> None:
        path, size = self._files.pop(adapter_id)
        path.unlink(missing_ok=True)
        self.used_bytes -= size
