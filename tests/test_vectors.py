"""proto/vectors/: every message type has a vector; each decodes to its fields and the
fields encode to exactly its bytes."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest

from mesh_node.protocol import REGISTRY
from mesh_node.transport.frames import FrameDecoder, FrameLimits, frame_parts
from mesh_node.transport.messages import Error
from mesh_node.transport.schema import from_plain, to_plain

VECTORS = sorted((Path(__file__).parent.parent / "proto" / "vectors").glob("*.json"))


def test_every_message_type_has_a_vector():
    covered = {json.loads(path.read_text())["type_id"] for path in VECTORS}
    missing = [cls.__name__ for type_id, cls in REGISTRY.items() if type_id not in covered]
    assert not missing, f"no vector for {missing}: run scripts/make_vectors.py"


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_vector_decodes_and_encodes_exactly(path):
    record = json.loads(path.read_text())
    frame = bytes.fromhex(record["frame"])
    ((body, blob),) = FrameDecoder(FrameLimits()).feed(frame)
    decoded = REGISTRY.decode(body, memoryview(blob))
    assert type(decoded).__name__ == record["name"]
    assert REGISTRY.type_id(type(decoded)) == record["type_id"]
    assert to_plain(decoded) == record["fields"]
    built = from_plain(type(decoded), record["fields"])
    encoded = b"".join(bytes(part) for part in frame_parts(REGISTRY.encode(built)))
    assert encoded.hex() == record["frame"]


def test_expert_plan_example_matches_the_spec():
    """PROTOCOL.md's plan example: the rankings of the RankingsData vector, the offers it
    lists, give the plan the PeerState vector follows and the shards it publishes."""
    from mesh_node.identity import NodeId
    from mesh_node.placement.expert_plan import ExpertDemand, PeerOffer, plan_experts
    from mesh_node.placement.rankings import ExpertRankings

    vectors = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in VECTORS}
    rankings = ExpertRankings.from_bytes(
        bytes.fromhex(vectors["RankingsData"]["fields"]["document"]["data"])
    )
    assert rankings.digest() == vectors["RankingsRequest"]["fields"]["digest"]
    state = vectors["PeerState"]["fields"]
    (info,) = state["models_on_disk"]
    assert info["rankings"] == rankings.digest()
    host, other = NodeId(bytes(range(32))), NodeId(bytes(range(32, 64)))
    assert bytes.fromhex(state["node"]) == host.key
    demand = ExpertDemand(
        rankings.layers,
        rankings.num_experts,
        1 << 20,
        rankings.gate_mass,
        rankings.coselection,
        rankings.digest(),
    )
    host_budget = info["expert_budget"] - info["trunk_bytes"]
    offers = [
        PeerOffer(host, host_budget, state["machine"]),
        PeerOffer(other, 6 << 20, "c4ca4238a0b92382"),
    ]
    plan = plan_experts(info["name"], host, offers, demand)
    assert plan.fingerprint == info["expert_plan"] == "3ed25745896ee081"
    assert {s["layer"]: tuple(s["experts"]) for s in state["expert_shards"]} == dict(
        plan.experts_of(host)
    )
    assert dict(plan.experts_of(host)) == {1: (0, 1), 3: (0, 1)}
    assert dict(plan.experts_of(other)) == {1: (0, 2, 3), 3: (1, 2, 3)}
    assert plan.unreplicated == ()


def test_an_error_from_a_node_that_sends_no_reason_decodes_with_none():
    """`Error.reason` came after `code` and `message`: a frame without it (an older node's)
    still decodes, to reason ""."""
    body = REGISTRY.encode(Error(0x1A, "no"))
    ((frame_body, _),) = FrameDecoder(FrameLimits()).feed(b"".join(frame_parts(body)))
    type_id, fields = msgpack.unpackb(frame_body)
    del fields["reason"]
    old = msgpack.packb([type_id, fields])
    assert REGISTRY.decode(old, memoryview(b"")) == Error(0x1A, "no", "")
