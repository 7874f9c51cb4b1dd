"""`ConsoleServer`: the console app on a TCP port, with a bounded start/stop lifetime."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import web

from mesh_node.console.api import create_app
from mesh_node.console.source import StatusSource
from mesh_node.http_site import HttpServer

log = logging.getLogger("mesh_node.console")

DEFAULT_PORT = 3131


class ConsoleServer(HttpServer):
    """Serves the status page and API for `source` on http://host:port.

    `await start()` binds (port 0 picks a free port; read `port` or `url` afterwards);
    `await stop()` ends every event stream (closing their subscriptions) and the listener,
    within `shutdown_timeout` seconds. The console has no authentication: keep it on
    loopback unless the network is trusted.
    """

    what = "the console server"
    service = "console"

    def __init__(
        self,
        source: StatusSource,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        max_event_clients: int = 64,
        keepalive: float = 15.0,
        shutdown_timeout: float = 5.0,
        allowed_hosts: Iterable[str] = (),
    ):
        super().__init__(host, port, shutdown_timeout, allowed_hosts)
        self.source = source
        self.max_event_clients = max_event_clients
        self.keepalive = keepalive

    def create_app(self) -> web.Application:
        return create_app(
            self.source, max_event_clients=self.max_event_clients, keepalive=self.keepalive
        )

    async def start(self) -> None:
        await super().start()
        log.info("console listening on %s", self.url)
