"""A local Hugging Face checkpoint folder: its config, and its tensors read one at a time.

`Checkpoint.open(folder)` parses config.json and every safetensors header (single file or shards
listed by `model.safetensors.index.json`), checks that each header is well formed and that the file
is long enough to hold the data it describes, and builds a name -> (file, dtype, shape) table
without reading any tensor data. `CheckpointReader.read(name)` then reads one tensor (or one slice
of the first dimension, for one expert of a fused `[E, ...]` tensor) through
`safetensors.safe_open`, so a caller that loads a few layers or a few experts touches only those
bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mesh_node.engine.config import ModelArgs
from mesh_node.engine.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # what model weights may be stored as


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and checks one safetensors header; raises CorruptCheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(
                    f"corrupt safetensors file {path}: {size} bytes, too short for a header"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CorruptCheckpointError(
                    f"corrupt safetensors file {path}: header length {header_len} does not fit in "
                    f"a {size}-byte file (truncated or not a safetensors file)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # (nested too deep)
        raise CorruptCheckpointError(
            f"corrupt safetensors file {path}: header is not valid JSON ({exc})"
        ) from exc
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = entry["dtype"]
            raw_shape, offsets = entry["shape"], entry["data_offsets"]
            if not isinstance(raw_shape, list) or not isinstance(offsets, list):
                raise TypeError("shape and data_offsets must be lists")
            if not all(type(d) is int and d >= 0 for d in raw_shape):
                raise ValueError("a shape holds non-negative integers")
            shape = tuple(raw_shape)
            begin, end = (int(o) for o in offsets)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"corrupt safetensors file {path}: bad header entry for {name!r}"
            ) from exc
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CorruptCheckpointError(
                f"safetensors file {path}: tensor {name!r} has unsupported dtype {dtype!r}"
            )
        info = TensorInfo(name, path, dtype, shape)
        if end - begin != info.nbytes or begin < 0:
            raise CorruptCheckpointError(
                f"corrupt safetensors file {path}: tensor {name!r} spans {end - begin} bytes but "
                f"its shape {list(shape)} and dtype {dtype} need {info.nbytes}"
            )
        if end > data_size:
            raise CorruptCheckpointError(
                f"corrupt safetensors file {path}: tensor {name!r} ends at data byte {end} but "
                f"the file holds only {data_size} data bytes (truncated?)"
            )
        tensors[name] = info
    return tensors


class Checkpoint:
    """A model folder: `args` (from config.json) and `tensors` (name -> TensorInfo)."""

    def __init__(self, folder: Path, args: ModelArgs, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.args = args
        self.tensors = tensors

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a directory")
        args = ModelArgs.from_folder(folder)
        return cls(folder, args, _index_tensors(folder))

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            files = sorted({str(i.file.name) for i in self.tensors.values()})
            raise MissingTensorError(
                f"tensor {name!r} is missing from the checkpoint in {self.folder} "
                f"(looked in {', '.join(files)})"
            ) from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def expect_shape(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        """The tensor's info, after checking it exists and has the shape config.json implies."""
        info = self.info(name)
        if info.shape != tuple(shape):
            raise TensorShapeError(
                f"tensor {name!r} in {info.file} has shape {list(info.shape)}, expected "
                f"{list(shape)} from config.json"
            )
        return info

    @contextmanager
    def reader(self) -> Iterator[CheckpointReader]:
        reader = CheckpointReader(self)
        try:
            yield reader
        finally:
            reader.close()


class CheckpointReader:
    """Reads tensors one by one, keeping each safetensors file open while in use."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._handles: dict[Path, object] = {}
        self.read_log: list[tuple[str, int | None]] = []

    def _handle(self, path: Path):
        from safetensors import safe_open

        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CorruptCheckpointError(f"corrupt safetensors file {path}: {exc}") from exc
            self._handles[path] = handle
        return handle

    def read(
        self,
        name: str,
        expected_shape: tuple[int, ...] | None = None,
        index: int | None = None,
    ) -> torch.Tensor:
        """One tensor, or `tensor[index]` (one slice of the first dimension) when index is given."""
        if expected_shape is None:
            info = self.checkpoint.info(name)
        else:
            info = self.checkpoint.expect_shape(name, expected_shape)
        if info.dtype not in FLOAT_DTYPES:  # e.g. int8 codes of a quantized checkpoint
            raise CheckpointError(
                f"{info.file}: tensor {name!r} is stored as {info.dtype}, not as floating point "
                "weights (quantized checkpoints are not supported)"
            )
        handle = self._handle(info.file)
        try:
            tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as exc:
            raise CorruptCheckpointError(
                f"corrupt safetensors file {info.file}: cannot read tensor {name!r}: {exc}"
            ) from exc
        self.read_log.append((name, index))
        return tensor

    def close(self) -> None:
        self._handles.clear()


def _plain_file_name(name: str) -> bool:
    """A file of the checkpoint's own folder: no folder part, not "." or ".."."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _index_tensors(folder: Path) -> dict[str, TensorInfo]:
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
            for name, file_name in weight_map.items():
                if not isinstance(file_name, str) or not _plain_file_name(file_name):
                    raise ValueError(f"{name!r} maps to {file_name!r:.80}, not a file name")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptCheckpointError(
                f"corrupt shard index {index_path}: {exc!r} (expected a JSON object with a "
                f"'weight_map' of tensor name -> file)"
            ) from exc
        files = sorted(set(weight_map.values()))
        headers: dict[str, dict[str, TensorInfo]] = {}
        for file_name in files:
            path = folder / file_name
            if not path.is_file():
                raise CheckpointError(
                    f"{index_path} lists shard {file_name!r}, which is missing from {folder}"
                )
            headers[file_name] = read_safetensors_header(path)
        tensors: dict[str, TensorInfo] = {}
        for name, file_name in weight_map.items():
            info = headers[file_name].get(name)
            if info is None:
                raise MissingTensorError(
                    f"{index_path} maps tensor {name!r} to {file_name}, but that file does not "
                    f"contain it"
                )
            tensors[name] = info
        return tensors
    single = folder / SINGLE_FILE
    candidates = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    shards = [p for p in candidates if not p.name.startswith("consolidated")]
    candidates = shards or candidates  # (Mistral's own format's copy beside the shards)
    if not candidates:
        raise CheckpointError(
            f"{folder}: no model.safetensors, no {INDEX_FILE} and no *.safetensors files "
            f"(only safetensors checkpoints are supported)"
        )
    tensors = {}
    for path in candidates:
        tensors.update(read_safetensors_header(path))
    return tensors
