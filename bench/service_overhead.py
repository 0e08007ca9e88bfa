"""What the public path costs: the same requests through the in-process engine and through the
whole stack (`lorafleet up`: Kafka in, ingest, engine service, Redis out), side by side in one run.

    python -m lorafleet.bench.service_overhead --requests 480 --max-tokens 48
    python -m lorafleet.bench.service_overhead --requests 480 960 --max-tokens 48 --device cuda

Workload: a tiny GQA Llama built here (nothing downloaded), 6 PEFT adapters of ranks 4-16 on
different modules plus base-only requests (one in seven), prompts of 16-48 random token ids,
greedy, ignore_eos, every request submitted at once. The engine path adds them all to one
LLMEngine and steps it to the end; the stack path produces them to the requests topic and reads
every reply stream with blocking XREADs. Both record, per request, the time of its first token and
of every later one (client-side for the stack), so the report gives throughput (first submit to
last terminal entry), the ratio stack / engine, and first-token and inter-token percentiles. The
stack run also checks exactly-once delivery: contiguous token indexes and one terminal entry per
request. With --repeat N the pair runs N times per request count, engine and stack alternating,
and the table adds the median ratio. Every record names where the CPU went over the run: CPU
seconds per process (ingest, engine, broker, redis, the client) and per thread (process_cpu.py);
--py-spy DIR also samples ingest and the engine over each stack run. Results:
bench/results/service-overhead/<commit>/ (JSON, markdown).
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

from lorafleet.bench.process_cpu import ProcessCpu, role
from lorafleet.bench.report import environment
from lorafleet.common.signals import stop_subprocess
from lorafleet.demo.tiny_models import build_peft_adapter, build_tiny_model

ATTN, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # id -> PEFT options: mixed ranks and module sets, like a real fleet's
    "bench/a-r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=1),
    "bench/b-r16-attn": dict(r=16, lora_alpha=16, target_modules=ATTN, seed=2),
    "bench/c-r4-all": dict(r=4, lora_alpha=8, target_modules=ATTN + MLP, seed=3),
    "bench/d-r8-mlp": dict(r=8, lora_alpha=8, target_modules=MLP, seed=4),
    "bench/e-r12-all": dict(r=12, lora_alpha=24, target_modules=ATTN + MLP, use_rslora=True, seed=5),
    "bench/f-r4-qkv": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], seed=6),
}


def build_assets(root: Path) -> tuple[Path, Path]:
    model = root / "model"
    build_tiny_model(model, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=2, seed=11)
    for adapter_id, options in ADAPTERS.items():
        build_peft_adapter(model, root / "adapters" / adapter_id, **options)
    return model, root / "adapters"


def workload(n: int, max_tokens: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(42)
    ids = [*ADAPTERS, None]
    return [{"id": f"r{i}", "adapter": ids[i % len(ids)], "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True, "prompt_token_ids": rng.integers(3, vocab, int(rng.integers(16, 49))).tolist()}
            for i in range(n)]


def start_stack(model: Path, adapters: Path, args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, dict]:
    """`lorafleet up` with the engine limits the in-process engine gets (same weights: the checkpoint)."""
    ready_file = workdir / "ready.json"
    env = dict(os.environ, LORAFLEET_MAX_NUM_SEQS=str(args.max_num_seqs),
               LORAFLEET_MAX_BATCHED_TOKENS=str(args.max_batched_tokens))
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "up", "--model", str(model),
                             "--adapters", str(adapters),
                             "--device", args.device, "--ready-file", str(ready_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "up.log", "wb"))
    deadline = time.monotonic() + 300
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_subprocess(proc, signal.SIGINT, 60)
            raise RuntimeError(f"lorafleet up did not get ready: {(workdir / 'up.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, json.loads(ready_file.read_text())


def make_engine(model: Path, adapters: Path, args: argparse.Namespace):
    """The README's library API: one LLMEngine with the stack's limits, and the adapters' weights."""
    from lorafleet.engine.engine import EngineConfig, LLMEngine
    from lorafleet.formats.lora_weights import load_peft_adapter_dir

    engine = LLMEngine(EngineConfig(model_dir=str(model), device=args.device, max_num_seqs=args.max_num_seqs,
                                    max_batched_tokens=args.max_batched_tokens))
    return engine, {a: load_peft_adapter_dir(adapters / a, engine.spec) for a in ADAPTERS}


