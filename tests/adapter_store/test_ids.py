"""Adapter id syntax, CONTRACT.md section 3."""

from __future__ import annotations

import pytest

from lorafleet.common.ids import is_valid_adapter_id, validate_adapter_id


@pytest.mark.parametrize(
    "adapter_id",
    ["a", "tenant-a/sql-v3", "A.b_c-D/0/1/2", "x" * 64, "/".join(["s"] * 20), "..a", "a..", "...", "v1.0"],
)
def test_valid_ids_pass(adapter_id):
    validate_adapter_id(adapter_id)
    assert is_valid_adapter_id(adapter_id)


@pytest.mark.parametrize(
    "adapter_id, words",
    [
        ("", ["empty"]),
        ("/a", ["segment 1", "empty"]),
        ("a/", ["segment 2", "empty"]),
        ("a//b", ["segment 2", "empty"]),
        ("x" * 65, ["65 characters", "at most 64"]),
        ("ok/" + "y" * 65, ["segment 2", "65 characters"]),
        (".", ["'.'"]),
        ("a/../b", ["segment 2", "'..'"]),
        ("..", ["'..'"]),
        ("a b", ["' '"]),
        ("tenant:a", ["':'"]),
        ("a\\b", ["'\\\\'"]),
        ("é", ["'é'"]),
        ("a/b\n", ["'\\n'"]),
    ],
)
def test_invalid_ids_name_the_rule(adapter_id, words):
    with pytest.raises(ValueError) as info:
        validate_adapter_id(adapter_id)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not is_valid_adapter_id(adapter_id)


@pytest.mark.parametrize("not_a_string", [None, 3, b"a", ["a"]])
def test_non_strings_are_rejected(not_a_string):
    with pytest.raises(ValueError, match="must be a string"):
        validate_adapter_id(not_a_string)
