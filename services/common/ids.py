"""Adapter id syntax (CONTRACT.md section 3), shared by the adapter store and ingest.

An adapter id is one or more segments joined by ``/``; each segment is 1-64 characters of
``[A-Za-z0-9._-]`` and is neither ``.`` nor ``..``. The id doubles as a folder path under the
adapter root, so this check is also what keeps a request from escaping that root.
"""

from __future__ import annotations

import re

SEGMENT_MAX_CHARS = 64
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RULE = "a segment must be 1-64 characters of [A-Za-z0-9._-]"


def validate_adapter_id(adapter_id: object) -> None:
    """Raise ValueError naming the rule broken when `adapter_id` is not a valid adapter id."""
    if not isinstance(adapter_id, str):
        raise ValueError(f"adapter id must be a string, got {type(adapter_id).__name__}")
    if not adapter_id:
        raise ValueError("adapter id must not be empty")
    for index, segment in enumerate(adapter_id.split("/")):
        where = f"segment {index + 1} of adapter id {adapter_id[:200]!r}"
        if not segment:
            raise ValueError(f"{where} is empty (no leading, trailing or doubled '/')")
        if len(segment) > SEGMENT_MAX_CHARS:
            raise ValueError(f"{where} has {len(segment)} characters, at most {SEGMENT_MAX_CHARS} are allowed: {_RULE}")
        if not _SEGMENT.fullmatch(segment):
            bad = sorted({c for c in segment if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
            raise ValueError(f"{where} holds characters {bad!r}: {_RULE}")
        if segment in (".", ".."):
            raise ValueError(f"{where} is {segment!r}: a segment must not be '.' or '..'")


def is_valid_adapter_id(adapter_id: object) -> bool:
    try:
        validate_adapter_id(adapter_id)
    except ValueError:
        return False
    return True
