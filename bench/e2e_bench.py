"""End-to-end S-LoRA benchmark through the service path: the trace produced to the requests topic
at its arrival times, replies read from the Redis streams, against `lorafleet up` (embedded broker,
redis-server, adapter store over a file:// root, ingest, one engine). Same workload and figures
as bench/engine_bench.py, so the two tables show what Kafka + Redis + the store cost.

    python -m lorafleet.bench.e2e_bench --setting S1 --n 5 100 --warmup 2 --rate 50 --duration 15 --out bench/results/h200

One stack serves every run (each run's adapters are its own folders, bench/n{n}-a{k}); results are
written after every run. On a machine without redis-server, bench/devkit.sh's kit is used.
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

from lorafleet.bench.adapters import AdapterBank, save_peft
from lorafleet.bench.metrics import summarize
from lorafleet.bench.report import write_results
from lorafleet.bench.shapes import make_model_folder
from lorafleet.bench.workload import SETTINGS, add_trace_arguments, generate_trace
from lorafleet.common.signals import stop_subprocess
from lorafleet.formats.model_spec import ModelSpec

KIT = Path(".devkit")  # bench/devkit.sh: redis-server (+ libs) and wheels for a GPU machine that lacks them


def stack_env(max_num_seqs: int, max_rank: int, kit: Path = KIT) -> dict[str, str]:
    """The environment of `lorafleet up`: random weights, the engine's limits, and the kit's
    redis-server when the machine has none (an explicit LORAFLEET_REDIS_SERVER_BIN wins)."""
    env = dict(os.environ, LORAFLEET_RANDOM_WEIGHTS_SEED="0", LORAFLEET_MAX_NUM_SEQS=str(max_num_seqs),
               LORAFLEET_MAX_ADAPTER_RANK=str(max_rank), LORAFLEET_MAX_BATCHED_TOKENS="4096")
    if not env.get("LORAFLEET_REDIS_SERVER_BIN") and (kit / "redis-server").exists():
        env["LORAFLEET_REDIS_SERVER_BIN"] = str((kit / "redis-server").resolve())
    return env


def start_stack(model_dir: Path, root: Path, device: str, max_num_seqs: int, max_rank: int,
                workdir: Path) -> tuple[subprocess.Popen, dict]:
    ready_file = workdir / "ready.json"
    env = stack_env(max_num_seqs, max_rank)
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "up", "--model", str(model_dir), "--adapters", str(root),
                             "--device", device, "--ready-file", str(ready_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "up.log", "wb"))
    deadline = time.monotonic() + 300
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.send_signal(signal.SIGINT)  # it stops what it started (broker, redis, services)
            proc.wait(60)
            raise RuntimeError(f"lorafleet up did not get ready; see {workdir / 'up.log'}")
        time.sleep(0.5)
    return proc, json.loads(ready_file.read_text())


async def drive(ready: dict, trace, prompts: list[list[int]], run: str, adapter_prefix: str,
                timeout_s: float | None = None) -> dict:
    """Produce at arrival times (to `ready`'s requests topic, the default if it names none); one
    XREAD over every open stream per poll, 20 ms apart; TimeoutError when requests are still
    open `timeout_s` after the start."""
    from lorafleet.client import LorafleetClient
    from lorafleet.common.messages import DoneReply, ErrorReply, TokenReply, parse_entry

    arrival, first, finish, out_tokens, last_id = {}, {}, {}, {}, {}
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"],
                               requests_topic=ready.get("requests_topic")) as client:
        t0 = time.perf_counter()

        async def produce() -> None:
            for r in trace:
                await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
                rid = f"{run}-{r.index}"
                await client.submit({"id": rid, "adapter": f"bench/{adapter_prefix}a{r.adapter}", "prompt_token_ids": prompts[r.index],
                                     "max_tokens": r.output_len, "temperature": 0, "ignore_eos": True})
                arrival[rid], last_id[f"lorafleet:out:{rid}"] = r.arrival, "0-0"

        producer = asyncio.create_task(produce())
        while not producer.done() or last_id:
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                producer.cancel()
                raise TimeoutError(f"{len(last_id)} requests of {run} still open after {timeout_s:.0f} s")
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trace_arguments(p, warmup_help="seconds of the trace (5 adapters) served first, not recorded")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds one run may take before it is abandoned")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/e2e"))
    args = p.parse_args()
    # SIGTERM (a stage's `timeout`) unwinds like Ctrl-C, so `finally` stops the stack it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setting = SETTINGS[args.setting]
    model_dir = make_model_folder(setting.shape, Path("/tmp/lorafleet-bench") / setting.shape)
    spec = ModelSpec.from_pretrained(model_dir)
    lengths = ((8, args.max_len), (8, args.max_len))
    runs = [("warm", 5, generate_trace(5, 1.0, args.rate, 1.0, args.warmup, *lengths))] if args.warmup > 0 else []
    runs += [(f"n{n}", n, generate_trace(n, 1.0, args.rate, 1.0, args.duration, *lengths)) for n in args.n]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        t = time.time()
        bank = AdapterBank(spec, setting.ranks, setting.modules, torch.device(args.device))
        for tag, _n, trace in runs:  # the adapter root, as a user would have it: one folder per run's adapter
            for number in sorted({r.adapter for r in trace}):
                save_peft(bank.get(number), workdir / "adapters" / "bench" / f"{tag}-a{number}", setting.modules)
            bank.forget()
        del bank
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"[e2e] adapters written in {time.time() - t:.1f}s", flush=True)
        t, proc = time.time(), None
        try:  # one stack serves every run, as one engine serves every engine-level run
            proc, ready = start_stack(model_dir, workdir / "adapters", args.device, args.max_num_seqs,
                                      max(setting.ranks), workdir)
            print(f"[e2e] lorafleet up ready in {time.time() - t:.1f}s", flush=True)
            for tag, n, trace in runs:
                rng = np.random.default_rng(7)
                prompts = [rng.integers(3, spec.vocab_size, r.input_len).tolist() for r in trace]
                t = time.time()
                result = asyncio.run(asyncio.wait_for(drive(ready, trace, prompts, run=f"{tag}-{int(time.time())}",
                                                            adapter_prefix=f"{tag}-"), args.run_timeout))
                if tag == "warm":
                    print(f"[e2e] warmup: {len(trace)} requests in {time.time() - t:.1f}s", flush=True)
                    continue
                rec = {"setting": setting.name, "mode": "e2e", "n": n, "rate": args.rate, "duration": args.duration,
                       "max_num_seqs": args.max_num_seqs, "wall_s": time.time() - t, **result}
                print(f"[e2e] {rec}", flush=True)
                records.append(rec)
                write_results(args.out, f"e2e-{setting.name}", records, vars(args))  # after every run
        finally:
            if proc is not None:
                stop_subprocess(proc, signal.SIGINT, 60)
            args.out.mkdir(parents=True, exist_ok=True)
            if (workdir / "up.log").exists():  # the service log, for what went wrong or slow
                (args.out / f"e2e-{setting.name}-up.log").write_bytes((workdir / "up.log").read_bytes()[-200_000:])


if __name__ == "__main__":
    main()
