"""`GET /api/events`: the server-sent event stream, one source subscription per client.

Each client gets its own `Subscription` (bounded on the source side, which resyncs a slow
client with a `status` event). The stream starts with the whole document, then forwards
the subscription's events, with a keep-alive comment when nothing happened for a while.
The number of concurrent streams is capped; a stream ends when its client goes away (the
handler is cancelled, or a write fails or stalls), when the source ends the subscription,
or when the console stops. The subscription is closed in every case.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from mesh_node.console.source import EVENT_STATUS, StatusSource, Subscription

log = logging.getLogger("mesh_node.console")

KEEPALIVE = b": keep-alive\n\n"
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def encode_event(name: str, payload: Any) -> bytes:
    """One SSE message. JSON without indentation never contains a raw newline; escaped to
    ASCII, any text encodes (a lone surrogate too, as from a path that is not UTF-8)."""
    data = json.dumps(payload, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n".encode()


async def _next_event(events: AsyncIterator[tuple[str, dict[str, Any]]]):
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


class EventStreams:
    """The live event streams of one console app: admission, pumping, shutdown."""

    def __init__(
        self,
        source: StatusSource,
        *,
        max_clients: int = 64,
        keepalive: float = 15.0,
        write_timeout: float = 30.0,
        retry_ms: int = 2000,
    ):
        self._source = source
        self.max_clients = max_clients
        self.keepalive = keepalive
        self.write_timeout = write_timeout
        self.retry_ms = retry_ms
        self.active = 0
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End every stream promptly (each closes its subscription) and refuse new ones."""
        self._closing.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._closing.is_set():
            return _refusal("the console is shutting down")
        if self.active >= self.max_clients:
            return _refusal(f"too many event-stream clients (limit {self.max_clients})")
        self.active += 1
        try:
            subscription = self._source.subscribe()
            try:
                return await self._stream(request, subscription)
            finally:
                subscription.close()
        finally:
            self.active -= 1

    async def _stream(self, request: web.Request, subscription: Subscription) -> web.StreamResponse:
        # Subscribed first, snapshot second: no change can fall between the two.
        document = self._source.status()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            first = f"retry: {self.retry_ms}\n\n".encode() + encode_event(EVENT_STATUS, document)
            await self._write(response, first)
            await self._pump(response, subscription)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("event stream to %s ended: %r", request.remote, exc)
        except Exception:  # after the headers: end the stream (no second answer to write)
            if not response.prepared:
                raise
            log.exception("event stream to %s failed", request.remote)
        return response

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        async with asyncio.timeout(self.write_timeout):  # a client that stopped reading
            await response.write(data)

    async def _pump(self, response: web.StreamResponse, subscription: Subscription) -> None:
        events = aiter(subscription)
        closing = asyncio.create_task(self._closing.wait())
        pending: asyncio.Task[Any] | None = None
        try:
            while not self._closing.is_set():
                if pending is None:
                    pending = asyncio.create_task(_next_event(events))
                done, _ = await asyncio.wait(
                    {pending, closing}, timeout=self.keepalive, return_when=asyncio.FIRST_COMPLETED
                )
                if closing in done:
                    return
                if pending not in done:
                    await self._write(response, KEEPALIVE)
                    continue
                event, pending = pending.result(), None
                if event is None:  # the source ended the subscription
                    return
                name, payload = event
                if not isinstance(name, str) or not _EVENT_NAME.fullmatch(name):
                    log.warning("dropping event with an invalid name %r", name)
                    continue
                await self._write(response, encode_event(name, payload))
        finally:
            leftover = {t for t in (pending, closing) if t is not None and not t.done()}
            for task in leftover:
                task.cancel()
            if leftover:  # let them finish; asyncio.wait never raises their exceptions
                await asyncio.wait(leftover, timeout=1.0)


def _refusal(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=503, headers={"Retry-After": "5"})
