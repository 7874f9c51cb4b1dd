"""`ModelArgs`: everything the engine needs from a checkpoint's config.json, per architecture.

Defaults follow the transformers configuration class of each architecture, so a config.json that
leaves a field out means the same thing here as there. One architecture table (`ARCHITECTURES`) says
what each supported `model_type` has: attention biases, QK-norm, sliding-window rules, MoE routing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_node.engine.errors import CheckpointError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    """What differs between the supported model families."""

    name: str
    moe: bool
    default_theta: float = 10_000.0
    default_eps: float = 1e-6
    qkv_bias: str = "none"  # "none" | "always" (qwen2) | "config:<key>" (bias on q,k,v from a flag)
    o_bias: str = "none"  # "none" | "config:<key>"
    mlp_bias: str = "none"
    qk_norm: str = "none"  # "none" | "head" (qwen3: per head) | "full" (olmoe: over the projection)
    # sliding windows: "none"; "global" (every layer, mistral/mixtral); "use_flag" (every layer
    # when use_sliding_window, qwen3_moe); "qwen" / "qwen2_moe" (per-layer layer_types, derived
    # from use_sliding_window and max_window_layers by each family's own rule)
    sliding: str = "none"
    router_norm: str = "flag"  # "always" (mixtral) | "flag" (config norm_topk_prob)
    shared_expert: bool = False
    experts_key: str = "num_experts"
    default_kv_heads: int | None = None  # None: same as attention heads
    default_head_dim: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "llama",
            moe=False,
            qkv_bias="config:attention_bias",
            o_bias="config:attention_bias",
            mlp_bias="config:mlp_bias",
            defaults={"intermediate_size": 11008, "max_position_embeddings": 2048},
        ),
        Architecture(
            "mistral",
            moe=False,
            sliding="global",
            default_kv_heads=8,
            defaults={
                "sliding_window": 4096,
                "intermediate_size": 14336,
                "max_position_embeddings": 131072,
            },
        ),
        Architecture(
            "qwen2",
            moe=False,
            qkv_bias="always",
            sliding="qwen",
            default_kv_heads=32,
            defaults={"intermediate_size": 22016, "max_position_embeddings": 32768},
        ),
        Architecture(
            "qwen3",
            moe=False,
            qkv_bias="config:attention_bias",
            o_bias="config:attention_bias",
            qk_norm="head",
            sliding="qwen",
            default_kv_heads=32,
            default_head_dim=128,
            defaults={"intermediate_size": 22016, "max_position_embeddings": 32768},
        ),
        Architecture(
            "mixtral",
            moe=True,
            default_theta=1_000_000.0,
            default_eps=1e-5,
            sliding="global",
            router_norm="always",
            experts_key="num_local_experts",
            default_kv_heads=8,
            defaults={
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "sliding_window": None,
                "intermediate_size": 14336,
                "max_position_embeddings": 131072,
            },
        ),
        Architecture(
            "qwen2_moe",
            moe=True,
            qkv_bias="config:qkv_bias",
            sliding="qwen2_moe",
            shared_expert=True,
            default_kv_heads=16,
            defaults={
                "num_experts": 60,
                "num_experts_per_tok": 4,
                "qkv_bias": True,
                "intermediate_size": 5632,
                "moe_intermediate_size": 1408,
                "shared_expert_intermediate_size": 5632,
                "sliding_window": 4096,
                "max_position_embeddings": 32768,
            },
        ),
        Architecture(
            "qwen3_moe",
            moe=True,
            qkv_bias="config:attention_bias",
            o_bias="config:attention_bias",
            qk_norm="head",
            sliding="use_flag",
            default_kv_heads=4,
            defaults={
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "intermediate_size": 6144,
                "moe_intermediate_size": 768,
                "sliding_window": 4096,
                "max_position_embeddings": 32768,
            },
        ),
        Architecture(
            "olmoe",
            moe=True,
            default_eps=1e-5,
            qkv_bias="config:attention_bias",
            o_bias="config:attention_bias",
            qk_norm="full",
            defaults={
                "num_experts": 64,
                "num_experts_per_tok": 8,
                "intermediate_size": 2048,
                "max_position_embeddings": 4096,
            },
        ),
    )
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeArgs:
    rope_type: str
    theta: float
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    normalize_top_k: bool
    shared_expert_intermediate_size: int | None  # qwen2_moe's always-on expert with a sigmoid gate
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense models, and dense layers of MoE models)
    rms_norm_eps: float
    rope: RopeArgs
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: str  # "none" | "head" | "full"
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]  # per layer
    moe: MoEArgs | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    checkpoint_dtype: str | None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def is_sparse_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.sparse_layers[layer]

    @property
    def sparse_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse_layer(i))

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{folder}: no config.json (is this a Hugging Face model folder?)"
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        try:
            return cls.from_config(config, source=str(path))
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            raise CheckpointError(f"{path}: a field has an unusable value ({exc})") from None

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            supported = ", ".join(sorted(ARCHITECTURES))
            raise UnsupportedArchitectureError(
                f"{source}: model_type {model_type!r} is not supported; supported architectures: "
                f"{supported}"
            )
        arch = ARCHITECTURES[model_type]
        quantization = config.get("quantization_config")
        if quantization is not None:  # its weights are codes plus scales: read as floats, junk
            method = quantization.get("quant_method") if isinstance(quantization, dict) else None
            raise UnsupportedArchitectureError(
                f"{source}: quantized checkpoints ({method or 'quantization_config'}) are not "
                "supported; use the model's bfloat16/float16/float32 weights"
            )

        def get(key: str, default: Any = None) -> Any:
            value = config.get(key)
            if value is None:
                value = arch.defaults.get(key, default)
            return value

        def flag(rule: str) -> bool:
            if rule == "none":
                return False
            if rule == "always":
                return True
            return bool(get(rule.split(":", 1)[1], False))

        try:
            hidden = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
            vocab = int(config["vocab_size"])
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing required field {exc.args[0]!r}") from exc
        kv_heads = config.get("num_key_value_heads")
        if kv_heads is None:
            kv_heads = arch.default_kv_heads if arch.default_kv_heads is not None else heads
        head_dim = config.get("head_dim") or arch.default_head_dim or hidden // heads
        if heads % int(kv_heads) != 0:
            raise CheckpointError(
                f"{source}: num_attention_heads {heads} is not a multiple of "
                f"num_key_value_heads {kv_heads}"
            )
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise UnsupportedArchitectureError(
                f"{source}: hidden_act {hidden_act!r} is not supported (only 'silu')"
            )
        max_pos = int(get("max_position_embeddings", 4096))
        rope = _rope_args(config, arch, max_pos, source)
        sliding = _sliding_windows(config, arch, layers)

        moe = None
        if arch.moe:
            # transformers v5 may save either name (its configs alias one to the other)
            num_experts = config.get("num_experts", config.get("num_local_experts"))
            num_experts = int(num_experts if num_experts is not None else get(arch.experts_key))
            sparse_step = int(get("decoder_sparse_step", 1) or 1)
            mlp_only = set(get("mlp_only_layers", []) or [])
            sparse_layers = tuple(
                num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0
                for i in range(layers)
            )
            size_key = (
                "moe_intermediate_size" if model_type.startswith("qwen") else "intermediate_size"
            )
            expert_size = int(get(size_key))
            shared = int(get("shared_expert_intermediate_size")) if arch.shared_expert else None
            moe = MoEArgs(
                num_experts=num_experts,
                top_k=int(get("num_experts_per_tok")),
                expert_intermediate_size=expert_size,
                normalize_top_k=True
                if arch.router_norm == "always"
                else bool(get("norm_topk_prob", False)),
                shared_expert_intermediate_size=shared,
                sparse_layers=sparse_layers,
            )
            if not 0 < moe.top_k <= num_experts:
                raise CheckpointError(
                    f"{source}: num_experts_per_tok {moe.top_k} must be in 1..{num_experts}"
                )

        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(get("intermediate_size", 4 * hidden)),
            rms_norm_eps=float(get("rms_norm_eps", arch.default_eps)),
            rope=rope,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=flag(arch.qkv_bias),
            o_bias=flag(arch.o_bias),
            mlp_bias=flag(arch.mlp_bias),
            qk_norm=arch.qk_norm,
            clip_qkv=config.get("clip_qkv") if model_type == "olmoe" else None,
            sliding_windows=sliding,
            moe=moe,
            eos_token_ids=eos_ids,
            bos_token_id=config.get("bos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
        )

    def parameter_count(self) -> dict[str, int]:
        """Parameters: 'trunk' (all but routed experts), 'experts', 'total', 'active' per token."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += h
        if self.qk_norm == "head":
            attn += 2 * d
        elif self.qk_norm == "full":
            attn += d * (self.num_heads + self.num_kv_heads)
        dense_mlp = 3 * h * self.intermediate_size + (
            2 * self.intermediate_size + h if self.mlp_bias else 0
        )
        trunk = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        experts = 0
        active_experts = 0
        for layer in range(self.num_layers):
            trunk += attn + 2 * h
            if self.moe is not None and self.is_sparse_layer(layer):
                trunk += self.moe.num_experts * h
                if self.moe.shared_expert_intermediate_size:
                    trunk += 3 * h * self.moe.shared_expert_intermediate_size + h
                per_expert = 3 * h * self.moe.expert_intermediate_size
                experts += self.moe.num_experts * per_expert
                active_experts += self.moe.top_k * per_expert
            else:
                trunk += dense_mlp
        return {
            "trunk": trunk,
            "experts": experts,
            "total": trunk + experts,
            "active": trunk
            - self.vocab_size * h * (0 if self.tie_word_embeddings else 1)
            + active_experts,
        }


