"""An aiohttp application served on a TCP port: started, and stopped within a bound.

The console and the OpenAI-compatible API are both such sites. A client that goes away
cancels its handler at once (`handler_cancellation`: an abandoned generation or event
stream stops); stopping waits at most `shutdown_timeout` (+2 s) for open requests.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

log = logging.getLogger("mesh_node.http")


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
