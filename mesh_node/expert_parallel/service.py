"""The expert service: the routed experts this node holds, computed for the hosts that ask.

A peer in an expert-parallel mesh holds some experts of some MoE layers (its part of the
plan) as `ExpertBank`s, by model and layer. A host sends one `ExpertCall` per layer per
step with the rows routed to this peer's experts; the service checks the call against what
it holds, computes it on its own worker thread (torch, off the event loop; one computation
at a time, so concurrent calls queue instead of fighting over the cores) and answers with
the outputs. A decode-sized call (a few rows) runs on the threads its model's share of the
cores allows (`set_call_threads`, see core_share): when the model's other nodes run on this
machine, its OpenMP team would otherwise keep spinning on cores the host and the other peers
need next (on a 2-core machine with three nodes, one thread per call doubled three-node decode
speed); on a machine of its own, every thread streams the experts' weights. Within that share,
it wakes only threads that have enough weights to stream (`threads_for_weights`): small experts
compute on one thread. Larger calls use every thread. At most `max_pending` calls wait; more
are answered OVERLOADED.

Calls also come on express lanes (transport/express.py) when the node has a lane server:
its thread checks and computes them itself, under the same lock as the worker thread's, so
that still one computation runs at a time.

The host's own experts live here too: its engine reads `bank(model, layer)` directly, so
the same bytes serve local and remote tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from mesh_node.engine.experts import ExpertBank
from mesh_node.expert_parallel.core_share import BYTES_PER_THREAD, threads_for_weights
from mesh_node.expert_parallel.messages import ExpertCall, ExpertOutput
from mesh_node.identity import NodeId
from mesh_node.transport.connection import Handlers, RequestContext
from mesh_node.transport.errors import ErrorCode, RequestFailed
from mesh_node.transport.express import ExpressServer
from mesh_node.transport.tensors import Tensor

log = logging.getLogger("mesh_node.experts")

SMALL_CALL_ROWS = 8  # calls with at most this many rows are decode-sized (set_call_threads)

_WIRE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class ExpertService:
    def __init__(
        self, handlers: Handlers, *, max_pending: int = 32, lanes: ExpressServer | None = None
    ):
        self._banks: dict[str, dict[int, ExpertBank]] = {}
        self.max_pending = max_pending
        self._pending = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mesh-experts"
        )
        self.all_threads = torch.get_num_threads()  # calls larger than SMALL_CALL_ROWS
        self._call_threads: dict[str, int] = {}  # model -> threads for decode-sized calls
        self.bytes_per_thread = BYTES_PER_THREAD  # a decode-sized call's weights per thread
        self.calls_served = 0
        self._computing = threading.Lock()  # one computation at a time: worker or lane thread
        self._busy_since: float | None = None  # monotonic start of the computation running
        handlers.on_request(ExpertCall, self._serve)
        if lanes is not None:
            lanes.on_call(ExpertCall, self._serve_lane)

    # ---- what is held (read from any thread; replaced whole, never mutated in place)
    def bank(self, model: str, layer: int) -> ExpertBank | None:
        return self._banks.get(model, {}).get(layer)

    def held(self, model: str) -> dict[int, tuple[int, ...]]:
        """layer -> expert ids held for `model`."""
        return {layer: bank.expert_ids for layer, bank in self._banks.get(model, {}).items()}

    def nbytes(self, model: str) -> int:
        return sum(bank.nbytes for bank in self._banks.get(model, {}).values())

    def models(self) -> list[str]:
        return sorted(self._banks)

    def replace(self, model: str, banks: Mapping[int, ExpertBank]) -> None:
        """Hold exactly these banks for `model` (an empty mapping drops the model)."""
        if banks:
            self._banks[model] = dict(banks)
        else:
            self._banks.pop(model, None)

    def replace_layer(self, model: str, layer: int, bank: ExpertBank | None) -> None:
        """Hold `bank` for one layer of `model` (None: none); other layers are unchanged."""
        banks = dict(self._banks.get(model, {}))
        if bank is None:
            banks.pop(layer, None)
        else:
            banks[layer] = bank
        self.replace(model, banks)

    def call_threads(self, model: str) -> int:
        """Intra-op threads for `model`'s decode-sized calls."""
        return self._call_threads.get(model, self.all_threads)

    def set_call_threads(self, model: str, threads: int | None) -> None:
        """Compute `model`'s decode-sized calls on `threads` intra-op threads (None: all)."""
        if threads is None:
            self._call_threads.pop(model, None)
        else:
            self._call_threads[model] = max(1, threads)

    def busy_for(self) -> float:
        """Seconds the computation running now has run (0 when none is)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._banks.clear()

    # ---- serving calls
    def check(self, call: ExpertCall, grouped: bool = True) -> tuple[ExpertBank, torch.Tensor]:
        """The bank and rows for a call, or RequestFailed saying what is wrong with it."""
        banks = self._banks.get(call.model)
        if banks is None:
            raise RequestFailed(
                ErrorCode.NOT_FOUND, f"this node holds no experts of model {call.model!r}"
            )
        bank = banks.get(call.layer)
        missing = [e for e in call.experts if bank is None or not bank.holds(e)]
        if missing:
            raise RequestFailed(
                ErrorCode.NOT_FOUND,
                f"experts {missing} of layer {call.layer} of {call.model} are not held here",
            )
        assert bank is not None
        if len(call.experts) != len(call.counts) or any(c < 0 for c in call.counts):
            raise RequestFailed(
                ErrorCode.BAD_REQUEST, "experts and counts must pair up, counts non-negative"
            )
        rows = call.rows
        hidden = bank.down.shape[0]  # down is [hidden, intermediate] per expert
        want = sum(call.counts) if grouped else None
        if len(rows.shape) != 2 or rows.shape[1] != hidden or want not in (None, rows.shape[0]):
            raise RequestFailed(
                ErrorCode.BAD_REQUEST,
                f"rows must be [{'sum(counts)=' + str(want) if grouped else 'tokens'}, {hidden}], "
                f"got {list(rows.shape)}",
            )
        held_dtype = _WIRE_DTYPES.get(bank.dtype)
        if rows.dtype != held_dtype:
            raise RequestFailed(
                ErrorCode.BAD_REQUEST,
                f"rows are {rows.dtype} but this node holds the experts in {held_dtype}: "
                "start every node of the mesh with the same --dtype (without one each node "
                "picks by its device: a GPU keeps a float16 checkpoint's float16, a CPU runs "
                "bfloat16)",
            )
        return bank, rows.torch()

    def check_weighted(self, call: ExpertCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token_of, weights) of a weighted call (None for a grouped one), checked."""
        if call.token_of is None and call.weights is None:
            return None
        total = sum(call.counts)
        tokens = call.rows.shape[0] if len(call.rows.shape) == 2 else 0
        weights = call.weights
        if (
            call.token_of is None
            or weights is None
            or len(call.token_of) != total
            or weights.dtype != "F32"
            or tuple(weights.shape) != (total,)
        ):
            raise RequestFailed(
                ErrorCode.BAD_REQUEST,
                f"a weighted call needs token_of and F32 weights, one per grouped row ({total})",
            )
        if any(not 0 <= t < tokens for t in call.token_of):
            raise RequestFailed(ErrorCode.BAD_REQUEST, f"token_of must index the {tokens} rows")
        if tokens == 1:  # one row (a decode step's call): every pair uses it
            return torch.zeros(total, dtype=torch.long), weights.torch()
        return torch.tensor(call.token_of, dtype=torch.long), weights.torch()

    def _prepared(self, call: ExpertCall) -> tuple[Any, ...]:
        """The checked arguments of `_compute` for a call (RequestFailed when it is wrong)."""
        weighted = self.check_weighted(call)
        bank, rows = self.check(call, grouped=weighted is None)
        if rows.shape[0] <= SMALL_CALL_ROWS:  # decode-sized: threads that have weights to stream
            weights = bank.nbytes // max(1, len(bank.expert_ids)) * len(call.experts)
            limit = self.call_threads(call.model)
            threads = threads_for_weights(weights, limit, self.bytes_per_thread)
        else:
            threads = self.all_threads
        return bank, rows, call.experts, call.counts, weighted, threads

    def _answer(self, args: tuple[Any, ...]) -> ExpertOutput:
        """Compute a checked call (one at a time: worker or lane thread) and wrap its outputs."""
        with self._computing:
            self._busy_since = time.monotonic()
            try:
                outputs = _compute(*args)
            finally:
                self._busy_since = None
        self.calls_served += 1
        return ExpertOutput(Tensor.from_torch(outputs))

    async def _serve(self, ctx: RequestContext, call: ExpertCall) -> ExpertOutput:
        args = self._prepared(call)
        if self._pending >= self.max_pending:
            raise RequestFailed(ErrorCode.OVERLOADED, "too many expert calls waiting here")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._answer, args)
        finally:
            self._pending -= 1

    def _serve_lane(self, peer: NodeId, call: ExpertCall) -> ExpertOutput:
        """A call that came on an express lane, on the lane thread."""
        return self._answer(self._prepared(call))


@torch.inference_mode()
def _compute(
    bank: ExpertBank, rows: torch.Tensor, experts, counts, weighted, threads: int
) -> torch.Tensor:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # intra-op threads of this (the service's) thread
    rows = rows.to(bank.device) if rows.device != bank.device else rows
    if weighted is None:
        return bank.run_grouped(rows, experts, counts).contiguous().cpu()
    token_of, weights = (t.to(bank.device) for t in weighted)
    return bank.run_weighted(rows, experts, counts, token_of, weights).contiguous().cpu()
