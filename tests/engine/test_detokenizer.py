"""Incremental detokenization: complete UTF-8 only, stop strings never emitted."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lorafleet.demo.tokenizer import build_tokenizer
from lorafleet.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def _stream(tok, text, stop=()):
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Hello", add_special_tokens=False), tuple(stop))
    deltas = []
    for i in ids:
        d.add(i)
        deltas.append(d.take_delta(final=False))
        if d.stopped:
            break
    deltas.append(d.take_delta(final=True))
    return deltas, d


def test_multibyte_characters_are_emitted_whole(tok):
    text = " café ☕ naïve 😀 end"
    deltas, _ = _stream(tok, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1, "the emoji must span several byte tokens for this test to mean anything"


def test_stop_string_cut_and_never_emitted(tok):
    deltas, d = _stream(tok, " the answer is 42. STOP here more text", stop=["STOP"])
    assert d.stopped
    assert "".join(deltas) == " the answer is 42. "
    assert not any("ST" in x for x in deltas)


def test_partial_stop_prefix_is_held_then_released(tok):
    deltas, d = _stream(tok, " a ST b", stop=["STOP"])
    assert not d.stopped
    assert "".join(deltas) == " a ST b"


def test_earliest_of_several_stop_strings_wins(tok):
    deltas, _ = _stream(tok, " one two three four", stop=["four", "two"])
    assert "".join(deltas) == " one "
