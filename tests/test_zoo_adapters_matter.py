"""Every zoo adapter matters, on every model the zoo builds it for: HF + PEFT greedy decoding with
the adapter differs from the base model's within the first FIRST_TOKENS tokens on at least half of
the prompts the equality tests give it (tests/mixed_requests.py). An adapter that barely changes
anything lets an engine that drops or mis-scales LoRA still match PEFT token for token."""

from __future__ import annotations

import pytest

from tests.mixed_requests import EQUALITY_PROMPT_LENGTHS, mixed_jobs
from tests.zoo import ADAPTER_MODELS, ADAPTERS

FIRST_TOKENS = 3


def changed_prompts(zoo, reference, model: str, adapter: str) -> tuple[int, int]:
    """(prompts whose first FIRST_TOKENS greedy tokens the adapter changes, prompts) of the mixed batch."""
    prompts = [prompt for _rid, name, prompt in mixed_jobs(EQUALITY_PROMPT_LENGTHS) if name == adapter]
    base_dir, adapter_dir = zoo.model(model), zoo.adapter(model, adapter)
    changed = sum(reference.greedy(base_dir, adapter_dir, prompt, FIRST_TOKENS)
                  != reference.greedy(base_dir, None, prompt, FIRST_TOKENS) for prompt in prompts)
    return changed, len(prompts)


@pytest.mark.parametrize("model", ADAPTER_MODELS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_changes_the_first_tokens_of_most_prompts(zoo, reference, model, adapter):
    changed, prompts = changed_prompts(zoo, reference, model, adapter)
    assert 2 * changed >= prompts, (
        f"{adapter} on {model} changes the first {FIRST_TOKENS} greedy tokens of only {changed} of {prompts} "
        f"prompts: raise its init_std (tests/zoo.py ADAPTERS) until it matters")
