"""Frames and message schema, without a network: round trips, limits, validation, and
property tests that decoding arbitrary bytes raises only the protocol's own error."""

from __future__ import annotations

import contextlib
import tracemalloc
from dataclasses import dataclass, field

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_node.protocol import REGISTRY as PROTOCOL_REGISTRY
from mesh_node.transport.errors import ErrorCode, ProtocolError
from mesh_node.transport.frames import HEADER, FrameDecoder, FrameLimits, frame_parts
from mesh_node.transport.messages import Error, Hello, Ping
from mesh_node.transport.schema import Registry
from mesh_node.transport.tensors import Tensor
from tests.transport.conftest import REGISTRY, Scale, Scaled


@dataclass(frozen=True, slots=True)
class Inner:
    name: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Outer:
    id: int
    tags: list[str]
    table: dict[str, int]
    inner: Inner
    maybe: int | None = None
    inners: list[Inner] = field(default_factory=list)
    flag: bool = False
    raw: bytes = b""


SCHEMA = Registry({0xF100: Outer, 0xF101: Ping})


def to_bytes(encoded) -> bytes:
    return b"".join(bytes(p) for p in frame_parts(encoded))


def decode_all(registry, data: bytes, limits=None, chunk=None):
    decoder = FrameDecoder(limits or FrameLimits())
    out = []
    chunks = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for part in chunks:
        for body, blob in decoder.feed(part):
            out.append(registry.decode(body, memoryview(blob)))
    decoder.finish()
    return out


def test_nested_message_round_trip():
    msg = Outer(
        id=7,
        tags=["a", "ü"],
        table={"x": 1},
        inner=Inner("in", 0.5),
        maybe=None,
        inners=[Inner("j")],
        flag=True,
        raw=b"\x00\xff",
    )
    assert decode_all(SCHEMA, to_bytes(SCHEMA.encode(msg))) == [msg]


@given(st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=20), st.integers(1, 50))
def test_frames_survive_any_chunking(seqs, chunk):
    data = b"".join(to_bytes(SCHEMA.encode(Ping(s))) for s in seqs)
    assert decode_all(SCHEMA, data, chunk=chunk) == [Ping(s) for s in seqs]


def test_unknown_fields_are_ignored_and_defaults_fill_in():
    body = msgpack.packb(
        [0xF100, {"id": 1, "tags": [], "table": {}, "inner": {"name": "n", "new": 3}, "zz": 9}]
    )
    (msg,) = decode_all(SCHEMA, HEADER.pack(len(body), 0) + body)
    assert msg == Outer(id=1, tags=[], table={}, inner=Inner("n"))


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"tags": [], "table": {}, "inner": {"name": "n"}}, "id is missing"),
        ({"id": "1", "tags": [], "table": {}, "inner": {"name": "n"}}, "field id"),
        ({"id": True, "tags": [], "table": {}, "inner": {"name": "n"}}, "field id"),
        ({"id": 1, "tags": [1], "table": {}, "inner": {"name": "n"}}, "tags[0]"),
        ({"id": 1, "tags": [], "table": {"k": "v"}, "inner": {"name": "n"}}, "table.k"),
        ({"id": 1, "tags": [], "table": {}, "inner": {}}, "inner.name is missing"),
        ({"id": 1, "tags": [], "table": {}, "inner": [1]}, "inner"),
        ({"id": 1, "tags": [], "table": {1: 2}, "inner": {"name": "n"}}, "table key"),
    ],
)
def test_invalid_fields_are_rejected_with_the_field_named(fields, needle):
    body = msgpack.packb([0xF100, fields], use_bin_type=True)
    with pytest.raises(ProtocolError) as bad:
        decode_all(SCHEMA, HEADER.pack(len(body), 0) + body)
    assert bad.value.code == ErrorCode.INVALID_MESSAGE
    assert needle in bad.value.message


def test_float_fields_accept_integers():
    body = msgpack.packb(
        [0xF100, {"id": 1, "tags": [], "table": {}, "inner": {"name": "n", "weight": 2}}]
    )
    (msg,) = decode_all(SCHEMA, HEADER.pack(len(body), 0) + body)
    assert msg.inner.weight == 2.0 and isinstance(msg.inner.weight, float)


