"""Fixtures of the service tests: real broker and redis-server (tests/infra_fixtures.py) and a
model folder holding the demo tokenizer and a config.json (no weights: ingest needs none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VOCAB_SIZE = 512
CONTEXT_LEN = 64  # small, so prompt_too_long is easy to reach


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from lorafleet.demo.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("ingest-model")
    build_tokenizer(folder, VOCAB_SIZE)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": VOCAB_SIZE, "max_position_embeddings": CONTEXT_LEN,
    }))
    return folder
