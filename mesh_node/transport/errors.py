"""Error codes shared by every wire-level failure, and the exceptions that carry them.

One table of codes serves three places on the wire (see proto/PROTOCOL.md, "Error codes"):
the application error code of a QUIC CONNECTION_CLOSE, the code of a RESET_STREAM /
STOP_SENDING, and the `code` field of an `Error` message answering a request.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    # connection-level (CONNECTION_CLOSE application error codes)
    NO_ERROR = 0x00
    HANDSHAKE_TIMEOUT = 0x01
    HANDSHAKE_FAILED = 0x02
    VERSION_MISMATCH = 0x03
    WRONG_MESH = 0x04
    BAD_IDENTITY = 0x05
    PROTOCOL_VIOLATION = 0x06
    SELF_CONNECTION = 0x07
    SHUTTING_DOWN = 0x08
    LINK_ERROR = 0x09  # the layer below failed: TLS alert, idle timeout, lost path
    # stream-level (RESET_STREAM / STOP_SENDING codes, Error message codes)
    MALFORMED_FRAME = 0x10
    FRAME_TOO_LARGE = 0x11
    TRUNCATED_FRAME = 0x12
    UNKNOWN_MESSAGE_TYPE = 0x13
    INVALID_MESSAGE = 0x14
    UNEXPECTED_MESSAGE = 0x15
    CANCELLED = 0x16
    OVERLOADED = 0x17
    INTERNAL_ERROR = 0x18
    NOT_SUPPORTED = 0x19
    BAD_REQUEST = 0x1A
    NOT_FOUND = 0x1B
    UNAVAILABLE = 0x1C

    @classmethod
    def describe(cls, code: int) -> str:
        try:
            return cls(code).name
        except ValueError:
            return f"0x{code:x}"


class TransportError(Exception):
    """Base class of every error raised by mesh_node.transport."""


class ProtocolError(TransportError):
    """Bytes or messages that break the protocol: a frame or message we refuse to decode."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class HandshakeError(TransportError):
    """The connection was refused during the application handshake (either side)."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"handshake failed ({ErrorCode.describe(code)}): {reason}")
        self.code = code
        self.reason = reason


class ConnectionLost(TransportError):
    """The connection closed (or could not be opened) before the operation finished."""

    def __init__(self, reason: str, code: int | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RemoteError(TransportError):
    """The peer answered a request with an `Error` message, or reset the stream."""

    def __init__(self, code: int, message: str, reason: str = ""):
        super().__init__(f"peer answered {ErrorCode.describe(code)}: {message}")
        self.code = code
        self.message = message
        self.reason = reason  # the Error's machine-readable refinement of code ("": none)


class RequestTimeout(TransportError, TimeoutError):
    """No answer (or no next stream item) arrived within the request's timeout."""


class Overloaded(TransportError):
    """A local bound was reached (too many requests in flight); try again later."""


class RequestFailed(TransportError):
    """Raised by a request handler to answer with an `Error` message of the given code (and
    reason: a machine-readable refinement of the code that the service defines)."""

    def __init__(self, code: ErrorCode, message: str, reason: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
