"""The application handshake run on the first stream of every connection.

    client -> server   Hello     {proto_min, proto_max, software, node_key, nonce}
    server -> client   HelloAck  {proto, software, node_key, nonce, signature, mesh_proof}
    client -> server   Auth      {signature, mesh_proof}
    server -> client   Welcome   {observed_host, observed_port}

Both sides prove over the same transcript hash
    TH = SHA-256("mesh-node/1 handshake\\0" | client_key | client_nonce | server_key |
                 server_nonce | proto:u16be)
that they own their node key (Ed25519 signature of ROLE | TH) and know the mesh secret
(HMAC-SHA256(proof_key, ROLE | TH)), with ROLE = "server\\0" or "client\\0". Nonces are fresh
32-byte randoms from both sides, so a recorded handshake fails on a new connection. The client
also checks that the server's TLS certificate carries the server's node key.

These classes are pure state machines; the connection feeds them messages.
"""

from __future__ import annotations

import hashlib
import secrets
import struct

from mesh_node import __version__
from mesh_node.identity import MeshSecret, NodeId, NodeIdentity
from mesh_node.transport.errors import ErrorCode, HandshakeError
from mesh_node.transport.messages import Auth, Hello, HelloAck, Welcome

PROTO_MIN = 1
PROTO_MAX = 1
ALPN = "mesh-node/1"
NONCE_SIZE = 32
SOFTWARE = f"mesh-node/{__version__}"
_LABEL = b"mesh-node/1 handshake\x00"
SERVER_ROLE = b"server\x00"
CLIENT_ROLE = b"client\x00"
# the reason of a client's BAD_IDENTITY when another node answers at a known node's address
# (it restarted with a new key, or the address went to another machine): news, not an attack
ANOTHER_NODE = "expected node "


def another_node(code: int, reason: str) -> bool:
    """Whether a handshake failed only because another node answers where a known one was."""
    return code == ErrorCode.BAD_IDENTITY and reason.startswith(ANOTHER_NODE)


def transcript_hash(
    client_key: bytes, client_nonce: bytes, server_key: bytes, server_nonce: bytes, proto: int
) -> bytes:
    return hashlib.sha256(
        _LABEL + client_key + client_nonce + server_key + server_nonce + struct.pack(">H", proto)
    ).digest()


def _check_key_and_nonce(key: bytes, nonce: bytes, who: str) -> NodeId:
    if len(nonce) != NONCE_SIZE:
        raise HandshakeError(ErrorCode.HANDSHAKE_FAILED, f"{who} nonce must be 32 bytes")
    try:
        return NodeId(key)
    except ValueError:
        raise HandshakeError(ErrorCode.BAD_IDENTITY, f"{who} node key must be 32 bytes") from None


def _verify(peer: NodeId, mesh: MeshSecret, role: bytes, th: bytes, sig: bytes, proof: bytes):
    # the signature covers both fresh nonces: a replayed or forged proof fails here
    if not peer.verify(sig, role + th):
        raise HandshakeError(
            ErrorCode.BAD_IDENTITY,
            f"signature does not prove node key {peer.short} on this connection "
            "(forged or replayed handshake)",
        )
    if not mesh.check(role + th, proof):
        raise HandshakeError(ErrorCode.WRONG_MESH, "peer does not know this mesh's secret")


class ClientHandshake:
    def __init__(self, identity: NodeIdentity, mesh: MeshSecret, expect: NodeId | None = None):
        self.identity = identity
        self.mesh = mesh
        self.expect = expect
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        self.peer: NodeId | None = None
        self.proto = 0
        self.peer_software = ""

    def hello(self) -> Hello:
        return Hello(PROTO_MIN, PROTO_MAX, SOFTWARE, self.identity.node_id.key, self.nonce)

    def on_hello_ack(self, ack: HelloAck, tls_server_key: bytes | None) -> Auth:
        peer = _check_key_and_nonce(ack.node_key, ack.nonce, "server")
        if not PROTO_MIN <= ack.proto <= PROTO_MAX:
            raise HandshakeError(
                ErrorCode.VERSION_MISMATCH,
                f"server chose protocol {ack.proto}, we speak {PROTO_MIN}..{PROTO_MAX}",
            )
        if tls_server_key != ack.node_key:
            raise HandshakeError(
                ErrorCode.BAD_IDENTITY, "server's TLS certificate does not carry its node key"
            )
        if peer == self.identity.node_id:
            raise HandshakeError(ErrorCode.SELF_CONNECTION, "connected to ourselves")
        if self.expect is not None and peer != self.expect:
            raise HandshakeError(
                ErrorCode.BAD_IDENTITY,
                f"{ANOTHER_NODE}{self.expect.short}, the server is {peer.short}",
            )
        th = transcript_hash(
            self.identity.node_id.key, self.nonce, ack.node_key, ack.nonce, ack.proto
        )
        _verify(peer, self.mesh, SERVER_ROLE, th, ack.signature, ack.mesh_proof)
        self.peer, self.proto, self.peer_software = peer, ack.proto, ack.software
        return Auth(self.identity.sign(CLIENT_ROLE + th), self.mesh.prove(CLIENT_ROLE + th))


class ServerHandshake:
    def __init__(self, identity: NodeIdentity, mesh: MeshSecret):
        self.identity = identity
        self.mesh = mesh
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        self.peer: NodeId | None = None
        self.proto = 0
        self.peer_software = ""
        self._th = b""
        self._claimed: NodeId | None = None

    def on_hello(self, hello: Hello) -> HelloAck:
        claimed = _check_key_and_nonce(hello.node_key, hello.nonce, "client")
        if claimed == self.identity.node_id:
            raise HandshakeError(ErrorCode.SELF_CONNECTION, "connected to ourselves")
        low, high = max(PROTO_MIN, hello.proto_min), min(PROTO_MAX, hello.proto_max)
        if low > high:
            raise HandshakeError(
                ErrorCode.VERSION_MISMATCH,
                f"client speaks protocol {hello.proto_min}..{hello.proto_max}, "
                f"we speak {PROTO_MIN}..{PROTO_MAX}",
            )
        self.proto, self.peer_software, self._claimed = high, hello.software, claimed
        self._th = transcript_hash(
            hello.node_key, hello.nonce, self.identity.node_id.key, self.nonce, high
        )
        return HelloAck(
            proto=high,
            software=SOFTWARE,
            node_key=self.identity.node_id.key,
            nonce=self.nonce,
            signature=self.identity.sign(SERVER_ROLE + self._th),
            mesh_proof=self.mesh.prove(SERVER_ROLE + self._th),
        )

    def on_auth(self, auth: Auth, observed: tuple[str, int]) -> Welcome:
        if self._claimed is None:
            raise HandshakeError(ErrorCode.PROTOCOL_VIOLATION, "Auth before Hello")
        _verify(self._claimed, self.mesh, CLIENT_ROLE, self._th, auth.signature, auth.mesh_proof)
        self.peer = self._claimed
        return Welcome(observed_host=observed[0], observed_port=observed[1])
