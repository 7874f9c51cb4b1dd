"""Garbage, oversize, truncated, unknown and invalid frames on a live connection: the
stream is reset with the matching code; the connection and the node keep serving."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from mesh_node.transport.errors import ErrorCode, ProtocolError
from mesh_node.transport.messages import Ping, Pong
from tests.conditions import until
from tests.transport.conftest import Count, Note, Sleep


def watch_resets(conn):
    """Record resets the peer sends us on streams we drive by hand."""
    resets: dict[int, asyncio.Future[int]] = {}
    original = conn.stream_reset

    def stream_reset(stream_id, code):
        fut = resets.setdefault(stream_id, asyncio.get_running_loop().create_future())
        if not fut.done():
            fut.set_result(code)
        original(stream_id, code)

    conn.stream_reset = stream_reset
    return resets


def frame(body: bytes, blob: bytes = b"", body_len=None, blob_len=None) -> bytes:
    head = struct.pack(
        ">II",
        len(body) if body_len is None else body_len,
        len(blob) if blob_len is None else blob_len,
    )
    return head + body + blob


def pack(type_id, fields) -> bytes:
    return msgpack.packb([type_id, fields], use_bin_type=True)


CASES = {
    "garbage body": (frame(b"\xc1\xc1\xc1 not msgpack"), True, ErrorCode.MALFORMED_FRAME),
    "not an envelope": (frame(msgpack.packb({"a": 1})), True, ErrorCode.MALFORMED_FRAME),
    "oversize body": (frame(b"", body_len=2**31), False, ErrorCode.FRAME_TOO_LARGE),
    "oversize blob": (frame(b"\x90", blob_len=2**31), False, ErrorCode.FRAME_TOO_LARGE),
    "truncated": (frame(pack(0x10, {"seq": 1}))[:-3], True, ErrorCode.TRUNCATED_FRAME),
    "empty stream": (b"", True, ErrorCode.TRUNCATED_FRAME),
    "empty body": (frame(b""), True, ErrorCode.MALFORMED_FRAME),
    "unknown type": (frame(pack(0xEEEE, {})), True, ErrorCode.UNKNOWN_MESSAGE_TYPE),
    "wrong field type": (frame(pack(0x10, {"seq": "one"})), True, ErrorCode.INVALID_MESSAGE),
    "missing field": (frame(pack(0x10, {})), True, ErrorCode.INVALID_MESSAGE),
    "bad tensor header": (
        frame(pack(0xF007, {"x": {"dtype": "F32", "shape": [4], "offset": 0}, "factor": 1.0})),
        True,
        ErrorCode.INVALID_MESSAGE,
    ),
    # a dtype that cannot be looked up (unhashable) is an invalid message, not a crash
    "tensor dtype an array": (
        frame(
            pack(0xF007, {"x": {"dtype": [], "shape": [4], "offset": 0}, "factor": 1.0}), bytes(16)
        ),
        True,
        ErrorCode.INVALID_MESSAGE,
    ),
    "tensor dtype a map": (
        frame(
            pack(0xF007, {"x": {"dtype": {}, "shape": [4], "offset": 0}, "factor": 1.0}), bytes(16)
        ),
        True,
        ErrorCode.INVALID_MESSAGE,
    ),
    # [0xF001, {"text": <str of two bytes that are not UTF-8>}]: the body does not decode
    "invalid UTF-8": (
        frame(b"\x92\xcd\xf0\x01\x81\xa4text\xa2\xff\xfe"),
        True,
        ErrorCode.MALFORMED_FRAME,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_request_stream_is_reset_and_peer_keeps_serving(pair_factory, mesh, case):
    data, fin, code = CASES[case]
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        resets = watch_resets(conn)
        slow = asyncio.create_task(conn.request(Sleep(0.5), timeout=10))  # an innocent stream
        await asyncio.sleep(0.05)
        carrier = conn._carrier
        stream_id = carrier.open_stream(unidirectional=False)
        carrier.write(stream_id, data, end=fin)
        carrier.flush()
        fut = resets.setdefault(stream_id, asyncio.get_running_loop().create_future())
        async with asyncio.timeout(5):
            assert await fut == code
        assert conn.is_open
        assert await conn.request(Ping(11), timeout=5) == Pong(11)
        assert (await slow).text == "slept"


async def test_bad_one_way_stream_is_dropped_and_peer_keeps_serving(pair_factory, mesh, caplog):
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        carrier = conn._carrier
        stream_id = carrier.open_stream(unidirectional=True)
        carrier.write(stream_id, frame(b"\xc1garbage"), end=True)
        carrier.flush()
        await conn.send(Note("after"), timeout=5)
        async with asyncio.timeout(5):
            assert (await p.service_b.notes.get())[1] == "after"
        assert p.service_b.notes.empty()  # the garbage reached no handler
        assert f"stream {stream_id} from" in caplog.text and "MALFORMED_FRAME" in caplog.text
        assert await conn.request(Ping(12), timeout=5) == Pong(12)


@pytest.mark.parametrize(
    "after", [pack(0x10, {"seq": 1}), pack(0x06, {"amount": 4096})], ids=["Ping", "Credit"]
)
async def test_frame_after_request_is_rejected(pair_factory, mesh, after):
    """After a unary request only FIN may follow: even Credit, which only a streamed
    response takes, is an unexpected frame there."""
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        resets = watch_resets(conn)
        carrier = conn._carrier
        stream_id = carrier.open_stream(unidirectional=False)
        carrier.write(stream_id, frame(pack(0xF002, {"seconds": 5.0})), end=False)
        carrier.flush()
        async with asyncio.timeout(5):
            await p.service_b.started.get()
        carrier.write(stream_id, frame(after), end=False)
        carrier.flush()
        fut = resets.setdefault(stream_id, asyncio.get_running_loop().create_future())
        async with asyncio.timeout(5):
            assert await fut == ErrorCode.UNEXPECTED_MESSAGE
        async with asyncio.timeout(5):
            assert await p.service_b.cancelled.get() == "sleep"  # its handler was stopped
        assert await conn.request(Ping(13), timeout=5) == Pong(13)


async def test_garbage_from_the_server_fails_only_that_call(pair_factory, mesh):
    async with pair_factory(mesh) as p:
        conn = await p.connect()

        async def lying(ctx, msg):
            server = p.b.connection_to(p.a.node_id)
            # find the stream this request came on and write garbage on it by hand
            stream_id = max(s for s in server._streams if not s & 2)
            server._carrier.write(stream_id, frame(b"\xc1\xc1"), end=True)
            server._carrier.flush()
            await asyncio.sleep(5)

        p.b.handlers._table[Sleep] = ("unary", lying)
        from mesh_node.transport.errors import ProtocolError

        with pytest.raises(ProtocolError) as bad:
            await conn.request(Sleep(1), timeout=5)
        assert bad.value.code == ErrorCode.MALFORMED_FRAME
        assert await conn.request(Ping(14), timeout=5) == Pong(14)


async def test_a_responder_that_ignores_credit_is_cut_off(pair_factory, mesh, monkeypatch):
    """A peer streaming items past the credit it was granted cannot fill the requester's
    memory: the requester resets the stream once the peer sends with no credit left."""
    async with pair_factory(mesh) as p:
        conn = await p.connect()
        server = p.b.connection_to(p.a.node_id)

        async def ignore_credit(stream):
            await asyncio.sleep(0)

        monkeypatch.setattr(server, "_wait_credit", ignore_credit)
        window = 256 << 10
        got = 0
        with pytest.raises(ProtocolError) as refused:
            async with conn.stream(Count(2000, 4096), timeout=5, window=window) as items:
                await asyncio.sleep(0.5)  # the reader does not read: items pile up
                queued = items._stream.items._queue
                buffered = sum(item[1] for item in queued if isinstance(item, tuple))
                async for _ in items:
                    got += 1
        assert refused.value.code == ErrorCode.UNEXPECTED_MESSAGE
        assert "without credit" in str(refused.value)
        assert buffered <= window + (8 << 10), buffered  # one frame past the window at most
        assert got * 4096 <= window + (8 << 10)
        assert await conn.request(Ping(15), timeout=5) == Pong(15)


@pytest.mark.parametrize("unidirectional", [False, True], ids=["request", "one-way"])
async def test_a_frame_left_half_sent_is_reset_after_the_arrival_timeout(
    pair_factory, mesh, unidirectional
):
    """What arrived of a frame that never completes is not held for ever: the stream is
    reset (TRUNCATED_FRAME) once `arrival_timeout` passes; the connection goes on."""
    from mesh_node.transport.connection import Limits

    limits = Limits(arrival_timeout=0.3)
    async with pair_factory(mesh, limits=limits) as p:
        conn = await p.connect()
        resets = watch_resets(conn)
        carrier = conn._carrier
        stream_id = carrier.open_stream(unidirectional=unidirectional)
        whole = frame(pack(0x10, {"seq": 1}), body_len=64 << 10)  # promises 64 KiB of body
        carrier.write(stream_id, whole, end=False)  # ... and sends 10 bytes of it
        carrier.flush()
        peer = p.b.connection_to(p.a.node_id)
        await asyncio.sleep(0.1)
        assert any(s.stream_id == stream_id for s in peer._streams.values())  # held, for now
        await until(
            lambda: all(s.stream_id != stream_id for s in peer._streams.values()), what="reset"
        )
        if not unidirectional:  # (a one-way stream has no way back to reset)
            fut = resets.setdefault(stream_id, asyncio.get_running_loop().create_future())
            async with asyncio.timeout(5):
                assert await fut == ErrorCode.TRUNCATED_FRAME
        assert conn.is_open
        assert await conn.request(Ping(13), timeout=5) == Pong(13)
