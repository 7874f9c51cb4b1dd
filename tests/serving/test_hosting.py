"""Hosting's own bookkeeping, with a fake membership and generators: what a node that stops
leaves behind."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mesh_node.engine.generator import GeneratorStats
from mesh_node.serving.hosting import Hosting
from mesh_node.serving.local import LocalModels


class BusyGenerator:
    """A generator with one request that never finishes."""

    closed = False

    def stats(self):
        return GeneratorStats(1, 0, 8, 64, 4096, 0, 0, 0, 0)

    def close(self, timeout=None):
        self.closed = True


class FakeMembership:
    node_id = "me"
    self_state = SimpleNamespace(current=SimpleNamespace(models_on_disk=[]))
    table = SimpleNamespace(subscribe=lambda callback: None)

    def update_state(self, **changes):
        pass


async def test_stopping_while_a_model_drains_closes_it_too():
    """A model no longer elected here drains (up to 30 s) after it left `local.generators`;
    a node stopped meanwhile closes it as well (its engine thread and memory)."""
    local = LocalModels()
    generator = BusyGenerator()
    local.generators["m"] = generator
    hosting = Hosting(FakeMembership(), local, [])
    hosting._busy.add("m")
    hosting._spawn(hosting._unload("m"))  # what evaluate() does when no longer elected
    await asyncio.sleep(0.3)
    assert "m" not in local.generators and not generator.closed  # draining
    async with asyncio.timeout(10):
        await hosting.stop()
    assert generator.closed
