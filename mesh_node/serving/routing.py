"""Which host takes a request: session affinity first, unless that host is clearly busier.

Affinity: the request's `user`, or else the start of its conversation, picks a preferred host
by rendezvous hashing (stable as hosts come and go: only the requests of a departed host move).
The start of a chat is its messages up to and including the first user message, all of it
(hashed): every later turn of the conversation repeats them, so all its turns share one key
however short that first message is, and conversations that share only a long system prompt
still differ. A raw prompt's start is its first 512 characters (code points). The least-loaded
host wins instead when the preferred one has more than `slack` more requests in flight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from mesh_node.identity import NodeId
from mesh_node.serving.requests import CompletionRequest

PREFIX_CHARS = 512


@dataclass(frozen=True, slots=True)
class HostLoad:
    node_id: NodeId
    inflight: int  # as gossiped by the host, plus what this node has sent it since


def affinity_key(request: CompletionRequest) -> bytes:
    """What places a request (UTF-8, lone surrogates kept as they are): `user\\0<user>`; else
    for chat `chat\\0<sha256 of its opening>`; else `prefix\\0<the prompt's first
    PREFIX_CHARS characters>`."""
    if request.user:
        return b"user\x00" + _utf8(request.user)
    if request.messages is not None:
        opening = []
        for message in request.messages:
            opening.append(f"{message.role}\x01{message.content}")
            if message.role == "user":
                break
        return b"chat\x00" + hashlib.sha256(_utf8("\x00".join(opening))).digest()
    return b"prefix\x00" + _utf8((request.prompt or "")[:PREFIX_CHARS])


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON may carry a lone surrogate


def _score(key: bytes, node_id: NodeId) -> bytes:
    return hashlib.sha256(key + node_id.key).digest()


def rank_hosts(hosts: Iterable[HostLoad], key: bytes, slack: int = 2) -> list[NodeId]:
    """Hosts in the order to try them: the chosen one first, the rest by affinity."""
    by_affinity = sorted(hosts, key=lambda h: _score(key, h.node_id), reverse=True)
    if not by_affinity:
        return []
    preferred = by_affinity[0]
    least = min(by_affinity, key=lambda h: h.inflight)  # ties: the earlier by affinity
    if preferred.inflight - least.inflight > slack:
        by_affinity.remove(least)
        by_affinity.insert(0, least)
    return [h.node_id for h in by_affinity]
