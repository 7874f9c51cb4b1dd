"""The transformer: embeddings, decoder layers (attention + dense MLP or MoE), final norm, LM head.

One module tree for every supported architecture; the differences (biases, QK-norm over the head or
over the whole projection, clipping, sliding windows, shared experts) are data in `ModelArgs`. A
model may hold only some layers (`layers` maps loaded layer index -> layer), and may lack the
embeddings or the head; `embed`, `run_layers` and `head` can be called separately for that reason.

Shapes: `tokens [B, T]`, `positions [B, T]` (absolute positions, int64), hidden `[B, T, H]`. Batch
row `b` uses cache slot `slot_start + b`; `kv_len` is how many cache positions the longest row
attends to.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mesh_node.engine.config import ModelArgs
from mesh_node.engine.kv_cache import KVCache
from mesh_node.engine.moe import DenseMLP, MoELayer
from mesh_node.engine.rope import rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference computes it: in float32, cast back, then scaled by the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        layer: int,
        qkv: torch.Tensor,
        o: torch.Tensor,
        qkv_bias: torch.Tensor | None = None,
        o_bias: torch.Tensor | None = None,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
    ):
        super().__init__()
        self.layer = layer
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.eps = args.rms_norm_eps
        self.qk_norm = args.qk_norm
        self.clip = args.clip_qkv
        self.window = args.sliding_windows[layer]
        self.qkv = nn.Parameter(qkv, requires_grad=False)  # [(nh + 2 nkv) * hd, H]
        self.o = nn.Parameter(o, requires_grad=False)
        self.qkv_bias = None if qkv_bias is None else nn.Parameter(qkv_bias, False)
        self.o_bias = None if o_bias is None else nn.Parameter(o_bias, False)
        self.q_norm = None if q_norm is None else nn.Parameter(q_norm, False)
        self.k_norm = None if k_norm is None else nn.Parameter(k_norm, False)
        self.split = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        slot_start: int,
        positions: torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = F.linear(x, self.qkv, self.qkv_bias).split(self.split, dim=-1)
        if self.qk_norm == "full":
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        if self.clip is not None:
            q = q.clamp(-self.clip, self.clip)
            k = k.clamp(-self.clip, self.clip)
            v = v.clamp(-self.clip, self.clip)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)
        k = k * cos + rotate_half(k) * sin

        k_cache = cache.keys[self.layer]
        v_cache = cache.values[self.layer]
        if batch == 1:
            start = int(positions[0, 0])
            k_cache[slot_start, :, start : start + seq] = k[0].transpose(0, 1)
            v_cache[slot_start, :, start : start + seq] = v[0].transpose(0, 1)
        elif seq == 1:  # decode: one new token per row, each at its own position
            rows = torch.arange(slot_start, slot_start + batch, device=x.device)
            k_cache[rows, :, positions[:, 0]] = k[:, 0]
            v_cache[rows, :, positions[:, 0]] = v[:, 0]
        else:
            raise ValueError("several rows of several tokens: prefill one sequence at a time")
        keys = k_cache[slot_start : slot_start + batch, :, :kv_len]
        values = v_cache[slot_start : slot_start + batch, :, :kv_len]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return F.linear(out, self.o, self.o_bias)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        index: int,
        input_norm: torch.Tensor,
        attention: Attention,
        post_norm: torch.Tensor,
        mlp: DenseMLP | MoELayer,
        eps: float,
    ):
        super().__init__()
        self.index = index
        self.input_norm = nn.Parameter(input_norm, requires_grad=False)
        self.attention = attention
        self.post_norm = nn.Parameter(post_norm, requires_grad=False)
        self.mlp = mlp
        self.eps = eps

    def forward(self, h, cos, sin, cache, slot_start, positions, kv_len, mask):
        h = h + self.attention(
            rms_norm(h, self.input_norm, self.eps),
            cos,
            sin,
            cache,
            slot_start,
            positions,
            kv_len,
            mask,
        )
        return h + self.mlp(rms_norm(h, self.post_norm, self.eps))


class Transformer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        layers: dict[int, DecoderLayer],
        embed_tokens: torch.Tensor | None,
        final_norm: torch.Tensor | None,
        lm_head: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
        max_seq_len: int,
    ):
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.device = device
        self.layers = nn.ModuleDict({str(i): layer for i, layer in sorted(layers.items())})
        self.layer_indices = sorted(layers)
        self.embed_tokens = None if embed_tokens is None else nn.Parameter(embed_tokens, False)
        self.final_norm = None if final_norm is None else nn.Parameter(final_norm, False)
        if lm_head is not None and embed_tokens is not None and lm_head is embed_tokens:
            self.lm_head = self.embed_tokens  # tied: one tensor, counted once
        else:
            self.lm_head = None if lm_head is None else nn.Parameter(lm_head, False)
        self.max_seq_len = max_seq_len
        cos, sin = rope_tables(args, max_seq_len, dtype, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.windows = sorted({args.sliding_windows[i] for i in self.layer_indices}, key=str)

    # -- accounting ---------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """Bytes of all loaded weights (tied tensors once); not the KV cache or rope tables."""
        seen: set[int] = set()
        total = 0
        for parameter in self.parameters():
            key = parameter.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += parameter.numel() * parameter.element_size()
        return total

    def moe_layers(self) -> Iterable[MoELayer]:
        for layer in self.layers.values():
            if isinstance(layer.mlp, MoELayer):
                yield layer.mlp

    def new_cache(self, slots: int, max_seq_len: int | None = None) -> KVCache:
        length = max_seq_len or self.max_seq_len
        if length > self.max_seq_len:
            raise ValueError(
                f"max_seq_len {length} exceeds the model's table of {self.max_seq_len}"
            )
        return KVCache(self.args, self.layer_indices, slots, length, self.dtype, self.device)

    # -- forward ------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("this model was loaded without its embeddings")
        return F.embedding(tokens, self.embed_tokens)

    def masks(self, positions: torch.Tensor, kv_len: int) -> dict[int | None, torch.Tensor | None]:
        """Boolean attention masks [B, 1, T, kv_len] per sliding window (None: full causal)."""
        batch, seq = positions.shape
        if batch == 1 and seq == 1 and self.windows == [None]:
            return {None: None}  # one token attending to everything before it
        key_pos = torch.arange(kv_len, device=positions.device)
        query_pos = positions[:, None, :, None]
        causal = key_pos <= query_pos
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in self.windows:
            masks[window] = causal if window is None else causal & (key_pos > query_pos - window)
        return masks

    def run_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot_start: int,
        kv_len: int,
    ) -> torch.Tensor:
        cos = self.cos[positions].unsqueeze(2)
        sin = self.sin[positions].unsqueeze(2)
        masks = self.masks(positions, kv_len)
        for layer in self.layers.values():
            mask = masks[self.args.sliding_windows[layer.index]]
            h = layer(h, cos, sin, cache, slot_start, positions, kv_len, mask)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None or self.final_norm is None:
            raise RuntimeError("this model was loaded without its LM head")
        return F.linear(rms_norm(h, self.final_norm, self.args.rms_norm_eps), self.lm_head).float()

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot_start: int = 0,
        kv_len: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (float32) `[B, T, V]`, or `[B, V]` for the last position when `last_only`."""
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        h = self.run_layers(self.embed(tokens), positions, cache, slot_start, kv_len)
        if last_only:
            h = h[:, -1]
        return self.head(h)
