"""The adapter root in object storage (contract section 3): its URL forms, the two files an
adapter folder holds, and the adapters it holds. obstore only: the gateway and `lorafleet
adapters ls` use it without the engine's dependencies."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import obstore
from obstore.store import LocalStore, S3Store

from lorafleet.common import settings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class S3Options:
    endpoint: str = ""  # LORAFLEET_S3_ENDPOINT; empty: obstore reads AWS_ENDPOINT_URL(_S3) itself
    allow_http: bool = False  # LORAFLEET_S3_ALLOW_HTTP
    request_timeout_s: float = 300.0  # one whole request, body included (large adapters)
    connect_timeout_s: float = 10.0


    @classmethod
    def from_env(cls) -> "S3Options":
        """The options of the LORAFLEET_S3_* and STORE_REQUEST_TIMEOUT_S variables."""
        return cls(endpoint=settings.read("S3_ENDPOINT"), allow_http=settings.read("S3_ALLOW_HTTP"),
                   request_timeout_s=settings.read("STORE_REQUEST_TIMEOUT_S"))


def open_root(root: str, s3: S3Options) -> obstore.store.ObjectStore:
    """An obstore store for a root URL: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path."""
    parsed = urlparse(root)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"adapter root {root!r} has no bucket (expected s3://bucket/prefix)")
        options = {
            "allow_http": s3.allow_http,
            "timeout": f"{s3.request_timeout_s}s",
            "connect_timeout": f"{s3.connect_timeout_s}s",
        }
        extra = {"endpoint": s3.endpoint} if s3.endpoint else {}
        # Retries are ours (with_retries), so that one policy and one set of logs covers them.
        return S3Store(
            parsed.netloc,
            prefix=parsed.path.strip("/") or None,
            client_options=options,
            retry_config={"max_retries": 0},
            **extra,
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"adapter root {root!r}: file URLs must be file:///absolute/path")
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a plain path
        raise ValueError(f"adapter root {root!r}: scheme {parsed.scheme!r} is not supported (file://, s3://, or a plain path)")
    else:
        path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"adapter root {root!r} is not an existing folder")
    return LocalStore(prefix=path)


def adapter_sizes(objects: Iterable[dict]) -> list[tuple[str, int]]:
    """(adapter id, bytes of its two files) of every folder holding both a config and weights,
    sorted by id, from a listing's objects (obstore's `path` and `size`)."""
    files: dict[str, dict[str, int]] = {}
    for obj in objects:
        folder, _, name = obj["path"].rpartition("/")
        files.setdefault(folder, {})[name] = int(obj["size"])
    return sorted((folder, sum(names.values())) for folder, names in files.items()
                  if CONFIG_FILE in names and WEIGHTS_FILE in names)
