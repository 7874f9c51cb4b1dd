"""Native bfloat16 kernels for decoding on CPU: `linear` for up to MAX_ROWS rows, `moe_token` for
one token's routed experts. Source: `cpu_kernels.c` beside this file.

Why: a decode step multiplies one row (or a few) by every active weight matrix, so it is bound by
how fast weights stream from memory. torch's fastest bf16 path for that here (oneDNN's packed
linear) has about 11 us of fixed cost per call, and a MoE layer of a model like OLMoE makes 16 such
calls per token plus a dozen small ops to split, activate and combine them. These kernels read the
checkpoint's row-major weights with the CPU's bf16 dot-product instructions (AVX512-BF16), split
the output rows over torch's OpenMP threads, and do a token's k experts (gate/up, silu, down,
weighted sum) in one call. The math is the torch ops' math (float32 sums rounded to bf16 where
torch rounds); only the order of the summation differs. Results do not depend on the thread count.

Where they are used: `linear.choose_layout` picks the "native" layout for bfloat16 on CPU when
`available()`; then `Weight`/`WeightStack` call `linear` for at most MAX_ROWS rows (decode steps,
small prefill groups of experts) and `F.linear` above; `MoELayer` runs a single token through
`moe_token` when its `ExpertBank` holds every expert, and `ExpertBank.run_weighted` (expert
parallelism: a peer's answer, the host's own experts) runs one token's experts of a bank holding
some of a layer's experts through it too, keeping the float32 sum (`float_sum`).

Building: nothing happens at import. The first `available()` call (loading a bf16 CPU model)
compiles the source with the system C compiler (`$CC` when set, and then only it; else `cc`, else
`gcc`) with FLAGS into `$XDG_CACHE_HOME/mesh-node/kernels` (default `~/.cache`; if that is not
writable, a per-user folder under the temp dir), named by a hash of the source, compiler, flags and
the CPU's flags. A folder or library another user owns or may write to is never used: loading a
library runs its code in this process. Each process compiles into its own temporary file and
renames it into place, so processes starting together (three test nodes) never load a partial
library; later processes just load it. The library links `libgomp.so.1`, which resolves to the
OpenMP runtime torch already loaded, so both share one thread pool; each call uses
`torch.get_num_threads()` threads.

Fallbacks: `available()` is False, and the engine keeps torch's kernels (oneDNN's packed "mkldnn"
layout, else "plain"; results identical to running with the kernels disabled) when
`MESH_NODE_NATIVE_KERNELS=0`, the platform is not x86-64 Linux, the CPU lacks AVX512-BF16 (all
silent), there is no compiler, compiling or loading fails, or the kernels disagree with torch on a
probe with uneven shapes (each of these logs one warning per process).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 64  # more rows than this: torch's matrix-matrix kernels are the better choice

_pointer, _long, _int = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type), as in cpu_kernels.c
    "mesh_kernels_available": ([], _int),
    "mesh_linear_bf16": ([_pointer, _long, _long, _pointer, _long, _pointer, _pointer, _int], None),
    "mesh_moe_token_bf16": (
        [_pointer, _long, _long, _long, *[_pointer] * 7, _int],
        None,
    ),
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mesh-node" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """The CPU has the AVX512-BF16 dot-product instructions the kernels are written for."""
    return "avx512_bf16" in _cpu_flags().split()


def _compiler() -> str | None:
    """`$CC` when set (and only it), else `cc`, else `gcc`; None when it is not found."""
    chosen = os.environ.get("CC")
    if chosen:
        words = shlex.split(chosen)
        return shutil.which(words[0]) if words else None
    return shutil.which("cc") or shutil.which("gcc")


def _owned(path: Path, kind: Callable[[int], bool]) -> bool:
    """`path` exists as `kind` (not a link), owned by this user, writable by nobody else;
    OSError when it exists otherwise (someone else could have put or changed what is there)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if not kind(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(
            f"{path} is not a {'folder' if kind is stat.S_ISDIR else 'file'} of this user's "
            "that only this user can write: not used"
        )
    return True


def _own_folder(folder: Path) -> None:
    """Make `folder` (mode 0700) unless it is there; OSError unless it is this user's, since a
    library loaded from it runs in this process. A folder of this user's that others may write
    to (a group-writable umask) loses those write bits first: nobody else can then swap a
    library in between its check and its loading."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = folder.lstat()
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o022:
        os.chmod(folder, stat.S_IMODE(info.st_mode) & ~0o022)
    _owned(folder, stat.S_ISDIR)


def _library_name(compiler: str) -> str:
    """Named by a hash of the source, compiler, flags and CPU: a change to any builds anew."""
    key = hashlib.sha256(
        b"\0".join(
            [
                SOURCE.read_bytes(),
                compiler.encode(),
                " ".join(FLAGS).encode(),
                _cpu_flags().encode(),
            ]
        )
    ).hexdigest()[:16]
    return f"cpu_kernels-{key}.so"


def _build(compiler: str) -> Path:
    """The compiled library for this source, compiler, flags and CPU, built on first use.

    Each builder compiles into its own temporary file and renames it into place (atomic), so
    processes starting together may all compile, but every one loads a complete library."""
    errors = []
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"mesh-node-kernels-{os.getuid()}"):
        library = folder / _library_name(compiler)
        try:
            _own_folder(folder)
            if _owned(library, stat.S_ISREG):
                return library
            handle, partial = tempfile.mkstemp(prefix=f".{library.name}.", dir=folder)
            os.close(handle)
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
            continue
        try:
            command = [compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.chmod(partial, 0o700)  # whatever the umask: see _owned
            os.replace(partial, library)  # atomic: readers see no file or a complete one
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return library
    raise OSError("no writable folder for the compiled kernels (" + "; ".join(errors) + ")")


def enabled() -> bool:
    """False when `MESH_NODE_NATIVE_KERNELS=0` (or off/false/no)."""
    value = os.environ.get("MESH_NODE_NATIVE_KERNELS", "1").strip().lower()
    return value not in ("0", "off", "false", "no")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not enabled():
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not cpu_supports_bf16():
        return None  # nothing to gain: torch's kernels are the ones to use here
    compiler = _compiler()
    if compiler is None:
        log.warning(
            "no C compiler (%s): bf16 CPU decoding uses torch's kernels",
            os.environ.get("CC") or "cc/gcc",
        )
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
        for name, (arguments, result) in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, result
        if not library.mesh_kernels_available():
            return None  # compiled without the bf16 dot-product instructions
        return library
    except Exception as exc:  # compiler error, timeout, unloadable library: torch's kernels
        log.warning("native CPU kernels unavailable (%s): bf16 decoding uses torch's kernels", exc)
        return None


@functools.cache
def available() -> bool:
    """Kernels enabled, built, loaded and matching torch on probes with uneven shapes. Builds the
    library on the first call (never at import)."""
    if _library() is None:
        return False
    try:
        ok = _probe()
    except Exception as exc:
        log.warning("native CPU kernels failed their probe (%s): not used", exc)
        return False
    if not ok:
        log.warning("native CPU kernels disagree with torch on this machine: not used")
    return ok


def _probe() -> bool:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    # linear: one bf16 rounding of float32 sums, so within a bf16 ulp of the exact values
    x, weight, bias = randn(3, 70), randn(37, 70), randn(37)
    exact = F.linear(x.float(), weight.float(), bias.float())
    if not torch.allclose(linear(x, weight, bias).float(), exact, rtol=2**-7, atol=1e-3):
        return False
    # one token's experts against the bf16 torch ops they replace (roundings in the same places)
    hidden, inter, count = 40, 24, 5
    x = randn(1, hidden)
    gate_up, down = randn(count, 2 * inter, hidden), randn(count, hidden, inter)
    experts, weights = torch.tensor([3, 0, 4]), torch.rand(3, generator=generator)
    outputs = []
    for e in experts.tolist():
        g, u = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(g) * u, down[e]))
    exact = torch.mm(weights[None], torch.cat(outputs).float())
    error = (moe_token(x, gate_up, down, experts, weights).float() - exact).abs().max()
    summed = moe_token(x, gate_up, down, experts, weights, float_sum=True)
    float_error = (summed - exact).abs().max()  # no final rounding: closer still
    bound = 2**-6 * exact.abs().max()
    return bool(error <= bound and summed.dtype == torch.float32 and float_error <= bound)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x [..., n] @ weight[out, n].T (+ bias) for at most MAX_ROWS rows, all bfloat16."""
    out_features, n = weight.shape
    x = x.contiguous()
    y = x.new_empty((*x.shape[:-1], out_features))
    _library().mesh_linear_bf16(
        x.data_ptr(),
        x.numel() // n,
        n,
        weight.data_ptr(),
        out_features,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


def moe_token(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    *,
    float_sum: bool = False,
) -> torch.Tensor:
    """One token's routed experts, weighted and summed: x [1, H] bf16; gate_up [E, 2I, H] and
    down [E, H, I] contiguous bf16 stacks; experts [k] int64 (indices into the stacks);
    weights [k] float32 (gate weights as the layer multiplies them) -> [1, H] bf16, or the
    float32 sum itself with `float_sum` (a part of a token's experts, added to the rest later)."""
    _, hidden, inter = down.shape
    k = experts.numel()
    x = x.contiguous()
    experts = experts.contiguous()
    weights = weights.contiguous()
    scratch = x.new_empty(k * inter)
    out = torch.empty((1, hidden), dtype=torch.float32 if float_sum else x.dtype)
    bf16_out, float_out = (None, out.data_ptr()) if float_sum else (out.data_ptr(), None)
    _library().mesh_moe_token_bf16(
        x.data_ptr(),
        hidden,
        inter,
        k,
        gate_up.data_ptr(),
        down.data_ptr(),
        experts.data_ptr(),
        weights.data_ptr(),
        scratch.data_ptr(),
        bf16_out,
        float_out,
        torch.get_num_threads(),
    )
    return out
