"""Shared fixtures: tiny random reference checkpoints (built once per session, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.reference_checkpoints import VARIANTS, build_reference

# the engine's tests run on every device torch sees: CI has only the CPU, a GPU machine adds CUDA
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
MOE_VARIANTS = [name for name, (kind, _) in VARIANTS.items() if kind.endswith(("moe", "mixtral"))]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


class ReferenceStore:
    """Builds each (variant, layout) once and hands out the folder and the transformers model."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple[str, bool], tuple[Path, object]] = {}

    def get(self, name: str, fused: bool = False):
        key = (name, fused)
        if key not in self._built:
            folder = self.root / f"{name}-{'fused' if fused else 'per-expert'}"
            folder.mkdir()
            model = build_reference(name, folder, fused_experts=fused)
            self._built[key] = (folder, model)
        return self._built[key]


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> ReferenceStore:
    return ReferenceStore(tmp_path_factory.mktemp("reference-checkpoints"))
