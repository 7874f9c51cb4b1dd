"""Reaching a member: an authenticated connection to a node known from the peer table."""

from __future__ import annotations

import logging

from mesh_node.identity import NodeId
from mesh_node.membership.table import PeerTable
from mesh_node.transport.connection import Connection
from mesh_node.transport.endpoint import Endpoint
from mesh_node.transport.errors import TransportError

log = logging.getLogger("mesh_node.membership")


async def connect_member(
    endpoint: Endpoint, table: PeerTable, node: NodeId, *, timeout: float
) -> Connection | None:
    """The open connection to `node`, reused when there is one, else dialed at the addresses
    it advertises (first that answers as that node); None when none does."""
    conn = endpoint.connection_to(node)
    if conn is not None:
        return conn
    member = table.get(node)
    for address in member.addresses if member is not None else []:
        try:
            return await endpoint.connect(
                (address.host, address.port), expect=node, timeout=timeout
            )
        except (TransportError, TimeoutError, OSError) as exc:
            log.debug("node %s not reachable at %s: %s", node.short, address, exc)
    return None
