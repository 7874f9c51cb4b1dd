"""A completion crosses to its host as a `Generate` message: every field a client can set
arrives as it was sent (a dropped seed or stop string would change the answer only when the
model is hosted elsewhere)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh_node.engine.sampling import SamplingParams
from mesh_node.protocol import REGISTRY
from mesh_node.serving.requests import ChatMessage, CompletionRequest
from mesh_node.serving.tunnel import from_wire, to_wire

text = st.text(max_size=20)
sampling = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 1 << 20),
    temperature=st.floats(0, 10, allow_nan=False),
    top_p=st.floats(0, 1, exclude_min=True),
    top_k=st.integers(0, 1 << 16),
    seed=st.none() | st.integers(0, (1 << 63) - 1),
    stop=st.lists(text.filter(bool), max_size=4).map(tuple),
    ignore_eos=st.booleans(),
)
messages = st.lists(
    st.builds(ChatMessage, st.sampled_from(["system", "user", "assistant"]), text),
    min_size=1,
    max_size=4,
).map(tuple)


@st.composite
def requests(draw) -> CompletionRequest:
    chat = draw(st.booleans())
    return CompletionRequest(
        model=draw(text.filter(bool)),
        request_id=draw(text.filter(bool)),
        messages=draw(messages) if chat else None,
        prompt=None if chat else draw(text),
        sampling=draw(sampling),
        generated_ids=tuple(draw(st.lists(st.integers(0, 1 << 20), max_size=8))),
    )


@given(requests())
def test_a_request_reaches_its_host_as_it_was_sent(request):
    encoded = REGISTRY.encode(to_wire(request))
    assert not encoded.blob_size  # no tensors: the body is the whole message
    assert from_wire(REGISTRY.decode(encoded.body, memoryview(b""))) == request
