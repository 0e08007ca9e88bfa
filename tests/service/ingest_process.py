"""`lorafleet ingest` as a process, run as an operator runs it: flags, a ready file, /metrics on any
free port; SIGKILLed mid-batch or stopped with SIGTERM. Its consumed counter (what it read from
the requests topic, counted again each time a batch is handled again) tells a test when ingest
holds a batch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from lorafleet.common.signals import stop_subprocess
from lorafleet.ingest.config import IngestConfig
from tests.service.kafka_helpers import POLL_S


class IngestProcess:
    def __init__(self, config: IngestConfig, tmp: Path, name: str, env: dict[str, str] | None = None):
        self.ready_file, self.log_path = tmp / f"{name}.ready", tmp / f"{name}.log"
        self.argv = [sys.executable, "-m", "lorafleet.cli", "ingest", "--model", str(config.model_dir),
                     "--kafka-bootstrap", config.kafka_bootstrap, "--redis-url", config.redis_url,
                     "--requests-topic", config.requests_topic, "--dlq-topic", config.dlq_topic,
                     "--work-topic", config.work_topic, "--requests-partitions", str(config.requests_partitions),
                     "--work-partitions", str(config.work_partitions), "--group-id", config.group_id,
                     "--kafka-session-timeout-ms", str(config.session_timeout_ms),
                     "--ready-file", str(self.ready_file), "--metrics-port", "0"]
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.metrics_url = ""

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    async def start(self, timeout_s: float = 120) -> "IngestProcess":
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "wb"))
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            assert self.proc.poll() is None, f"ingest exited with {self.proc.returncode}: {self.log_tail()}"
            assert time.monotonic() < deadline, f"ingest was not ready within {timeout_s}s: {self.log_tail()}"
            await asyncio.sleep(POLL_S)
        self.metrics_url = f"http://127.0.0.1:{json.loads(self.ready_file.read_text())['metrics_port']}/metrics"
        return self

    async def consumed(self) -> float:
        """lorafleet_ingest_consumed_total: messages read, each time its batch was handled."""
        self.alive()
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(self.metrics_url, timeout=10).read().decode())
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == "lorafleet_ingest_consumed_total")

    async def wait_consumed(self, count: int, timeout_s: float = 60,
                            unless: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Until ingest has read `count` messages (handled or being handled), or `unless()` is true."""
        deadline = time.monotonic() + timeout_s
        while (seen := await self.consumed()) < count:
            if unless is not None and await unless():
                return
            assert time.monotonic() < deadline, f"ingest read {seen} of {count} messages in {timeout_s}s"
            await asyncio.sleep(POLL_S)

    def alive(self) -> None:
        assert self.proc.poll() is None, f"ingest exited with {self.proc.returncode}: {self.log_tail()}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (ingest drains), SIGKILL after a minute; nothing when it has exited."""
        if self.proc is not None:
            stop_subprocess(self.proc, signal.SIGTERM, 60)
