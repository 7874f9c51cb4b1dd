"""Expert calls in isolation: how big calls are cut, and what a peer refuses."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mesh_node.engine.catalog import BUILTIN_DIR
from mesh_node.engine.experts import ExpertNotLoadedError
from mesh_node.engine.loading import load_expert_banks
from mesh_node.expert_parallel.coordinator import split_call
from mesh_node.expert_parallel.dispatch import _request_of
from mesh_node.expert_parallel.messages import ExpertCall, RankingsData
from mesh_node.expert_parallel.service import SMALL_CALL_ROWS, ExpertService
from mesh_node.transport.connection import Handlers
from mesh_node.transport.errors import ErrorCode, RequestFailed
from mesh_node.transport.tensors import Tensor


@given(
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 50)), max_size=12),
    st.integers(1, 40),
)
def test_split_call_keeps_every_row_in_order_within_the_limit(groups, max_rows):
    experts = [e for e, _ in groups]
    counts = [c for _, c in groups]
    pieces = split_call(experts, counts, max_rows)
    assert all(sum(c) <= max_rows for _, c in pieces)
    flat = [e for es, cs in pieces for e, c in zip(es, cs, strict=True) for _ in range(c)]
    assert flat == [e for e, c in groups for _ in range(c)]
    assert len(pieces) == max(1, -(-sum(counts) // max_rows))


@pytest.fixture(scope="module")
def service():
    held = ExpertService(Handlers())
    held.replace("builtin", load_expert_banks(BUILTIN_DIR, {0: [1, 2], 3: [7]}, device="cpu"))
    yield held
    held.close()


def call(layer=0, experts=(1,), counts=(2,), rows=None, model="builtin"):
    rows = torch.zeros(sum(counts), 128) if rows is None else rows
    return ExpertCall(model, layer, list(experts), list(counts), Tensor.from_torch(rows))


@pytest.mark.parametrize(
    ("bad", "code", "words"),
    [
        (call(model="other"), ErrorCode.NOT_FOUND, "no experts of model"),
        (call(experts=(3,)), ErrorCode.NOT_FOUND, "not held"),
        (call(layer=1), ErrorCode.NOT_FOUND, "not held"),
        (
            call(experts=(1, 2), counts=(1,), rows=torch.zeros(1, 128)),
            ErrorCode.BAD_REQUEST,
            "pair",
        ),
        (call(rows=torch.zeros(3, 128)), ErrorCode.BAD_REQUEST, "rows must be"),
        (call(rows=torch.zeros(2, 64)), ErrorCode.BAD_REQUEST, "rows must be"),
        (call(rows=torch.zeros(2, 128, dtype=torch.bfloat16)), ErrorCode.BAD_REQUEST, "--dtype"),
    ],
)
def test_a_peer_refuses_calls_it_cannot_answer_with_a_clear_reason(service, bad, code, words):
    with pytest.raises(RequestFailed) as caught:
        service.check(bad)
    assert caught.value.code == code and words in caught.value.message


def test_a_good_call_computes_what_the_bank_computes(service):
    rows = torch.randn(3, 128)
    bank, got = service.check(call(experts=(1, 2), counts=(2, 1), rows=rows))
    assert torch.equal(got, rows)
    assert bank.expert_ids == (1, 2)


def test_a_rankings_document_travels_as_bytes_in_a_u8_tensor():
    data = bytes(range(256)) * 5000  # larger than a frame body may be
    assert RankingsData.of(data).data() == data
    with pytest.raises(ValueError, match="U8"):
        RankingsData(Tensor.from_torch(torch.zeros(2))).data()


def weighted(token_of, weights, rows, experts=(1, 2), counts=(2, 1)):
    return ExpertCall(
        "builtin",
        0,
        list(experts),
        list(counts),
        Tensor.from_torch(rows),
        token_of=token_of,
        weights=None if weights is None else Tensor.from_torch(weights),
    )


@pytest.mark.parametrize(
    ("token_of", "weights", "words"),
    [
        ([0, 1, 0], None, "F32 weights"),
        ([0, 1], torch.ones(3), "one per grouped row"),
        ([0, 1, 0], torch.ones(3, dtype=torch.float64), "F32 weights"),
        ([0, 2, 0], torch.ones(3), "index the 2 rows"),
    ],
)
def test_a_peer_refuses_bad_weighted_calls(service, token_of, weights, words):
    with pytest.raises(RequestFailed) as caught:
        service.check_weighted(weighted(token_of, weights, torch.zeros(2, 128)))
    assert caught.value.code == ErrorCode.BAD_REQUEST and words in caught.value.message


def test_a_weighted_call_sums_each_tokens_experts_with_their_gate_weights(service):
    rows = torch.randn(2, 128)
    token_of, weights = service.check_weighted(
        weighted([0, 1, 1], torch.tensor([0.25, 0.5, 0.75]), rows)
    )
    bank = service.bank("builtin", 0)
    partial = bank.run_weighted(rows, [1, 2], [2, 1], token_of, weights)
    one = bank.run_grouped(rows, [1], [2])  # expert 1 on both tokens
    two = bank.run_grouped(rows[1:], [2], [1])  # expert 2 on token 1
    assert torch.allclose(partial[0], 0.25 * one[0])
    assert torch.allclose(partial[1], 0.5 * one[1] + 0.75 * two[0])


def test_a_one_row_weighted_call_reads_every_pair_as_that_row(service):
    token_of, weights = service.check_weighted(
        weighted([0, 0], torch.tensor([0.25, 0.75]), torch.randn(1, 128), counts=(1, 1))
    )
    assert token_of.dtype == torch.long and token_of.tolist() == [0, 0]
    assert weights.tolist() == [0.25, 0.75]


@pytest.mark.parametrize(
    ("chosen", "experts", "expected"),
    [
        ([5, 2], [2, 5], [0.75, 0.25]),  # grouped by expert: the second choice's weight first
        ([2, 5], [2, 5], [0.25, 0.75]),  # already in order: a view of the gate weights
        ([2, 5], [5], [0.75]),
    ],
)
def test_a_one_token_request_pairs_each_expert_with_its_own_gate_weight(chosen, experts, expected):
    x = torch.randn(1, 128)
    flat_weights = torch.tensor([0.25, 0.75])
    pairs = {expert: [i] for i, expert in enumerate(chosen)}
    tokens, rows, counts, token_of, pair_weights = _request_of(x, experts, pairs, 2, flat_weights)
    assert tokens.tolist() == [0] and rows is x and counts == [1] * len(experts)
    assert token_of.tolist() == [0] * len(experts) and pair_weights.tolist() == expected


def test_a_one_token_weighted_call_equals_the_grouped_sum_exactly(service):
    """A decode step's call (one row, each expert once) takes a shorter path on a float32
    bank: the same products and the same float32 sum, in the same order, bit for bit."""
    bank = service.bank("builtin", 0)
    x = torch.randn(1, 128)
    held = [2, 1]  # the order the host sends them in, not the bank's
    weights = torch.tensor([0.7, 0.3])
    token_of = torch.zeros(2, dtype=torch.long)
    got = bank.run_weighted(x, held, [1, 1], token_of, weights)
    outputs = bank.run_grouped(x.expand(2, -1), held, [1, 1])
    expected = torch.zeros(1, 128).index_add_(0, token_of, outputs * weights.unsqueeze(1))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    missing = next(e for e in range(8) if not bank.holds(e))
    with pytest.raises(ExpertNotLoadedError, match=f"expert {missing} of layer 0"):
        bank.run_weighted(x, [held[0], missing], [1, 1], token_of[:2], weights[:2])


def test_banks_merge_and_subset_keep_each_experts_weights():
    a = load_expert_banks(BUILTIN_DIR, {2: [5, 1]}, device="cpu")[2]
    b = load_expert_banks(BUILTIN_DIR, {2: [3]}, device="cpu")[2]
    whole = load_expert_banks(BUILTIN_DIR, {2: [1, 3, 5]}, device="cpu")[2]
    merged = a.merged(b)
    assert merged.expert_ids == (1, 3, 5)
    rows = torch.randn(3, 128)
    assert torch.equal(
        merged.run_grouped(rows, [1, 3, 5], [1, 1, 1]),
        whole.run_grouped(rows, [1, 3, 5], [1, 1, 1]),
    )
    part = merged.subset([5])
    assert part.expert_ids == (5,) and part.nbytes == whole.nbytes // 3
    assert torch.equal(part.run_grouped(rows[:1], [5], [1]), whole.run_grouped(rows[:1], [5], [1]))
    with pytest.raises(ValueError, match="both"):
        merged.merged(b)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs more than one intra-op thread")
async def test_decode_sized_calls_compute_on_the_models_share_of_threads(service):
    async def threads_after(rows: int) -> int:
        answer = await service._serve(None, call(experts=(1,), counts=(rows,)))
        assert tuple(answer.outputs.shape) == (rows, 128)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(service._executor, torch.get_num_threads)

    every = torch.get_num_threads()
    # a built-in expert (0.4 MB) is too little to stream for a second thread to be worth waking
    assert await threads_after(SMALL_CALL_ROWS) == 1
    assert await threads_after(SMALL_CALL_ROWS + 1) == every  # larger calls: all threads
    service.bytes_per_thread = 1  # from here on, as if every expert were large
    # nothing said (the model's nodes are on other machines): every thread streams weights
    assert service.call_threads("builtin") == every
    assert await threads_after(SMALL_CALL_ROWS) == every
    # its other nodes share this machine: one thread, no OpenMP team left spinning
    service.set_call_threads("builtin", 1)
    assert await threads_after(SMALL_CALL_ROWS) == 1
    assert await threads_after(SMALL_CALL_ROWS + 1) == every  # larger calls: all threads
    assert service.call_threads("other-model") == every  # per model
    service.set_call_threads("builtin", None)
    assert await threads_after(SMALL_CALL_ROWS) == every
