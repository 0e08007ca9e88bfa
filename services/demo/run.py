"""`lorafleet demo`: start the stack with the demo model and adapters, send requests over every
demo adapter and the base model at once, and stream the replies to the terminal as they arrive."""

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

from lorafleet.common import settings
from lorafleet.common.signals import stop_subprocess


def _start_stack(device: str, ready_file: Path) -> subprocess.Popen:
    env = dict(os.environ, LORAFLEET_DEVICE=device)
    env.pop("LORAFLEET_MODEL", None), env.pop("LORAFLEET_ADAPTERS", None)  # the demo's own
    return subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "up", "--ready-file", str(ready_file)], env=env,
                            stdout=subprocess.DEVNULL)


def _wait_ready(proc: subprocess.Popen, ready_file: Path, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while not ready_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"lorafleet up exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("lorafleet up was not ready in time")
        time.sleep(0.3)
    return json.loads(ready_file.read_text())


async def _stream_all(ready: dict, jobs: list[tuple[str, str | None, str]]) -> list[tuple[str, str, str]]:
    from lorafleet.client import LorafleetClient
    from lorafleet.common.messages import DoneReply, TokenReply

    width = max(len(label) for label, _, _ in jobs)
    results = []
    async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
        run = f"{int(time.time())}"
        streams = []
        for i, (label, adapter, prompt) in enumerate(jobs):
            req = {"id": f"demo-{run}-{i}", "adapter": adapter, "prompt": prompt, "max_tokens": 40, "temperature": 0}
            streams.append((label, prompt, await client.submit(req)))

        async def follow(label: str, prompt: str, stream: str) -> None:
            text = []
            async for entry in client.replies(stream=stream, timeout=300):
                if isinstance(entry, TokenReply):
                    if entry.text:
                        text.append(entry.text)
                        print(f"{label:<{width}} | {entry.text!r}", flush=True)
                elif isinstance(entry, DoneReply):
                    results.append((label, prompt, "".join(text) + f"   [{entry.finish_reason}, {entry.completion_tokens} tokens]"))
                else:
                    results.append((label, prompt, f"ERROR {entry.code}: {entry.message}"))

        await asyncio.gather(*(follow(*s) for s in streams))
    return sorted(results)


def run_demo(args: argparse.Namespace) -> int:
    from lorafleet.demo.assets import ensure_demo_assets

    demo = ensure_demo_assets(Path(settings.read("CACHE_DIR")).expanduser())
    jobs: list[tuple[str, str | None, str]] = []
    for adapter_id in demo.adapter_ids:
        for example in demo.adapter_examples[adapter_id][:1]:
            jobs.append((adapter_id, adapter_id, example.prompt))
            jobs.append((f"base: {adapter_id} prompt", None, example.prompt))
    jobs += [("base", None, p) for p in demo.base_prompts[:2]]
    with tempfile.TemporaryDirectory() as tmp:
        ready_file = Path(tmp) / "ready.json"
        print("starting lorafleet up (embedded Kafka broker, redis-server, adapter store, ingest, engine)...", flush=True)
        proc = _start_stack(args.device, ready_file)
        try:
            ready = _wait_ready(proc, ready_file)
            print(f"ready: {json.dumps(ready)}\nsending {len(jobs)} requests at once; tokens as they stream in:\n", flush=True)
            results = asyncio.run(_stream_all(ready, jobs))
            print("\n=== replies ===")
            for label, prompt, text in results:
                print(f"[{label}]\n  prompt: {prompt!r}\n  reply:  {text}")
            return 0
        finally:
            stop_subprocess(proc, signal.SIGINT, 60)
