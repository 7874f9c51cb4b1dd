"""The `mesh` fixture: an empty in-process mesh (see mesh.py) stopped after the test."""

from __future__ import annotations

import pytest

from mesh_node.identity import new_mesh_id
from mesh_node.transport.memory import MemoryNetwork
from tests.gateway.mesh import Mesh


@pytest.fixture
async def mesh():
    m = Mesh(MemoryNetwork(latency=0.0002), new_mesh_id())
    yield m
    await m.stop()
