"""The OpenAI-compatible HTTP API every node serves (specified in proto/API.md).

    GET  /v1/models              the models a client can ask for (`backend.model_ids()`)
    GET  /v1/models/{id}         one of them (404 model_not_found otherwise)
    POST /v1/chat/completions    chat, whole or streamed (server-sent events)
    POST /v1/completions         raw-prompt completion, whole or streamed

The API turns OpenAI JSON into a `CompletionRequest` (openai_format.py), asks the `Backend`
for its deltas and writes them back. It neither knows nor cares whether the model runs here
or across the mesh. Every error is OpenAI's JSON shape with the status of its `ServingError`.

Streams: no header is sent before the backend's first delta (or its first error, which is then
a plain HTTP error). A `ServingError` after that becomes a last `data: {"error": ...}` event,
then `data: [DONE]`. A client that goes away ends its generation: aiohttp cancels the handler
when the server runs with `handler_cancellation=True` (ApiServer does), and a watcher notices the
closed connection otherwise, so `create_app` is safe under any runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from mesh_node.cancellation import cancel_and_wait
from mesh_node.http_site import HttpServer
from mesh_node.serving.openai_format import (
    DEFAULT_MAX_TOKENS_LIMIT,
    SSE_DONE,
    ChatFormat,
    CompletionFormat,
    ParsedRequest,
    ResponseFormat,
    decode_body,
    model_list,
    model_object,
    new_request_id,
    parse_chat_completion,
    parse_completion,
    sse_event,
    usage_object,
)
from mesh_node.serving.requests import (
    Backend,
    BadRequest,
    Delta,
    GenerationFailed,
    ModelNotFound,
    NoHostAvailable,
    Overloaded,
    ServingError,
    Unauthorized,
)

log = logging.getLogger("mesh_node.serving.api")

DEFAULT_PORT = 9337
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_DISCONNECT_POLL = 0.1  # seconds between checks that a client is still connected
DEFAULT_BODY_TIMEOUT = 30.0  # seconds a client may take to send its request body
# seconds a streaming client may read nothing while its answer waits to be sent; then the
# connection is dropped and the generation stops (its request slot is freed)
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_MAX_IN_FLIGHT = 256  # completions in progress at once; more are answered 429

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a reverse proxy must not hold tokens back
}


class Forbidden(ServingError):
    status, type, code = 403, "invalid_request_error", "forbidden_host"


class UnreadableBody(BadRequest):
    """The body broke off or did not decode (a bad Content-Encoding): 400, connection closed."""


class RequestTooLarge(ServingError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RequestTimeout(ServingError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class UnknownRoute(ServingError):
    status, type, code = 404, "invalid_request_error", "unknown_url"


class MethodNotAllowed(ServingError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class InternalError(ServingError):
    status, type, code = 500, "server_error", "internal_error"


class _ClientGone(Exception):
    """The client closed its connection: nobody is left to answer."""


class OpenAIApi:
    """The request handlers and their settings; `create_app` mounts them."""

    def __init__(
        self,
        backend: Backend,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
        disconnect_poll: float = DEFAULT_DISCONNECT_POLL,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    ):
        if api_key == "":
            raise ValueError("api_key must be a non-empty string, or None for no authentication")
        self.backend = backend
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.disconnect_poll = disconnect_poll
        self.body_timeout = body_timeout
        self.max_in_flight = max_in_flight
        self.write_timeout = write_timeout
        self._serving: set[asyncio.Task] = set()  # handlers of completions under way
        self._none_serving = asyncio.Event()
        self._none_serving.set()
        self._ending: set[asyncio.Task] = set()  # cancelled by end_completions, not yet answered
        self.created = int(time.time())  # the `created` of every model: when we started

    @property
    def in_flight(self) -> int:
        """Completions being read, generated or streamed now."""
        return len(self._serving)

    # -- models -------------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(model_list(self.backend.model_ids(), self.created))

    async def get_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.backend.model_ids():
            raise ModelNotFound(f"the model {model!r} does not exist on this mesh", "model")
        return web.json_response(model_object(model, self.created))

    # -- completions --------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, parse_chat_completion, "chatcmpl-", ChatFormat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, parse_completion, "cmpl-", CompletionFormat)

    async def _complete(
        self,
        request: web.Request,
        parse: Callable[..., ParsedRequest],
        id_prefix: str,
        format_class: type[ResponseFormat],
    ) -> web.StreamResponse:
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"{self.in_flight} requests are in progress on this node (at most "
                f"{self.max_in_flight}): try again shortly"
            )
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        self._none_serving.clear()
        try:
            return await self._complete_one(request, parse, id_prefix, format_class)
        except asyncio.CancelledError:
            if not self._ended_here():
                raise
            raise _shutting_down() from None
        finally:
            self._serving.discard(task)
            self._ending.discard(task)
            if not self._serving:
                self._none_serving.set()

    async def end_completions(self, grace: float) -> None:
        """Gives the completions in progress `grace` seconds to finish, then ends the rest: each
        answers a 503 saying this node is shutting down (a stream already started ends with it
        as a last error event). For stopping: aiohttp alone would wait twice as long, then cut
        the connections without a word."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._none_serving.wait()
        if not self._serving:
            return
        log.info("ending %d completion(s) still in progress: shutting down", len(self._serving))
        self._ending = set(self._serving)
        for task in self._ending:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.write_timeout):
                await self._none_serving.wait()

    def _ended_here(self) -> bool:
        """Whether the cancellation being handled is end_completions' alone: then it is taken
        back (the handler answers the client instead); a client gone or a second cancel is not."""
        task = asyncio.current_task()
        if task not in self._ending or task is None or task.cancelling() != 1:
            return False
        self._ending.discard(task)
        task.uncancel()
        return True

    async def _complete_one(
        self,
        request: web.Request,
        parse: Callable[..., ParsedRequest],
        id_prefix: str,
        format_class: type[ResponseFormat],
    ) -> web.StreamResponse:
        body = decode_body(await self._read_body(request))
        parsed = parse(
            body, request_id=new_request_id(id_prefix), max_tokens_limit=self.max_tokens_limit
        )
        completion = parsed.completion
        shape = format_class(
            completion.request_id, completion.model, int(time.time()), parsed.include_usage
        )
        log.debug(
            "%s %s model=%s stream=%s",
            completion.request_id,
            request.path,
            completion.model,
            parsed.stream,
        )
        async with _cancel_when_client_leaves(request, self.disconnect_poll):
            if parsed.stream:
                return await self._stream(request, parsed, shape)
            return await self._whole(parsed, shape)

    async def _whole(self, parsed: ParsedRequest, shape: ResponseFormat) -> web.Response:
        texts: list[str] = []
        last: Delta | None = None
        async with self.backend.stream(parsed.completion) as deltas:
            async for delta in deltas:
                texts.append(delta.text)
                last = delta
                if delta.finish_reason is not None:
                    break
        finish_reason = _finish_reason(last)
        return web.json_response(shape.whole("".join(texts), finish_reason, usage_object(last)))

    async def _stream(
        self, request: web.Request, parsed: ParsedRequest, shape: ResponseFormat
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        last: Delta | None = None
        error: ServingError | None = None
        try:
            async with self.backend.stream(parsed.completion) as deltas:
                iterator = aiter(deltas)
                delta = await anext(iterator, None)  # an error here is a plain HTTP error
                if delta is None:
                    raise GenerationFailed("the generation ended before producing anything")
                response = web.StreamResponse(headers=_SSE_HEADERS)
                send = _Sender(request, response, self.write_timeout)
                await send.ready()
                for chunk in shape.opening_chunks():
                    await send(chunk)
                while delta is not None:
                    last = delta
                    if delta.text:
                        # awaiting the write is the backpressure: a slow reader slows the reads
                        # of the backend stream, which merges what piles up meanwhile
                        await send(shape.text_chunk(delta.text))
                    if delta.finish_reason is not None:
                        break
                    delta = await anext(iterator, None)
            await send(shape.finish_chunk(_finish_reason(last)))
            if parsed.include_usage:
                await send(shape.usage_chunk(usage_object(last)))
        except _ClientGone:
            log.debug("%s: the client went away", parsed.completion.request_id)
            return response  # type: ignore[return-value]  # prepared: _ClientGone comes later
        except asyncio.CancelledError:
            if response is None or not self._ended_here():
                raise  # (before the headers, _complete answers a plain 503)
            error = _shutting_down()
        except ServingError as exc:
            if response is None:
                raise
            error = exc
        except Exception:
            if response is None:
                raise
            log.exception("%s failed mid-stream", parsed.completion.request_id)
            error = InternalError("the server failed while streaming the answer")
        try:
            if error is not None:
                log.info("%s: stream ended by %s", parsed.completion.request_id, error.message)
                await send(error.body())
            await send.end()
        except _ClientGone:
            pass
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        too_large = RequestTooLarge(f"the request body is larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.body_timeout:g} s"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except ConnectionError as exc:
            raise _ClientGone from exc
        except (RequestPayloadError, HttpProcessingError) as exc:  # e.g. gzip that is not
            raise UnreadableBody(f"the request body could not be read: {exc}") from None

    # -- authentication -----------------------------------------------------------------------

    def authorize(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "missing API key: send it as the header 'Authorization: Bearer <key>'"
            )
        given = token.strip().encode("utf-8", "surrogateescape")  # any header bytes
        if not hmac.compare_digest(given, self.api_key.encode()):
            raise Unauthorized("invalid API key")


API_KEY = web.AppKey("openai_api", OpenAIApi)


def create_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    disconnect_poll: float = DEFAULT_DISCONNECT_POLL,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
) -> web.Application:
    """The API app over `backend`. Run it with `ApiServer` (or any aiohttp runner)."""
    api = OpenAIApi(
        backend,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit,
        disconnect_poll=disconnect_poll,
        body_timeout=body_timeout,
        max_in_flight=max_in_flight,
        write_timeout=write_timeout,
    )
    app = web.Application(middlewares=[_openai_errors], client_max_size=max_body_bytes)
    app[API_KEY] = api
    app.router.add_get("/v1/models", api.list_models)
    app.router.add_get("/v1/models/{model:.+}", api.get_model)  # ids may hold '/' (org/name)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/v1/completions", api.completions)
    return app


@web.middleware
async def _openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Authentication for /v1, and every error as OpenAI's `{"error": {...}}`."""
    try:
        if request.path == "/v1" or request.path.startswith("/v1/"):
            request.app[API_KEY].authorize(request)
        return await handler(request)
    except ServingError as exc:
        if exc.status >= 500:
            log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        response = web.json_response(exc.body(), status=exc.status, headers=headers)
        if isinstance(exc, (UnreadableBody, RequestTooLarge, RequestTimeout)):
            response.force_close()  # the body's end is unknown: the connection cannot go on
        if isinstance(exc, UnreadableBody):  # (else aiohttp reads on after it: a traceback)
            request.content.feed_eof()
        return response
    except _ClientGone:
        return web.Response(status=400)  # nobody will read it
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error, headers = _http_error(request, exc)
        return web.json_response(error.body(), status=error.status, headers=headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        error = InternalError("internal server error (the node's log has the details)")
        return web.json_response(error.body(), status=error.status)


def _http_error(
    request: web.Request, exc: web.HTTPException
) -> tuple[ServingError, dict[str, str] | None]:
    if exc.status == 404:
        message = f"unknown URL: {request.method} {request.path} (see proto/API.md)"
        return UnknownRoute(message), None
    if exc.status == 405:
        allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return MethodNotAllowed(f"method {request.method} is not allowed on {request.path}"), allow
    if exc.status == 413:
        return RequestTooLarge(f"the request body is too large: {exc.reason}"), None
    error = ServingError(exc.reason or f"HTTP {exc.status}")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error, None


def _shutting_down() -> NoHostAvailable:
    return NoHostAvailable("this node is shutting down: send the request to another node")


def _finish_reason(last: Delta | None) -> str:
    reason = last.finish_reason if last is not None else None
    if reason is None:
        raise GenerationFailed("the generation ended without finishing")
    if reason not in ("stop", "length"):
        raise GenerationFailed(f"the generation ended early ({reason})")
    return reason


class _Sender:
    """Writes a streamed answer's events. A closed connection, or a client that reads
    nothing for `timeout` seconds while a write waits (it holds a request slot and its
    generation), becomes _ClientGone; the latter's connection is dropped."""

    def __init__(self, request: web.Request, response: web.StreamResponse, timeout: float):
        self._request = request
        self._response = response
        self._timeout = timeout

    async def ready(self) -> None:
        await self._guarded(self._response.prepare(self._request))

    async def __call__(self, payload: dict[str, Any]) -> None:
        await self._guarded(self._response.write(sse_event(payload)))

    async def end(self) -> None:
        await self._guarded(self._response.write(SSE_DONE))
        await self._guarded(self._response.write_eof())

    async def _guarded(self, write: Any) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await write
        except ConnectionError as exc:
            raise _ClientGone from exc
        except TimeoutError:
            log.info("a client read nothing for %g s: dropping its connection", self._timeout)
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            raise _ClientGone from None


@contextlib.asynccontextmanager
async def _cancel_when_client_leaves(request: web.Request, interval: float) -> AsyncIterator[None]:
    """Cancels the current task once the client's connection is gone, even while it waits for
    the backend (which a write to the client would only notice at the next delta). Needed when
    aiohttp does not cancel handlers itself (`handler_cancellation=False`, its default)."""
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> None:
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                log.debug("%s %s: the client disconnected", request.method, request.path)
                task.cancel()
                return
            await asyncio.sleep(interval)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


class ApiServer(HttpServer):
    """Serves the OpenAI-compatible API for `backend` on http://host:port/v1.

    `await start()` binds (port 0 picks a free port; read `port` or `url` afterwards);
    `await stop()` ends every request (cancelling their generations) and the listener within
    `shutdown_timeout` seconds. With `api_key`, every /v1 request must send
    `Authorization: Bearer <api_key>`; without, the API is open: bind it to loopback or a
    trusted network.
    """

    what = "the API server"
    service = "api"

    def error_body(self, message: str, code: str) -> dict:
        error = Forbidden(message)
        error.code = code  # forbidden_host or forbidden_origin
        return error.body()  # OpenAI's shape, as every other error here

    def __init__(
        self,
        backend: Backend,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
        shutdown_timeout: float = 5.0,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        allowed_hosts: Iterable[str] = (),
    ):
        super().__init__(host, port, shutdown_timeout, allowed_hosts)
        self.backend = backend
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.body_timeout = body_timeout
        self.max_in_flight = max_in_flight
        self.write_timeout = write_timeout

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as its base URL: `url` + "/v1"."""
        return f"{self.url}/v1"

    def create_app(self) -> web.Application:
        # a client that goes away cancels its generation at once (see http_site)
        return create_app(
            self.backend,
            api_key=self.api_key,
            max_body_bytes=self.max_body_bytes,
            max_tokens_limit=self.max_tokens_limit,
            body_timeout=self.body_timeout,
            max_in_flight=self.max_in_flight,
            write_timeout=self.write_timeout,
        )

    async def start(self) -> None:
        await super().start()
        log.info("OpenAI-compatible API listening on %s/v1", self.url)

    async def stop(self) -> None:
        """Stops listening, gives the completions in progress `shutdown_timeout` seconds, ends
        the rest with a 503 (see `OpenAIApi.end_completions`), then closes the connections."""
        if self.app is None or self._runner is None:
            return await super().stop()
        ending = asyncio.ensure_future(self.app[API_KEY].end_completions(self.shutdown_timeout))
        try:
            await super().stop()  # (it waits for the handlers that `ending` ends)
        finally:
            await cancel_and_wait([ending])
