"""The host's express lanes (transport/express.py) to the peers holding its experts.

A decode step's expert call goes on the lane to its peer when there is one and the call fits
one datagram: the engine thread sends it and reads the answer itself, no event loop between.
Everything else (prefill-sized calls, peers without a lane) goes over QUIC as before, and so
does a call the lane did not answer: `RemoteExperts` makes it again over QUIC at once, and
the lane is dropped. The coordinator opens lanes from the event loop, after a call over QUIC
to that peer succeeded (`wants`), and not again for `retry_after` seconds after one failed. A
new lane carries one Ping first (`probe_lane`, in a worker thread): one that does not answer,
say a firewall blocks its port, is never used.
"""

from __future__ import annotations

import threading
import time

import torch

from mesh_node.expert_parallel.dispatch import partial_sums, weighted_call
from mesh_node.identity import NodeId
from mesh_node.transport.express import (
    MAX_PLAINTEXT,
    ExpressCall,
    ExpressClient,
    ExpressFailed,
    LaneState,
)

ANSWER_SLACK = 4096  # bytes of a lane answer besides its F32 rows (headers, field names)


MAX_HELD_OFF = 1024  # peers held off from new lanes, remembered (oldest forgotten first)


class LaneCall:
    """One expert call in flight on a lane."""

    def __init__(self, lanes: ExpertLanes, call: ExpressCall, rows: torch.Tensor, peer: NodeId):
        self._lanes = lanes
        self._call = call
        self._rows = rows
        self._peer = peer

    def result(self, timeout: float) -> torch.Tensor:
        try:
            reply = self._lanes.client.result(self._call, timeout)
        except ExpressFailed:
            self._lanes.failed(self._peer, self._call.lane.lane)
            raise
        return partial_sums(reply, self._rows, self._peer)

    def cancel(self) -> bool:
        self._lanes.client.cancel(self._call)
        return True


class ExpertLanes:
    """Lanes to the peers of one hosted model. `start` runs on the engine's thread, `add`,
    `wants` and `connection_closed` on the event loop."""

    def __init__(self, model: str, client: ExpressClient, *, retry_after: float = 30.0):
        self.model = model
        self.client = client
        self.retry_after = retry_after
        self.calls = 0  # calls sent on lanes
        self.fallbacks = 0  # calls a lane did not answer (made again over QUIC)
        self._owners: dict[NodeId, object] = {}  # peer -> the connection that opened its lane
        self._not_before: dict[NodeId, float] = {}  # peer -> no new lane before this time
        self._opening: set[NodeId] = set()
        self._lock = threading.Lock()

    def start(
        self, peer: NodeId, layer: int, experts, counts, rows, token_of, weights
    ) -> LaneCall | None:
        answer_bytes = rows.shape[0] * rows.shape[1] * 4 + ANSWER_SLACK  # F32 partial sums
        if peer not in self.client or answer_bytes > MAX_PLAINTEXT:
            return None
        call = self.client.call(
            peer, weighted_call(self.model, layer, experts, counts, rows, token_of, weights)
        )
        if call is None:
            return None
        self.calls += 1
        return LaneCall(self, call, rows, peer)

    def failed(self, peer: NodeId, lane_id: bytes | None = None) -> None:
        """A call on the lane to `peer` (`lane_id`: on that lane) went unanswered: drop the
        lane, open none for a while. A lane opened since the call was made stays."""
        self.fallbacks += 1
        if not self.client.drop(peer, lane_id):
            return  # the call's lane is gone already; a newer one took its place
        with self._lock:
            self._owners.pop(peer, None)
            self._hold_off(peer, time.monotonic() + self.retry_after)

    def wants(self, peer: NodeId) -> bool:
        """Whether to open a lane to `peer` now (none open, none opening, none failed lately);
        True marks it opening until `add` or `refused`."""
        with self._lock:
            if (
                self.client.closed
                or peer in self.client
                or peer in self._opening
                or time.monotonic() < self._not_before.get(peer, 0.0)
            ):
                return False
            self._opening.add(peer)
            return True

    def add(
        self,
        peer: NodeId,
        owner: object,
        address: tuple[str, int],
        lane: bytes,
        secret: bytes,
        start: LaneState | None = None,
    ) -> bool:
        """Use a lane granted (over the connection `owner`) and probed; False, and nothing
        kept, when these lanes were closed meanwhile (the model stopped being hosted)."""
        try:
            self.client.add(peer, address, lane, secret, start)
        except RuntimeError:  # closed: the model stopped being hosted, or a rebuild
            return False
        with self._lock:
            self._owners[peer] = owner
            self._opening.discard(peer)
        return True

    def refused(self, peer: NodeId, retry_after: float | None = None) -> None:
        """Opening a lane to `peer` failed: try again after `retry_after` s (None: never)."""
        with self._lock:
            self._opening.discard(peer)
            self._hold_off(
                peer, float("inf") if retry_after is None else time.monotonic() + retry_after
            )

    def _hold_off(self, peer: NodeId, until: float) -> None:
        """No new lane to `peer` before `until` (under the lock); forgets the holds passed."""
        now = time.monotonic()
        self._not_before = {p: t for p, t in self._not_before.items() if t > now}
        self._not_before.pop(peer, None)
        self._not_before[peer] = until
        while len(self._not_before) > MAX_HELD_OFF:  # (refusals "for good" never pass)
            del self._not_before[next(iter(self._not_before))]

    def connection_closed(self, owner: object) -> None:
        """A connection closed: the lane it opened is gone on the peer's side too."""
        with self._lock:
            peers = [p for p, o in self._owners.items() if o is owner]
            for peer in peers:
                del self._owners[peer]
        for peer in peers:
            self.client.drop(peer)

    def status(self) -> dict[str, int]:
        return {
            "lanes": len(self._owners),
            "lane_calls": self.calls,
            "lane_fallbacks": self.fallbacks,
            "lane_resent": self.client.resent,
            "lane_polled": self.client.polled,
        }

    def close(self) -> None:
        self.client.close()
