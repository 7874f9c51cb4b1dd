"""A host serves its rankings document: encoded once, however many peers ask at once."""

from __future__ import annotations

import asyncio
import threading
import time

from mesh_node.expert_parallel.coordinator import ExpertParallel
from mesh_node.expert_parallel.messages import RankingsRequest


class Rankings:
    def __init__(self) -> None:
        self.encodes = 0
        self.lock = threading.Lock()

    def to_bytes(self) -> bytes:
        with self.lock:
            self.encodes += 1
        time.sleep(0.2)  # a large model's document takes a while
        return b"document"


class Host:
    """The part of ExpertParallel that serves rankings."""

    def __init__(self, rankings: dict) -> None:
        self.rankings = rankings
        self._documents: dict = {}

    _serve_rankings = ExpertParallel._serve_rankings
    _encoded = ExpertParallel._encoded


async def test_simultaneous_requests_share_one_encoding():
    rankings = Rankings()
    host = Host({"d1": rankings})
    answers = await asyncio.gather(
        *(host._serve_rankings(None, RankingsRequest("m", "d1")) for _ in range(20))
    )
    assert rankings.encodes == 1
    assert all(a.data() == b"document" for a in answers)
    await host._serve_rankings(None, RankingsRequest("m", "d1"))
    assert rankings.encodes == 1  # kept for the next ones


async def test_rankings_forgotten_while_encoding_are_not_kept_encoded():
    rankings = Rankings()
    host = Host({"d1": rankings})
    serving = asyncio.ensure_future(host._serve_rankings(None, RankingsRequest("m", "d1")))
    await asyncio.sleep(0.05)
    del host.rankings["d1"]  # forgotten (a newer plan's rankings pushed it out)
    assert (await serving).data() == b"document"  # the request under way is still answered
    assert host._documents == {}
