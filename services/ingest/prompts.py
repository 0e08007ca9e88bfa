"""The model facts ingest needs: its tokenizer (and chat template), vocabulary size and context length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.common.contract import ChatMessage, ErrorCode, RequestError


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
    Llama's BOS), a whole batch per call so the Rust tokenizer can use several threads; renders
    chat `messages` with the model's chat template (or the one ingest was given)."""

    def __init__(self, tokenizer: Any, limits: ModelLimits, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or None

    @classmethod
    def load(cls, model_dir: Path, chat_template_file: str = "") -> "PromptEncoder":
        from transformers import AutoTokenizer

        limits = ModelLimits.from_model_dir(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if len(tokenizer) > limits.vocab_size:
            raise ValueError(f"tokenizer of {model_dir} has {len(tokenizer)} tokens, more than the "
                             f"model's vocab_size {limits.vocab_size}")
        template = None
        if chat_template_file:
            try:
                template = Path(chat_template_file).read_text()
            except OSError as exc:
                raise ValueError(f"chat template {chat_template_file}: {exc.strerror}") from None
        return cls(tokenizer, limits, template)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: prompts longer than model_max_length are ingest's call (prompt_too_long).
        encoded = self.tokenizer(texts, add_special_tokens=True, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def encode_chats(self, conversations: list[list[ChatMessage]]) -> list[list[int] | RequestError]:
        """Each conversation rendered by the chat template with the assistant's turn opened
        (add_generation_prompt), then tokenized without adding special tokens: the template
        writes them (BOS included) itself. A conversation the template refuses (roles out of
        order, say) or a model without a template gets its invalid_request instead."""
        if self.chat_template is None:
            refusal = RequestError(ErrorCode.INVALID_REQUEST, "messages cannot be used: the model has no chat "
                                   "template (send prompt, or start ingest with --chat-template).")
            return [refusal for _ in conversations]
        results: list[list[int] | RequestError] = []
        for conversation in conversations:
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in conversation], chat_template=self.chat_template,
                    tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja2's TemplateError, raise_exception(...) of the template
                results.append(RequestError(ErrorCode.INVALID_REQUEST,
                                            f"messages: the model's chat template refused them: {exc}"[:500]))
                continue
            results.append(list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]))
        return results
