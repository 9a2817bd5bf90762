"""A loopback TCP proxy that makes a local server behave like a remote object store.

Every byte is delivered ``one_way_delay`` seconds after it arrived (so a
request/response round trip costs twice that), and each connection, in each
direction, is capped at ``bandwidth`` bytes per second — the per-stream limit
that makes real S3 clients open many connections.  Runs its own asyncio loop
on a daemon thread.

    proxy = LatencyProxy(upstream=("127.0.0.1", 5000), one_way_delay=0.010, bandwidth=25e6)
    proxy.start(); ... proxy.url ...; proxy.stop()
"""

from __future__ import annotations

import asyncio
import threading
import time


class LatencyProxy:
    def __init__(self, upstream: tuple[str, int], *, one_way_delay: float = 0.010,
                 bandwidth: float = 25e6, chunk: int = 64 * 1024) -> None:
        self.upstream = upstream
        self.one_way_delay = one_way_delay
        self.bandwidth = bandwidth
        self.chunk = chunk
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="latency-proxy")
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LatencyProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=256))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, up_writer), self._pipe(up_reader, client_writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward bytes with a fixed delay and a bandwidth cap, preserving order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            next_free = 0.0  # when the capped link can start sending the next piece
            while True:
                due, data = await queue.get()
                if not data:
                    break
                start = max(due, next_free, time.monotonic())
                next_free = start + len(data) / self.bandwidth
                delay = next_free - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(self.chunk)
                queue.put_nowait((time.monotonic() + self.one_way_delay, data))
                if not data:
                    break
        finally:
            await sender