def run_engine(engine, weights: dict, requests: list[dict]) -> dict:
    from lorafleet.engine.engine import SamplingParams

    run = f"e{time.perf_counter_ns()}"
    times: dict[str, list[float]] = {f"{run}-{r['id']}": [] for r in requests}
    t0 = time.perf_counter()
    for r in requests:
        params = SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True)
        engine.add_request(f"{run}-{r['id']}", prompt_token_ids=r["prompt_token_ids"], params=params,
                           adapter_id=r["adapter"], adapter=weights.get(r["adapter"]))
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - t0
        for out in outputs:
            times[out.request_id].extend([now] * len(out.new_token_ids))
    return summarize(times, 0.0, time.perf_counter() - t0)


async def run_stack(ready: dict, requests: list[dict]) -> dict:
    from lorafleet.client import LorafleetClient
    from lorafleet.common.messages import DoneReply, TokenReply, parse_entry

    times: dict[str, list[float]] = {r["id"]: [] for r in requests}
    run = f"s{int(time.time() * 1000)}"
    last_id = {f"lorafleet:out:{run}-{r['id']}": "0-0" for r in requests}
    indexes: dict[str, int] = {}
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        t0 = time.perf_counter()
        await client.submit_many([{**r, "id": f"{run}-{r['id']}"} for r in requests])
        while last_id:
            response = await client.redis.xread(dict(last_id), count=10000, block=50)
            now = time.perf_counter() - t0
            for key, entries in response or []:
                key = key.decode()
                rid = key.removeprefix(f"lorafleet:out:{run}-")
                for entry_id, fields in entries:
                    last_id[key] = entry_id
                    entry = parse_entry(fields)
                    if isinstance(entry, TokenReply):
                        if entry.index != indexes.get(rid, 0):
                            raise AssertionError(f"{rid}: token index {entry.index}, expected {indexes.get(rid, 0)}")
                        indexes[rid] = entry.index + len(entry.token_ids)
                        times[rid].extend([now] * len(entry.token_ids))
                    elif isinstance(entry, DoneReply):
                        del last_id[key]
                    else:
                        raise AssertionError(f"{rid}: {entry}")
        end = time.perf_counter() - t0
    return summarize(times, 0.0, end)


def measure_pair(engine, weights: dict, ready: dict, requests: list[dict], cpu: ProcessCpu, own_cpu: ProcessCpu,
                 up_pid: int, args: argparse.Namespace, workdir: Path) -> dict:
    """The requests through the in-process engine, then through the stack: one record of both."""
    before = own_cpu.snapshot()
    engine_figures = run_engine(engine, weights, requests)
    engine_figures["processes"] = own_cpu.since(before, engine_figures["span_s"])
    print_processes(engine_figures["processes"])
    before = cpu.snapshot()
    spies = start_py_spy(up_pid, args, workdir, len(requests))
    stack = asyncio.run(run_stack(ready, requests))
    stop_py_spy(spies)
    stack["processes"] = cpu.since(before, stack["span_s"])
    print_processes(stack["processes"])
    return {"requests": len(requests), "max_tokens": args.max_tokens, "ratio": stack["req_s"] / engine_figures["req_s"],
            **{f"engine_{k}": v for k, v in engine_figures.items()}, **{f"stack_{k}": v for k, v in stack.items()}}


def start_py_spy(up_pid: int, args: argparse.Namespace, workdir: Path, n: int) -> list[subprocess.Popen]:
    """With --py-spy DIR: sample ingest and the engine (all threads, idle included) over the
    stack run into DIR/<role>-<n>.txt (collapsed stacks, one line per stack with its sample count)."""
    if not args.py_spy:
        return []
    import psutil

    args.py_spy.mkdir(parents=True, exist_ok=True)
    spies = []
    for child in psutil.Process(up_pid).children(recursive=True):
        name = role(child)
        if name in ("ingest", "engine"):
            out = args.py_spy / f"{name}-{n}.txt"
            spies.append(subprocess.Popen(["py-spy", "record", "--pid", str(child.pid), "--format", "raw", "--idle",
                                           "--threads", "--rate", "200", "--output", str(out)],
                                          stdout=subprocess.DEVNULL, stderr=open(workdir / f"py-spy-{name}.log", "wb")))
    time.sleep(1.0)  # py-spy attaches before the first request is produced
    return spies


