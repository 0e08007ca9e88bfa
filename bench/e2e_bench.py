"""End-to-end S-LoRA benchmark through the service path: the trace produced to the requests topic
at its arrival times, replies read from the Redis streams, against `lorafleet up` (embedded broker,
redis-server, adapter store over a file:// root, ingest, one engine). Same workload and figures
as bench/engine_bench.py, so the two tables show what Kafka + Redis + the store cost.

    python -m bench.e2e_bench --setting S1 --n 5 100 --rate 50 --duration 20 --out bench/results/e2e
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.adapters import AdapterBank, save_peft
from bench.metrics import summarize
from bench.report import write_results
from bench.shapes import make_model_folder
from bench.workload import SETTINGS, generate_trace
from services.engine.model_spec import ModelSpec


def start_stack(model_dir: Path, root: Path, device: str, max_num_seqs: int, workdir: Path) -> tuple[subprocess.Popen, dict]:
    ready_file = workdir / "ready.json"
    env = dict(os.environ, LORAFLEET_RANDOM_WEIGHTS_SEED="0", LORAFLEET_MAX_NUM_SEQS=str(max_num_seqs),
               LORAFLEET_MAX_ADAPTER_RANK="64", LORAFLEET_MAX_BATCHED_TOKENS="4096")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", str(model_dir), "--adapters", str(root),
                             "--device", device, "--ready-file", str(ready_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "up.log", "wb"))
    deadline = time.monotonic() + 600
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"lorafleet up did not get ready; see {workdir / 'up.log'}")
        time.sleep(0.5)
    return proc, json.loads(ready_file.read_text())


async def drive(ready: dict, trace, prompts: list[list[int]], run: str) -> dict:
    """Produce at arrival times; one XREAD over every open stream per poll, 20 ms apart."""
    from services.client import LorafleetClient
    from services.common.messages import DoneReply, ErrorReply, TokenReply, parse_entry

    arrival, first, finish, out_tokens, last_id = {}, {}, {}, {}, {}
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        t0 = time.perf_counter()

        async def produce() -> None:
            for r in trace:
                await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
                rid = f"{run}-{r.index}"
                await client.submit({"id": rid, "adapter": f"bench/a{r.adapter}", "prompt_token_ids": prompts[r.index],
                                     "max_tokens": r.output_len, "temperature": 0, "ignore_eos": True})
                arrival[rid], last_id[f"lorafleet:out:{rid}"] = r.arrival, "0-0"

        producer = asyncio.create_task(produce())
        while not producer.done() or last_id:
            if last_id:
                response = await client.redis.xread(dict(last_id), count=1000)
                now = time.perf_counter() - t0
                for key, entries in response or []:
                    key = key.decode() if isinstance(key, bytes) else key
                    rid = key.removeprefix("lorafleet:out:")
                    for entry_id, fields in entries:
                        last_id[key] = entry_id
                        entry = parse_entry(fields)
                        if isinstance(entry, TokenReply):
                            first.setdefault(rid, now)
                        elif isinstance(entry, (DoneReply, ErrorReply)):
                            if isinstance(entry, ErrorReply):
                                raise RuntimeError(f"{rid}: {entry.code}: {entry.message}")
                            finish[rid], out_tokens[rid] = now, int(entry.completion_tokens)
                            del last_id[key]
            await asyncio.sleep(0.02)
        await producer
    return summarize(arrival, first, finish, out_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="S1")
    p.add_argument("--n", type=int, nargs="+", default=[5, 100])
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/e2e"))
    args = p.parse_args()
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    spec = ModelSpec.from_pretrained(model_dir)
    records = []
    for n in args.n:
        trace = generate_trace(n, 1.0, args.rate, 1.0, args.duration)
        rng = np.random.default_rng(7)
        prompts = [rng.integers(3, spec.vocab_size, r.input_len).tolist() for r in trace]
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            bank = AdapterBank(spec, setting.ranks, setting.modules, torch.device(args.device))
            for number in sorted({r.adapter for r in trace}):  # the adapter root, as a user would have it
                save_peft(bank.get(number), workdir / "adapters" / "bench" / f"a{number}", setting.modules)
            proc, ready = start_stack(model_dir, workdir / "adapters", args.device, args.max_num_seqs, workdir)
            try:
                result = asyncio.run(drive(ready, trace, prompts, run=f"n{n}-{int(time.time())}"))
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(120)
        rec = {"setting": setting.name, "mode": "e2e", "n": n, "rate": args.rate, "duration": args.duration, **result}
        print(rec, flush=True)
        records.append(rec)
    write_results(args.out, f"e2e-{setting.name}", records, vars(args))


if __name__ == "__main__":
    main()
