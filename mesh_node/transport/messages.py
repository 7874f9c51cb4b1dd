"""Messages owned by the transport: the handshake, stream control, and ping.

Their type ids are fixed (0x01-0x1F is reserved for the transport); every registry holds them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, first frame of the handshake stream."""

    proto_min: int
    proto_max: int
    software: str
    node_key: bytes
    nonce: bytes


@dataclass(frozen=True, slots=True)
class HelloAck:
    """Server -> client: the server's identity, chosen version, and its proofs."""

    proto: int
    software: str
    node_key: bytes
    nonce: bytes
    signature: bytes
    mesh_proof: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    """Client -> server: the client's proofs over the same transcript."""

    signature: bytes
    mesh_proof: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client: admitted. Tells the client the address the server saw it from."""

    observed_host: str
    observed_port: int


@dataclass(frozen=True, slots=True)
class Error:
    """Answers a request that failed; the stream ends after it. `reason`: a machine-readable
    refinement of `code` that a service defines ("" when none)."""

    code: int
    message: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Credit:
    """Flow control on a streamed response: the reader grants `amount` more bytes."""

    amount: int


@dataclass(frozen=True, slots=True)
class ExpressOpen:
    """Ask for an express lane (see transport/express.py): `secret` is 32 fresh random bytes
    from which both sides derive the lane's keys. Answered by ExpressLane."""

    secret: bytes


@dataclass(frozen=True, slots=True)
class ExpressLane:
    """The lane granted: its 8-byte id and the UDP port of the answerer's lane socket."""

    lane: bytes
    port: int


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    seq: int


TRANSPORT_MESSAGES: dict[int, type] = {
    0x01: Hello,
    0x02: HelloAck,
    0x03: Auth,
    0x04: Welcome,
    0x05: Error,
    0x06: Credit,
    0x07: ExpressOpen,
    0x08: ExpressLane,
    0x10: Ping,
    0x11: Pong,
}
