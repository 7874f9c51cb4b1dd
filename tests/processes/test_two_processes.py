"""Real OS processes over real QUIC on loopback."""

from __future__ import annotations

import asyncio

from mesh_node.identity import new_mesh_id
from mesh_node.transport.errors import ErrorCode
from mesh_node.transport.messages import Ping, Pong
from tests.processes.nodes import NodeProcess, client_endpoint


async def test_two_node_processes_link_and_leave_cleanly():
    mesh_id = new_mesh_id()
    first = await NodeProcess.join(mesh_id)
    second = await NodeProcess.join(mesh_id, "--peer", "{}:{}".format(*first.address))
    try:
        await second.wait_log(rf"joined through {first.node_id.short}")
        # this test process is a third party: it can reach both, authenticated
        ours = client_endpoint(mesh_id)
        await ours.start()
        try:
            conn = await ours.connect(first.address, expect=first.node_id, timeout=10)
            assert await conn.request(Ping(1), timeout=5) == Pong(1)
            # SIGTERM: the node leaves at once, closing its connections cleanly
            assert await first.stop() == 0
            async with asyncio.timeout(5):
                await conn.wait_closed()
            assert conn.close_code == ErrorCode.NO_ERROR
            await second.wait_log(rf"node {first.node_id.short} has left")
        finally:
            await ours.close()
    finally:
        await first.stop()
        assert await second.stop() == 0


async def test_a_node_of_another_mesh_is_refused_by_a_process():
    node = await NodeProcess.join(new_mesh_id())
    try:
        ours = client_endpoint(new_mesh_id())
        await ours.start()
        try:
            from mesh_node.transport.errors import HandshakeError

            try:
                await ours.connect(node.address, timeout=10)
                raise AssertionError("connection should have been refused")
            except HandshakeError as refused:
                assert refused.code == ErrorCode.WRONG_MESH
            await node.wait_log("handshake with .* failed.*WRONG_MESH")
        finally:
            await ours.close()
    finally:
        assert await node.stop() == 0
