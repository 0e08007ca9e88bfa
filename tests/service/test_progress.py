"""Progress bars appear on a terminal only: a service's or a benchmark's stderr that is a file
(Kubernetes, CI, logs) gets no bar."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

_SHOW = "from lorafleet.common.progress import progress\nfor _ in progress(range(3), 'loading weights'): pass\n"


def test_a_bar_on_a_terminal_and_none_in_a_file(tmp_path):
    quiet = subprocess.run([sys.executable, "-c", _SHOW], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == ""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a real terminal's size
    proc = subprocess.Popen([sys.executable, "-c", _SHOW], stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    try:
        while chunk := os.read(leader, 4096):  # read while it runs: the terminal closes with it
            out += chunk
    except OSError:
        pass
    assert proc.wait(60) == 0
    assert b"loading weights" in out, out
