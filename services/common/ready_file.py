"""Ready files: each service, and `lorafleet up` for the whole stack, writes one once it can take
work (the Kubernetes probes, the supervisor and `lorafleet send` / `tail` wait for it)."""

from __future__ import annotations

import json
from pathlib import Path


def write_ready_file(path: str | None, payload: dict) -> None:
    """Write `payload` as JSON to `path` atomically (a rename: a reader never sees half of it);
    no path, nothing written."""
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)