def stop_py_spy(spies: list[subprocess.Popen]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for spy in spies:
        spy.wait(60)


def print_processes(rows: list[dict]) -> None:
    for r in rows:
        threads = ", ".join(f"{t['name']} {t['cpu_s']}" for t in r["threads"])
        print(f"  {r['role']:>13} {r['cpu_s']:7.2f} CPU s  {r['cores']:.2f} cores  [{threads}]", flush=True)


def summarize(times: dict[str, list[float]], start: float, end: float) -> dict:
    ttft = np.array([t[0] - start for t in times.values()])
    itl = np.concatenate([np.diff(t) for t in times.values() if len(t) > 1])
    tokens = sum(len(t) for t in times.values())
    span = end - start
    pct = {f"{name}_p{q}_ms": float(np.percentile(values, q) * 1000) for name, values in (("ttft", ttft), ("itl", itl))
           for q in (50, 90, 99)}
    return {"requests": len(times), "tokens": tokens, "span_s": span, "req_s": len(times) / span,
            "tok_s": tokens / span, **pct}


def _cell(value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def write(out: Path, records: list[dict], args: argparse.Namespace) -> None:
    env = environment(args.commit)
    folder = out / env["commit"][:7]
    folder.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "args": vars(args) | {"out": str(out)}, "records": records}
    (folder / "service-overhead.json").write_text(json.dumps(report, indent=1, default=str))
    cols = ["requests", "max_tokens", "repeat", "engine_req_s", "stack_req_s", "ratio", "engine_ttft_p50_ms",
            "stack_ttft_p50_ms", "engine_ttft_p99_ms", "stack_ttft_p99_ms", "engine_itl_p50_ms", "stack_itl_p50_ms",
            "engine_itl_p99_ms", "stack_itl_p99_ms"]
    lines = ["# The service path against the in-process engine", "",
             f"commit `{env['commit']}`, {env['gpu']}, torch {env['torch']}, {env['date']}", "",
             f"command: `{env['command']}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    lines += ["", "| requests | runs | median ratio | median stack / engine first-token p50 |", "|---|---|---|---|"]
    for n in dict.fromkeys(r["requests"] for r in records):
        runs = [r for r in records if r["requests"] == n]
        ttft = np.median([r["stack_ttft_p50_ms"] / r["engine_ttft_p50_ms"] for r in runs])
        lines.append(f"| {n} | {len(runs)} | {np.median([r['ratio'] for r in runs]):.3f} | {ttft:.2f}x |")
    (folder / "service-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, nargs="+", default=[480], help="requests per run (runs per value)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=1, help="engine/stack pairs per request count (medians reported)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--commit", default=None)
    p.add_argument("--py-spy", type=Path, default=None, help="sample ingest and engine with py-spy into this folder")
    p.add_argument("--out", type=Path, default=Path("bench/results/service-overhead"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, adapters = build_assets(Path(tmp))
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        proc, ready = start_stack(model, adapters, args, Path(tmp))
        engine, weights = make_engine(model, adapters, args)
        cpu = ProcessCpu(proc.pid, extra={"client": os.getpid()})
        own_cpu = ProcessCpu(None, extra={"in-process engine": os.getpid()})
        records = []
        try:
            # Warm both paths at full size: first steps, and the stack's first burst, are slow
            # (buffers and code paths that small runs never reach).
            warm = workload(max(args.requests), 4, vocab)
            asyncio.run(run_stack(ready, warm))
            run_engine(engine, weights, warm)
            for n in args.requests:
                for repeat in range(args.repeat):  # engine and stack alternate: drift hits both alike
                    records.append(measure_pair(engine, weights, ready, workload(n, args.max_tokens, vocab),
                                                cpu, own_cpu, proc.pid, args, Path(tmp)) | {"repeat": repeat})
                    write(args.out, records, args)
        finally:
            engine.close()
            stop_subprocess(proc, signal.SIGINT, 60)  # up drains and stops its broker and Redis


if __name__ == "__main__":
    main()
