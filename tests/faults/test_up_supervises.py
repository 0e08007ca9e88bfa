"""`lorafleet up` supervises its services (the reliability issue's row D6): an engine killed
mid-generation is restarted while the embedded broker and Redis keep running, its request is
finished by the new engine with every token once, and a service that keeps dying stops the stack
with the reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafleet.client import LorafleetClient
from lorafleet.common.messages import DoneReply, TokenReply
from tests.infra_fixtures import unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _children(pid: int) -> dict[str, int]:
    """name -> pid of a process's children ('engine', 'ingest', 'tansu', 'redis-server', ...)."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        words = [w.decode(errors="replace") for w in argv if w]
        name = next((w for w in words if w in ("engine", "ingest", "adapter-store")), Path(words[0]).name)
        found[name] = int(child)
    return found


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s}s")


async def test_a_killed_engine_is_restarted_and_a_crash_loop_stops_the_stack(zoo, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(zoo.adapter("mha", "r4-pattern"), root / "t" / "a")
    ready_file = tmp_path / "ready.json"
    env = dict(os.environ, LORAFLEET_UP_RESTART_LIMIT="1", LORAFLEET_UP_RESTART_WINDOW_S="300")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", "up", "--model", str(zoo.model("mha")),
                             "--adapters", str(root), "--device", "cpu", "--ready-file", str(ready_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "up.log", "wb"))
    try:
        _wait(lambda: ready_file.exists() or proc.poll() is not None, 180, "lorafleet up ready")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        ready = json.loads(ready_file.read_text())
        before = _children(proc.pid)
        rid = unique_name("survivor")
        async with LorafleetClient(ready["kafka_bootstrap"], ready["redis_url"]) as client:
            stream = await client.submit({"id": rid, "prompt": "hello", "max_tokens": 48, "temperature": 0,
                                          "ignore_eos": True})
            entries = []
            async for entry in client.replies(stream=stream, timeout=120):
                entries.append(entry)
                if len(entries) == 3:  # mid-generation
                    os.kill(before["engine"], signal.SIGKILL)
            restarted = _children(proc.pid)
            tokens = [t for e in entries if isinstance(e, TokenReply) for t in e.token_ids]
            indexes = [e.index for e in entries if isinstance(e, TokenReply)]
            assert isinstance(entries[-1], DoneReply) and entries[-1].completion_tokens == 48 == len(tokens)
            assert indexes == sorted(set(indexes)), "a token was written twice"
        assert restarted["engine"] != before["engine"]
        for server in set(before) - {"engine"}:  # broker, redis, store, ingest: untouched
            assert restarted[server] == before[server], server
        assert "engine-0 exited with -9; restarting" in (tmp_path / "up.log").read_text()

        os.kill(restarted["engine"], signal.SIGKILL)  # the second exit within the window: a crash loop
        assert _wait(lambda: proc.poll() is not None, 120, "up stopping after a crash loop")
        assert proc.returncode == 1
        assert "engine-0 exited 2 times within 300s" in (tmp_path / "up.log").read_text()
        for name, pid in before.items():  # up stopped its services and its broker and Redis
            _wait(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 30, f"{name} gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