def test_tensor_blob_is_not_copied_on_decode():
    x = torch.arange(1000, dtype=torch.float32)
    encoded = REGISTRY.encode(Scale(Tensor.from_torch(x), 3.0))
    # the encoder hands the caller's bytes to the stream as they are
    assert any(isinstance(p, memoryview) and p.obj is not None for p in encoded.blob_parts)
    data = to_bytes(encoded)
    decoder = FrameDecoder(FrameLimits())
    ((body, blob),) = decoder.feed(data)
    msg = REGISTRY.decode(body, memoryview(blob))
    y = msg.x.torch()
    assert torch.equal(y, x)
    blob[0] = 0xAB  # write through the blob (x sits at offset 0)...
    assert y.view(torch.uint8)[0] == 0xAB  # ...and the tensor sees it: same memory


def test_tensors_are_aligned_and_several_fit_in_one_blob():
    a, b = torch.randn(3), torch.randn(5, 2).to(torch.bfloat16)
    encoded = REGISTRY.encode(Scaled(Tensor.from_torch(a), [Tensor.from_torch(b)] * 2))
    ((body, blob),) = FrameDecoder(FrameLimits()).feed(to_bytes(encoded))
    msg = REGISTRY.decode(body, memoryview(blob))
    fields = msgpack.unpackb(body)[1]
    assert all(t["offset"] % 64 == 0 for t in [fields["y"], *fields["extra"]])
    assert torch.equal(msg.y.torch(), a) and torch.equal(msg.extra[1].torch(), b)


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor(3.5),  # a scalar
        torch.tensor([True, False, True]),
        torch.arange(6, dtype=torch.int8).reshape(2, 3),
        torch.randn(2, 3).half(),
        torch.randn(2, 2).to(torch.bfloat16),  # no numpy dtype: wrapped as bytes
        torch.randn(3, 4).t(),  # not contiguous: copied
        torch.arange(10.0)[3:7],  # a view into a larger storage: its own bytes only
        torch.randn(2, requires_grad=True),
        torch.zeros(0, 3),
    ],
    ids=["scalar", "bool", "int8", "f16", "bf16", "transposed", "view", "grad", "empty"],
)
def test_from_torch_wraps_the_tensors_bytes_with_dtype_and_shape(x):
    wrapped = Tensor.from_torch(x)
    assert wrapped.shape == tuple(x.shape) and wrapped.nbytes == x.numel() * x.element_size()
    back = wrapped.torch()
    assert back.dtype == x.dtype and torch.equal(back, x.detach())


def test_tensor_data_must_match_its_header():
    with pytest.raises(ValueError, match="needs"):
        Tensor("F32", (2, 2), memoryview(bytes(12)))
    with pytest.raises(ValueError, match="unknown tensor dtype"):
        Tensor("F128", (1,), memoryview(bytes(16)))


