"""proto/vectors/: every message type has a vector; each decodes to its fields and the
fields encode to exactly its bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_node.protocol import REGISTRY
from mesh_node.transport.frames import FrameDecoder, FrameLimits, frame_parts
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
