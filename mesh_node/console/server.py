"""`ConsoleServer`: the console app on a TCP port, with a bounded start/stop lifetime."""

from __future__ import annotations

import logging

from aiohttp import web

from mesh_node.console.api import create_app
from mesh_node.console.source import StatusSource
from mesh_node.http_site import start_site, stop_site

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
        self._runner, self.port = await start_site(
            self.app, self.host, self.port, self.shutdown_timeout
        )
        log.info("console listening on %s", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await stop_site(runner, self.shutdown_timeout, "the console")

    async def __aenter__(self) -> ConsoleServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
