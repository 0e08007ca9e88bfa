"""The README's "talk to lorafleet" block, run as written (`lorafleet up &`, then `send` and `tail`
with no wait in between), then `send --json -` and `tail`'s exit codes against the same stack.

The block runs in bash in its own session, with the installed `lorafleet` command on PATH; only the
ready file's path is swapped for a temporary one, and LORAFLEET_MODEL / LORAFLEET_ADAPTERS point
`up` at a zoo model and an adapter root holding the block's adapter id (the demo model would take
minutes to build here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
README_READY_FILE = "/tmp/lorafleet.json"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- talk-example -->\s*```bash\n(.*?)```", text, re.S)
    assert found, "README.md lost its talk-example block"
    return found.group(1)


@pytest.fixture
def stack_env(zoo, tmp_path):
    block = readme_block()
    adapter_id = re.search(r"--adapter (\S+)", block).group(1)
    root = tmp_path / "adapters"
    shutil.copytree(zoo.adapter("mha", "r4-pattern"), root / adapter_id)
    env = dict(os.environ, LORAFLEET_MODEL=str(zoo.model("mha")), LORAFLEET_ADAPTERS=str(root),
               LORAFLEET_DEVICE="cpu", LORAFLEET_WAIT_READY_S="240",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env, tmp_path / "lorafleet.json"


def _lorafleet(env, *argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["lorafleet", *argv], env=env, input=stdin, capture_output=True, text=True, timeout=300)


def test_readme_block_then_send_json_and_tail_exit_codes(stack_env, tmp_path):
    env, ready_file = stack_env
    script = readme_block().replace(README_READY_FILE, str(ready_file))
    script = "\n".join(ln for ln in script.splitlines() if not ln.startswith(". .venv/bin/activate"))
    # stdout to a file, not a pipe: the backgrounded `up` keeps its stdout open after bash exits
    # (and prints the ready JSON there, as in a terminal)
    out_file = tmp_path / "block.out"
    shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=tmp_path, text=True,
                             stdout=open(out_file, "w"), stderr=open(tmp_path / "block.log", "w"), start_new_session=True)
    try:
        shell.wait(timeout=360)
        log = (tmp_path / "block.log").read_text()[-3000:]
        assert shell.returncode == 0, log
        lines = [ln for ln in out_file.read_text().splitlines() if '"kafka_bootstrap"' not in ln]
        # send prints the id (the README's r1), then tail one JSON object per entry up to `done`
        assert lines[0] == re.search(r"--id (\S+)", readme_block()).group(1)
        entries = [json.loads(ln) for ln in lines[1:]]
        assert entries and all(e["type"] == "token" for e in entries[:-1])
        assert entries[-1]["type"] == "done" and entries[-1]["completion_tokens"] == sum(len(e["token_ids"]) for e in entries[:-1])

        # against the same stack: two requests from stdin, one for an adapter that does not exist
        reqs = [{"id": "j-ok", "prompt": "hello", "max_tokens": 3, "temperature": 0},
                {"id": "j-missing", "adapter": "no/such", "prompt": "hello", "max_tokens": 3}]
        sent = _lorafleet(env, "send", "--ready-file", str(ready_file), "--json", "-",
                          stdin="\n".join(json.dumps(r) for r in reqs) + "\n")
        assert sent.returncode == 0 and sent.stdout.split() == ["j-ok", "j-missing"], sent.stderr
        ok = _lorafleet(env, "tail", "--ready-file", str(ready_file), "--text", "j-ok")
        assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["type"] == "done", ok.stderr
        missing = _lorafleet(env, "tail", "--ready-file", str(ready_file), "j-missing")
        assert missing.returncode == 1, missing.stderr
        error = json.loads(missing.stdout.splitlines()[-1])
        assert (error["type"], error["code"]) == ("error", "adapter_not_found") and "no/such" in error["message"]
        never = _lorafleet(env, "tail", "--ready-file", str(ready_file), "--timeout-s", "1", "never-sent")
        assert never.returncode == 3 and "no terminal entry" in never.stderr
        bad = _lorafleet(env, "send", "--ready-file", str(ready_file), "--adapter", "x")
        assert bad.returncode == 2 and "--prompt is required" in bad.stderr
    finally:
        _stop_group(shell)


def _stop_group(shell: subprocess.Popen) -> None:
    """SIGTERM to the block's session (`up` drains and stops its broker and redis); SIGKILL to
    whatever is left after 60 s. Bounded: an unreaped zombie still answers kill(pgid, 0)."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 5)):
        try:
            os.killpg(shell.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(shell.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            continue
        break
    shell.wait(10)
