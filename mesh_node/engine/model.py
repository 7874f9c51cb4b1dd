"""The transformer: embeddings, decoder layers (attention + dense MLP or MoE), final norm, LM head.

One module tree for every supported architecture; the differences (biases, QK-norm over the head or
over the whole projection, clipping, sliding windows, shared experts) are data in `ModelArgs`. A
model may hold only some layers (`layers` maps loaded layer index -> layer), and may lack the
embeddings or the head; `embed`, `run_layers` and `head` can be called separately for that reason.

Shapes: `tokens [B, T]`, `positions [B, T]` (absolute positions, int64), hidden `[B, T, H]`. Batch
row `b` uses cache slot `slot_start + b`; `kv_len` is how many cache positions the longest row
attends to. Either one sequence (B = 1) whose T new tokens sit at positions kv_len - T .. kv_len - 1
(prefill, or a decode step), or B sequences of one new token each (a batched decode step).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mesh_node.engine.config import ModelArgs
from mesh_node.engine.kv_cache import KVCache
from mesh_node.engine.linear import Weight, WeightStack
from mesh_node.engine.moe import DenseMLP, MoELayer
from mesh_node.engine.rope import rope_tables


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, computed in float32, in x's dtype.

    A layer norm of [x, -x] is exactly that on its first half (the mean of [x, -x] is zero and
    its variance is mean(x^2)): one fused kernel instead of six elementwise ops, which is what
    costs time at decode batch sizes.
    """
    dim = x.shape[-1]
    return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * dim,), None, None, eps)[..., :dim]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference computes it: normalized in float32, cast back, times the weight."""
    return weight * normalize(x, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] computed as a roll of x
    by half the head and the sign folded into the sin table: [-sin1, sin2] (exactly equal)."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


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
        layout: str = "plain",
    ):
        super().__init__()
        self.layer = layer
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.eps = args.rms_norm_eps
        self.qk_norm = args.qk_norm
        self.clip = args.clip_qkv
        self.qkv = Weight(qkv, layout, qkv_bias)  # [(nh + 2 nkv) * hd, H]
        self.o = Weight(o, layout, o_bias)
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.q_dim = self.num_heads * self.head_dim
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim**-0.5

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections, QK-norm, clipping and rope: q [B, T, nh, hd], k and v [B, T, nkv, hd]."""
        batch, seq, _ = x.shape
        qkv = self.qkv(x)
        qk_dim = self.q_dim + self.kv_dim
        if self.qk_norm == "full":  # olmoe: over each whole projection
            qk = torch.cat(
                (
                    rms_norm(qkv[..., : self.q_dim], self.q_norm, self.eps),
                    rms_norm(qkv[..., self.q_dim : qk_dim], self.k_norm, self.eps),
                ),
                dim=-1,
            )
        else:
            qk = qkv[..., :qk_dim]
        v = qkv[..., qk_dim:]
        if self.clip is not None:
            qk = qk.clamp(-self.clip, self.clip)
            v = v.clamp(-self.clip, self.clip)
        qk = qk.reshape(batch, seq, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # qwen3: per head, one weight for q heads, one for k heads
            qk = normalize(qk, self.eps)
            qk[:, :, : self.num_heads].mul_(self.q_norm)
            qk[:, :, self.num_heads :].mul_(self.k_norm)
        qk = apply_rope(qk, cos, sin)  # one rope for q and k heads together
        q = qk[:, :, : self.num_heads]
        k = qk[:, :, self.num_heads :]
        return q, k, v.view(batch, seq, self.num_kv_heads, self.head_dim)

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
        cache_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`cache_index` (batched decode): row b's kv head h goes to flat cache row
        ((slot_start + b) * kv_heads + h) * max_seq_len + position_b."""
        batch, seq, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        k_cache = cache.keys[self.layer]
        v_cache = cache.values[self.layer]
        if batch == 1:  # one sequence: its new tokens are the last `seq` of `kv_len`
            start = kv_len - seq
            k_cache[slot_start, :, start:kv_len] = k[0].transpose(0, 1)
            v_cache[slot_start, :, start:kv_len] = v[0].transpose(0, 1)
        elif seq == 1:  # decode: one new token per row, each at its own position
            flat = (batch * self.num_kv_heads, self.head_dim)
            k_cache.view(-1, self.head_dim).index_copy_(
                0, cache_index, k.reshape(flat).to(k_cache.dtype)
            )
            v_cache.view(-1, self.head_dim).index_copy_(
                0, cache_index, v.reshape(flat).to(v_cache.dtype)
            )
        else:
            raise ValueError("several rows of several tokens: prefill one sequence at a time")
        keys = k_cache[slot_start : slot_start + batch, :, :kv_len]
        values = v_cache[slot_start : slot_start + batch, :, :kv_len]
        if seq == 1:
            # decode: a few small matmuls beat the fused kernel's fixed cost at one query row;
            # query heads of one kv head form that kv head's rows (grouped-query attention)
            grouped = q.reshape(batch, self.num_kv_heads, self.group, self.head_dim)
            scores = torch.matmul(grouped.to(keys.dtype), keys.transpose(-1, -2)).float()
            scores = scores * self.scale
            if mask is not None:  # additive float mask [B, 1, 1, L]
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            out = torch.matmul(probs, values).reshape(batch, 1, self.q_dim)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2).to(keys.dtype),
                keys,
                values,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            out = out.transpose(1, 2).reshape(batch, seq, self.q_dim)
        return self.o(out.to(x.dtype))


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
        self.input_norm = input_norm
        self.attention = attention
        self.post_norm = post_norm
        self.mlp = mlp
        self.eps = eps

    def forward(self, h, cos, sin, cache, slot_start, positions, kv_len, mask, cache_index=None):
        h = h + self.attention.forward(
            rms_norm(h, self.input_norm, self.eps),
            cos,
            sin,
            cache,
            slot_start,
            positions,
            kv_len,
            mask,
            cache_index,
        )
        return h + self.mlp.forward(rms_norm(h, self.post_norm, self.eps))


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
        layout: str = "plain",
    ):
        super().__init__()
        self.args = args
        self.dtype = dtype
        self.device = device
        self.layers = nn.ModuleDict({str(i): layer for i, layer in sorted(layers.items())})
        self.layer_indices = sorted(layers)
        self.embed_tokens = embed_tokens
        self.final_norm = final_norm
        self.lm_head: Weight | None = None
        self.tied_head = lm_head is not None and lm_head is embed_tokens
        if lm_head is not None and not self.tied_head:
            self.lm_head = Weight(lm_head, layout)
        self.max_seq_len = max_seq_len
        # on CPU, half-precision models keep keys and values in float32: attention over the
        # cache is small matmuls, which CPUs run far faster in float32 than in bf16/fp16
        half_precision = dtype in (torch.bfloat16, torch.float16)
        self.cache_dtype = torch.float32 if half_precision and device.type == "cpu" else dtype
        cos, sin = rope_tables(args, max_seq_len, dtype, device)
        half = args.head_dim // 2
        sin[:, :half] = -sin[:, :half]  # rotate_half's sign, folded in (see apply_rope)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("signed_sin", sin, persistent=False)
        self.windows = sorted({args.sliding_windows[i] for i in self.layer_indices}, key=str)

    # -- accounting ---------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """Bytes of all loaded weights (tied tensors once); not the KV cache or rope tables."""
        total = 0
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
                elif isinstance(value, (Weight, WeightStack)):
                    total += value.nbytes
        return total

    @property
    def has_head(self) -> bool:
        return self.final_norm is not None and (self.lm_head is not None or self.tied_head)

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
        return KVCache(self.args, self.layer_indices, slots, length, self.cache_dtype, self.device)

    # -- forward ------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("this model was loaded without its embeddings")
        return F.embedding(tokens, self.embed_tokens)

    def masks(self, positions: torch.Tensor, kv_len: int) -> dict[int | None, torch.Tensor | None]:
        """Attention masks per sliding window (key None: full causal attention): boolean
        [B, 1, T, kv_len] for prefill, additive float [B, 1, 1, kv_len] for decode steps; None
        where a single sequence attends to all of its cached positions anyway."""
        batch, seq = positions.shape
        if batch == 1 and seq == 1 and self.windows == [None]:
            return {None: None}  # one token attending to everything before it
        key_pos = torch.arange(kv_len, device=positions.device)
        query_pos = positions[:, None, :, None]
        causal = key_pos <= query_pos
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in self.windows:
            allowed = causal if window is None else causal & (key_pos > query_pos - window)
            if seq == 1:  # the decode path adds a float mask to its scores
                allowed = torch.where(allowed, 0.0, float("-inf"))
            masks[window] = allowed
        return masks

    def run_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot_start: int,
        kv_len: int,
    ) -> torch.Tensor:
        batch, seq = positions.shape
        if batch == 1:  # one sequence: positions are kv_len - seq .. kv_len - 1, slice the tables
            cos = self.cos[kv_len - seq : kv_len, None]
            sin = self.signed_sin[kv_len - seq : kv_len, None]
        else:
            cos = self.cos[positions].unsqueeze(2)
            sin = self.signed_sin[positions].unsqueeze(2)
        cache_index = None
        if batch > 1:  # where each row's new key/value goes in the flattened cache
            heads = self.args.num_kv_heads
            rows = torch.arange(slot_start * heads, (slot_start + batch) * heads)
            cache_index = rows.to(positions.device) * cache.max_seq_len
            cache_index += positions.reshape(-1).repeat_interleave(heads)
        masks = self.masks(positions, kv_len)
        windows = self.args.sliding_windows
        for layer in self.layers.values():
            mask = masks[windows[layer.index]]
            h = layer.forward(h, cos, sin, cache, slot_start, positions, kv_len, mask, cache_index)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            raise RuntimeError("this model was loaded without its LM head")
        h = rms_norm(h, self.final_norm, self.args.rms_norm_eps)
        if self.tied_head:  # the embedding table itself: no second copy in another layout
            return F.linear(h, self.embed_tokens).float()
        return self.lm_head(h).float()

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
