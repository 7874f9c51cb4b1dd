"""One authenticated connection to a peer: handshake, framed streams, RPC, flow control.

A `Connection` runs over a `Carrier` (a QUIC connection, or the in-memory network used by
tests and simulations) and knows nothing else about it. Every exchange gets its own stream:

* request/response: a bidirectional stream, one request frame (then FIN) answered by one
  response frame or an `Error` (then FIN);
* streamed response: as above, answered by many frames then FIN; the requester grants
  credit in bytes with `Credit` frames (real backpressure: a slow reader stops the sender);
* one-way message: a unidirectional stream with one frame, then FIN.

A malformed, oversize, truncated or unexpected frame resets that stream only (RESET_STREAM
and STOP_SENDING with the error code); the connection and every other stream go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh_node.identity import MeshSecret, NodeId, NodeIdentity
from mesh_node.transport.errors import (
    ConnectionLost,
    ErrorCode,
    HandshakeError,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestFailed,
    RequestTimeout,
)
from mesh_node.transport.frames import (
    HANDSHAKE_LIMITS,
    HEADER,
    HEADER_SIZE,
    FrameDecoder,
    FrameLimits,
    frame_parts,
    frame_size,
    single_frame,
)
from mesh_node.transport.handshake import ClientHandshake, ServerHandshake, another_node
from mesh_node.transport.messages import Auth, Credit, Error, Hello, HelloAck, Welcome
from mesh_node.transport.schema import Encoded, Registry

log = logging.getLogger("mesh_node.transport")

HANDSHAKE_STREAM = 0
# Credit a responder may assume on a streamed response before any Credit frame (protocol
# constant): a requester wanting a larger window grants the difference after its request.
INITIAL_CREDIT = 64 << 10
# Peer streams a connection may see opened out of order (a stream's first bytes arriving
# after a higher-numbered stream's): QUIC opens the lower ones implicitly, and its stream
# limit (128 concurrent in aioquic) keeps the count small. Beyond this, the peer misbehaves.
MAX_STREAM_GAPS = 1024


class Carrier(Protocol):
    """What a Connection needs from the layer below. Stream ids follow QUIC's numbering:
    bit 0 is the initiator (0 client, 1 server), bit 1 is set on unidirectional streams."""

    is_client: bool
    remote_address: tuple[str, int]  # as dialed (a host name too), else as the peer came
    remote_ip: str  # the IP address its datagrams go to (what a dialed name resolved to)

    def open_stream(self, unidirectional: bool) -> int: ...
    # raises RuntimeError on a stream that is finished or reset
    def write(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> None: ...
    def flush(self) -> None: ...
    def reset(self, stream_id: int, code: int) -> None: ...
    def stop(self, stream_id: int, code: int) -> None: ...
    def unacked(self, stream_id: int) -> int: ...
    def acknowledge(self) -> None: ...
    def server_key(self) -> bytes | None: ...
    def rtt(self) -> float | None: ...
    def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every connection."""

    frames: FrameLimits = field(default_factory=FrameLimits)
    handshake_timeout: float = 10.0
    max_inbound_requests: int = 128  # concurrent handlers per connection
    max_outbound_requests: int = 128  # concurrent calls per connection (others wait)
    stream_high_water: int = 256 << 10  # unacknowledged bytes per stream before writers wait
    stream_window: int = 1 << 20  # bytes a streamed response may run ahead of our reading
    # seconds a streamed response waits for the requester's credit before giving up (a
    # requester that stops reading would hold the handler and its slot for ever)
    credit_timeout: float = 60.0
    max_early_events: int = 256  # server streams buffered while the client finishes handshake
    # seconds a peer's new stream may take to deliver its whole request (or one-way) frame:
    # a frame left half sent would hold what arrived of it (up to a frame's limit) for ever
    arrival_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a handler knows about the request it serves."""

    peer: NodeId
    connection: Connection


UnaryHandler = Callable[[RequestContext, Any], Awaitable[Any] | Any]
StreamHandler = Callable[[RequestContext, Any], AsyncIterator[Any]]
OneWayHandler = Callable[[RequestContext, Any], Awaitable[None] | None]


class Handlers:
    """Which function serves which request type. Shared by all connections of an endpoint.

    Request and one-way handlers are `async def` (run as a task per request) or plain
    functions (run inline as the request arrives: for quick, non-blocking work such as
    pings and probes; their answer leaves in the same packet as the acknowledgement).
    Stream handlers are async generators.
    """

    UNARY, STREAM, ONEWAY, UNARY_INLINE, ONEWAY_INLINE = (
        "unary",
        "stream",
        "oneway",
        "unary-inline",
        "oneway-inline",
    )

    def __init__(self) -> None:
        self._table: dict[type, tuple[str, Callable[..., Any]]] = {}

    def _add(self, message_type: type, kind: str, fn: Callable[..., Any]) -> None:
        if message_type in self._table:
            raise ValueError(f"a handler for {message_type.__name__} is already registered")
        self._table[message_type] = (kind, fn)

    def on_request(self, message_type: type, fn: UnaryHandler) -> None:
        inline = not inspect.iscoroutinefunction(fn)
        self._add(message_type, self.UNARY_INLINE if inline else self.UNARY, fn)

    def on_stream(self, message_type: type, fn: StreamHandler) -> None:
        if not inspect.isasyncgenfunction(fn):
            name = message_type.__name__
            raise TypeError(f"stream handler for {name} must be an async generator")
        self._add(message_type, self.STREAM, fn)

    def on_message(self, message_type: type, fn: OneWayHandler) -> None:
        inline = not inspect.iscoroutinefunction(fn)
        self._add(message_type, self.ONEWAY_INLINE if inline else self.ONEWAY, fn)

    def get(self, message_type: type) -> tuple[str, Callable[..., Any]] | None:
        return self._table.get(message_type)


class _NoFramesYet:
    """A stream's decoder before its first bytes: most answers arrive whole, in one piece,
    and never need one (see Connection.stream_data)."""

    __slots__ = ("limits",)
    idle = True

    def __init__(self, limits: FrameLimits):
        self.limits = limits


class _StreamClosed(Exception):
    """Internal: the stream went away under a writer (reset or connection closed)."""


class _Stream:
    """State of one open stream (either direction)."""

    __slots__ = (
        "arrival",
        "closed",
        "consumed",
        "credit",
        "credit_waiter",
        "decoder",
        "dispatched",
        "done",
        "ended",
        "items",
        "kind",
        "reset_code",
        "stream_id",
        "task",
        "window",
    )

    def __init__(self, stream_id: int, limits: Limits):
        self.stream_id = stream_id
        self.decoder = _NoFramesYet(limits.frames)
        self.kind = ""
        self.dispatched = False  # inbound: the request frame arrived and went to a handler
        self.arrival = 0.0  # inbound, frame not yet whole: loop time it must be whole by
        self.task: asyncio.Task[None] | None = None
        # outbound calls: what the caller waits for (decoded frames or a terminal exception):
        # a Future for a unary call, a Queue for a streamed response
        self.items: Any = None
        self.done = False
        self.ended = False
        self.closed = False
        self.reset_code: int | None = None
        # streamed responses: the responder's credit (each side keeps its own count) and
        # what the requester consumed since its last grant
        self.credit = INITIAL_CREDIT
        self.credit_waiter: asyncio.Future[None] | None = None
        self.consumed = 0
        self.window = limits.stream_window


class _Slots(asyncio.Semaphore):
    """A semaphore whose uncontended acquire and release need no await and no waiter scan
    (both are on every call's path)."""

    def take(self) -> bool:
        if self.locked():
            return False
        self._value -= 1
        return True

    def release(self) -> None:
        if self._waiters:
            super().release()
        else:
            self._value += 1


_END = object()  # queued when the peer finished its side of an outbound stream


def _deliver(stream: _Stream, item: Any) -> None:
    """Hand an answer (or a terminal exception) to the caller waiting on an outbound stream."""
    if isinstance(stream.items, asyncio.Future):
        if not stream.items.done():
            stream.items.set_result(item)
    else:
        stream.items.put_nowait(item)


class Connection:
    """An authenticated connection. Created by an endpoint; use `request`, `send`, `stream`."""

    def __init__(
        self,
        carrier: Carrier,
        *,
        identity: NodeIdentity,
        mesh: MeshSecret,
        registry: Registry,
        handlers: Handlers,
        limits: Limits,
        expect: NodeId | None = None,
        on_open: Callable[[Connection], None] | None = None,
        on_close: Callable[[Connection], None] | None = None,
    ):
        self._carrier = carrier
        self._loop = asyncio.get_running_loop()
        self._registry = registry
        self._handlers = handlers
        self._limits = limits
        self._on_open = on_open
        self._on_close = on_close
        self._streams: dict[int, _Stream] = {}
        # stream id -> (wake when unacked bytes fall below this, waiter)
        self._drain_waiters: dict[int, tuple[int, asyncio.Future[None]]] = {}
        self._early_events: list[tuple[str, tuple[Any, ...]]] | None = []
        self._inbound = 0
        # the next new stream id the peer may open, by stream type bit (bidi 0, uni 2), and
        # the lower ids it skipped so far (their first bytes may still come)
        peer_bit = 1 if carrier.is_client else 0
        self._next_peer_stream = {0: peer_bit or 4, 2: 2 | peer_bit}  # client's 0: handshake
        self._stream_gaps: set[int] = set()
        self._outbound = _Slots(limits.max_outbound_requests)
        self._deadlines: dict[_Stream, tuple[float, Any, float]] = {}
        self._arrival_sweep: asyncio.TimerHandle | None = None  # see _sweep_arrivals
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at: float | None = None
        self._context: RequestContext | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.peer: NodeId | None = None
        self.peer_software = ""
        self.observed_address: tuple[str, int] | None = None
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        # loop time of the last data in (a carrier that sees packets, QUIC, also counts
        # those holding only acknowledgements: the peer is there)
        self.last_heard = asyncio.get_running_loop().time()
        # set when inbound data woke a task here: it answered one of our calls (a caller
        # resumes) or started a request's handler; a carrier clears it before handing over
        # a datagram's events and reads it after
        self.woke = False
        self._state = "handshake"
        self._client_hs: ClientHandshake | None = None
        self._server_hs: ServerHandshake | None = None
        self._hs_decoder = FrameDecoder(HANDSHAKE_LIMITS)
        if carrier.is_client:
            self._client_hs = ClientHandshake(identity, mesh, expect)
        else:
            self._server_hs = ServerHandshake(identity, mesh)
        self._hs_timer = asyncio.get_running_loop().call_later(
            limits.handshake_timeout, self._handshake_timed_out
        )

    # ------------------------------------------------------------------ public API

    @property
    def remote_address(self) -> tuple[str, int]:
        return self._carrier.remote_address

    @property
    def remote_ip(self) -> str:
        """The peer's IP address on this connection (`remote_address` may hold a name)."""
        return self._carrier.remote_ip

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def authenticating(self) -> bool:
        """In the handshake still: the peer has not yet proven who it is (nor been refused)."""
        return self._state == "handshake"

    @property
    def is_client(self) -> bool:
        return self._carrier.is_client

    @property
    def busy(self) -> bool:
        """Requests, answers or messages under way on it (either direction)."""
        return bool(self._streams)

    def rtt(self) -> float | None:
        """Smoothed round-trip time measured by the carrier, in seconds."""
        return self._carrier.rtt()

    def start(self) -> None:
        """Client side: send Hello on the handshake stream."""
        assert self._client_hs is not None
        stream_id = self._carrier.open_stream(unidirectional=False)
        if stream_id != HANDSHAKE_STREAM:
            raise RuntimeError("the handshake must use the connection's first stream")
        self._write_now(HANDSHAKE_STREAM, self._registry.encode(self._client_hs.hello()))

    async def wait_open(self) -> None:
        """Wait for the handshake; raises HandshakeError or ConnectionLost."""
        await asyncio.shield(self.opened)

    async def request(self, message: Any, *, timeout: float) -> Any:
        """Send a request and return the peer's response message.

        Raises RemoteError (the peer answered with an error), RequestTimeout, ConnectionLost.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        encoded = self._encode(message)
        if not self._outbound.take():  # all call slots busy: wait for one, within the deadline
            try:
                async with asyncio.timeout_at(deadline):
                    await self._outbound.acquire()
            except TimeoutError:
                raise self._timeout_error(message, timeout) from None
        try:
            stream = self._open_call("unary")
            self._add_deadline(stream, deadline, message, timeout)
            try:
                # a fresh stream has nothing unacknowledged: the request goes out at once
                carrier, stream_id = self._carrier, stream.stream_id
                head = HEADER.pack(len(encoded.body), encoded.blob_size) + encoded.body
                try:
                    if encoded.blob_parts:
                        carrier.write(stream_id, head)
                        for part in encoded.blob_parts[:-1]:  # tensors, not copied
                            carrier.write(stream_id, part)
                        carrier.write(stream_id, encoded.blob_parts[-1], end=True)
                    else:
                        carrier.write(stream_id, head, end=True)
                    carrier.flush()
                except RuntimeError:
                    pass  # reset under us: the future says why
                item = await stream.items
            finally:
                self._deadlines.pop(stream, None)
                if stream.done:  # answered: nothing to cancel
                    stream.closed = True
                    self._streams.pop(stream_id, None)
                else:
                    self._finish_call(stream)
        finally:
            self._outbound.release()
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise RemoteError(ErrorCode.UNEXPECTED_MESSAGE, "stream ended without an answer")
        return item

    def _add_deadline(self, stream: _Stream, deadline: float, message: Any, timeout: float):
        """Calls in flight share one timer (set for the earliest deadline), so a call costs
        a dict entry rather than a timer handle."""
        self._deadlines[stream] = (deadline, message, timeout)
        if self._sweep_at is None or deadline < self._sweep_at:
            if self._sweeper is not None:
                self._sweeper.cancel()
            self._sweep_at = deadline
            self._sweeper = asyncio.get_running_loop().call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = self._sweep_at = None
        now = asyncio.get_running_loop().time()
        pending = float("inf")
        for stream, (deadline, message, timeout) in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[stream]
                _deliver(stream, self._timeout_error(message, timeout))
            else:
                pending = min(pending, deadline)
        if pending != float("inf"):
            self._sweep_at = pending
            self._sweeper = asyncio.get_running_loop().call_at(pending, self._sweep)

    def _timeout_error(self, message: Any, timeout: float) -> RequestTimeout:
        return RequestTimeout(
            f"no answer to {type(message).__name__} from {self._peer_label()} within {timeout:g}s"
        )

    async def send(self, message: Any, *, timeout: float = 10.0) -> None:
        """Send a one-way message (no answer). Returns once the peer has acknowledged its
        bytes, so at most `max_outbound_requests` messages are in flight per connection."""
        try:
            async with asyncio.timeout(timeout), self._outbound:
                self._check_open()
                stream_id = self._carrier.open_stream(unidirectional=True)
                stream = _Stream(stream_id, self._limits)
                self._streams[stream_id] = stream
                try:
                    await self._write_frame(stream, self._encode(message), end=True)
                    await self._drain(stream, 1)
                except _StreamClosed:
                    self._check_open()
                    raise ConnectionLost(f"{self._peer_label()} refused the message") from None
                finally:
                    self._streams.pop(stream_id, None)
        except TimeoutError:
            raise RequestTimeout(
                f"{type(message).__name__} to {self._peer_label()} not delivered in {timeout:g}s"
            ) from None

    def _encode(self, message: Any) -> Encoded:
        """The message's frame, or ProtocolError(FRAME_TOO_LARGE) when it is over the frame
        limits: the peer would reset the stream only after every byte had crossed."""
        encoded = self._registry.encode(message)
        frames = self._limits.frames
        if len(encoded.body) > frames.max_body or encoded.blob_size > frames.max_blob:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"{type(message).__name__} of {frame_size(encoded)} bytes is over the frame "
                f"limits ({frames.max_body} bytes of body, {frames.max_blob} of tensors): "
                "not sent",
            )
        return encoded

    def stream(self, message: Any, *, timeout: float, window: int | None = None) -> ResponseStream:
        """Open a streamed response. Use as `async with conn.stream(req, timeout=5) as s:`
        then `async for item in s`. `timeout` bounds the wait for each item."""
        window = max(window or self._limits.stream_window, INITIAL_CREDIT)
        return ResponseStream(self, message, timeout, window)

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self._state != "closed":
            self._carrier.close(int(code), reason)
            self._terminate(int(code), reason or "closed locally")

    async def wait_closed(self) -> None:
        await self.closed.wait()

    # ------------------------------------------------------------------ carrier events

    def stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if self._state == "closed":
            return
        self.last_heard = self._loop.time()
        if stream_id == HANDSHAKE_STREAM:
            self._handshake_data(data, end)
            return
        if self._state == "handshake":
            if self._client_hs is not None and self._early_events is not None:
                self._buffer_early("data", (stream_id, data, end))
                return
            self._fail_handshake(
                HandshakeError(ErrorCode.PROTOCOL_VIOLATION, "stream opened before handshake")
            )
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_local(stream_id) or not self._new_peer_stream(stream_id):
                return  # late data on a stream we already finished with
            if end and not stream_id & 2 and self._request_in_one_piece(stream_id, data):
                return
            stream = self._accept_stream(stream_id)
        elif (
            end
            and stream.kind == "unary"
            and stream.decoder.idle
            and self._answer_in_one_piece(stream, data)
        ):
            return
        if type(stream.decoder) is _NoFramesYet:
            stream.decoder = FrameDecoder(stream.decoder.limits)
        try:
            for body, blob in stream.decoder.feed(data) if data else ():
                message = self._registry.decode(body, memoryview(blob))
                self._frame_received(stream, message, HEADER_SIZE + len(body) + len(blob))
            if end:
                stream.decoder.finish()
                self._peer_finished(stream)
        except ProtocolError as exc:
            self._abort_stream(stream, exc.code, exc.message)

    def _request_in_one_piece(self, stream_id: int, data: bytes) -> bool:
        """Fast path: a whole request and its FIN in one piece (the usual case). Inline
        handlers answer at once, with no per-stream state. False: take the general path."""
        frame = single_frame(data, self._limits.frames)
        if frame is None:
            return False
        try:
            message = self._registry.decode(frame[0], memoryview(frame[1]))
        except ProtocolError:
            return False  # the general path resets the stream with the right code
        entry = self._handlers.get(type(message))
        if entry is not None and entry[0] == Handlers.UNARY_INLINE:
            self._serve_inline(stream_id, entry[1], message)
        else:
            stream = self._accept_stream(stream_id, arrived=True)
            stream.dispatched = True
            self._dispatch(stream, message)
        return True

    def _new_peer_stream(self, stream_id: int) -> bool:
        """True (and noted) when a peer stream's id was never seen: a new exchange. Ids go up
        by 4 per type; one above the next expected opens the ids skipped as gaps."""
        kind = stream_id & 2
        expected = self._next_peer_stream[kind]
        if stream_id >= expected:
            if stream_id > expected:
                skipped = range(expected, stream_id, 4)
                if len(self._stream_gaps) + len(skipped) > MAX_STREAM_GAPS:
                    self.close(ErrorCode.PROTOCOL_VIOLATION, "stream ids skipped too far ahead")
                    return False
                self._stream_gaps.update(skipped)
            self._next_peer_stream[kind] = stream_id + 4
            return True
        if stream_id in self._stream_gaps:
            self._stream_gaps.discard(stream_id)
            return True
        return False

    def _answer_in_one_piece(self, stream: _Stream, data: bytes) -> bool:
        """Fast path: a unary call's whole answer and FIN in one piece."""
        frame = single_frame(data, self._limits.frames)
        if frame is None:
            return False
        try:
            message = self._registry.decode(frame[0], memoryview(frame[1]))
            self._frame_received(stream, message, len(data))
            self._peer_finished(stream)
        except ProtocolError as exc:
            self._abort_stream(stream, exc.code, exc.message)
        return True

    def stream_reset(self, stream_id: int, code: int) -> None:
        """The peer reset its sending side (RESET_STREAM) or asked us to stop (STOP_SENDING)."""
        if self._state == "handshake":
            if stream_id == HANDSHAKE_STREAM:
                self._fail_handshake(
                    HandshakeError(
                        ErrorCode.HANDSHAKE_FAILED,
                        f"peer reset the handshake stream ({ErrorCode.describe(code)})",
                    )
                )
                return
            if self._early_events is not None:
                self._buffer_early("reset", (stream_id, code))
                return
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._is_local(stream_id):
                self._new_peer_stream(stream_id)  # a skipped id that will never come
            return
        stream.reset_code = code
        self._wake(stream)  # a writer waiting to drain learns of the reset (before _drop)
        if stream.task is not None:  # inbound: stop the handler
            stream.task.cancel()
            self._drop(stream)
        elif stream.items is None:  # inbound, not dispatched yet: nothing to stop
            self._drop(stream)
        elif not stream.done:  # outbound: the caller sees the reset
            _deliver(
                stream, RemoteError(code, f"peer reset the stream ({ErrorCode.describe(code)})")
            )
            stream.done = True

    def writable(self) -> None:
        """Acknowledgements arrived: writers waiting for their buffer to drain may go on."""
        if not self._drain_waiters:
            return
        for stream_id, (below, waiter) in list(self._drain_waiters.items()):
            if self._carrier.unacked(stream_id) < below:
                del self._drain_waiters[stream_id]
                if not waiter.done():
                    waiter.set_result(None)

    def connection_terminated(self, code: int, reason: str) -> None:
        """The peer closed the connection, or the layer below lost it."""
        if self._state == "handshake":
            log.log(
                logging.INFO if another_node(code, reason) else logging.WARNING,
                "handshake with %s:%s failed: closed by peer (%s: %s)",
                *self.remote_address[:2],
                ErrorCode.describe(code),
                reason or "no reason",
            )
        self._terminate(code, reason)

    def _terminate(self, code: int, reason: str) -> None:
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        self.close_code, self.close_reason = code, reason
        self._hs_timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._arrival_sweep is not None:
            self._arrival_sweep.cancel()
            self._arrival_sweep = None
        if not self.opened.done():
            if code in (ErrorCode.NO_ERROR, ErrorCode.SHUTTING_DOWN):
                self.opened.set_exception(ConnectionLost(f"connection closed: {reason}", code))
            else:
                self.opened.set_exception(HandshakeError(code, reason or "connection closed"))
            self.opened.exception()  # mark retrieved: a dial nobody awaits is not an error
        lost = ConnectionLost(
            f"connection to {self._peer_label()} closed "
            f"({ErrorCode.describe(code)}{': ' + reason if reason else ''})",
            code,
        )
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
            elif stream.items is not None and not stream.done:  # our calls learn why
                _deliver(stream, lost)
                stream.done = True
            self._wake(stream)
        self._streams.clear()
        for _, waiter in self._drain_waiters.values():
            if not waiter.done():
                waiter.set_exception(_StreamClosed())
                waiter.exception()
        self._drain_waiters.clear()
        self.closed.set()
        if was_open and self._on_close is not None:
            self._on_close(self)

    # ------------------------------------------------------------------ handshake

    def _handshake_data(self, data: bytes, end: bool) -> None:
        if self._state != "handshake":
            return  # the handshake stream's FIN after success
        try:
            for body, blob in self._hs_decoder.feed(data):
                self._handshake_message(self._registry.decode(body, memoryview(blob)))
                if self._state != "handshake":
                    return
            if end:
                raise HandshakeError(ErrorCode.HANDSHAKE_FAILED, "handshake stream ended early")
        except ProtocolError as exc:
            self._fail_handshake(HandshakeError(ErrorCode.HANDSHAKE_FAILED, exc.message))
        except HandshakeError as exc:
            self._fail_handshake(exc)

    def _handshake_message(self, message: Any) -> None:
        def expect(kind: type) -> None:
            if type(message) is not kind:
                raise HandshakeError(
                    ErrorCode.HANDSHAKE_FAILED,
                    f"expected {kind.__name__} during handshake, got {type(message).__name__}",
                )

        if self._client_hs is not None:
            hs = self._client_hs
            if hs.peer is None:
                expect(HelloAck)
                auth = hs.on_hello_ack(message, self._carrier.server_key())
                self._write_now(HANDSHAKE_STREAM, self._registry.encode(auth), end=True)
            else:
                expect(Welcome)
                self.observed_address = (message.observed_host, message.observed_port)
                self._opened(hs.peer, hs.peer_software)
        else:
            hs_server = self._server_hs
            assert hs_server is not None
            if hs_server.proto == 0:
                expect(Hello)
                ack = hs_server.on_hello(message)
                self._write_now(HANDSHAKE_STREAM, self._registry.encode(ack))
            else:
                expect(Auth)
                welcome = hs_server.on_auth(message, self.remote_address)
                assert hs_server.peer is not None
                self._write_now(HANDSHAKE_STREAM, self._registry.encode(welcome), end=True)
                self._opened(hs_server.peer, hs_server.peer_software)

    def _opened(self, peer: NodeId, software: str) -> None:
        self._hs_timer.cancel()
        self.peer, self.peer_software, self._state = peer, software, "open"
        self._context = RequestContext(peer, self)
        log.debug("connection to %s open (%s)", peer.short, software)
        self.opened.set_result(None)
        if self._on_open is not None:
            self._on_open(self)
        early, self._early_events = self._early_events or [], None
        for kind, args in early:
            if kind == "data":
                self.stream_data(*args)
            else:
                self.stream_reset(*args)

    def _buffer_early(self, kind: str, args: tuple[Any, ...]) -> None:
        assert self._early_events is not None
        if len(self._early_events) >= self._limits.max_early_events:
            self._fail_handshake(
                HandshakeError(ErrorCode.PROTOCOL_VIOLATION, "too much traffic before Welcome")
            )
            return
        self._early_events.append((kind, args))

    def _fail_handshake(self, exc: HandshakeError) -> None:
        side = "client" if self._carrier.is_client else "server"
        log.log(  # (a node that restarted with a new key: news, not an attack)
            logging.INFO if another_node(exc.code, exc.reason) else logging.WARNING,
            "handshake with %s:%s failed (%s side): %s",
            *self.remote_address[:2],
            side,
            exc,
        )
        self._carrier.close(int(exc.code), exc.reason)
        self._terminate(int(exc.code), exc.reason)

    def _handshake_timed_out(self) -> None:
        if self._state == "handshake":
            self._fail_handshake(
                HandshakeError(ErrorCode.HANDSHAKE_TIMEOUT, "handshake did not finish in time")
            )

    # ------------------------------------------------------------------ streams

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id & 1) == (0 if self._carrier.is_client else 1)

    def _accept_stream(self, stream_id: int, arrived: bool = False) -> _Stream:
        """A peer's new stream; unless its frame `arrived` whole already, it has
        `arrival_timeout` seconds to deliver it (one sweep timer per connection checks)."""
        stream = _Stream(stream_id, self._limits)
        stream.kind = "oneway-in" if stream_id & 2 else "request-in"
        self._streams[stream_id] = stream
        if not arrived:
            stream.arrival = self._loop.time() + self._limits.arrival_timeout
            if self._arrival_sweep is None:
                self._arrival_sweep = self._loop.call_at(stream.arrival, self._sweep_arrivals)
        return stream

    def _sweep_arrivals(self) -> None:
        """Resets the peer's streams whose frame is not whole in time; looks again at the
        next such deadline while any stream waits for its frame."""
        self._arrival_sweep = None
        now, next_due = self._loop.time(), None
        for stream in list(self._streams.values()):
            if stream.dispatched or stream.kind not in ("request-in", "oneway-in"):
                continue
            if stream.arrival <= now:
                self._abort_stream(
                    stream,
                    ErrorCode.TRUNCATED_FRAME,
                    f"no whole frame within {self._limits.arrival_timeout:g}s of the stream "
                    "opening",
                )
            elif next_due is None or stream.arrival < next_due:
                next_due = stream.arrival
        if next_due is not None and self._state != "closed":
            self._arrival_sweep = self._loop.call_at(next_due, self._sweep_arrivals)

    def _open_call(self, kind: str) -> _Stream:
        self._check_open()
        stream_id = self._carrier.open_stream(unidirectional=False)
        stream = _Stream(stream_id, self._limits)
        stream.kind = kind
        if kind == "unary":
            stream.items = asyncio.get_running_loop().create_future()
        else:
            stream.items = asyncio.Queue()
        self._streams[stream_id] = stream
        return stream

    def _finish_call(self, stream: _Stream) -> None:
        """Caller is done with an outbound stream: cancel it if the answer is not complete."""
        if not stream.done and not stream.closed and self._state == "open":
            with contextlib.suppress(Exception):
                self._carrier.stop(stream.stream_id, ErrorCode.CANCELLED)
                self._carrier.reset(stream.stream_id, ErrorCode.CANCELLED)
        self._drop(stream)

    def _frame_received(self, stream: _Stream, message: Any, size: int) -> None:
        kind = stream.kind
        if kind in ("unary", "stream"):
            self.woke = True
            if stream.done:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "frame after the answer ended")
            if type(message) is Error:
                _deliver(stream, RemoteError(message.code, message.message, message.reason))
                stream.done = True
                return
            if type(message) is Credit:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "Credit sent to a requester")
            if kind == "unary":
                _deliver(stream, message)
                stream.done = True
                return
            # the responder may send only while its credit is positive (section 5): a peer
            # that ignores our grants cannot make us buffer more than one frame past them
            if stream.credit <= 0:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, "streamed item sent without credit"
                )
            stream.credit -= size
            _deliver(stream, (message, size))
            return
        if kind == "stream-in":
            if type(message) is not Credit:
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"unexpected {type(message).__name__} frame"
                )
            if message.amount <= 0:
                raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Credit amount must be positive")
            stream.credit += message.amount
            self._wake(stream)
            return
        if kind in ("request-in", "oneway-in") and not stream.dispatched:
            stream.dispatched = True
            self._dispatch(stream, message)
            return
        raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"unexpected {type(message).__name__}")

    def _peer_finished(self, stream: _Stream) -> None:
        if stream.kind == "oneway-in":
            self._carrier.acknowledge()  # its sender waits for the acknowledgement (send)
        if stream.kind in ("unary", "stream"):
            self.woke = True
            stream.ended = True
            if not stream.done:
                _deliver(stream, _END)
                stream.done = True
            if stream.closed:
                self._drop(stream)
        elif not stream.dispatched and stream.kind in ("request-in", "oneway-in"):
            raise ProtocolError(ErrorCode.TRUNCATED_FRAME, "stream ended before a request")

    def _dispatch(self, stream: _Stream, message: Any) -> None:
        entry = self._handlers.get(type(message))
        oneway = stream.kind == "oneway-in"
        if entry is None or entry[0].startswith("oneway") != oneway:
            role = "message" if oneway else "request"
            text = f"no handler for {type(message).__name__} as a {role}"
            if oneway:
                raise ProtocolError(ErrorCode.NOT_SUPPORTED, text)
            self._answer_now(stream, ErrorCode.NOT_SUPPORTED, text)
            return
        kind, fn = entry
        ctx = self._context
        assert ctx is not None
        if kind == Handlers.UNARY_INLINE:
            self._serve_inline(stream.stream_id, fn, message)
            return
        if kind == Handlers.ONEWAY_INLINE:
            try:
                fn(ctx, message)
            except Exception:
                self._log_failure(sys.exc_info()[1], message)
            self._drop(stream)
            return
        if kind == Handlers.STREAM:
            stream.kind = "stream-in"  # the requester may grant Credit on this stream
        if self._inbound >= self._limits.max_inbound_requests:
            if oneway:
                raise ProtocolError(ErrorCode.OVERLOADED, "too many messages in flight")
            self._answer_now(stream, ErrorCode.OVERLOADED, "too many requests in flight")
            return
        runner = {
            Handlers.UNARY: self._serve_unary,
            Handlers.STREAM: self._serve_stream,
            Handlers.ONEWAY: self._serve_oneway,
        }[kind]
        self._inbound += 1
        self.woke = True
        stream.task = self._spawn(runner(stream, fn, ctx, message))
        # runs even when the task is cancelled before it started
        stream.task.add_done_callback(lambda _: self._handler_done(stream))

    def _serve_inline(self, stream_id: int, fn: Callable[..., Any], msg: Any) -> None:
        try:
            encoded = self._encode(fn(self._context, msg))
        except Exception as exc:
            stream = self._streams.get(stream_id) or self._accept_stream(stream_id)
            self._spawn(self._answer_failure(stream, exc, msg))
            return
        # nothing was written on this stream yet, so nothing can be waiting to drain
        with contextlib.suppress(_StreamClosed):
            self._write_now(stream_id, encoded, end=True)
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._drop(stream)

    async def _write_and_drop(self, stream: _Stream, encoded: Encoded) -> None:
        with contextlib.suppress(_StreamClosed):
            await self._write_frame(stream, encoded, end=True)
        self._drop(stream)

    def _answer_now(self, stream: _Stream, code: ErrorCode, text: str) -> None:
        self._spawn(self._write_and_drop(stream, self._registry.encode(Error(int(code), text))))

    def _handler_done(self, stream: _Stream) -> None:
        self._inbound -= 1
        self._drop(stream)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve_unary(self, stream: _Stream, fn: UnaryHandler, ctx: RequestContext, msg):
        try:
            reply = await fn(ctx, msg)
            await self._write_frame(stream, self._encode(reply), end=True)
        except _StreamClosed:
            pass
        except Exception as exc:
            await self._answer_failure(stream, exc, msg)

    async def _serve_stream(self, stream: _Stream, fn: StreamHandler, ctx: RequestContext, msg):
        items = fn(ctx, msg)
        try:
            async for item in items:
                encoded = self._encode(item)
                await self._wait_credit(stream)
                stream.credit -= frame_size(encoded)
                await self._write_frame(stream, encoded)
            self._write_end(stream)
        except _StreamClosed:
            pass
        except Exception as exc:
            await self._answer_failure(stream, exc, msg)
        finally:
            await items.aclose()

    async def _serve_oneway(self, stream: _Stream, fn: OneWayHandler, ctx: RequestContext, msg):
        try:
            await fn(ctx, msg)
        except Exception:
            log.exception("handler for %s from %s failed", type(msg).__name__, ctx.peer.short)

    async def _answer_failure(self, stream: _Stream, exc: Exception, msg: Any) -> None:
        """A handler raised: RequestFailed carries its code, anything else is internal."""
        reason = ""
        if isinstance(exc, RequestFailed):
            code, text, reason = exc.code, exc.message, exc.reason
        elif isinstance(exc, ProtocolError) and exc.code == ErrorCode.FRAME_TOO_LARGE:
            log.warning("answer to %s not sent: %s", type(msg).__name__, exc.message)
            code, text = exc.code, exc.message  # (our answer would not fit a frame)
        else:
            self._log_failure(exc, msg)
            code, text = ErrorCode.INTERNAL_ERROR, f"internal error handling {type(msg).__name__}"
        await self._write_and_drop(stream, self._registry.encode(Error(int(code), text, reason)))

    def _log_failure(self, exc: BaseException, msg: Any) -> None:
        log.error(
            "handler for %s from %s failed",
            type(msg).__name__,
            self._peer_label(),
            exc_info=exc,
        )

    def _write_end(self, stream: _Stream) -> None:
        if self._state == "open" and stream.reset_code is None:
            with contextlib.suppress(RuntimeError):
                self._carrier.write(stream.stream_id, b"", end=True)
                self._carrier.flush()

    async def _wait_credit(self, stream: _Stream) -> None:
        if stream.credit > 0:
            return
        deadline = self._loop.time() + self._limits.credit_timeout
        while stream.credit <= 0:
            if stream.reset_code is not None or self._state != "open":
                raise _StreamClosed()
            stream.credit_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await stream.credit_waiter
            except TimeoutError:
                self._abort_stream(
                    stream,
                    ErrorCode.CANCELLED,
                    f"the requester granted no credit for {self._limits.credit_timeout:g} s",
                )
                raise _StreamClosed() from None

    def _wake(self, stream: _Stream) -> None:
        waiter = stream.credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        drain = self._drain_waiters.pop(stream.stream_id, None)
        if drain is not None and not drain[1].done():
            drain[1].set_result(None)

    async def _drain(self, stream: _Stream, below: int) -> None:
        """Wait until the stream's unacknowledged bytes fall below `below`."""
        sid = stream.stream_id
        while self._carrier.unacked(sid) >= below:
            if stream.reset_code is not None or self._state != "open":
                raise _StreamClosed()
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters[sid] = (below, waiter)
            try:
                await waiter
            finally:  # a timeout or cancellation leaves no waiter behind
                if self._drain_waiters.get(sid, (0, None))[1] is waiter:
                    del self._drain_waiters[sid]

    async def _write_frame(self, stream: _Stream, encoded: Encoded, end: bool = False) -> None:
        """Write one frame, first waiting while the stream's unacknowledged bytes are high."""
        await self._drain(stream, self._limits.stream_high_water)
        if stream.reset_code is not None or self._state != "open":
            raise _StreamClosed()
        self._write_now(stream.stream_id, encoded, end)

    def _write_now(self, stream_id: int, encoded: Encoded, end: bool = False) -> None:
        parts = frame_parts(encoded)
        try:
            for i, part in enumerate(parts):
                self._carrier.write(stream_id, part, end=end and i == len(parts) - 1)
        except RuntimeError as exc:  # the carrier refuses writes on a reset/finished stream
            raise _StreamClosed() from exc
        self._carrier.flush()

    def _abort_stream(self, stream: _Stream, code: ErrorCode, text: str) -> None:
        log.warning(
            "stream %d from %s reset: %s: %s",
            stream.stream_id,
            self._peer_label(),
            code.name,
            text,
        )
        sid = stream.stream_id
        local = self._is_local(sid)
        with contextlib.suppress(Exception):
            if local or not sid & 2:  # we have a sending side
                self._carrier.reset(sid, int(code))
            if not local or not sid & 2:  # we have a receiving side
                self._carrier.stop(sid, int(code))
        stream.reset_code = int(code)
        if stream.task is not None:
            stream.task.cancel()
        elif stream.kind in ("unary", "stream") and not stream.done:
            _deliver(stream, ProtocolError(code, f"bad answer from peer: {text}"))
            stream.done = True
        self._wake(stream)
        self._drop(stream)

    def _drop(self, stream: _Stream) -> None:
        stream.closed = True
        self._streams.pop(stream.stream_id, None)
        self._drain_waiters.pop(stream.stream_id, None)

    def _check_open(self) -> None:
        if self._state != "open":
            raise ConnectionLost(
                f"connection to {self._peer_label()} is {self._state}", self.close_code
            )

    def _peer_label(self) -> str:
        if self.peer is not None:
            return self.peer.short
        return "{}:{}".format(*self.remote_address[:2])

    # used by ResponseStream
    def _grant(self, stream: _Stream, nbytes: int) -> None:
        stream.consumed += nbytes
        if stream.consumed >= stream.window // 2 and not stream.ended and self._state == "open":
            grant, stream.consumed = stream.consumed, 0
            stream.credit += grant
            with contextlib.suppress(_StreamClosed):
                self._write_now(stream.stream_id, self._registry.encode(Credit(grant)))


