"""Errors the engine raises. Each message names the problem and, where there is one, what to do."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class UnsupportedArchitectureError(EngineError):
    """The checkpoint's architecture (config.json `model_type`) or an option is unsupported."""


class CheckpointError(EngineError):
    """A checkpoint folder is missing a file, or its config is unusable."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in any of the checkpoint's safetensors files."""


class TensorShapeError(CheckpointError):
    """A tensor has a different shape than the config implies."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file (or the shard index) cannot be parsed or is truncated."""


class ModelNotFoundError(EngineError):
    """A model given by path or repo id cannot be found (or fetched)."""


class OverloadedError(EngineError):
    """The generator already holds its maximum number of active and queued requests."""


class RequestCancelledError(EngineError):
    """The request was cancelled before it finished."""


class ExpertsUnavailable(EngineError):
    """Some expert of a MoE layer spread over the mesh has no live holder (and none appeared
    in time): another host of the model would meet the same mesh."""


class GeneratorClosedError(EngineError):
    """The generator was shut down (or its worker died); it takes no more requests."""
