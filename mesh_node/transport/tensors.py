"""Tensor payloads: a dtype/shape header in the message body, the raw bytes in the frame's blob.

A `Tensor` wraps a buffer without copying it. Receiving, the data is a memoryview into the
frame's blob; sending, it is a memoryview of the caller's array or torch tensor, handed to the
QUIC stream as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mesh_node.transport.errors import ErrorCode, ProtocolError

# wire dtype name -> (itemsize, numpy dtype name or None, torch dtype attribute)
DTYPES: dict[str, tuple[int, str | None, str]] = {
    "F64": (8, "float64", "float64"),
    "F32": (4, "float32", "float32"),
    "F16": (2, "float16", "float16"),
    "BF16": (2, None, "bfloat16"),
    "I64": (8, "int64", "int64"),
    "I32": (4, "int32", "int32"),
    "I16": (2, "int16", "int16"),
    "I8": (1, "int8", "int8"),
    "U8": (1, "uint8", "uint8"),
    "BOOL": (1, "bool", "bool"),
}
MAX_RANK = 8
_NUMPY_TO_WIRE = {np_name: wire for wire, (_, np_name, _) in DTYPES.items() if np_name}
_TORCH_TO_WIRE = {torch_name: wire for wire, (_, _, torch_name) in DTYPES.items()}
_TORCH_DTYPE_TO_WIRE: dict[Any, str] = {}  # torch dtype object -> wire name, filled on use


@dataclass(frozen=True, slots=True)
class Tensor:
    """A dense, C-contiguous tensor: wire dtype name, shape, and its bytes (not copied)."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        check_spec(self.dtype, self.shape)
        needed = DTYPES[self.dtype][0] * math.prod(self.shape)
        if self.data.nbytes != needed:
            raise ValueError(
                f"tensor data has {self.data.nbytes} bytes, dtype {self.dtype} shape "
                f"{list(self.shape)} needs {needed}"
            )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes  # checked against dtype and shape on construction

    @classmethod
    def from_numpy(cls, array: Any) -> Tensor:
        import numpy as np

        wire = _NUMPY_TO_WIRE.get(array.dtype.name)
        if wire is None:
            raise ValueError(f"numpy dtype {array.dtype} has no wire dtype")
        array = np.ascontiguousarray(array)
        return cls(wire, tuple(array.shape), memoryview(array).cast("B"))

    @classmethod
    def from_torch(cls, tensor: Any) -> Tensor:
        """Wrap a CPU torch tensor (made contiguous, moved to CPU if needed)."""
        wire = _TORCH_DTYPE_TO_WIRE.get(tensor.dtype)
        if wire is None:
            wire = _TORCH_TO_WIRE.get(str(tensor.dtype).removeprefix("torch."))
            if wire is None:
                raise ValueError(f"torch dtype {tensor.dtype} has no wire dtype")
            _TORCH_DTYPE_TO_WIRE[tensor.dtype] = wire
        if tensor.requires_grad:
            tensor = tensor.detach()
        if not tensor.is_cpu:
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        shape = tuple(tensor.shape)
        if DTYPES[wire][1] is not None and tensor.numel():  # numpy has the dtype: view it
            return cls(wire, shape, memoryview(tensor.numpy()).cast("B"))
        raw = tensor.reshape(-1).view(_byte_view_dtype(tensor))
        return cls(wire, shape, memoryview(raw.numpy()).cast("B"))

    def numpy(self) -> Any:
        """A numpy array over the same bytes (no copy). BF16 has no numpy dtype: use torch()."""
        import numpy as np

        np_name = DTYPES[self.dtype][1]
        if np_name is None:
            raise ValueError(f"{self.dtype} has no numpy dtype; use Tensor.torch()")
        return np.frombuffer(self.data, dtype=np_name).reshape(self.shape)

    def torch(self) -> Any:
        """A torch tensor over the same bytes (no copy when the buffer is writable)."""
        import torch

        dtype = getattr(torch, DTYPES[self.dtype][2])
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype)
        data = self.data if not self.data.readonly else bytearray(self.data)
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape)


def _byte_view_dtype(tensor: Any) -> Any:
    import torch

    return torch.uint8 if tensor.numel() else tensor.dtype


def check_spec(dtype: Any, shape: Any) -> None:
    """Validate a dtype/shape pair from the wire; raises ValueError."""
    if type(dtype) is not str or dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if len(shape) > MAX_RANK:
        raise ValueError(f"tensor rank {len(shape)} exceeds {MAX_RANK}")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ValueError(f"tensor shape {list(shape)} must hold non-negative integers")


def tensor_from_wire(header: Any, blob: memoryview) -> Tensor:
    """Build a Tensor from its wire header {dtype, shape, offset} and the frame's blob."""
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "tensor header must be a map")
    dtype, shape, offset = header.get("dtype"), header.get("shape"), header.get("offset")
    if not isinstance(shape, list) or type(offset) is not int:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "tensor header needs dtype, shape (array), offset (int)"
        )
    try:
        check_spec(dtype, shape)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, str(exc)) from None
    nbytes = DTYPES[dtype][0] * math.prod(shape)
    if offset < 0 or offset + nbytes > len(blob):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"tensor bytes [{offset}, {offset + nbytes}) fall outside the {len(blob)}-byte blob",
        )
    return Tensor(dtype, tuple(shape), blob[offset : offset + nbytes])