class ResponseStream:
    """Client side of a streamed response: `async with` it, then `async for` the items."""

    def __init__(self, conn: Connection, message: Any, timeout: float, window: int):
        self._conn = conn
        self._message = message
        self._timeout = timeout
        self._window = window
        self._stream: _Stream | None = None
        self._acquired = False

    async def __aenter__(self) -> ResponseStream:
        conn = self._conn
        encoded = conn._encode(self._message)  # (one too large for a frame is not sent)
        try:
            async with asyncio.timeout(self._timeout):
                await conn._outbound.acquire()
        except TimeoutError:
            raise Overloaded(f"too many calls in flight to {conn._peer_label()}") from None
        self._acquired = True
        try:
            stream = conn._open_call("stream")
            self._stream = stream
            stream.window = self._window
            with contextlib.suppress(_StreamClosed):  # the item queue says why
                await conn._write_frame(stream, encoded)
            extra = self._window - INITIAL_CREDIT
            if extra > 0 and stream.reset_code is None:
                stream.credit += extra
                with contextlib.suppress(_StreamClosed):
                    conn._write_now(stream.stream_id, conn._registry.encode(Credit(extra)))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            if stream.done and self._conn.is_open:
                self._conn._write_end(stream)  # answer complete: close our side cleanly
            self._conn._finish_call(stream)
        if self._acquired:
            self._acquired = False
            self._conn._outbound.release()

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        stream = self._stream
        if stream is None:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout(self._timeout):
                item = await stream.items.get()
        except TimeoutError:
            raise RequestTimeout(
                f"no stream item from {self._conn._peer_label()} within {self._timeout:g}s"
            ) from None
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        message, size = item
        self._conn._grant(stream, size)
        return message
