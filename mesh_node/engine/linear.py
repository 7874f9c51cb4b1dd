"""Weight matrices stored in the layout that multiplies fastest on their device and dtype.

`Weight` holds one `[out, in]` matrix; `WeightStack` holds n of the same shape (experts). Calling
them computes `x @ W.T (+ bias)`. Layouts, chosen once per (device, dtype):

- "plain": the checkpoint's `[out, in]`, `F.linear` (GPUs; CPU float16);
- "transposed": `[in, out]` contiguous, `torch.mm`; on CPU in float32 this takes the BLAS path
  that is about a quarter faster for the one-row products of decoding;
- "mkldnn": oneDNN's blocked layout (what torch's own CPU compiler uses for bfloat16 linears);
  batch-1 bfloat16 products read the weights at about 1.5x the bandwidth of `F.linear`;
- "native": the checkpoint's `[out, in]`, multiplied by our own kernels (`cpu_kernels`) up to
  `cpu_kernels.MAX_ROWS` rows (decode steps) and by `F.linear` above (prefill); CPU bfloat16
  where the kernels are available, which also lets a MoE layer run a token's experts in one call.

`nbytes` is the logical size (elements x element size) whatever the layout, which is what the
engine reports as resident weight bytes; `dense()` gives the `[out, in]` matrix back.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mesh_node.engine import cpu_kernels


@functools.cache
def _mkldnn_works(dtype: torch.dtype) -> bool:
    """Probes oneDNN's packed linear once: available in this build and exact on a small case."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight = torch.arange(96, dtype=torch.float32).reshape(8, 12).div(50).to(dtype)
        x = torch.linspace(-1, 1, 24).reshape(2, 12).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got.float(), F.linear(x, weight).float(), atol=1e-2))
    except Exception:  # an op missing from this build, or failing on this CPU
        return False


def choose_layout(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cpu":
        return "plain"
    if dtype == torch.float32:
        return "transposed"
    if dtype == torch.bfloat16 and cpu_kernels.available():
        return "native"
    if dtype == torch.bfloat16 and _mkldnn_works(dtype):
        return "mkldnn"
    return "plain"


class Weight:
    """One `[out, in]` weight matrix (and optional bias) in a chosen layout."""

    def __init__(self, dense: torch.Tensor, layout: str, bias: torch.Tensor | None = None):
        self.shape = tuple(dense.shape)
        self.dtype = dense.dtype
        self.layout = layout
        self.bias = bias
        self.nbytes = dense.numel() * dense.element_size() + (
            0 if bias is None else bias.numel() * bias.element_size()
        )
        if layout == "transposed":
            self.data = dense.t().contiguous()
        elif layout == "mkldnn":
            self.data = torch.ops.mkldnn._reorder_linear_weight(dense, 1)
        elif layout == "native":
            self.data = dense.contiguous()
            if bias is not None:
                self.bias = bias.to(dense.dtype).contiguous()  # the kernel reads it raw
        else:
            self.data = dense

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "transposed":
            if self.bias is None:
                return torch.matmul(x, self.data)
            return torch.matmul(x, self.data).add_(self.bias)
        if self.layout == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(x, self.data, self.bias, "none", [], "")
        if (
            self.layout == "native"
            and x.dtype == self.dtype
            and x.numel() <= cpu_kernels.MAX_ROWS * self.shape[1]
        ):
            return cpu_kernels.linear(x, self.data, self.bias)
        return F.linear(x, self.data, self.bias)

    def dense(self) -> torch.Tensor:
        if self.layout == "transposed":
            return self.data.t()
        if self.layout == "mkldnn":
            return self.data.to_dense()
        return self.data


class WeightStack:
    """n weight matrices of one shape `[out, in]` (a layer's experts), each used on its own."""

    def __init__(self, dense: torch.Tensor, layout: str):
        self.count, *shape = dense.shape
        self.shape = tuple(shape)
        self.dtype = dense.dtype
        self.layout = layout
        self.nbytes = dense.numel() * dense.element_size()
        if layout == "transposed":
            self.data = dense.transpose(1, 2).contiguous()
        elif layout == "mkldnn":
            self.data = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in dense]
        elif layout == "native":
            self.data = dense.contiguous()
        else:
            self.data = dense

    def apply(self, j: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W[j].T, written into `out` when given."""
        if self.layout == "transposed":
            return torch.matmul(x, self.data[j], out=out) if out is not None else x @ self.data[j]
        if self.layout == "mkldnn":
            y = torch.ops.mkldnn._linear_pointwise(x, self.data[j], None, "none", [], "")
        elif (
            self.layout == "native"
            and x.dtype == self.dtype
            and x.numel() <= cpu_kernels.MAX_ROWS * self.shape[1]
        ):
            y = cpu_kernels.linear(x, self.data[j])
        else:
            y = F.linear(x, self.data[j])
        return y if out is None else out.copy_(y)

    def dense(self, j: int) -> torch.Tensor:
        if self.layout == "transposed":
            return self.data[j].t()
        if self.layout == "mkldnn":
            return self.data[j].to_dense()
        return self.data[j]
