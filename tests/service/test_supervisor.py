"""Supervisor (what `lorafleet up` runs its services under) with real child processes and given
clock readings: restart after a doubling backoff, give up past the crash-loop limit, and stop
children that ignore SIGTERM."""

from __future__ import annotations

import os
import sys
import time

import pytest

from lorafleet.supervisor import CrashLoop, Supervisor

EXIT_AT_ONCE = (sys.executable, "-c", "import sys; print('starting'); sys.exit('svc: port 1 is taken')")
# Writes its ready file (the last argument) and then lives until signalled.
STAY = (sys.executable, "-c", "import pathlib, sys, time; pathlib.Path(sys.argv[-1]).write_text('{}'); time.sleep(600)")


def _wait_exit(sup: Supervisor) -> None:
    for child in sup.children:
        child.proc.wait(30)


def test_a_dead_child_restarts_after_a_doubling_backoff_then_crash_loops(tmp_path):
    sup = Supervisor(tmp_path, dict(os.environ), restart_limit=2, restart_window_s=100, command=EXIT_AT_ONCE)
    child = sup.start("svc", [])
    _wait_exit(sup)
    assert sup.supervise(now=0) == ["svc exited with 1; restarting in 1s"]
    assert sup.supervise(now=0.5) == []  # still backing off
    first = child.proc.pid
    assert sup.supervise(now=1.0) == [f"svc restarted (pid {child.proc.pid})"] and child.proc.pid != first
    _wait_exit(sup)
    assert sup.supervise(now=2.0) == ["svc exited with 1; restarting in 2s"]
    assert sup.supervise(now=3.9) == [] and sup.supervise(now=4.0)[0].startswith("svc restarted")
    _wait_exit(sup)
    with pytest.raises(CrashLoop, match=r"svc exited 3 times within 100s \(last exit code 1\): svc: port 1 is taken"):
        sup.supervise(now=5.0)
    assert sup.restarts == 2


def test_exits_outside_the_window_are_forgotten(tmp_path):
    sup = Supervisor(tmp_path, dict(os.environ), restart_limit=1, restart_window_s=10, command=EXIT_AT_ONCE)
    sup.start("svc", [])
    for now in (0, 100, 200):  # one exit per 100 s: never two within 10 s
        _wait_exit(sup)
        assert "exited with 1" in sup.supervise(now=now)[0]
        assert "restarted" in sup.supervise(now=now + 1)[0]
    sup.stop(5)


def test_ready_files_and_stop(tmp_path):
    sup = Supervisor(tmp_path, dict(os.environ), restart_limit=1, restart_window_s=10, command=STAY)
    sup.start("a", [])
    sup.start("b", [])
    sup.wait_ready(60)
    assert all(c.ready.exists() for c in sup.children) and sup.supervise() == []
    started = time.monotonic()
    sup.stop(10)
    assert all(c.proc.poll() is not None for c in sup.children) and time.monotonic() - started < 10


def test_a_child_that_dies_before_ready_is_fatal(tmp_path):
    sup = Supervisor(tmp_path, dict(os.environ), restart_limit=5, restart_window_s=10, command=EXIT_AT_ONCE)
    sup.start("svc", [])
    with pytest.raises(RuntimeError, match="svc exited with 1: svc: port 1 is taken"):  # its last line says why
        sup.wait_ready(30)