def _rope_args(config: dict[str, Any], arch: Architecture, max_pos: int, source: str) -> RopeArgs:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedArchitectureError(
            f"{source}: per-layer-type rope_parameters are not supported"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: rope type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", config.get("rope_theta", arch.default_theta))
    original = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and original is None:
        original = config.get("original_max_position_embeddings", max_pos)
    return RopeArgs(
        rope_type=rope_type,
        theta=float(theta),
        factor=params.get("factor"),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_position_embeddings=original,
        attention_factor=params.get("attention_factor"),
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        partial_rotary_factor=float(
            params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        ),
    )


def _sliding_windows(
    config: dict[str, Any], arch: Architecture, layers: int
) -> tuple[int | None, ...]:
    """Per layer: the sliding attention window in tokens, or None for full attention."""
    window = (
        config["sliding_window"]
        if "sliding_window" in config
        else arch.defaults.get("sliding_window")
    )
    if arch.sliding == "none":
        return (None,) * layers
    if arch.sliding == "global":
        return (window if window else None,) * layers
    use = bool(config.get("use_sliding_window", False))
    if arch.sliding == "use_flag":  # qwen3_moe: one window for every layer when enabled
        return ((window or None) if use else None,) * layers
    layer_types = config.get("layer_types")
    if arch.sliding == "qwen":
        window = window if use else None
        max_window_layers = int(config.get("max_window_layers", 28))
        if layer_types is None:
            layer_types = [
                "sliding_attention" if window is not None and i >= max_window_layers else "full"
                for i in range(layers)
            ]
    else:  # qwen2_moe
        window = window if use else 0
        max_window_layers = int(config.get("max_window_layers", 28))
        if layer_types is None:
            layer_types = [
                "sliding_attention" if (i + 1) % 2 and i < max_window_layers and use else "full"
                for i in range(layers)
            ]
    return tuple(
        (window or None) if kind == "sliding_attention" else None for kind in layer_types[:layers]
    )
