"""SIGTERM/SIGINT -> an asyncio.Event, for services that drain before they exit."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from contextlib import suppress


def install_signal_stop(stop: asyncio.Event | None) -> tuple[asyncio.Event, list[signal.Signals]]:
    """Return (stop event, signals hooked). A caller-given event is used as is (tests, `up`)."""
    if stop is not None:
        return stop, []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    return stop, installed


def stop_subprocess(proc: subprocess.Popen, sig: int, timeout_s: float) -> None:
    """Send `sig` to a child still running, wait up to `timeout_s` for it, then SIGKILL and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
