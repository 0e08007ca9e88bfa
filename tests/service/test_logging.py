"""Every log line of a service carries its `service` field: lines of loggers made with get_logger
(their own service), of bare structlog loggers and of standard-library loggers (the process's)."""

from __future__ import annotations

import json
import subprocess
import sys

_LOG = """
import logging, structlog
from lorafleet.common.logging import configure_logging, get_logger
configure_logging("adapter-store", "info")
structlog.get_logger().bind(adapter_id="a/b").info("bare_event")
get_logger("engine").info("bound event")
logging.getLogger("aiokafka").warning("library warning")
"""


def test_every_line_names_its_service():
    done = subprocess.run([sys.executable, "-c", _LOG], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = {line["event"]: line for line in map(json.loads, done.stderr.splitlines())}
    assert lines["bare_event"]["service"] == "adapter-store" and lines["bare_event"]["adapter_id"] == "a/b"
    assert lines["bound event"]["service"] == "engine"
    assert lines["library warning"]["service"] == "adapter-store"
