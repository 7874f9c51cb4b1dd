#!/usr/bin/env python3
"""Write proto/vectors/: one JSON file per message type with an example message and its
encoded frame in hex, and proto/vectors/lanes/datagram.json: one express-lane datagram (keys,
plaintext, sealed bytes). Run after adding a message type (tests fail until its vector exists):

    PYTHONPATH=. python scripts/make_vectors.py
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mesh_node.expert_parallel.messages import (
    ExpertCall,
    ExpertOutput,
    RankingsData,
    RankingsRequest,
)
from mesh_node.identity import NodeId
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
from mesh_node.placement.expert_plan import ExpertDemand, PeerOffer, plan_experts
from mesh_node.placement.rankings import ExpertRankings
from mesh_node.protocol import REGISTRY
from mesh_node.serving.messages import ChatTurn, Generate, GenerateChunk
from mesh_node.transport.express import lane_key_bytes, plaintext, seal
from mesh_node.transport.frames import frame_parts
from mesh_node.transport.messages import (
    Auth,
    Credit,
    Error,
    ExpressLane,
    ExpressOpen,
    Hello,
    HelloAck,
    Ping,
    Pong,
    Welcome,
)
from mesh_node.transport.schema import to_plain
from mesh_node.transport.tensors import Tensor

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
NONCE_A = bytes([0xA5] * 32)
NONCE_B = bytes([0x5A] * 32)
SIG = bytes(range(64))
MAC = bytes(range(100, 132))


def f32(values) -> Tensor:
    """An F32 tensor (a list, or a list of rows), little-endian."""
    rows = values if isinstance(values[0], list) else [values]
    data = b"".join(struct.pack("<f", v) for row in rows for v in row)
    shape = (len(rows), len(rows[0])) if isinstance(values[0], list) else (len(values),)
    return Tensor("F32", shape, memoryview(data))


def bf16(rows: list[list[float]]) -> Tensor:
    """A BF16 tensor of exactly representable values (the top half of each float32)."""
    flat = [v for row in rows for v in row]
    data = b"".join(struct.pack("<f", v)[2:] for v in flat)
    return Tensor("BF16", (len(rows), len(rows[0])), memoryview(data))


# Expert rankings of a 2-layer (MoE layers 1 and 3), 4-expert model: the RankingsData vector
# carries them, RankingsRequest and ModelInfo.rankings name their digest, and the PeerState
# vector's expert_plan is the plan every node computes from them (PROTOCOL.md, section 9).
RANKINGS = ExpertRankings(
    fingerprint="9f86d081884c7d65",
    kind="micro",
    layers=(1, 3),
    num_experts=4,
    gate_mass=((0.5, 0.25, 0.125, 0.125), (0.0625, 0.4375, 0.25, 0.25)),
    selection=((0.75, 0.5, 0.5, 0.25), (0.25, 0.75, 0.5, 0.5)),
    coselection=(
        (
            (0.0, 0.5, 0.25, 0.0),
            (0.5, 0.0, 0.0, 0.0),
            (0.25, 0.0, 0.0, 0.25),
            (0.0, 0.0, 0.25, 0.0),
        ),
        (
            (0.0, 0.0, 0.25, 0.0),
            (0.0, 0.0, 0.25, 0.5),
            (0.25, 0.25, 0.0, 0.0),
            (0.0, 0.5, 0.0, 0.0),
        ),
    ),
    tokens=16,
    prompts=4,
)
TRUNK_BYTES = 4 << 20
EXPERT_BYTES = 1 << 20
BUDGET_A = 8 << 20  # KEY_A, the host: 4 MiB left for experts after the trunk
BUDGET_B = 6 << 20
MACHINE_A, MACHINE_B = "3a7bd3e2360a3d29", "c4ca4238a0b92382"  # two machines
PLAN = plan_experts(
    "tiny-moe",
    NodeId(KEY_A),
    [
        PeerOffer(NodeId(KEY_A), BUDGET_A - TRUNK_BYTES, MACHINE_A),
        PeerOffer(NodeId(KEY_B), BUDGET_B, MACHINE_B),
    ],
    ExpertDemand(
        RANKINGS.layers,
        RANKINGS.num_experts,
        EXPERT_BYTES,
        RANKINGS.gate_mass,
        RANKINGS.coselection,
        RANKINGS.digest(),
    ),
)

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
    models_on_disk=[
        ModelInfo(
            "tiny-moe",
            "qwen3_moe",
            12582912,
            3145728,
            4,
            trunk_bytes=TRUNK_BYTES,
            expert_budget=BUDGET_A,
            rankings=RANKINGS.digest(),
            expert_plan=PLAN.fingerprint,
            checkpoint="5e1d6c0a9f3b2e47",
        )
    ],
    models_served=["tiny-moe"],
    expert_shards=[
        ExpertShard("tiny-moe", layer, list(experts))
        for layer, experts in PLAN.experts_of(NodeId(KEY_A)).items()
    ],
    load=Load(2, 41.5),
    machine=MACHINE_A,
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
    Error(code=0x17, message="too many requests in flight"),  # (reason: "", its default)
    Credit(amount=524288),
    ExpressOpen(secret=bytes(range(32))),
    ExpressLane(lane=bytes.fromhex("5a17c0de00c0ffee"), port=41873),
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
    ExpertCall(
        model="tiny-moe",
        layer=3,
        experts=[2, 0],
        counts=[2, 1],
        rows=bf16([[1.0, -0.5, 0.25, 2.0], [0.0, 1.5, -1.0, 0.125]]),
        token_of=[0, 1, 1],
        weights=f32([0.5, 0.25, 0.75]),
    ),
    ExpertOutput(outputs=f32([[0.5, 0.0, -0.25, 1.0], [-1.0, 0.75, 0.5, 0.0]])),
    RankingsRequest(model="tiny-moe", digest=RANKINGS.digest()),
    RankingsData.of(RANKINGS.to_bytes()),
]

OUT = Path(__file__).resolve().parent.parent / "proto" / "vectors"


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()  # no options: --help explains, anything else is refused
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
    write_lane_vector()


def write_lane_vector() -> None:
    """A call on an express lane (PROTOCOL.md section 5.1): Ping(42) as call 7, datagram 3."""
    secret, lane, call, seq = bytes(range(100, 132)), bytes.fromhex("5a17c0de00c0ffee"), 7, 3
    call_key, answer_key = lane_key_bytes(secret, lane)
    body = plaintext(REGISTRY, call, Ping(seq=42))
    record = {
        "secret": secret.hex(),
        "lane": lane.hex(),
        "call_key": call_key.hex(),
        "answer_key": answer_key.hex(),
        "call": call,
        "ping_seq": 42,
        "seq": seq,
        "plaintext": body.hex(),
        "datagram": seal(AESGCM(call_key), lane, seq, body).hex(),
    }
    path = OUT / "lanes" / "datagram.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(OUT.parent.parent)}")


if __name__ == "__main__":
    main()
