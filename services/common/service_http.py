"""Every service's HTTP port: Prometheus metrics at /metrics, and /health and /ready for probes
that speak HTTP (the exec probes, `--check live|ready`, stay: both answer from health.problems).

The server is prometheus_client's own threaded WSGI server, so a scrape never waits on the
service's event loop, and a stuck loop cannot hide: /health reads the heartbeat the loop keeps,
as the exec probe does. /health and /ready run the same checks as `--check live` and
`--check ready` (bounded in time) and answer 200 with `ok: ...` or 503 with every reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .logging import get_logger


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # scrapes every few seconds: not worth a log line each
        pass


class ServiceHttp:
    def __init__(self, port: int, registry: CollectorRegistry, problems: Callable[[str], list[str]],
                 host: str = "0.0.0.0"):
        """problems(mode) -> every reason the service is not `mode` ('live' or 'ready'), [] when it is.
        port 0: any free port (`port` says which, once started)."""
        self.registry, self.problems = registry, problems
        metrics = make_wsgi_app(registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path in ("/health", "/ready"):
                mode = "live" if path == "/health" else "ready"
                try:
                    found = problems(mode)
                except Exception as exc:  # a check that crashes is a finding, not a 500 without a reason
                    found = [f"the {mode} check failed: {type(exc).__name__}: {exc}"]
                status = "503 Service Unavailable" if found else "200 OK"
                body = (f"unhealthy: {'; '.join(found)}" if found else f"ok: {mode}").encode() + b"\n"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
                return [body]
            if path in ("/metrics", "/"):
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics, /health, /ready\n"]

        try:
            self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"the metrics port {port} cannot be opened ({exc.strerror}): another service on "
                          "this host? Pass --metrics-port 0 (any free port) or -1 (none)") from exc
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="lorafleet-http", daemon=True)

    def start(self) -> "ServiceHttp":
        self._thread.start()
        get_logger("http").info("serving /metrics, /health, /ready", port=self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
