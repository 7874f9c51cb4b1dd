"""The `mesh` fixture: an empty in-process mesh (see mesh.py) stopped after the test."""

from __future__ import annotations

import asyncio
import io

import pytest

from mesh_node.identity import new_mesh_id
from mesh_node.transport.memory import MemoryNetwork
from tests.gateway.mesh import Mesh


@pytest.fixture
async def mesh():
    m = Mesh(MemoryNetwork(latency=0.0002), new_mesh_id())
    yield m
    try:
        async with asyncio.timeout(60):
            await m.stop()
    except TimeoutError:  # say what is still waiting, not just that something is
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(file=stacks)
        pytest.fail(f"the mesh did not stop within 60 s; its tasks:\n{stacks.getvalue()}")
