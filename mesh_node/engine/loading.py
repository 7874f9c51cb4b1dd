"""Builds a `Transformer` from a checkpoint: all of it, or only given layers and given experts.

Checkpoint tensor names are Hugging Face's. Routed experts come in two on-disk layouts and both
load: one tensor per expert (`...experts.N.gate_proj.weight`, Mixtral's `...experts.N.w1.weight`) or
fused 3-D tensors (`...experts.gate_up_proj [E, 2I, H]`, `...experts.down_proj [E, H, I]`, as
transformers v5 saves them). For a subset of experts only those experts' bytes are read (a slice of
a fused tensor).

Devices and dtypes: `device="auto"` picks CUDA (ROCm builds of torch also report as CUDA) when
present, else CPU. `dtype=None` picks float32 for tiny models on every device (they cost nothing in
it, and CPU and GPU nodes then pick the same greedy tokens, which failover replay relies on); for
larger ones bfloat16 on CPU (fp16 matmul is very slow on CPUs) and the checkpoint's half type on
GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mesh_node.engine.checkpoint import Checkpoint, CheckpointReader
from mesh_node.engine.config import ModelArgs
from mesh_node.engine.errors import CheckpointError, MissingTensorError
from mesh_node.engine.experts import ExpertBank
from mesh_node.engine.linear import choose_layout
from mesh_node.engine.model import Attention, DecoderLayer, Transformer
from mesh_node.engine.moe import DenseMLP, MoELayer

TINY_MODEL_PARAMETERS = 100_000_000  # below this, CPU inference defaults to float32
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class LoadPlan:
    """Which parts of a model to load.

    layers: layer indices to load (None: all). experts: routed experts of the loaded MoE layers:
    None for all, a sequence of expert ids for the same subset in every layer, or a mapping
    layer -> expert ids (layers not in the mapping get none). `LoadPlan.trunk()` loads no routed
    experts at all: embeddings, attention, norms, routers, dense MLPs, shared experts, head.

    restrict_router: each MoE layer's router may choose only the experts loaded for that layer
    (independent-shard mode: a node serves whole requests with its own experts, no expert
    traffic; see `MoELayer.restrict_router`). Loading raises ValueError when a layer would hold
    fewer experts than the model routes each token to (top_k).
    """

    layers: tuple[int, ...] | None = None
    experts: Mapping[int, Sequence[int]] | Sequence[int] | None = None
    embeddings: bool = True
    head: bool = True
    restrict_router: bool = False

    @classmethod
    def trunk(cls, layers: Iterable[int] | None = None) -> LoadPlan:
        return cls(layers=None if layers is None else tuple(layers), experts=())

    def layer_indices(self, args: ModelArgs) -> list[int]:
        if self.layers is None:
            return list(range(args.num_layers))
        bad = [i for i in self.layers if not 0 <= i < args.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {args.num_layers} layers")
        return sorted(set(self.layers))

    def experts_for(self, args: ModelArgs, layer: int) -> tuple[int, ...]:
        assert args.moe is not None
        if self.experts is None:
            ids: Iterable[int] = range(args.moe.num_experts)
        elif isinstance(self.experts, Mapping):
            ids = self.experts.get(layer, ())
        else:
            ids = self.experts
        ids = tuple(sorted(set(int(e) for e in ids)))
        bad = [e for e in ids if not 0 <= e < args.moe.num_experts]
        if bad:
            raise ValueError(f"experts {bad} out of range: layers have {args.moe.num_experts}")
        return ids


@dataclass
class LoadReport:
    folder: Path
    plan: LoadPlan
    dtype: torch.dtype
    device: torch.device
    tensors_read: list[tuple[str, int | None]] = field(default_factory=list)
    weight_bytes: int = 0
    seconds: float = 0.0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA/ROCm device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(
    dtype: str | torch.dtype | None, args: ModelArgs, device: torch.device
) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        try:
            return DTYPE_NAMES[dtype]
        except KeyError:
            raise ValueError(
                f"unknown dtype {dtype!r}: use auto, {', '.join(sorted(DTYPE_NAMES))}"
            ) from None
    if args.parameter_count()["total"] < TINY_MODEL_PARAMETERS:
        return torch.float32
    if device.type == "cuda":
        return torch.float16 if args.checkpoint_dtype == "float16" else torch.bfloat16
    return torch.bfloat16


class _Builder:
    def __init__(self, checkpoint: Checkpoint, reader: CheckpointReader, dtype, device):
        self.layout = choose_layout(device, dtype)
        self.checkpoint = checkpoint
        self.args = checkpoint.args
        self.reader = reader
        self.dtype = dtype
        self.device = device

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.reader.read(name, expected_shape=shape)
        return tensor.to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str, shape: tuple[int, ...], present: bool) -> torch.Tensor | None:
        return self.read(name, shape) if present else None

    def attention(self, layer: int) -> Attention:
        a = self.args
        p = f"model.layers.{layer}.self_attn."
        h, hd = a.hidden_size, a.head_dim
        sizes = {"q": a.num_heads * hd, "k": a.num_kv_heads * hd, "v": a.num_kv_heads * hd}
        qkv = torch.cat([self.read(f"{p}{n}_proj.weight", (s, h)) for n, s in sizes.items()])
        qkv_bias = None
        if a.qkv_bias:
            qkv_bias = torch.cat([self.read(f"{p}{n}_proj.bias", (s,)) for n, s in sizes.items()])
        o = self.read(f"{p}o_proj.weight", (h, a.num_heads * hd))
        o_bias = self.maybe(f"{p}o_proj.bias", (h,), a.o_bias)
        q_norm = k_norm = None
        if a.qk_norm == "head":
            q_norm = self.read(f"{p}q_norm.weight", (hd,))
            k_norm = self.read(f"{p}k_norm.weight", (hd,))
        elif a.qk_norm == "full":
            q_norm = self.read(f"{p}q_norm.weight", (sizes["q"],))
            k_norm = self.read(f"{p}k_norm.weight", (sizes["k"],))
        return Attention(a, layer, qkv, o, qkv_bias, o_bias, q_norm, k_norm, self.layout)

    def dense_mlp(self, prefix: str, inter: int, bias: bool = False) -> DenseMLP:
        h = self.args.hidden_size
        gate_up = torch.cat(
            [
                self.read(f"{prefix}gate_proj.weight", (inter, h)),
                self.read(f"{prefix}up_proj.weight", (inter, h)),
            ]
        )
        down = self.read(f"{prefix}down_proj.weight", (h, inter))
        gate_up_bias = down_bias = None
        if bias:
            gate_up_bias = torch.cat(
                [
                    self.read(f"{prefix}gate_proj.bias", (inter,)),
                    self.read(f"{prefix}up_proj.bias", (inter,)),
                ]
            )
            down_bias = self.read(f"{prefix}down_proj.bias", (h,))
        return DenseMLP(gate_up, down, gate_up_bias, down_bias, self.layout)

    def moe_prefix(self, layer: int) -> str:
        legacy = f"model.layers.{layer}.block_sparse_moe."
        if self.checkpoint.has(f"{legacy}gate.weight"):
            return legacy
        return f"model.layers.{layer}.mlp."

    def expert_bank(self, layer: int, prefix: str, expert_ids: tuple[int, ...]) -> ExpertBank:
        a = self.args
        assert a.moe is not None
        h, inter, n = a.hidden_size, a.moe.expert_intermediate_size, a.moe.num_experts
        gate_up = torch.empty((len(expert_ids), 2 * inter, h), dtype=self.dtype, device=self.device)
        down = torch.empty((len(expert_ids), h, inter), dtype=self.dtype, device=self.device)
        fused = f"{prefix}experts.gate_up_proj"
        if self.checkpoint.has(fused):
            down_name = f"{prefix}experts.down_proj"
            self.checkpoint.expect_shape(fused, (n, 2 * inter, h))
            self.checkpoint.expect_shape(down_name, (n, h, inter))
            for j, e in enumerate(expert_ids):
                gate_up[j].copy_(self.reader.read(fused, index=e))
                down[j].copy_(self.reader.read(down_name, index=e))
        else:
            names = (
                ("w1", "w3", "w2")
                if a.architecture == "mixtral"
                else ("gate_proj", "up_proj", "down_proj")
            )
            for j, e in enumerate(expert_ids):
                p = f"{prefix}experts.{e}."
                if not self.checkpoint.has(f"{p}{names[0]}.weight"):
                    raise MissingTensorError(
                        f"expert {e} of layer {layer}: neither {p}{names[0]}.weight (one tensor "
                        f"per expert) nor {fused} (fused [E, 2I, H]) is in the checkpoint in "
                        f"{self.checkpoint.folder}"
                    )
                gate_up[j, :inter].copy_(self.reader.read(f"{p}{names[0]}.weight", (inter, h)))
                gate_up[j, inter:].copy_(self.reader.read(f"{p}{names[1]}.weight", (inter, h)))
                down[j].copy_(self.reader.read(f"{p}{names[2]}.weight", (h, inter)))
        return ExpertBank(layer, expert_ids, gate_up, down, self.layout)

    def mlp(self, layer: int, plan: LoadPlan) -> DenseMLP | MoELayer:
        a = self.args
        if not a.is_sparse_layer(layer):
            return self.dense_mlp(f"model.layers.{layer}.mlp.", a.intermediate_size, a.mlp_bias)
        assert a.moe is not None
        prefix = self.moe_prefix(layer)
        router = self.read(f"{prefix}gate.weight", (a.moe.num_experts, a.hidden_size))
        expert_ids = plan.experts_for(a, layer)
        if plan.restrict_router and len(expert_ids) < a.moe.top_k:
            raise ValueError(
                f"restrict_router: layer {layer} would hold {len(expert_ids)} experts "
                f"({list(expert_ids)}) but the model routes each token to {a.moe.top_k}; "
                f"give every MoE layer at least {a.moe.top_k} experts"
            )
        bank = self.expert_bank(layer, prefix, expert_ids)
        shared = shared_gate = None
        if a.moe.shared_expert_intermediate_size:
            shared = self.dense_mlp(
                f"{prefix}shared_expert.", a.moe.shared_expert_intermediate_size
            )
            shared_gate = self.read(f"{prefix}shared_expert_gate.weight", (1, a.hidden_size))
        moe = MoELayer(
            layer,
            router,
            a.moe.top_k,
            a.moe.normalize_top_k,
            bank,
            shared,
            shared_gate,
            float_gate_weights=a.architecture == "mixtral",
            layout=self.layout,
        )
        if plan.restrict_router:
            moe.restrict_router(expert_ids)
        return moe

    def layer(self, index: int, plan: LoadPlan) -> DecoderLayer:
        a = self.args
        p = f"model.layers.{index}."
        return DecoderLayer(
            index,
            self.read(f"{p}input_layernorm.weight", (a.hidden_size,)),
            self.attention(index),
            self.read(f"{p}post_attention_layernorm.weight", (a.hidden_size,)),
            self.mlp(index, plan),
            a.rms_norm_eps,
        )


def load_model(
    source: str | Path | Checkpoint,
    *,
    plan: LoadPlan | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    max_seq_len: int | None = None,
) -> Transformer:
    """Loads a model folder (or an opened Checkpoint) as a Transformer; see `LoadPlan` for parts.

    The returned model carries `load_report` (tensors read, weight bytes, dtype, device, time).
    """
    started = time.perf_counter()
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    args = checkpoint.args
    plan = plan or LoadPlan()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, args, torch_device)
    seq_len = min(max_seq_len or args.max_position_embeddings, args.max_position_embeddings)
    h, v = args.hidden_size, args.vocab_size
    with checkpoint.reader() as reader:
        builder = _Builder(checkpoint, reader, torch_dtype, torch_device)
        embed = builder.read("model.embed_tokens.weight", (v, h)) if plan.embeddings else None
        layers = {i: builder.layer(i, plan) for i in plan.layer_indices(args)}
        final_norm = lm_head = None
        if plan.head:
            final_norm = builder.read("model.norm.weight", (h,))
            if args.tie_word_embeddings:
                lm_head = (
                    embed
                    if embed is not None
                    else builder.read("model.embed_tokens.weight", (v, h))
                )
            elif checkpoint.has("lm_head.weight"):
                lm_head = builder.read("lm_head.weight", (v, h))
            else:
                raise MissingTensorError(
                    f"tensor 'lm_head.weight' is missing from the checkpoint in "
                    f"{checkpoint.folder} and config.json does not tie it to the embeddings "
                    f"(tie_word_embeddings)"
                )
        read_log = list(reader.read_log)
    model = Transformer(
        args,
        layers,
        embed,
        final_norm,
        lm_head,
        torch_dtype,
        torch_device,
        seq_len,
        layout=choose_layout(torch_device, torch_dtype),
    )
    model.eval()
    model.load_report = LoadReport(
        folder=checkpoint.folder,
        plan=plan,
        dtype=torch_dtype,
        device=torch_device,
        tensors_read=read_log,
        weight_bytes=model.weight_bytes(),
        seconds=time.perf_counter() - started,
    )
    if not model.layers and not plan.embeddings and not plan.head:
        raise CheckpointError("the load plan selects nothing to load")
    return model


def load_expert_banks(
    source: str | Path | Checkpoint,
    experts: Mapping[int, Sequence[int]],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
) -> dict[int, ExpertBank]:
    """Only routed experts: layer -> a bank of the given experts (what an expert-parallel peer
    holds). Layers must be MoE layers; only these experts' bytes are read from disk. Empty
    expert lists are skipped. The dtype follows the same defaults as `load_model`, so a host
    and its peers agree on it."""
    checkpoint = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    args = checkpoint.args
    if args.moe is None:
        raise CheckpointError(f"the model in {checkpoint.folder} has no routed experts")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, args, torch_device)
    plan = LoadPlan(experts=experts)
    banks: dict[int, ExpertBank] = {}
    with checkpoint.reader() as reader:
        builder = _Builder(checkpoint, reader, torch_dtype, torch_device)
        for layer in sorted(experts):
            if not 0 <= layer < args.num_layers or not args.is_sparse_layer(layer):
                raise ValueError(f"layer {layer} is not a MoE layer of this model")
            ids = plan.experts_for(args, layer)
            if ids:
                banks[layer] = builder.expert_bank(layer, builder.moe_prefix(layer), ids)
    return banks


def expert_nbytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of one routed expert (gate, up and down projections) in `dtype`."""
    assert args.moe is not None
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 3 * args.hidden_size * args.moe.expert_intermediate_size * itemsize
