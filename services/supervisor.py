"""The children of `lorafleet up`: each service its own process, restarted when it dies.

A child that exits after the stack was ready is started again after a backoff (1 s, doubling, at
most 30 s); the embedded broker and redis-server are not the children's and outlive them, so a
crashing service costs its own in-flight work only (Kafka redelivers it). A child that dies more
than `restart_limit` times within `restart_window_s` is crash-looping: the supervisor gives up and
names it (CrashLoop), and `up` stops. Before the stack is ready, any exit is fatal (a
configuration error must not be retried forever).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

MAX_BACKOFF_S = 30.0


class CrashLoop(RuntimeError):
    """A child died too often; the message names it, its exits and its log."""


@dataclass
class Child:
    name: str
    argv: list[str]
    ready: Path
    log: Path
    proc: subprocess.Popen | None = None
    crashes: deque = field(default_factory=deque)  # monotonic times of recent unexpected exits
    restart_at: float | None = None  # set while waiting out the backoff


class Supervisor:
    def __init__(self, workdir: Path, env: dict[str, str], *, restart_limit: int, restart_window_s: float,
                 command: tuple[str, ...] = (sys.executable, "-m", "lorafleet.cli")):
        """command: what each child runs, before its own argv and --ready-file (tests swap it)."""
        self.workdir, self.env, self.command = workdir, env, command
        self.restart_limit, self.restart_window_s = restart_limit, restart_window_s
        self.children: list[Child] = []
        self.restarts = 0

    def start(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self.workdir / f"{name}.ready", self.workdir / f"{name}.log")
        self.children.append(child)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.ready.unlink(missing_ok=True)  # the previous run's: readiness must be the new one's
        cmd = [*self.command, *child.argv, "--ready-file", str(child.ready)]
        with open(child.log, "ab") as log:
            child.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        child.restart_at = None

    def wait_ready(self, timeout_s: float) -> None:
        """Every child ready, else RuntimeError naming the first that exited or took too long."""
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            while not child.ready.exists():
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: {_last_line(child.log)} "
                                       f"(log: {child.log})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} was not ready within {timeout_s:.0f}s; see {child.log}")
                time.sleep(0.2)

    def supervise(self, now: float | None = None) -> list[str]:
        """One look at the children: restart those whose backoff is over, schedule the newly dead.
        Returns what happened, one line each (for the log). Raises CrashLoop."""
        now = time.monotonic() if now is None else now
        events = []
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._spawn(child)
                    self.restarts += 1
                    events.append(f"{child.name} restarted (pid {child.proc.pid})")
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.crashes.append(now)
            while child.crashes and now - child.crashes[0] > self.restart_window_s:
                child.crashes.popleft()
            if len(child.crashes) > self.restart_limit:
                raise CrashLoop(f"{child.name} exited {len(child.crashes)} times within {self.restart_window_s:.0f}s "
                                f"(last exit code {code}): {_last_line(child.log)} (log: {child.log})")
            delay = min(MAX_BACKOFF_S, 2.0 ** (len(child.crashes) - 1))
            child.restart_at = now + delay
            events.append(f"{child.name} exited with {code}; restarting in {delay:.0f}s")
        return events

    def stop(self, timeout_s: float) -> None:
        """SIGTERM to every child (they drain), SIGKILL to those still running at the deadline."""
        running = [c.proc for c in reversed(self.children) if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _last_line(log: Path) -> str:
    """The last line a child wrote (its error, when it exits at start), cut to one screen line."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"
