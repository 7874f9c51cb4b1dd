"""A key/value cache preallocated once: per loaded layer, `[slots, kv_heads, max_seq_len,
head_dim]`.

A slot holds one sequence. The generator keeps its decoding sequences in slots `0..n-1` so that a
decode step reads `cache[:n, :, :kv_len]`, a view, never a gather; `move` copies a sequence to
another slot when the set of running sequences changes.
"""

from __future__ import annotations

import torch

from mesh_node.engine.config import ModelArgs


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        layers: list[int],
        slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.slots = slots
        self.max_seq_len = max_seq_len
        shape = (slots, args.num_kv_heads, max_seq_len, args.head_dim)
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    @property
    def nbytes(self) -> int:
        tensors = list(self.keys.values()) + list(self.values.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` to slot `dst` in every layer."""
        if src == dst or length == 0:
            return
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[dst, :, :length].copy_(tensor[src, :, :length])