def test_oversize_frame_is_refused_before_allocating():
    decoder = FrameDecoder(FrameLimits(max_body=1 << 20, max_blob=1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as bad:
            decoder.feed(HEADER.pack(0xFFFFFFFF, 0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bad.value.code == ErrorCode.FRAME_TOO_LARGE
    assert peak < 64 << 10
    with pytest.raises(ProtocolError) as bad_blob:
        FrameDecoder(FrameLimits(max_blob=10)).feed(HEADER.pack(1, 11))
    assert bad_blob.value.code == ErrorCode.FRAME_TOO_LARGE


def test_a_partial_frame_holds_only_the_bytes_that_arrived():
    """A header within the limits allocates nothing by itself: a peer announcing 65 MiB
    and sending 8 bytes pins 8 bytes, and the buffers grow with what arrives."""
    decoders = [FrameDecoder(FrameLimits()) for _ in range(8)]
    tracemalloc.start()
    try:
        for decoder in decoders:
            assert decoder.feed(HEADER.pack(1 << 20, 64 << 20)) == []
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 64 << 10
    # and bytes fed in small pieces still make the whole frame
    data = to_bytes(REGISTRY.encode(Scale(Tensor.from_torch(torch.arange(4096.0)), 2.0)))
    decoder = FrameDecoder(FrameLimits())
    frames = [f for i in range(0, len(data), 1000) for f in decoder.feed(data[i : i + 1000])]
    assert len(frames) == 1
    assert REGISTRY.decode(frames[0][0], memoryview(frames[0][1])).factor == 2.0


def test_truncated_frame_is_detected_at_end_of_stream():
    data = to_bytes(SCHEMA.encode(Ping(1)))
    for cut in range(1, len(data)):
        decoder = FrameDecoder(FrameLimits())
        assert decoder.feed(data[:cut]) == []
        with pytest.raises(ProtocolError) as bad:
            decoder.finish()
        assert bad.value.code == ErrorCode.TRUNCATED_FRAME


def test_registry_refuses_conflicts():
    with pytest.raises(ValueError, match="already used"):
        Registry({0x10: Ping}).extended({0x10: Error})
    with pytest.raises(ValueError, match="already registered"):
        Registry({0x10: Ping}).extended({0x11: Ping})
    with pytest.raises(TypeError, match="not a registered message type"):
        SCHEMA.encode(Error(1, "x"))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_raises_only_protocol_errors(data):
    for registry in (PROTOCOL_REGISTRY, REGISTRY, SCHEMA):
        with contextlib.suppress(ProtocolError):
            decode_all(registry, data, limits=FrameLimits(max_body=4096, max_blob=4096))


MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def _msgpack_values():
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        MSGPACK_INTS,
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.binary(max_size=8),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.one_of(st.text(max_size=6), MSGPACK_INTS), children, max_size=4),
        ),
        max_leaves=12,
    )


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([*sorted(t for t, _ in REGISTRY.items()), 0, 0xEEEE]), _msgpack_values())
def test_well_formed_msgpack_with_any_fields_raises_only_protocol_errors(type_id, fields):
    body = msgpack.packb([type_id, fields], use_bin_type=True)
    blob = bytearray(64)
    with contextlib.suppress(ProtocolError):
        REGISTRY.decode(body, memoryview(blob))


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.one_of(st.sampled_from(["F32", "BF16", "U8"]), _msgpack_values()),
            "shape": st.one_of(st.lists(MSGPACK_INTS, max_size=9), _msgpack_values()),
            "offset": st.one_of(st.integers(-8, 80), _msgpack_values()),
        },
    )
)
def test_tensor_headers_with_any_values_raise_only_protocol_errors(header):
    """The tensor header {dtype, shape, offset}: any value in any of them (an array or a
    map as dtype included) decodes or raises the protocol's own error."""
    body = msgpack.packb([0xF007, {"x": header, "factor": 1.0}], use_bin_type=True)
    with contextlib.suppress(ProtocolError):
        REGISTRY.decode(body, memoryview(bytearray(64)))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(PROTOCOL_REGISTRY.items(), key=lambda kv: kv[0])),
    st.dictionaries(
        st.sampled_from(["seq", "code", "message", "amount", "nonce", "node_key", "proto"]),
        st.one_of(MSGPACK_INTS, st.text(max_size=4), st.binary(max_size=40), st.none()),
    ),
)
def test_protocol_messages_with_random_fields_raise_only_protocol_errors(entry, fields):
    type_id, _ = entry
    body = msgpack.packb([type_id, fields], use_bin_type=True)
    with contextlib.suppress(ProtocolError):
        PROTOCOL_REGISTRY.decode(body, memoryview(bytearray()))


def test_hello_is_strict_about_types():
    fields = {"proto_min": 1, "proto_max": 1, "software": "x", "node_key": "k", "nonce": b""}
    body = msgpack.packb([0x01, fields], use_bin_type=True)
    with pytest.raises(ProtocolError, match="node_key"):
        PROTOCOL_REGISTRY.decode(body, memoryview(bytearray()))
    body = msgpack.packb([0x01, {**fields, "node_key": b"k"}], use_bin_type=True)
    assert isinstance(PROTOCOL_REGISTRY.decode(body, memoryview(bytearray())), Hello)
