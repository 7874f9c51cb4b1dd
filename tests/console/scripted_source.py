"""A `StatusSource` for tests: holds a status document; the test changes it and it pushes
events to its subscribers, following the contract in mesh_node/console/source.py."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import time
from typing import Any

_END = object()


def node_id(index: int) -> str:
    """A well-formed, deterministic 52-character node id (lowercase base32)."""
    digest = hashlib.sha256(f"test node {index}".encode()).digest()
    return base64.b32encode(digest).decode().rstrip("=").lower()


def make_peer(index: int, *, status: str = "alive", is_self: bool = False, **fields: Any):
    """A complete PEER record for node `index`; `fields` override any key."""
    peer_id = node_id(index)
    now = time.time()
    peer = {
        "id": peer_id,
        "short": peer_id[:10],
        "name": f"node-{index}",
        "self": is_self,
        "status": status,
        "status_since": now - 30,
        "incarnation": 1,
        "addresses": [f"127.0.0.1:{7300 + index}"],
        "role": "host" if index == 0 else "worker",
        "software": "mesh-node 0.1.0",
        "state_version": 3,
        "hardware": {
            "cpu_cores": 8,
            "ram_total": 32 << 30,
            "ram_free": 20 << 30,
            "gpus": [{"name": "Test GPU 24G", "vram_total": 24 << 30, "vram_free": 20 << 30}]
            if index == 0
            else [],
        },
        "machine": "3a7bd3e2360a3d29" if index < 2 else f"{index:016x}",
        "models_on_disk": [
            {
                "name": "tiny-moe",
                "architecture": "mixtral",
                "bytes": 3 << 30,
                "parameters": 1_500_000_000,
                "experts": 8,
            }
        ],
        "models_served": ["tiny-moe"] if index == 0 else [],
        "expert_shards": [],
        "load": {"inflight": index, "tokens_per_s": 12.5 * index},
        "last_seen": None if is_self else now - 1.5,
        "rtt_ms": None if is_self else 0.4 + index,
    }
    peer.update(fields)
    return peer


class ScriptedSubscription:
    """Bounded queue of events; on overflow it is replaced by one `status` resync."""

    def __init__(self, source: ScriptedSource, size: int):
        self._source = source
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=size)
        self.closed = False
        self.resyncs = 0

    def push(self, name: str, payload: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait((name, payload))
        except asyncio.QueueFull:
            self._drain()
            self.resyncs += 1
            self._queue.put_nowait(("status", self._source.status()))

    def end(self) -> None:
        """The source ends this subscription (iteration stops after queued events)."""
        if self._queue.full():
            self._drain()
        self._queue.put_nowait(_END)

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    def __aiter__(self) -> ScriptedSubscription:
        return self

    async def __anext__(self) -> tuple[str, dict[str, Any]]:
        if self.closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END or self.closed:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._drain()
        self._queue.put_nowait(_END)  # wakes a pending __anext__
        self._source.subscriptions.discard(self)


class ScriptedSource:
    """Holds peers (by id) and extra top-level keys; changes are pushed to subscribers."""

    def __init__(
        self, peers: list[dict[str, Any]], *, queue_size: int = 64, extra: dict | None = None
    ):
        self.peers = {p["id"]: p for p in peers}
        self.node = next((p["id"] for p in peers if p.get("self")), peers[0]["id"])
        self.extra = dict(extra or {})
        self.queue_size = queue_size
        self.subscriptions: set[ScriptedSubscription] = set()
        self.subscribed = 0  # how many subscriptions were ever made

    # StatusSource
    def status(self) -> dict[str, Any]:
        peers = [copy.deepcopy(p) for p in self.peers.values()]
        counts = {
            s: sum(p["status"] == s for p in peers) for s in ("alive", "suspect", "dead", "left")
        }
        names = sorted(
            {m["name"] for p in peers for m in p["models_on_disk"]}
            | {m for p in peers for m in p["models_served"]}
        )
        live = [p for p in peers if p["status"] in ("alive", "suspect")]
        models = [
            {
                "name": name,
                "served_by": [p["id"] for p in live if name in p["models_served"]],
                "on_disk": [
                    p["id"] for p in peers if any(m["name"] == name for m in p["models_on_disk"])
                ],
            }
            for name in names
        ]
        return {
            "node": self.node,
            "mesh": {"nodes": len(peers), **counts},
            "peers": peers,
            "models": models,
            **copy.deepcopy(self.extra),
        }

    def subscribe(self) -> ScriptedSubscription:
        subscription = ScriptedSubscription(self, self.queue_size)
        self.subscriptions.add(subscription)
        self.subscribed += 1
        return subscription

    # Changes, as membership would make them
    def upsert(self, peer: dict[str, Any]) -> None:
        self.peers[peer["id"]] = peer
        self.emit("peer", copy.deepcopy(peer))

    def set_status(self, peer_id: str, status: str) -> None:
        peer = dict(self.peers[peer_id], status=status, status_since=time.time())
        self.upsert(peer)

    def remove(self, peer_id: str) -> None:
        del self.peers[peer_id]
        self.emit("removed", {"id": peer_id})

    def emit(self, name: str, payload: dict[str, Any]) -> None:
        for subscription in list(self.subscriptions):
            subscription.push(name, payload)

    def end_subscriptions(self) -> None:
        for subscription in list(self.subscriptions):
            subscription.end()

    @property
    def open_subscriptions(self) -> int:
        return len(self.subscriptions)


def shard_entry(nodes: list[str], **fields) -> dict:
    """One entry of the `shards` section as IndependentShards.status() writes it."""
    return {
        "model": "tiny-moe",
        "shard": 1,
        "shards": len(nodes),
        "nodes": nodes,
        "rankings": "973479b277642ce3",
        "plan": "b9bb8d29ef029a3e",
        "experts": {"0": [0, 1, 3, 4], "1": [0, 2, 5, 6]},
        "num_experts": 8,
        "core": {"0": [0, 1], "1": [0, 2]},
        "experts_per_shard": [4, 4, 3][: len(nodes)],
        "quality": "independent-shard mode: 3 shards, exact-match 71.5% vs 98.5% full",
        **fields,
    }
