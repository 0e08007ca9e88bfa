"""Baseline: HF transformers + PEFT serving the same trace with mixed-adapter batches.

Static batching as HF `generate` allows: a batch of up to --batch requests, each row with its own
adapter (PEFT's `adapter_names`), generated until the longest output of the batch. A batch waits
to fill (until --batch requests have arrived, at most --max-wait-s after its oldest one): a batch
of whatever arrived by the time the GPU is free would start with the one request of t = 0 and run
for its whole output. Same model shape, same random adapters, same GPU. Only the first
--max-requests of the trace are offered, and no batch starts after --budget-s: the rate reported
is the requests served over the time to the last one's finish (HF is slow; the rate is what is
compared).

    python -m lorafleet.bench.hf_baseline --setting S1 --n 5 100 --out bench/results/engine
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lorafleet.bench.adapters import AdapterBank, peft_state_dict
from lorafleet.bench.metrics import summarize
from lorafleet.bench.report import write_results
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.workload import SETTINGS, generate_trace
from lorafleet.formats.model_spec import ModelSpec


def build_peft_model(model_dir: Path, bank: AdapterBank, numbers: list[int], device: str = "cuda"):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                 dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    peft_model = None
    for k in numbers:
        w = bank.get(k)
        cfg = LoraConfig(r=w.config.rank, lora_alpha=w.config.lora_alpha, target_modules=list(bank.modules))
        name = f"a{k}"
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        state = {k: v.to(device) for k, v in peft_state_dict(w).items()}
        set_peft_model_state_dict(peft_model, state, adapter_name=name)
    return peft_model.eval()


class StepClock:
    """A transformers StoppingCriteria: the time of each generated token (times[k]: token k + 1 of
    every row), and a stop at the deadline, so that one slow static batch cannot run past it."""

    def __init__(self, t0: float, deadline_s: float):
        self.t0, self.deadline_s, self.times = t0, deadline_s, []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        now = time.perf_counter() - self.t0
        self.times.append(now)
        return torch.full((input_ids.shape[0],), now > self.deadline_s, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def serve(model, trace, batch: int, vocab: int, device: str = "cuda", budget_s: float = float("inf"),
          max_wait_s: float = 2.0) -> dict:
    """Throughput and latencies of the requests served within budget_s (no batch starts, and no
    token is generated, after it): HF is slow, so `served` may be less than `offered`. Timing is
    as a streaming server's: a row's first token comes with the batch's first step, and a request
    is done at the step of its own last token (the batch goes on to its longest output)."""
    from transformers import StoppingCriteriaList

    rng = np.random.default_rng(7)
    warm = torch.full((1, 8), 5, dtype=torch.long, device=device)  # CUDA / cuBLAS set-up is not billed to the trace
    model.generate(input_ids=warm, max_new_tokens=2, do_sample=False, adapter_names=[f"a{trace[0].adapter}"], pad_token_id=0)
    arrival, first, finish, out_tokens = {}, {}, {}, {}
    batch_sizes, generated = [], 0
    queue = list(trace)
    t0 = time.perf_counter()
    while queue:
        now = time.perf_counter() - t0
        # Start when the batch is full or its oldest request has waited max_wait_s (queue is in arrival order).
        start = min(queue[min(batch, len(queue)) - 1].arrival, queue[0].arrival + max_wait_s)
        if max(start, now) > budget_s:
            break
        if start > now:
            time.sleep(start - now)
        ready = [r for r in queue[:batch] if r.arrival <= max(start, now)]
        batch_sizes.append(len(ready))
        for r in ready:
            queue.remove(r)
        longest = max(r.input_len for r in ready)
        ids = torch.zeros(len(ready), longest, dtype=torch.long)
        mask = torch.zeros(len(ready), longest, dtype=torch.long)
        for i, r in enumerate(ready):  # left padding
            ids[i, longest - r.input_len :] = torch.from_numpy(rng.integers(3, vocab, r.input_len))
            mask[i, longest - r.input_len :] = 1
        new = max(r.output_len for r in ready)
        clock = StepClock(t0, budget_s)
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, adapter_names=[f"a{r.adapter}" for r in ready], pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
        steps = len(clock.times)
        generated += steps * len(ready)
        print(f"[hf-peft] batch of {len(ready)}: {steps} of {new} tokens by {clock.times[-1]:.1f}s, {len(queue)} left", flush=True)
        for r in ready:
            if r.output_len <= steps:  # its last token came before the deadline
                key = str(r.index)
                arrival[key], first[key], finish[key] = r.arrival, clock.times[0], clock.times[r.output_len - 1]
                out_tokens[key] = r.output_len
        if steps < new:
            break  # the deadline stopped this batch
    if not finish:
        return {"requests": 0, "served": 0, "offered": len(trace), "batch_sizes": batch_sizes, "generated_tokens": generated}
    return {**summarize(arrival, first, finish, out_tokens), "served": len(finish), "offered": len(trace),
            "batch_sizes": batch_sizes, "generated_tokens": generated}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="S1")
    p.add_argument("--n", type=int, nargs="+", default=[5, 100])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=96)
    p.add_argument("--max-wait-s", type=float, default=2.0, help="a batch starts when full or this long after its oldest request")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="seconds of the trace per n after which no batch starts and no token is generated")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"))
    p.add_argument("--max-len", type=int, default=512, help="lengths uniform in [8, max-len) (CPU smoke runs: less)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--commit", default=None, help="git commit of the code (read from git when omitted)")
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    spec = ModelSpec.from_pretrained(model_dir)
    records = []
    for n in args.n:
        lengths = ((8, args.max_len), (8, args.max_len))
        trace = generate_trace(n, 1.0, args.rate, 1.0, args.duration, *lengths)[: args.max_requests]
        bank = AdapterBank(spec, setting.ranks, setting.modules, torch.device(args.device))
        t = time.time()
        numbers = sorted({r.adapter for r in trace})
        model = build_peft_model(model_dir, bank, numbers, args.device)
        build_s = time.time() - t
        print(f"[hf-peft] n={n}: model + {len(numbers)} adapters built in {build_s:.1f}s", flush=True)
        t = time.time()
        rec = {"setting": setting.name, "mode": "hf-peft", "n": n, "rate": args.rate, "batch": args.batch,
               "build_s": build_s, **serve(model, trace, args.batch, spec.vocab_size, args.device, args.budget_s, args.max_wait_s),
               "wall_s": time.time() - t}
        print(f"[hf-peft] {rec}", flush=True)
        records.append(rec)
        write_results(args.out, f"hf-peft-{setting.name}", records, vars(args))  # after every n
        del model, bank
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
