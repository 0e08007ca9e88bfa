"""Chat `messages` rendered by ingest's PromptEncoder: the tokenizer's own template, one given by
file (--chat-template), and a model without any (every chat request refused, by name)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lorafleet.common.contract import ChatMessage, RequestError
from lorafleet.ingest.prompts import ModelLimits, PromptEncoder
from tests.service.conftest import CONTEXT_LEN, VOCAB_SIZE

LIMITS = ModelLimits(VOCAB_SIZE, CONTEXT_LEN)
TURNS = [ChatMessage("user", "hi")]


def test_the_tokenizers_template_renders_the_turns(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    (ids,) = PromptEncoder(tokenizer, LIMITS).encode_chats([TURNS])
    assert ids == tokenizer("user: hi\nassistant:")["input_ids"]  # BOS once: the template's


def test_a_template_file_replaces_the_tokenizers(model_dir, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    encoder = PromptEncoder.load(model_dir, str(tmp_path / "t.jinja"))
    (ids,) = encoder.encode_chats([TURNS])
    assert encoder.tokenizer.decode(ids) == "<hi>"
    with pytest.raises(ValueError, match="chat template .*missing.jinja"):
        PromptEncoder.load(model_dir, str(tmp_path / "missing.jinja"))


def test_without_a_template_every_chat_is_refused_by_name(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = None
    results = PromptEncoder(tokenizer, LIMITS).encode_chats([TURNS, TURNS])
    assert all(isinstance(r, RequestError) and r.code == "invalid_request" and "no chat template" in r.message
               for r in results)
