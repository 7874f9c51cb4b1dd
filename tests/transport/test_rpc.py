"""RPC over both carriers: request/response, errors, timeouts, cancellation, one-way
messages, streamed responses with backpressure, tensor payloads, reuse and reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest
import torch

from mesh_node.transport.connection import Limits
from mesh_node.transport.errors import (
    ConnectionLost,
    ErrorCode,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from mesh_node.transport.frames import FrameLimits, frame_size
from mesh_node.transport.messages import Ping, Pong
from mesh_node.transport.tensors import Tensor
from tests.conditions import until
from tests.transport.conftest import (
    Count,
    Crash,
    Echo,
    Fail,
    Item,
    Note,
    Scale,
    Scaled,
    Sleep,
    Unhandled,
    connected,
    memory_pair,
    quic_pair,
)


async def test_request_response_both_directions(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        assert conn.peer == p.b.node_id
        assert await conn.request(Ping(7), timeout=5) == Pong(7)
        assert await conn.request(Echo("héllo ✓"), timeout=5) == Echo("héllo ✓")
        # the server can call the client over the same connection
        back = p.b.connection_to(p.a.node_id)
        assert back is not None and back.peer == p.a.node_id
        assert await back.request(Ping(9), timeout=5) == Pong(9)


async def test_many_concurrent_requests(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        replies = await asyncio.gather(*(conn.request(Ping(i), timeout=10) for i in range(300)))
        assert replies == [Pong(i) for i in range(300)]


async def test_handler_errors_reach_the_caller_with_their_code(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        with pytest.raises(RemoteError) as failed:
            await conn.request(Fail(ErrorCode.NOT_FOUND), timeout=5)
        assert failed.value.code == ErrorCode.NOT_FOUND
        assert "asked to fail" in failed.value.message
        assert failed.value.reason == "asked"  # the service's refinement of the code travels
        with pytest.raises(RemoteError) as crashed:
            await conn.request(Crash(), timeout=5)
        assert crashed.value.code == ErrorCode.INTERNAL_ERROR and crashed.value.reason == ""
        assert "ZeroDivisionError" not in crashed.value.message  # internals stay inside
        with pytest.raises(RemoteError) as unsupported:
            await conn.request(Unhandled(), timeout=5)
        assert unsupported.value.code == ErrorCode.NOT_SUPPORTED
        assert await conn.request(Ping(1), timeout=5) == Pong(1)


async def test_timeout_cancels_the_remote_handler(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        with pytest.raises(RequestTimeout):
            await conn.request(Sleep(30), timeout=0.2)
        async with asyncio.timeout(5):
            assert await p.service_b.cancelled.get() == "sleep"
        assert await conn.request(Ping(2), timeout=5) == Pong(2)


async def test_cancelling_the_caller_cancels_the_remote_handler(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        call = asyncio.create_task(conn.request(Sleep(30), timeout=60))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(5):
            assert await p.service_b.cancelled.get() == "sleep"


async def test_a_message_over_the_frame_limit_is_refused_before_it_is_sent(pair_factory, mesh):
    """The peer would reset the stream only after every byte had crossed: a request, a
    stream's request or a one-way message over the limit fails at once, on our side, and
    the connection goes on."""
    big = Echo("x" * (Limits().frames.max_body + 1))
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        with pytest.raises(ProtocolError, match="over the frame limits") as refused:
            await conn.request(big, timeout=5)
        assert refused.value.code == ErrorCode.FRAME_TOO_LARGE
        with pytest.raises(ProtocolError, match="not sent"):
            async with conn.stream(big, timeout=5):
                pass
        with pytest.raises(ProtocolError, match="not sent"):
            await conn.send(big, timeout=5)
        assert await conn.request(Ping(1), timeout=5) == Pong(1)
        assert conn.is_open


async def test_an_answer_over_the_frame_limit_is_answered_frame_too_large(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        with pytest.raises(RemoteError, match="over the frame limits") as refused:
            async with conn.stream(Count(1, size=Limits().frames.max_body + 1), timeout=5) as s:
                _ = [item async for item in s]
        assert refused.value.code == ErrorCode.FRAME_TOO_LARGE
        assert await conn.request(Ping(2), timeout=5) == Pong(2)


async def test_one_way_messages(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        for i in range(20):
            await conn.send(Note(f"n{i}"), timeout=5)
        got = [await asyncio.wait_for(p.service_b.notes.get(), 5) for _ in range(20)]
        assert sorted(text for _, text in got) == sorted(f"n{i}" for i in range(20))
        assert {peer for peer, _ in got} == {p.a.node_id.short}


async def test_streamed_response(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        async with conn.stream(Count(500), timeout=5) as items:
            got = [item.i async for item in items]
        assert got == list(range(500))
        # an empty stream ends at once
        async with conn.stream(Count(0), timeout=5) as items:
            assert [item async for item in items] == []
        assert await conn.request(Ping(3), timeout=5) == Pong(3)


async def test_stream_reader_leaving_early_cancels_the_producer(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        async with conn.stream(Count(10**9, size=1024), timeout=5) as items:
            async for item in items:
                if item.i == 10:
                    break
        async with asyncio.timeout(5):
            assert await p.service_b.cancelled.get() == "count"


async def test_slow_stream_reader_keeps_memory_bounded(pair_factory, mesh):
    """The producer may run ahead of a slow reader by the credit window plus the send
    buffer, never more, however long the reader sleeps."""
    item_size = 16 << 10
    limits = Limits(stream_window=256 << 10, stream_high_water=128 << 10)
    async with pair_factory(mesh, limits=limits) as p:
        conn = await p.connect()
        service = p.service_b
        bound = (limits.stream_window + limits.stream_high_water) // item_size + 2
        consumed = 0
        ahead = []
        async with conn.stream(Count(400, size=item_size), timeout=10) as items:
            async for item in items:
                assert item.i == consumed and len(item.pad) == item_size
                consumed += 1
                if consumed % 100 == 0:  # pause: the producer must stop, not fill memory
                    await asyncio.sleep(0.3)
                    ahead.append(service.produced - consumed)
        assert consumed == 400
        assert max(ahead) <= bound, (ahead, bound)
        assert max(ahead) >= 4  # it did run ahead within the window (flow is pipelined)


async def test_stream_error_midway(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()

        async def broken(ctx, msg):
            yield Item(0)
            raise ValueError("boom")

        p.b.handlers._table[Count] = ("stream", broken)
        got = []
        with pytest.raises(RemoteError) as failed:
            async with conn.stream(Count(5), timeout=5) as items:
                async for item in items:
                    got.append(item.i)
        assert got == [0]
        assert failed.value.code == ErrorCode.INTERNAL_ERROR


async def test_tensor_payloads_round_trip(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.float16):
            x = (torch.arange(3 * 5 * 7) - 50).reshape(3, 5, 7).to(dtype)
            reply = await conn.request(Scale(Tensor.from_torch(x), 2.0), timeout=5)
            assert isinstance(reply, Scaled)
            assert torch.equal(reply.y.torch(), x * 2)
            assert torch.equal(reply.extra[0].torch(), x)
            assert torch.equal(reply.extra[1].torch(), x[:1])
        big = torch.randn(512, 1024)  # 2 MiB
        reply = await conn.request(Scale(Tensor.from_torch(big), -1.0), timeout=20)
        assert torch.equal(reply.y.torch(), -big)
        empty = torch.zeros(0, 4)
        reply = await conn.request(Scale(Tensor.from_torch(empty), 1.0), timeout=5)
        assert reply.y.torch().shape == (0, 4)


async def test_a_1_mib_tensor_and_its_header_fit_the_stream_window(mesh):
    # the window a peer grants a stream holds a whole 1 MiB tensor message, frame header
    # included: with a window of exactly 1 MiB its last bytes waited a round trip for the
    # receiver's window update
    async with quic_pair(mesh) as p:
        conn = await p.connect()
        message = Scale(Tensor.from_torch(torch.ones(1 << 18)), 3.0)  # 1 MiB of float32
        size = frame_size(conn._registry.encode(message))
        assert size > 1 << 20
        assert conn._carrier._quic._remote_max_stream_data_bidi_remote >= size
        reply = await conn.request(message, timeout=20)
        assert torch.equal(reply.y.torch(), torch.full((1 << 18,), 3.0))


async def test_connections_are_reused(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        first = await p.connect()
        again = await p.a.connect(p.b.address)
        by_id = await p.a.connect(("192.0.2.1", 1), expect=p.b.node_id)  # reused by id
        assert first is again is by_id
        dials = await asyncio.gather(*(p.a.connect(p.b.address) for _ in range(5)))
        assert all(c is first for c in dials)


async def test_lost_connection_is_re_established(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        first = await p.connect()
        first.close()
        await first.wait_closed()
        with pytest.raises(ConnectionLost):
            await first.request(Ping(1), timeout=5)
        again = await p.a.connect(p.b.address, expect=p.b.node_id)
        assert again is not first and again.is_open
        assert await again.request(Ping(4), timeout=5) == Pong(4)


async def test_clean_close_is_seen_by_the_peer(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        server_side = await connected(p.b, p.a.node_id)
        pending = asyncio.create_task(server_side.request(Sleep(30), timeout=30))
        await asyncio.sleep(0.1)
        await p.a.close()
        async with asyncio.timeout(5):
            await server_side.wait_closed()
        assert server_side.close_code == ErrorCode.NO_ERROR
        with pytest.raises(ConnectionLost):
            await pending
        assert not conn.is_open


async def test_in_flight_requests_fail_when_the_connection_dies(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        calls = [asyncio.create_task(conn.request(Sleep(30), timeout=30)) for _ in range(3)]
        await asyncio.sleep(0.1)
        await p.b.close()
        for call in calls:
            with pytest.raises(ConnectionLost):
                await call


async def test_too_many_concurrent_requests_get_overloaded(pair_factory, mesh):
    async with pair_factory(mesh, limits=Limits(max_inbound_requests=2)) as p:
        conn = await p.connect()
        calls = [asyncio.create_task(conn.request(Sleep(0.5), timeout=10)) for _ in range(2)]
        for _ in range(2):
            async with asyncio.timeout(5):
                await p.service_b.started.get()
        with pytest.raises(RemoteError) as refused:
            await conn.request(Echo("a third"), timeout=5)
        assert refused.value.code == ErrorCode.OVERLOADED
        assert await conn.request(Ping(1), timeout=5) == Pong(1)  # inline: needs no slot
        assert [(await c).text for c in calls] == ["slept", "slept"]
        assert await conn.request(Ping(2), timeout=5) == Pong(2)  # the slots came back
        server_side = p.b.connection_to(p.a.node_id)
        assert server_side._inbound == 0 and not server_side._streams


async def test_a_handler_may_close_its_own_connection(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        closed = []

        def goodbye(ctx, msg):  # inline one-way handler closing the connection it runs on
            ctx.connection.close()
            closed.append(msg.text)

        p.b.handlers._table[Note] = ("oneway-inline", goodbye)
        pending = asyncio.create_task(conn.request(Sleep(30), timeout=30))
        await asyncio.sleep(0.1)
        # the close may beat the acknowledgement of the message itself
        with contextlib.suppress(ConnectionLost):
            await conn.send(Note("bye"), timeout=5)
        async with asyncio.timeout(5):
            await conn.wait_closed()
        assert closed == ["bye"]
        with pytest.raises(ConnectionLost):
            await pending


async def test_an_answered_caller_resumes_before_the_housekeeping_transmit(mesh):
    # QUIC: the datagram carrying an answer wakes the caller; what is left to send (the
    # acknowledgement, the timer) waits until the caller has run, and goes out after it
    async with quic_pair(mesh) as p:
        conn = await p.connect()
        await conn.request(Ping(0), timeout=5)
        carrier = conn._carrier
        seen: list[str] = []
        transmit, received = carrier.transmit, carrier.datagram_received

        def counted_transmit():
            seen.append("transmit")
            transmit()

        def counted_datagram(data, addr):
            seen.append("datagram")
            received(data, addr)
            seen.append("datagram handled")

        carrier.transmit, carrier.datagram_received = counted_transmit, counted_datagram
        try:
            for i in range(20):
                seen.clear()
                assert await conn.request(Ping(i), timeout=5) == Pong(i)
                seen.append("resumed")
                # the answer's datagram (the last one) sent nothing while it was handled
                answer = len(seen) - 1 - seen[::-1].index("datagram")
                assert seen[answer + 1] == "datagram handled", seen
                await asyncio.sleep(0)  # the deferred transmit runs once the caller yields
                assert "transmit" in seen[seen.index("resumed") :], seen
        finally:
            carrier.transmit, carrier.datagram_received = transmit, received


async def test_a_request_handler_starts_before_the_housekeeping_transmit(mesh):
    # QUIC: the datagram carrying a request starts its handler (a task); what is left to send
    # (the acknowledgement, the timer) waits until the handler has taken its first step (an
    # expert peer hands its work to a worker thread there), and goes out after it
    async with quic_pair(mesh) as p:
        conn = await p.connect()
        assert await conn.request(Echo("warm"), timeout=5) == Echo("warm")
        server = p.b.connection_to(p.a.node_id)
        assert server is not None
        carrier = server._carrier
        seen: list[str] = []
        transmit, received = carrier.transmit, carrier.datagram_received

        def counted_transmit():
            # a timer going off between the datagram and the handler's step transmits on its own
            frame, timer = sys._getframe(1), False
            while frame is not None:
                timer |= frame.f_code.co_name == "_handle_timer"
                frame = frame.f_back
            seen.append("timer transmit" if timer else "transmit")
            transmit()

        def counted_datagram(data, addr):
            seen.append("datagram")
            received(data, addr)
            seen.append("datagram handled")

        async def echo(ctx, msg):
            seen.append("handler")
            return Echo(msg.text)

        p.b.handlers._table[Echo] = ("unary", echo)
        carrier.transmit, carrier.datagram_received = counted_transmit, counted_datagram
        try:
            for i in range(20):
                seen.clear()
                assert await conn.request(Echo(str(i)), timeout=5) == Echo(str(i))
                order = [event for event in seen if event != "timer transmit"]
                started = order.index("handler")
                # the request's datagram sent nothing while it was handled
                assert order[started - 2 : started] == ["datagram", "datagram handled"], seen
                assert "transmit" in order[started:], seen  # the answer, then housekeeping
        finally:
            carrier.transmit, carrier.datagram_received = transmit, received


async def test_a_stream_whose_first_bytes_come_late_is_still_served(pair_factory, mesh):
    """QUIC may deliver a higher-numbered stream's first bytes before a lower one's (a lost
    packet, retransmitted later): the lower stream is a new exchange all the same, for a
    request and for a one-way message."""
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        carrier = conn._carrier
        quic = getattr(carrier, "_quic", None)
        first = conn._open_call("unary")
        if quic is not None:  # make aioquic give the next call the next id
            quic._get_or_create_stream_for_send(first.stream_id)
        second = conn._open_call("unary")
        assert second.stream_id > first.stream_id
        note_first = carrier.open_stream(unidirectional=True)
        if quic is not None:
            quic._get_or_create_stream_for_send(note_first)
        note_second = carrier.open_stream(unidirectional=True)
        assert note_second > note_first
        for stream_id, message, end in [
            (second.stream_id, Ping(2), True),
            (note_second, Note("second"), True),
        ]:
            conn._write_now(stream_id, conn._registry.encode(message), end=end)
        await asyncio.sleep(0.1)  # the higher streams are served first
        conn._write_now(first.stream_id, conn._registry.encode(Ping(1)), end=True)
        conn._write_now(note_first, conn._registry.encode(Note("first")), end=True)
        async with asyncio.timeout(5):
            assert await second.items == Pong(2)
            assert await first.items == Pong(1)
            notes = {(await p.service_b.notes.get())[1] for _ in range(2)}
        assert notes == {"first", "second"}
        for stream in (first, second):
            conn._drop(stream)
        # streams already served stay finished: late bytes on them are ignored
        server = p.b.connection_to(p.a.node_id)
        server.stream_data(first.stream_id, b"late", True)
        assert first.stream_id not in server._streams
        assert await conn.request(Ping(3), timeout=5) == Pong(3)


async def test_a_peer_skipping_too_many_stream_ids_is_disconnected(mesh):
    """Skipped stream ids are remembered until their bytes come; a peer that skips more
    than QUIC's stream limit would ever allow is closed rather than remembered without
    bound (over QUIC, aioquic refuses it first)."""
    from mesh_node.transport.connection import MAX_STREAM_GAPS

    async with memory_pair(mesh) as p:
        conn = await p.connect()
        far = conn._carrier.open_stream(unidirectional=False) + 4 * (MAX_STREAM_GAPS + 1)
        conn._carrier.write(far, b"", end=True)
        conn._carrier.flush()
        async with asyncio.timeout(5):
            await conn.wait_closed()
        assert conn.close_code == ErrorCode.PROTOCOL_VIOLATION


async def test_a_refused_one_way_message_fails_at_once(mesh):
    """A message the peer refuses (here: over its frame limit, lower than ours) is reported
    as soon as the refusal arrives, not when the sender's timeout runs out. (Over QUIC: the
    in-memory network acknowledges the bytes at once, so the send is over before any
    refusal.)"""
    lower = Limits(frames=FrameLimits(max_body=256 << 10))
    async with quic_pair(mesh, limits_b=lower) as p:
        conn = await p.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectionLost, match="refused the message"):
            await conn.send(Note("x" * (512 << 10)), timeout=5)  # over the peer's limit
        assert loop.time() - started < 4
        assert not conn._drain_waiters
        await conn.send(Note("small"), timeout=5)
        async with asyncio.timeout(5):
            assert (await p.service_b.notes.get())[1] == "small"


async def test_a_stream_whose_reader_stops_reading_gives_up_after_the_credit_timeout(
    pair_factory, mesh
):
    """A requester that opens a streamed response and never reads (and never cancels) holds
    the responder's handler only until `credit_timeout`: then the stream is reset."""
    limits = Limits(credit_timeout=0.5, stream_window=64 << 10)
    async with pair_factory(mesh, limits=limits) as p:
        conn = await p.connect()
        async with conn.stream(Count(1000, size=16 << 10), timeout=10) as items:
            async with asyncio.timeout(5):
                assert await p.service_b.cancelled.get() == "count"  # the handler stopped
            server = p.b.connection_to(p.a.node_id)
            await until(lambda: server._inbound == 0, what="the handler's slot freed")
            with pytest.raises(RemoteError) as reset:
                async for _ in items:
                    pass
            assert reset.value.code == ErrorCode.CANCELLED
        assert await conn.request(Echo("still"), timeout=5) == Echo("still")


