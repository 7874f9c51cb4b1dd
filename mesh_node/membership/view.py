"""The mesh as the console shows it: the status document and a stream of changes.

Implements the console's StatusSource (mesh_node/console/source.py); documented in
proto/CONSOLE.md. Reads the peer table; owns nothing but its subscribers' queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from mesh_node.membership.claims import ALIVE, DEAD, LEFT, SUSPECT
from mesh_node.membership.table import CONTACT, REMOVED, Member, PeerTable
from mesh_node.transport.schema import to_plain

CONTACT_EVENT_EVERY = 5.0  # seconds between "peer" events caused only by probe answers
SUBSCRIBER_QUEUE = 256


class MeshView:
    def __init__(
        self,
        table: PeerTable,
        *,
        wall_clock: Callable[[], float] = time.time,
        extra: Callable[[], dict[str, Any]] | None = None,
    ):
        self.table = table
        self.wall_clock = wall_clock
        self.extra = extra  # later layers add sections (hosting, placements)
        self._loop = asyncio.get_running_loop()
        self._subscribers: set[Subscription] = set()
        self._contact_sent: dict[Any, float] = {}
        table.subscribe(self._on_change)

    def _wall(self, loop_time: float | None) -> float | None:
        if loop_time is None:
            return None
        return round(self.wall_clock() - (self._loop.time() - loop_time), 3)

    def peer_record(self, member: Member) -> dict[str, Any]:
        state = member.state
        node_id = member.node_id
        addresses = state.addresses if state is not None else member.addresses
        working = state is not None and member.live
        return {
            "id": str(node_id),
            "short": node_id.short,
            "name": state.name if state else "",
            "self": node_id == self.table.self_id,
            "status": member.status,
            "status_since": self._wall(member.status_since),
            "incarnation": member.incarnation,
            "addresses": [str(a) for a in addresses],
            "role": state.role if state else "",
            "software": state.software if state else "",
            "state_version": member.state_version,
            "hardware": to_plain(state.hardware) if state and state.hardware else None,
            "machine": state.machine if state else "",
            "models_on_disk": to_plain(state.models_on_disk) if state else [],
            # what a dead or departed member did is over: its last state says it still serves
            "models_served": list(state.models_served) if working else [],
            "expert_shards": to_plain(state.expert_shards) if working else [],
            "load": to_plain(state.load) if working else {"inflight": 0, "tokens_per_s": 0.0},
            "last_seen": self._wall(member.last_seen),
            "rtt_ms": round(member.rtt * 1000, 3) if member.rtt is not None else None,
        }

    def status(self) -> dict[str, Any]:
        members = sorted(self.table, key=lambda m: (m.node_id != self.table.self_id, m.node_id))
        counts = {s: 0 for s in (ALIVE, SUSPECT, DEAD, LEFT)}
        models: dict[str, dict[str, list[str]]] = {}
        for m in members:
            counts[m.status] += 1
            if m.state is None or not m.live:
                continue
            for name in m.state.models_served:
                models.setdefault(name, {"served_by": [], "on_disk": []})["served_by"].append(
                    str(m.node_id)
                )
            for info in m.state.models_on_disk:
                models.setdefault(info.name, {"served_by": [], "on_disk": []})["on_disk"].append(
                    str(m.node_id)
                )
        doc = {
            "node": str(self.table.self_id),
            "mesh": {"nodes": len(members), **counts},
            "peers": [self.peer_record(m) for m in members],
            "models": [{"name": name, **where} for name, where in sorted(models.items())],
        }
        if self.extra is not None:
            doc.update(self.extra())
        return doc

    # ---- change stream
    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def _on_change(self, member: Member, what: str) -> None:
        if what == REMOVED:
            self._contact_sent.pop(member.node_id, None)
        if not self._subscribers:
            return
        if what == REMOVED:
            self._publish("removed", {"id": str(member.node_id)})
            return
        if what == CONTACT:
            now = self._loop.time()
            if now - self._contact_sent.get(member.node_id, -1e9) < CONTACT_EVENT_EVERY:
                return
            self._contact_sent[member.node_id] = now
        self._publish("peer", self.peer_record(member))

    def publish_status(self) -> None:
        """Tell subscribers to take a fresh full document (after a change outside the table)."""
        if self._subscribers:
            self._publish("status", self.status())

    def _publish(self, event: str, payload: dict[str, Any]) -> None:
        for sub in list(self._subscribers):
            sub.push(event, payload)


_RESYNC = ("status", {})  # in a queue: "the whole document, as it is when this is read"


class Subscription:
    """A bounded queue of (event, payload). On overflow the backlog is replaced by one
    "status" event with the whole document, so a slow reader resyncs instead of growing. The
    document is built when the reader takes it, not on overflow: a reader that has stopped
    costs the node nothing, however many changes come (and what comes meanwhile is in it)."""

    def __init__(self, view: MeshView):
        self._view = view
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._closed = False
        self._resync = False  # the backlog was dropped: the next read is the whole document

    def push(self, event: str, payload: dict[str, Any]) -> None:
        if self._closed or self._resync:
            return  # (a resync pending: the document read next will hold this change)
        try:
            self._queue.put_nowait((event, payload))
        except asyncio.QueueFull:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._resync = True
            self._queue.put_nowait(_RESYNC)

    def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while not self._closed:
            item = await self._queue.get()
            if self._closed:
                return
            if item is _RESYNC:  # built now, on the reader's turn
                self._resync = False
                item = ("status", self._view.status())
            yield item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._view._subscribers.discard(self)
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(("closed", {}))  # wake a waiting reader
