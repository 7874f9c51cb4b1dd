"""Framing: a stream carries frames of `body_len:u32be | blob_len:u32be | body | blob`.

The body is msgpack (`[type_id, fields]`); the blob carries raw tensor bytes. Both lengths are
checked against the limits before anything is allocated, and a partial frame's buffers grow
with the bytes that arrive: a header alone (8 bytes claiming 65 MiB) costs nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mesh_node.transport.errors import ErrorCode, ProtocolError
from mesh_node.transport.schema import Encoded

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size
_EMPTY = bytearray()  # shared, never written: a frame without blob

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class FrameLimits:
    max_body: int = 1 << 20
    max_blob: int = 64 << 20


# the handshake's four frames are a few hundred bytes each and carry no tensors
HANDSHAKE_LIMITS = FrameLimits(max_body=4096, max_blob=0)


def frame_parts(encoded: Encoded) -> list[bytes | memoryview]:
    """The byte strings to write, in order, for one frame (the blob is not copied)."""
    head = HEADER.pack(len(encoded.body), encoded.blob_size) + encoded.body
    return [head, *encoded.blob_parts]


def single_frame(data: bytes, limits: FrameLimits) -> tuple[memoryview, bytearray] | None:
    """(body, blob) when `data` is exactly one complete frame within the limits, else None
    (the caller then takes the general, incremental path, which reports any problem)."""
    size = len(data)
    if size < HEADER_SIZE:
        return None
    body_len, blob_len = HEADER.unpack_from(data)
    if (
        size != HEADER_SIZE + body_len + blob_len
        or not 0 < body_len <= limits.max_body
        or blob_len > limits.max_blob
    ):
        return None
    view = memoryview(data)
    body_end = HEADER_SIZE + body_len
    return view[HEADER_SIZE:body_end], bytearray(view[body_end:]) if blob_len else _EMPTY


def frame_size(encoded: Encoded) -> int:
    return HEADER_SIZE + len(encoded.body) + encoded.blob_size


class FrameDecoder:
    """Incremental decoder for one stream. `feed()` returns the frames completed so far.

    Returns (body, blob) pairs; the caller decodes bodies with the registry. After any
    ProtocolError the decoder is unusable (the stream gets reset).
    """

    __slots__ = ("_blob", "_blob_len", "_body", "_body_len", "_head", "_limits", "_stage")

    _HEADER, _BODY, _BLOB = 0, 1, 2

    def __init__(self, limits: FrameLimits):
        self._limits = limits
        self._head = b""
        self._stage = self._HEADER
        self._body = _EMPTY
        self._blob = _EMPTY
        self._body_len = self._blob_len = 0

    @property
    def idle(self) -> bool:
        """True between frames (nothing partial buffered)."""
        return self._stage == self._HEADER and not self._head

    @staticmethod
    def _fill(target: bytearray, size: int, view: memoryview, pos: int) -> int:
        """Append to `target` (growing it) up to `size` bytes in all; returns the new pos."""
        take = min(size - len(target), len(view) - pos)
        target += view[pos : pos + take]
        return pos + take

    def _check(self, body_len: int, blob_len: int) -> None:
        if body_len > self._limits.max_body:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame body of {body_len} bytes exceeds {self._limits.max_body}",
            )
        if blob_len > self._limits.max_blob:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame blob of {blob_len} bytes exceeds {self._limits.max_blob}",
            )
        if body_len == 0:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "frame with an empty body")

    def feed(self, data: bytes | memoryview) -> list[tuple[Buffer, bytearray]]:
        """Frames completed by `data`, as (body, blob). A body may be a view into `data`."""
        if self._stage == self._BLOB and len(data) < self._blob_len - len(self._blob):
            # fast path: a chunk in the middle of a large blob (tensor payloads)
            self._blob += data
            return []
        view = memoryview(data)
        frames: list[tuple[Buffer, bytearray]] = []
        pos = 0
        if self.idle:  # fast path: whole frames need no buffering
            end = len(view)
            while end - pos >= HEADER_SIZE:
                body_len, blob_len = HEADER.unpack_from(view, pos)
                self._check(body_len, blob_len)
                body_at = pos + HEADER_SIZE
                frame_end = body_at + body_len + blob_len
                if frame_end > end:
                    break
                blob = bytearray(view[body_at + body_len : frame_end]) if blob_len else _EMPTY
                frames.append((view[body_at : body_at + body_len], blob))
                pos = frame_end
        while pos < len(view):
            if self._stage == self._HEADER:
                take = min(HEADER_SIZE - len(self._head), len(view) - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < HEADER_SIZE:
                    break
                body_len, blob_len = HEADER.unpack(self._head)
                self._head = b""
                self._check(body_len, blob_len)
                self._body, self._body_len = bytearray(), body_len
                self._blob, self._blob_len = (bytearray() if blob_len else _EMPTY), blob_len
                self._stage = self._BODY
            if self._stage == self._BODY:
                pos = self._fill(self._body, self._body_len, view, pos)
                if len(self._body) < self._body_len:
                    break
                self._stage = self._BLOB
            if self._blob_len:
                pos = self._fill(self._blob, self._blob_len, view, pos)
                if len(self._blob) < self._blob_len:
                    break
            frames.append((self._body, self._blob))
            self._body, self._blob = _EMPTY, _EMPTY
            self._stage = self._HEADER
        return frames

    def finish(self) -> None:
        """The stream ended: a partial frame left over is an error."""
        if not self.idle:
            raise ProtocolError(ErrorCode.TRUNCATED_FRAME, "stream ended inside a frame")
