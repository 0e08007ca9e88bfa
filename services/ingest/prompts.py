"""The model facts ingest needs: its tokenizer, vocabulary size and context length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int  # token ids must be in [0, vocab_size)
    context_len: int  # prompt + max_tokens must be <= this (max_position_embeddings)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ModelLimits":
        path = Path(model_dir) / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"model folder {model_dir} has no config.json") from None
        missing = [k for k in ("vocab_size", "max_position_embeddings") if not isinstance(config.get(k), int)]
        if missing:
            raise ValueError(f"{path} lacks integer {' and '.join(missing)}")
        return cls(vocab_size=config["vocab_size"], context_len=config["max_position_embeddings"])


class PromptEncoder:
    """Tokenizes prompt texts the way the engines' model expects (special tokens included, e.g.
    Llama's BOS), a whole batch per call so the Rust tokenizer can use several threads."""

    def __init__(self, tokenizer: Any, limits: ModelLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    @classmethod
    def load(cls, model_dir: Path) -> "PromptEncoder":
        from transformers import AutoTokenizer

        limits = ModelLimits.from_model_dir(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if len(tokenizer) > limits.vocab_size:
            raise ValueError(f"tokenizer of {model_dir} has {len(tokenizer)} tokens, more than the "
                             f"model's vocab_size {limits.vocab_size}")
        return cls(tokenizer, limits)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: prompts longer than model_max_length are ingest's call (prompt_too_long).
        encoded = self.tokenizer(texts, add_special_tokens=True, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]
