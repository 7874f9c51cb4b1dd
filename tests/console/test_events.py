"""GET /api/events: the server-sent event stream."""

import asyncio

import aiohttp
import pytest

from mesh_node.console.events import encode_event
from mesh_node.console.server import ConsoleServer
from tests.conditions import until
from tests.console.scripted_source import ScriptedSource, make_peer
from tests.console.sse import EventReader


def stream_tasks() -> list[asyncio.Task]:
    """Tasks the event-stream pump creates (waiting on a subscription or on shutdown)."""
    names = ("_next_event", "Event.wait")
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ in names]


async def test_stream_starts_with_the_whole_document(console, source, http):
    async with http.get(f"{console.url}/api/events") as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-store"
        first = await EventReader(response).next_event()
    assert first.event == "status"
    assert first.data == source.status()
    assert first.retry == 2000


async def test_changes_follow_as_peer_and_removed_events(console, source, http):
    async with http.get(f"{console.url}/api/events") as response:
        events = EventReader(response)
        await events.next_event()
        dead = make_peer(1)["id"]
        source.set_status(dead, "dead")
        newcomer = make_peer(7, name="späť \n [bold]x")
        source.upsert(newcomer)
        source.remove(make_peer(2)["id"])

        changed = await events.next_event()
        assert (changed.event, changed.data["id"], changed.data["status"]) == ("peer", dead, "dead")
        added = await events.next_event()
        assert (added.event, added.data) == ("peer", newcomer)
        removed = await events.next_event()
        assert (removed.event, removed.data) == ("removed", {"id": make_peer(2)["id"]})


async def test_text_that_is_not_utf8_streams_escaped(http):
    """A lone surrogate (what Python makes of a file name that is not UTF-8, say in an error
    text) must not break the stream: JSON escapes it."""
    text = "loading experts failed: /models/caf\udce9"
    source = ScriptedSource([make_peer(0, is_self=True)], extra={"experts": [{"error": text}]})
    async with (
        ConsoleServer(source, port=0) as console,
        http.get(f"{console.url}/api/events") as response,
    ):
        first = await EventReader(response).next_event()
        assert first.event == "status" and first.data["experts"][0]["error"] == text
        source.upsert(make_peer(3, name="caf\udce9"))
        assert (await EventReader(response).next_event()).data["name"] == "caf\udce9"


async def test_overflow_resyncs_with_a_status_event(http):
    source = ScriptedSource([make_peer(0, is_self=True), make_peer(1)], queue_size=2)
    async with (
        ConsoleServer(source, port=0) as console,
        http.get(f"{console.url}/api/events") as response,
    ):
        events = EventReader(response)
        await events.next_event()
        await until(lambda: source.open_subscriptions == 1)
        for n in range(10, 15):  # five changes in one loop turn: more than the queue holds
            source.upsert(make_peer(n))
        resync = await events.next_event()
        assert resync.event == "status"
        assert resync.data == source.status()
        assert len(resync.data["peers"]) == 7


async def test_keepalive_comment_when_idle(source, http):
    async with (
        ConsoleServer(source, port=0, keepalive=0.05) as console,
        http.get(f"{console.url}/api/events") as response,
    ):
        events = EventReader(response)
        await events.next_event()
        assert (await events.next(timeout=2)).event == "comment"
        source.set_status(make_peer(1)["id"], "suspect")
        assert (await events.next_event()).event == "peer"


async def test_client_going_away_closes_its_subscription(console, source):
    # A client of its own, whose connection really closes when the response is released.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        response = await http.get(f"{console.url}/api/events")
        await EventReader(response).next_event()
        await until(lambda: source.open_subscriptions == 1)
        assert stream_tasks()
        response.close()
    await until(lambda: source.open_subscriptions == 0, what="subscription closed")
    await until(lambda: not stream_tasks(), what="pump tasks gone")
    assert source.subscribed == 1


async def test_event_stream_clients_are_limited(console, source, http):
    streams = []
    try:
        for _ in range(console.max_event_clients):
            response = await http.get(f"{console.url}/api/events")
            assert response.status == 200
            await EventReader(response).next_event()
            streams.append(response)
        async with http.get(f"{console.url}/api/events") as refused:
            assert refused.status == 503
            assert "too many" in (await refused.json())["error"]
            assert refused.headers["Retry-After"]
        assert source.open_subscriptions == console.max_event_clients
        streams.pop().close()
        await until(lambda: source.open_subscriptions == console.max_event_clients - 1)
        async with http.get(f"{console.url}/api/events") as admitted:
            assert admitted.status == 200
    finally:
        for response in streams:
            response.close()


async def test_stop_ends_open_streams_promptly(source, http):
    console = ConsoleServer(source, port=0, shutdown_timeout=10.0)
    await console.start()
    response = await http.get(f"{console.url}/api/events")
    events = EventReader(response)
    await events.next_event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await console.stop()
    assert loop.time() - started < 1.0  # far below shutdown_timeout: streams end at once
    assert source.open_subscriptions == 0
    with pytest.raises((EOFError, aiohttp.ClientError)):
        await events.next(timeout=2)
    response.close()
    assert not stream_tasks()


async def test_source_ending_a_subscription_ends_the_stream(console, source, http):
    async with http.get(f"{console.url}/api/events") as response:
        events = EventReader(response)
        await events.next_event()
        await until(lambda: source.open_subscriptions == 1)
        source.end_subscriptions()
        with pytest.raises(EOFError):
            await events.next(timeout=2)
    await until(lambda: source.open_subscriptions == 0)


async def test_events_with_unsafe_names_are_dropped(console, source, http):
    async with http.get(f"{console.url}/api/events") as response:
        events = EventReader(response)
        await events.next_event()
        await until(lambda: source.open_subscriptions == 1)
        source.emit("peer\ndata: forged", {"id": "x"})
        source.set_status(make_peer(1)["id"], "left")
        message = await events.next_event()
        assert (message.event, message.data["status"]) == ("peer", "left")


def test_encoded_events_are_one_data_line():
    encoded = encode_event("peer", {"name": "a\nb\r\nc", "ü": 1})
    assert encoded.count(b"\n") == 3
    assert encoded.startswith(b"event: peer\ndata: {")
    assert encoded.endswith(b"}\n\n")
