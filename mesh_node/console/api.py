"""The console's aiohttp application: JSON API, event stream, and the status page.

Routes (specified in proto/CONSOLE.md):

    GET /                 the status page (page/index.html, with console.js and console.css)
    GET /api/status       the status document
    GET /api/peers        {"peers": [PEER, ...]}
    GET /api/events       text/event-stream of changes (see events.py)

Every error, unknown paths included, is answered as JSON `{"error": "..."}`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from mesh_node.console.events import EventStreams
from mesh_node.console.source import StatusSource

log = logging.getLogger("mesh_node.console")

PAGE_DIR = Path(__file__).with_name("page")
PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/console.js": ("console.js", "text/javascript"),
    "/console.css": ("console.css", "text/css"),
}

SOURCE_KEY = web.AppKey("source", StatusSource)
STREAMS_KEY = web.AppKey("event_streams", EventStreams)

_NO_STORE = {"Cache-Control": "no-store"}


def create_app(
    source: StatusSource, *, max_event_clients: int = 64, keepalive: float = 15.0
) -> web.Application:
    """The console app over `source`. Run it with `ConsoleServer` (or any aiohttp runner)."""
    app = web.Application(middlewares=[_json_errors])
    streams = EventStreams(source, max_clients=max_event_clients, keepalive=keepalive)
    app[SOURCE_KEY] = source
    app[STREAMS_KEY] = streams
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/peers", _peers)
    app.router.add_get("/api/events", streams.handle, allow_head=False)
    for path, (filename, content_type) in PAGE_FILES.items():
        app.router.add_get(path, _page_file((PAGE_DIR / filename).read_bytes(), content_type))

    async def end_streams(app: web.Application) -> None:
        streams.close()

    app.on_shutdown.append(end_streams)
    return app


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SOURCE_KEY].status(), headers=_NO_STORE)


async def _peers(request: web.Request) -> web.Response:
    peers = request.app[SOURCE_KEY].status().get("peers", [])
    return web.json_response({"peers": peers}, headers=_NO_STORE)


def _page_file(body: bytes, content_type: str):
    """A handler for one page file, read once when the app is built (the loop never reads
    files)."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    return handler


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"not found: {request.path} (see proto/CONSOLE.md for the API)"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response({"error": message}, status=exc.status, headers=headers)
    except Exception as exc:
        log.exception("console: %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {exc!r}"}, status=500)
