"""Framing: a stream carries frames of `body_len:u32be | blob_len:u32be | body | blob`.

The body is msgpack (`[type_id, fields]`); the blob carries raw tensor bytes. Both lengths are
checked against the limits before anything is allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mesh_node.transport.errors import ErrorCode, ProtocolError
from mesh_node.transport.schema import Encoded

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size


@dataclass(frozen=True, slots=True)
class FrameLimits:
    max_body: int = 1 << 20
    max_blob: int = 64 << 20


def frame_parts(encoded: Encoded) -> list[bytes | memoryview]:
    """The byte strings to write, in order, for one frame (the blob is not copied)."""
    head = HEADER.pack(len(encoded.body), encoded.blob_size) + encoded.body
    return [head, *encoded.blob_parts]


def frame_size(encoded: Encoded) -> int:
    return HEADER_SIZE + len(encoded.body) + encoded.blob_size


class FrameDecoder:
    """Incremental decoder for one stream. `feed()` returns the frames completed so far.

    Returns (body, blob) pairs; the caller decodes bodies with the registry. After any
    ProtocolError the decoder is unusable (the stream gets reset).
    """

    __slots__ = ("_blob", "_body", "_filled", "_head", "_limits", "_stage")

    _HEADER, _BODY, _BLOB = 0, 1, 2

    def __init__(self, limits: FrameLimits):
        self._limits = limits
        self._head = bytearray()
        self._stage = self._HEADER
        self._body = bytearray()
        self._blob = bytearray()
        self._filled = 0

    @property
    def idle(self) -> bool:
        """True between frames (nothing partial buffered)."""
        return self._stage == self._HEADER and not self._head

    def _fill(self, target: bytearray, view: memoryview, pos: int) -> int:
        take = min(len(target) - self._filled, len(view) - pos)
        target[self._filled : self._filled + take] = view[pos : pos + take]
        self._filled += take
        return pos + take

    def _start_frame(self) -> None:
        body_len, blob_len = HEADER.unpack(self._head)
        self._head.clear()
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
        self._body = bytearray(body_len)
        self._blob = bytearray(blob_len)
        self._stage, self._filled = self._BODY, 0

    def feed(self, data: bytes | memoryview) -> list[tuple[bytearray, bytearray]]:
        frames: list[tuple[bytearray, bytearray]] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._stage == self._HEADER:
                take = min(HEADER_SIZE - len(self._head), len(view) - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < HEADER_SIZE:
                    break
                self._start_frame()
            if self._stage == self._BODY:
                pos = self._fill(self._body, view, pos)
                if self._filled < len(self._body):
                    break
                self._stage, self._filled = self._BLOB, 0
            pos = self._fill(self._blob, view, pos)
            if self._filled < len(self._blob):
                break
            frames.append((self._body, self._blob))
            self._body, self._blob = bytearray(), bytearray()
            self._stage, self._filled = self._HEADER, 0
        return frames

    def finish(self) -> None:
        """The stream ended: a partial frame left over is an error."""
        if not self.idle:
            raise ProtocolError(ErrorCode.TRUNCATED_FRAME, "stream ended inside a frame")
