"""The one table of message types on the wire (type id -> dataclass).

Ranges: 0x01-0x1F transport (fixed), 0x20-0x3F membership, 0x40-0x5F placement,
0x60-0x7F serving, 0x80-0x9F experts, 0xF000-0xFFFF private/experimental (never in this table).
proto/PROTOCOL.md documents every entry; tests check each against proto/vectors/.
"""

from __future__ import annotations

from mesh_node.expert_parallel.messages import EXPERT_MESSAGES
from mesh_node.membership.messages import MEMBERSHIP_MESSAGES
from mesh_node.serving.messages import SERVING_MESSAGES
from mesh_node.transport.messages import TRANSPORT_MESSAGES
from mesh_node.transport.schema import Registry

MESSAGES: dict[int, type] = {
    **TRANSPORT_MESSAGES,
    **MEMBERSHIP_MESSAGES,
    **SERVING_MESSAGES,
    **EXPERT_MESSAGES,
}

REGISTRY = Registry(MESSAGES)
