"""An aiohttp application served on a TCP port: started, and stopped within a bound.

The console and the OpenAI-compatible API are both such sites (`HttpServer` subclasses).
A client that goes away cancels its handler at once (`handler_cancellation`: an abandoned
generation or event stream stops); stopping waits at most `shutdown_timeout` (+2 s) for
open requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Self

from aiohttp import web

log = logging.getLogger("mesh_node.http")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_names_only(error_body):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        """For a site bound to loopback: a request naming another host (a web page whose
        name was rebound to 127.0.0.1, reading this site from the user's browser) is refused
        with a 403 in the site's error JSON."""
        host = request.headers.get("Host")
        if host is not None:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not _is_loopback(name):
                message = f"this site answers only to a loopback host, not {host!r}"
                return web.json_response(error_body(message), status=403)
        return await handler(request)

    return middleware


async def start_site(
    app: web.Application, host: str, port: int, shutdown_timeout: float
) -> tuple[web.AppRunner, int]:
    """Serves `app` on host:port (0 picks a port); returns the runner and the port bound."""
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def stop_site(runner: web.AppRunner, shutdown_timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(shutdown_timeout + 2.0):
            await runner.cleanup()
    except TimeoutError:
        log.warning("%s did not stop within %.1fs", what, shutdown_timeout + 2.0)


class HttpServer:
    """An app (built by the subclass's `create_app`) served on http://host:port.

    `await start()` binds (port 0 picks a free port; read `port` or `url` afterwards);
    `await stop()` ends open requests and the listener within `shutdown_timeout` seconds.
    """

    what = "the HTTP server"  # for errors and log lines

    def __init__(self, host: str, port: int, shutdown_timeout: float):
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The server's root, http://host:port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def create_app(self) -> web.Application:
        raise NotImplementedError

    def error_body(self, message: str) -> dict:
        """The site's JSON for an error it answers itself (the 403 to a foreign Host)."""
        return {"error": message}

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError(f"{self.what} is already started")
        self.app = self.create_app()
        if _is_loopback(self.host):
            self.app.middlewares.insert(0, _loopback_names_only(self.error_body))
        self._runner, self.port = await start_site(
            self.app, self.host, self.port, self.shutdown_timeout
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await stop_site(runner, self.shutdown_timeout, self.what)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
