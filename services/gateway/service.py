"""The gateway service: the OpenAI-compatible API (app.py) on uvicorn, beside Kafka and Redis.

Life of the service:
1. create the requests topic when missing (a gateway may start before ingest), start the Kafka
   producer (acks=all) and the reply reader (ReplyMux), then serve HTTP; report ready with the
   port it listens on.
2. serve until SIGTERM/SIGINT (uvicorn's own graceful shutdown: no new connections, answers in
   flight get `drain_timeout_s` to finish; those still open then are cancelled end to end), or
   until the caller's `stop` event.
3. stop the reply reader and flush the producer.

The gateway keeps no state between calls: any number of replicas serve behind one Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import uvicorn

from lorafleet.common.kafka import TopicSpec, ensure_topics, make_producer, with_kafka_retries
from lorafleet.common.logging import get_logger
from lorafleet.common.signals import install_signal_stop
from lorafleet.gateway.app import Gateway
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.reply_mux import ReplyMux

START_TIMEOUT_S = 30.0  # uvicorn binding its socket


async def run_gateway(config: GatewayConfig, *, stop: asyncio.Event | None = None,
                      on_ready: Callable[[int], None] | None = None, metrics: GatewayMetrics | None = None) -> None:
    """Serve until `stop` is set (default: until SIGTERM/SIGINT). on_ready(port) once serving."""
    log = get_logger("gateway")
    stop, installed = install_signal_stop(stop)
    await ensure_topics(config.kafka_bootstrap, [TopicSpec(config.requests_topic, config.requests_partitions)])
    producer = make_producer(config.kafka_bootstrap, client_id="lorafleet-gateway")
    mux = ReplyMux(config.redis_url)
    try:
        await with_kafka_retries(producer.start, "start producer")
        await mux.start()
        gateway = Gateway(config, mux=mux, producer=producer, metrics=metrics or GatewayMetrics())
        server = uvicorn.Server(uvicorn.Config(
            gateway.app(), host=config.host, port=config.port, lifespan="off", log_config=None, access_log=False,
            timeout_graceful_shutdown=max(1, int(config.drain_timeout_s))))
        listener = _listen(config.host, config.port)
        port = listener.getsockname()[1]
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        await _started(server, serving)
        log.info("gateway ready", port=port, model=config.model_name, adapters=config.adapters or None,
                 requests_topic=config.requests_topic, auth=bool(config.api_key))
        if on_ready is not None:
            on_ready(port)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        server.should_exit = True
        await serving
        log.info("gateway stopped")
    finally:
        for sig in installed:
            asyncio.get_running_loop().remove_signal_handler(sig)
        await mux.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 10)


def _listen(host: str, port: int) -> socket.socket:
    """The bound socket uvicorn serves on: bound here, so a port in use is a clear error (uvicorn
    would exit the process) and port 0's choice is known before serving."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:  # a configuration error: one line, no traceback (cli.main)
        listener.close()
        raise ValueError(f"the gateway cannot listen on {host}:{port} ({exc.strerror}): another service there? "
                         "Pass --port 0 (any free port); `lorafleet up`: --gateway-port 0, or -1 for no gateway") from None
    return listener


async def _started(server: uvicorn.Server, serving: asyncio.Task) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + START_TIMEOUT_S
    while not server.started:
        if serving.done():
            serving.result()
            raise RuntimeError("the gateway's server stopped before it started")
        if loop.time() > give_up:
            raise TimeoutError(f"the gateway did not start listening within {START_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.02)
