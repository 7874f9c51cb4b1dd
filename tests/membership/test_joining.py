"""Joining through a seed that cannot be joined (a `--peer` with a typo, a firewall, another
mesh's id): the first failure through each address is a warning that says what to check,
later ones are info (the node retries the seeds while it is alone)."""

from __future__ import annotations

import logging

from mesh_node.identity import MeshSecret, NodeIdentity, new_mesh_id
from mesh_node.membership.messages import Address
from mesh_node.protocol import REGISTRY
from mesh_node.transport.connection import Handlers
from tests.membership.test_mesh_in_process import simulate


def joins(caplog, address: Address) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"could not join through {address}" in r.message]


def test_a_seed_where_no_node_answers_is_a_warning_once_with_a_hint(caplog):
    caplog.set_level(logging.INFO, logger="mesh_node.membership")
    nowhere = Address("10.9.9.9", 7300)

    async def check(mesh):
        node = mesh.nodes[0]
        for _ in range(3):
            assert not await node.membership.join(nowhere)
        said = joins(caplog, nowhere)
        assert [r.levelno for r in said] == [logging.WARNING, logging.INFO, logging.INFO]
        assert "is a node running there, and does UDP reach its port?" in said[0].message
        assert "is a node running" not in said[1].message  # the hint once

    simulate(check, nodes=1)


def test_a_seed_in_another_mesh_says_to_compare_the_mesh_ids(caplog):
    caplog.set_level(logging.INFO, logger="mesh_node.membership")

    async def check(mesh):
        stranger = mesh.network.endpoint(
            NodeIdentity.generate(),
            MeshSecret(new_mesh_id()),
            registry=REGISTRY,
            handlers=Handlers(),
        )
        await stranger.start()
        try:
            there = Address(*stranger.address)
            assert not await mesh.nodes[0].membership.join(there)
            (said,) = joins(caplog, there)
            assert said.levelno == logging.WARNING and "WRONG_MESH" in said.message
            assert "in another mesh: compare the mesh ids" in said.message
        finally:
            await stranger.close()

    simulate(check, nodes=1)
