"""The mixed batch the equality tests submit: for each prompt length, one base-only request and
one per zoo adapter (ranks 1-16, attention / MLP / all modules, rsLoRA, rank patterns), so a
step mixes adapters of different ranks with base-only tokens."""

from __future__ import annotations

from lorafleet.engine.engine import LLMEngine, SamplingParams
from lorafleet.formats.lora_weights import load_peft_adapter_dir
from tests.zoo import ADAPTERS

# The prompt lengths of the equality tests' mixed batch (tests/engine/test_equivalence.py)
EQUALITY_PROMPT_LENGTHS = (3, 9, 17, 33, 40)


def prompt_ids(n: int, salt: int) -> list[int]:
    """n deterministic token ids inside every zoo model's vocabulary."""
    return [(7 * i + 13 * salt) % 500 + 4 for i in range(n)]


def mixed_jobs(prompt_lengths: tuple[int, ...]) -> list[tuple[str, str | None, list[int]]]:
    """(request id, adapter name or None, prompt) of every request of the mixed batch."""
    jobs = []
    for salt, n in enumerate(prompt_lengths):
        for name in (None, *ADAPTERS):
            rid = f"{name}-{n}"
            jobs.append((rid, name, prompt_ids(n, salt + len(rid))))
    return jobs


def add_mixed_requests(eng: LLMEngine, zoo, model: str, prompt_lengths: tuple[int, ...],
                       max_tokens: int) -> list[tuple[str, str | None, list[int]]]:
    """Submits the batch (greedy, ignore_eos) -> (request id, adapter name or None, prompt) each."""
    weights = {name: load_peft_adapter_dir(zoo.adapter(model, name), eng.spec) for name in ADAPTERS}
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    jobs = mixed_jobs(prompt_lengths)
    for rid, name, prompt in jobs:
        eng.add_request(rid, prompt_token_ids=prompt, params=params, adapter_id=name,
                        adapter=None if name is None else weights[name])
    return jobs
