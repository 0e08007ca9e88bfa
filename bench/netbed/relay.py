"""A TCP relay that delays every chunk by `delay` ± `jitter`: latency on a link without netem.

This kernel has no netem qdisc (`tc qdisc add ... netem` answers "Specified qdisc kind is
unknown") and Toxiproxy is in none of the registries this machine reaches, so the bed adds
latency in user space: the relay runs in the client's namespace on the server's own address (a
/32 on the client's lo shadows the server's address there, see NetBed.add_address) and forwards
to the server's second address. Each direction keeps its order (a chunk never leaves before the
one read before it), so jitter varies the delay without reordering bytes, as on one TCP flow.

    python -m lorafleet.bench.netbed.relay --listen 10.213.0.10:6379 --to 10.213.0.110:6379 \
        --delay-ms 20 --jitter-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

CHUNK = 65536
CONNECT_TIMEOUT_S = 10.0


class DelayedPipe:
    """One direction of one connection: read, hold until due, write; order kept."""

    def __init__(self, delay_s: float, jitter_s: float, rng: random.Random) -> None:
        self.delay_s, self.jitter_s, self.rng = delay_s, jitter_s, rng

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(held, writer))
        last_due = 0.0
        try:
            while data := await reader.read(CHUNK):
                due = time.monotonic() + max(0.0, self.delay_s + self.rng.uniform(-self.jitter_s, self.jitter_s))
                last_due = max(last_due, due)  # never before the chunk read before it
                held.put_nowait((last_due, data))
        finally:
            held.put_nowait((last_due, b""))  # end of stream, after everything held
            await sender

    async def _send(self, held: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return


async def serve(listen: tuple[str, int], to: tuple[str, int], delay_s: float, jitter_s: float, seed: int) -> None:
    rng = random.Random(seed)

    async def relay(client_reader, client_writer) -> None:
        print(f"connection from {client_writer.get_extra_info('peername')[0]}", flush=True)
        try:
            server_reader, server_writer = await asyncio.wait_for(asyncio.open_connection(*to), CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError):
            client_writer.close()
            return
        try:
            await asyncio.gather(DelayedPipe(delay_s, jitter_s, rng).run(client_reader, server_writer),
                                 DelayedPipe(delay_s, jitter_s, rng).run(server_reader, client_writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    server = await asyncio.start_server(relay, *listen)
    print(f"relaying {listen[0]}:{listen[1]} -> {to[0]}:{to[1]}", flush=True)  # the bed waits for this line
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--to", type=_address, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.jitter_ms > args.delay_ms or args.delay_ms < 0:
        parser.error("--jitter-ms must lie within 0..--delay-ms")
    asyncio.run(serve(args.listen, args.to, args.delay_ms / 1000, args.jitter_ms / 1000, args.seed))


if __name__ == "__main__":
    main()