async def test_connections_with_one_peer_are_bounded_and_the_newest_kept(pair_factory, mesh):
    """Every per-connection bound (handlers, lanes, streams) multiplies by the connections a
    peer opens: beyond MAX_PER_PEER the oldest are closed."""
    from mesh_node.transport.endpoint import MAX_PER_PEER

    async with pair_factory(mesh) as p:
        host, port = p.b.address
        dialed = [await p.a._dial(host, port, None, 5.0) for _ in range(MAX_PER_PEER + 3)]
        await until(lambda: len(p.b._by_peer.get(p.a.node_id, [])) <= MAX_PER_PEER)
        await until(lambda: sum(c.is_open for c in dialed) == MAX_PER_PEER)
        assert all(c.is_open for c in dialed[-MAX_PER_PEER:])  # the newest serve on
        assert await dialed[-1].request(Ping(21), timeout=5) == Pong(21)


async def test_name_lookups_are_bounded_and_never_delay_a_dial_to_an_address(mesh):
    """A name that does not resolve (a slow resolver, or names a peer hands over) holds an
    executor thread: at most MAX_LOOKUPS run, and a dial to an IP address needs none."""
    from mesh_node.transport import quic

    async with quic_pair(mesh) as p:
        loop = asyncio.get_running_loop()
        stalled = asyncio.Event()

        async def never(host, port, **kwargs):
            await stalled.wait()
            raise OSError("gave up")

        original = loop.getaddrinfo
        loop.getaddrinfo = never
        try:
            names = [f"n{i}.slow.test" for i in range(quic.MAX_LOOKUPS + 4)]
            dials = [asyncio.ensure_future(p.a.connect((name, 7300), timeout=30)) for name in names]
            await asyncio.sleep(0.1)
            refused = [d for d in dials if d.done()]
            assert len(refused) == 4
            for dial in refused:
                with pytest.raises(ConnectionLost, match="name lookups running"):
                    dial.result()
            conn = await p.a.connect(p.b.address, timeout=5)  # an IP address: no lookup
            assert await conn.request(Ping(22), timeout=5) == Pong(22)
        finally:
            stalled.set()
            loop.getaddrinfo = original
        for dial in dials:
            with contextlib.suppress(ConnectionLost):
                await dial
        assert p.a._lookups == 0


