"""The node's inference runtime: torch, Hugging Face checkpoints, continuous batching.

Knows nothing about the network. The objects other parts of the node use:

- `resolve_model(spec)`: built-in model / local folder / Hugging Face cache / download -> folder
- `load_model(folder, plan=LoadPlan(...), dtype=..., device=...)`: a `Transformer`, whole or partial
- `Generator(model, tokenizer)` / `Generator.from_pretrained(spec)`: worker thread, `submit()`
  -> `RequestStream` (async or sync iteration of `TokenChunk`s, `cancel()`)
- `ExpertBank` / `ExpertComputer`: what a MoE layer calls to compute its routed experts
- `measure_expert_usage(model, sequences)`: per-(layer, expert) gate mass, selections and
  co-selections (`measure_expert_usage_by_layer(folder, ...)`: one layer in memory at a time)
- `LoadPlan(experts=..., restrict_router=True)`: a model whose routers choose only the experts
  it holds (independent-shard mode)
- `evaluation.evaluate_quality(folder, plan)`: greedy exact match and answer perplexity on the
  built-in model's held-out prompts
"""

from mesh_node.engine.catalog import ModelInfo, ResolvedModel, list_local_models, resolve_model
from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.config import ModelArgs
from mesh_node.engine.errors import (
    CheckpointError,
    CorruptCheckpointError,
    EngineError,
    ExpertsUnavailable,
    GeneratorClosedError,
    MissingTensorError,
    ModelNotFoundError,
    OverloadedError,
    RequestCancelledError,
    TensorShapeError,
    UnsupportedArchitectureError,
)
from mesh_node.engine.expert_usage import (
    ExpertUsage,
    measure_expert_usage,
    measure_expert_usage_by_layer,
)
from mesh_node.engine.experts import ExpertBank, ExpertComputer, ExpertNotLoadedError
from mesh_node.engine.generator import (
    ContextLengthError,
    GenerationRequest,
    GenerationResult,
    Generator,
    GeneratorStats,
    InvalidRequestError,
    RequestStream,
    TokenChunk,
    Usage,
)
from mesh_node.engine.loading import LoadPlan, load_model
from mesh_node.engine.model import Transformer
from mesh_node.engine.moe import MoELayer
from mesh_node.engine.sampling import SamplingParams
from mesh_node.engine.tokenizer import TextStream, Tokenizer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ContextLengthError",
    "CorruptCheckpointError",
    "EngineError",
    "ExpertBank",
    "ExpertComputer",
    "ExpertNotLoadedError",
    "ExpertUsage",
    "ExpertsUnavailable",
    "GenerationRequest",
    "GenerationResult",
    "Generator",
    "GeneratorClosedError",
    "GeneratorStats",
    "InvalidRequestError",
    "LoadPlan",
    "MissingTensorError",
    "MoELayer",
    "ModelArgs",
    "ModelInfo",
    "ModelNotFoundError",
    "OverloadedError",
    "RequestCancelledError",
    "RequestStream",
    "ResolvedModel",
    "SamplingParams",
    "TensorShapeError",
    "TextStream",
    "TokenChunk",
    "Tokenizer",
    "Transformer",
    "UnsupportedArchitectureError",
    "Usage",
    "list_local_models",
    "load_model",
    "measure_expert_usage",
    "measure_expert_usage_by_layer",
    "resolve_model",
]
