#!/usr/bin/env python3
"""Write proto/vectors/: one JSON file per message type with an example message and its
encoded frame in hex. Run after adding a message type (tests fail until its vector exists):

    python scripts/make_vectors.py
"""

from __future__ import annotations

import json
from pathlib import Path

from mesh_node.membership.messages import (
    Address,
    Claim,
    ExpertShard,
    Gossip,
    Gpu,
    Hardware,
    Load,
    ModelInfo,
    PeerState,
    Probe,
    ProbeAck,
    ProbeRequest,
    ProbeResult,
    StateDelta,
    StateRequest,
    SyncReply,
    SyncRequest,
)
from mesh_node.protocol import REGISTRY
from mesh_node.serving.messages import ChatTurn, Generate, GenerateChunk
from mesh_node.transport.frames import frame_parts
from mesh_node.transport.messages import (
    Auth,
    Credit,
    Error,
    Hello,
    HelloAck,
    Ping,
    Pong,
    Welcome,
)
from mesh_node.transport.schema import to_plain

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
NONCE_A = bytes([0xA5] * 32)
NONCE_B = bytes([0x5A] * 32)
SIG = bytes(range(64))
MAC = bytes(range(100, 132))

ALIVE = Claim("alive", KEY_A, 1700000000000, KEY_A, [Address("192.0.2.7", 7300)], SIG)
SUSPECT = Claim("suspect", KEY_A, 1700000000000, KEY_B, [], SIG)
STATE = PeerState(
    node=KEY_A,
    version=1700000000042,
    incarnation=1700000000000,
    name="box-1",
    software="mesh-node/0.1.0",
    role="host",
    addresses=[Address("192.0.2.7", 7300)],
    hardware=Hardware(16, 64 << 30, 40 << 30, [Gpu("NVIDIA H100", 80 << 30, 79 << 30)]),
    models_on_disk=[ModelInfo("tiny-moe", "qwen3_moe", 12582912, 3145728, 8)],
    models_served=["tiny-moe"],
    expert_shards=[ExpertShard("tiny-moe", 0, [0, 1, 5])],
    load=Load(2, 41.5),
)

EXAMPLES = [
    Hello(proto_min=1, proto_max=1, software="mesh-node/0.1.0", node_key=KEY_A, nonce=NONCE_A),
    HelloAck(
        proto=1,
        software="mesh-node/0.1.0",
        node_key=KEY_B,
        nonce=NONCE_B,
        signature=SIG,
        mesh_proof=MAC,
    ),
    Auth(signature=SIG, mesh_proof=MAC),
    Welcome(observed_host="192.0.2.7", observed_port=53211),
    Error(code=0x17, message="too many requests in flight"),
    Credit(amount=524288),
    Ping(seq=42),
    Pong(seq=42),
    Probe(seq=7, state_version=1700000000042, claims=[ALIVE]),
    ProbeAck(seq=7, state_version=1700000000001, claims=[SUSPECT]),
    ProbeRequest(target=KEY_A, addresses=[Address("192.0.2.7", 7300)], claims=[]),
    ProbeResult(ok=False, claims=[]),
    Gossip(claims=[ALIVE, SUSPECT]),
    SyncRequest(digest=bytes(range(32)), claims=[]),
    SyncReply(digest=bytes(range(1, 33)), claims=[ALIVE]),
    StateRequest(),
    STATE,
    StateDelta(node=KEY_A, base=1700000000042, version=1700000000043, load=Load(0, 0.0)),
    Generate(
        request_id="chatcmpl-4f9c2a",
        model="builtin",
        messages=[ChatTurn("user", "What is 348 + 276?")],
        generated_ids=[26, 22],
        max_tokens=16,
        temperature=0.0,
        seed=7,
        stop=["\n"],
    ),
    GenerateChunk(
        text="", token_ids=[1], finish_reason="stop", prompt_tokens=18, completion_tokens=4
    ),
]

OUT = Path(__file__).resolve().parent.parent / "proto" / "vectors"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for message in EXAMPLES:
        type_id = REGISTRY.type_id(type(message))
        frame = b"".join(bytes(part) for part in frame_parts(REGISTRY.encode(message)))
        record = {
            "type_id": type_id,
            "name": type(message).__name__,
            "fields": to_plain(message),
            "frame": frame.hex(),
        }
        path = OUT / f"{type_id:04x}-{type(message).__name__}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path.relative_to(OUT.parent.parent)}")


if __name__ == "__main__":
    main()