@pytest.mark.parametrize("written", ["::1", "0:0:0:0:0:0:0:1", "::0001"])
async def test_an_ipv6_address_written_any_way_is_dialed(mesh, written):
    """aioquic matches replies by the address's text: a literal goes to it in standard form."""
    from mesh_node.identity import NodeIdentity
    from mesh_node.protocol import REGISTRY as PROTOCOL
    from mesh_node.transport.quic import QuicEndpoint
    from tests.transport.conftest import Service

    def endpoint():
        return QuicEndpoint(
            NodeIdentity.generate(),
            mesh,
            registry=PROTOCOL,
            handlers=Service().handlers,
            host="::1",
            port=0,
        )

    a, b = endpoint(), endpoint()
    try:
        await a.start()
        await b.start()
    except OSError as exc:
        await a.close()
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        conn = await a.connect((written, b.port), timeout=5)
        assert await conn.request(Ping(23), timeout=5) == Pong(23)
    finally:
        await a.close()
        await b.close()


async def test_a_connection_busy_with_a_request_is_kept_over_idle_ones(pair_factory, mesh):
    from mesh_node.transport.endpoint import MAX_PER_PEER

    async with pair_factory(mesh) as p:
        host, port = p.b.address
        busy = await p.a._dial(host, port, None, 5.0)
        slow = asyncio.ensure_future(busy.request(Sleep(1.0), timeout=10))
        await until(lambda: any(c.busy for c in p.b._by_peer.get(p.a.node_id, [])))
        more = [await p.a._dial(host, port, None, 5.0) for _ in range(MAX_PER_PEER)]
        await until(lambda: sum(c.is_open for c in [busy, *more]) == MAX_PER_PEER)
        assert busy.is_open and not more[0].is_open  # the oldest idle one went instead
        assert (await slow).text == "slept"
