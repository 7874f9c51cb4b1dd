"""`ConsoleServer`: the console app on a TCP port, with a bounded start/stop lifetime."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from mesh_node.console.api import create_app
from mesh_node.console.source import StatusSource

log = logging.getLogger("mesh_node.console")

DEFAULT_PORT = 3131


class ConsoleServer:
    """Serves the status page and API for `source` on http://host:port.

    `await start()` binds (port 0 picks a free port; read `port` or `url` afterwards);
    `await stop()` ends every event stream (closing their subscriptions) and the listener,
    within `shutdown_timeout` seconds. The console has no authentication: keep it on
    loopback unless the network is trusted.
    """

    def __init__(
        self,
        source: StatusSource,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        max_event_clients: int = 64,
        keepalive: float = 15.0,
        shutdown_timeout: float = 5.0,
    ):
        self.source = source
        self.host = host
        self.port = port
        self.max_event_clients = max_event_clients
        self.keepalive = keepalive
        self.shutdown_timeout = shutdown_timeout
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the console server is already started")
        self.app = create_app(
            self.source, max_event_clients=self.max_event_clients, keepalive=self.keepalive
        )
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that goes away ends its event stream now
            shutdown_timeout=self.shutdown_timeout,
            access_log=None,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("console listening on %s", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            async with asyncio.timeout(self.shutdown_timeout + 2.0):
                await runner.cleanup()
        except TimeoutError:
            log.warning("console did not stop within %.1fs", self.shutdown_timeout + 2.0)

    async def __aenter__(self) -> ConsoleServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
