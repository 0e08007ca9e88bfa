"""`lorafleet up` as the fault tests run it: a process started as a user would, waited for until
its ready file appears, stopped with SIGINT (it drains and stops its broker and Redis), killed if
that takes over a minute; and the tests' own broker or Redis, killed and started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lorafleet.common.embedded import EmbeddedProcess
from lorafleet.common.signals import stop_subprocess


class UpStack:
    def __init__(self, tmp: Path, model: Path, adapters: Path, *args: str, env: dict[str, str] | None = None):
        self.tmp, self.ready_file = tmp, tmp / "ready.json"
        self.argv = [sys.executable, "-m", "lorafleet.cli", "up", "--model", str(model), "--adapters", str(adapters),
                     "--device", "cpu", "--ready-file", str(self.ready_file), *args]
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}

    def log_tail(self) -> str:
        return (self.tmp / "up.log").read_text()[-3000:]

    def start(self, timeout_s: float = 240) -> "UpStack":
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.tmp / "up.log", "wb"))
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            assert self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, f"lorafleet up was not ready within {timeout_s}s"
            time.sleep(0.2)
        self.ready = json.loads(self.ready_file.read_text())
        return self

    def alive(self) -> None:
        assert self.proc.poll() is None, self.log_tail()

    def stop(self) -> None:
        if self.proc is not None:
            stop_subprocess(self.proc, signal.SIGINT, 60)


class Restartable:
    """An embedded server (lorafleet.common.embedded) to SIGKILL and start again on its port, or
    to stall (SIGSTOP) and resume.
    start(port) launches it: port None at first, then the port it had."""

    def __init__(self, start: Callable[[int | None], EmbeddedProcess]):
        self._start = start
        self.server = start(None)

    @property
    def port(self) -> int:
        return self.server.port

    def kill(self) -> None:
        self.server.process.kill()
        self.server.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections and data (a stall);
        what clients send meanwhile waits in its sockets and is served after resume()."""
        self.server.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.server.process.send_signal(signal.SIGCONT)

    def start(self) -> None:
        self.server = self._start(self.server.port)

    def stop(self) -> None:
        self.server.stop()
