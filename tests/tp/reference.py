"""HF transformers + PEFT logits for the sharded decoder tests (the independent reference)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

# Six sequences: zoo adapters 0-4 (ranks 1, 2, 8, 16, 4/2) and one base-only sequence, prompts of
# different lengths (not multiples of the test pool's block size), then one fixed token each.
DECODER_JOB = {
    "seq_adapter": [0, 1, 2, -1, 3, 4],
    "prompts": [[5, 17, 99, 3, 42], [8, 8, 250, 31, 7, 66, 12], [101, 4, 9], [77, 13, 200, 5],
                [3, 310, 44, 27, 90, 61, 15, 9, 120], [64, 2, 18, 230, 71, 37]],
    "next": [11, 45, 23, 7, 140, 58],
}


def reference_logits(model_dir: Path, adapter_dirs: list[str], job: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of every prompt token, concatenated [sum(len), V]; logits of each next token [B, V])."""
    prefill, decode = _reference(str(model_dir), tuple(adapter_dirs), json.dumps(job, sort_keys=True))
    return prefill.clone(), decode.clone()


@lru_cache(maxsize=4)
@torch.inference_mode()
def _reference(model_dir: str, adapter_dirs: tuple[str, ...], job_json: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = json.loads(job_json)  # JSON text: a hashable cache key
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(d, adapter_name=str(i))
    model.eval()
    prefill, decode = [], []
    for prompt, adapter, nxt in zip(job["prompts"], job["seq_adapter"], job["next"]):
        ids = torch.tensor([prompt + [nxt]])
        if adapter >= 0:
            model.set_adapter(str(adapter))
            logits = model(ids).logits[0].float()  # [n + 1, V]
        else:
            with model.disable_adapter():
                logits = model(ids).logits[0].float()
        prefill.append(logits[:-1])
        decode.append(logits[-1])
    return torch.cat(prefill), torch.stack(decode)
