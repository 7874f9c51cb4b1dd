"""Expert rankings of a MoE checkpoint: which experts its routers use, measured once and shared.

What is measured, per MoE layer and routed expert, over a fixed set of calibration prompts run
through the model's own routers (`engine.expert_usage`):
- gate mass: the router probability (softmax over all experts, before top-k) the expert receives,
  summed over tokens and normalized to sum 1 over the layer's experts. It says how much the model
  leans on the expert, including near misses that top-k cut off; placement keeps the hottest
  experts where they are cheapest to reach (the host itself, then the fastest peers).
- selection: the fraction of tokens whose top-k included the expert (a row sums to k). It says how
  often a request would have to reach the expert's holder.
- co-selection: `coselection[l][a][b]`, the fraction of tokens of layer l that chose both a and b
  (symmetric, zero diagonal). Experts often chosen together are best held by one peer: a token
  then costs one remote call for that layer instead of two.

Two runs: "full" (64 prompts, up to 128 tokens each) and "micro" (4 prompts, up to 16 tokens): the
micro run is cheap enough for any node to do at once; the full run replaces it when done.
`agreement(micro, full)` says how well the micro run predicts the full one (Spearman rank
correlation of gate mass, and how many of the top quarter of experts both runs agree on).

Calibration prompts are shipped, never downloaded, and are a pure function of the checkpoint's
fingerprint and the run's size, so two peers measuring the same checkpoint get the same numbers
(up to floating point differences between devices). The built-in model gets prompts from the
skills it was trained on (`engine.builtin_skills`: training-style and held-out, alternating, one
skill after another); any other model gets `calibration_prompts.txt` (English, code, math, a few
other languages), rendered with the tokenizer's chat template when it has one (the last tokens are
kept when a prompt is longer than the run allows, so a long default system prompt does not crowd
out the prompt itself).

Results carry `checkpoint_fingerprint(folder)`: a digest of config.json, the tokenizer's files
(`TOKENIZER_FILES` present: they decide the calibration tokens), every safetensors file's size
and header (tensor names, dtypes, shapes, offsets) and a sample of its data bytes (64 blocks of
4 KiB spread over the file), read without loading the weights. A copy of a checkpoint in another
folder has the same fingerprint; a changed config, tokenizer or chat template or tensor layout,
or retrained weights, change it (a change confined to bytes that no sample block covers would
not). Rankings are cached
under `<cache>/rankings/<fingerprint>-<kind>.msgpack`, where `<cache>` is `$MESH_NODE_CACHE`, else
`$XDG_CACHE_HOME/mesh-node`, else `~/.cache/mesh-node`; they travel between peers as
`ExpertRankings.to_bytes()` (canonical msgpack), and `from_bytes` rejects anything malformed with
`RankingsError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger(__name__)

KINDS: dict[str, tuple[int, int]] = {"full": (64, 128), "micro": (4, 16)}  # prompts, max tokens
FORMAT_VERSION = 1
MAX_ENCODED_BYTES = 256 * 1024 * 1024
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_MATRIX_ENTRIES = 64 * 1024 * 1024  # layers * experts * experts
SUM_TOLERANCE = 1e-6
CALIBRATION_FILE = Path(__file__).resolve().parent / "calibration_prompts.txt"
BUILTIN_PROMPT_SEED = 20240606
TOKENIZER_FILES = (  # in the fingerprint when present
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 4096


class RankingsError(ValueError):
    """Encoded rankings are malformed: wrong type, shape or range of a field, or not msgpack."""


class NoExpertsError(ValueError):
    """The model has no MoE layers, so there is nothing to rank."""


# -- checkpoint identity -------------------------------------------------------------------------


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """A hex sha256 of a checkpoint folder's identity (see the module docstring); reads config.json,
    the safetensors headers and a few sampled blocks, never all the weights."""
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    digest = hashlib.sha256(b"mesh-node checkpoint fingerprint v2\0")
    _update(digest, config.read_bytes())
    for name in TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            _update(digest, name.encode())
            _update(digest, file.read_bytes())
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    for file in files:
        _update(digest, file.name.encode())
        size = file.stat().st_size
        digest.update(struct.pack("<Q", size))
        with file.open("rb") as handle:
            prefix = handle.read(8)
            header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            header_len = min(header_len, max(size - 8, 0))
            header = handle.read(header_len)
            _update(digest, _canonical_header(header))
            data_start = 8 + header_len
            data_size = size - data_start
            for block in range(SAMPLE_BLOCKS if data_size > 0 else 0):
                handle.seek(data_start + data_size * block // SAMPLE_BLOCKS)
                _update(digest, handle.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def _update(digest, data: bytes) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def _canonical_header(raw: bytes) -> bytes:
    """The header's tensors (name, dtype, shape, offsets) in a fixed order; the raw bytes if the
    header is not JSON (a corrupt file still gets a fingerprint; loading it will fail anyway)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw
    if not isinstance(header, dict):
        return raw
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return json.dumps(tensors, sort_keys=True, separators=(",", ":")).encode()


# -- the rankings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertRankings:
    fingerprint: str  # checkpoint_fingerprint of the model measured
    kind: str  # "full" | "micro"
    layers: tuple[int, ...]  # MoE layer indices, the rows of the tables below
    num_experts: int
    gate_mass: tuple[tuple[float, ...], ...]  # per layer, sums to 1 over experts
    selection: tuple[tuple[float, ...], ...]  # per layer, fraction of tokens choosing the expert
    coselection: tuple[tuple[tuple[float, ...], ...], ...]  # per layer [E][E], by tokens
    tokens: int
    prompts: int

    @classmethod
    def from_usage(cls, usage, fingerprint: str, kind: str, prompts: int) -> ExpertRankings:
        """From an `engine.expert_usage.ExpertUsage`: normalizes the sums and counts."""
        if usage.tokens <= 0:
            raise ValueError("no tokens were measured")
        tokens = usage.tokens
        gate_mass = []
        for layer, row in zip(usage.layers, usage.gate_mass.tolist(), strict=True):
            total = math.fsum(row)
            if not (math.isfinite(total) and total > 0 and all(math.isfinite(v) for v in row)):
                raise RankingsError(
                    f"the router's gate weights in layer {layer} are not finite numbers (did "
                    "it overflow? try another dtype, e.g. bfloat16 or float32)"
                )
            gate_mass.append(tuple(float(v) / total for v in row))
        selection = tuple(tuple(c / tokens for c in row) for row in usage.selected.tolist())
        coselection = tuple(
            tuple(tuple(c / tokens for c in row) for row in matrix)
            for matrix in usage.coselected.tolist()
        )
        rankings = cls(
            fingerprint=fingerprint,
            kind=kind,
            layers=tuple(int(layer) for layer in usage.layers),
            num_experts=usage.num_experts,
            gate_mass=tuple(gate_mass),
            selection=selection,
            coselection=coselection,
            tokens=tokens,
            prompts=prompts,
        )
        return _from_fields(rankings._fields())  # checked as a peer's or the cache's would be

    def ranking(self, layer: int) -> list[int]:
        """Experts of MoE layer `layer`, hottest first: by gate mass, ties by selection, then id."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not one of the measured MoE layers {self.layers}")
        row = self.layers.index(layer)
        mass, chosen = self.gate_mass[row], self.selection[row]
        return sorted(range(self.num_experts), key=lambda e: (-mass[e], -chosen[e], e))

    def _fields(self) -> dict[str, Any]:
        return {
            "coselection": [[list(r) for r in m] for m in self.coselection],
            "fingerprint": self.fingerprint,
            "gate_mass": [list(r) for r in self.gate_mass],
            "kind": self.kind,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "prompts": self.prompts,
            "selection": [list(r) for r in self.selection],
            "tokens": self.tokens,
            "v": FORMAT_VERSION,
        }

    def to_bytes(self) -> bytes:
        """Canonical msgpack: the same rankings always encode to the same bytes."""
        return msgpack.packb(self._fields(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> ExpertRankings:
        """Decodes and checks `to_bytes` output; anything malformed raises `RankingsError`.
        Unknown fields are ignored (a newer peer may add some)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise RankingsError(f"expected bytes, got {type(data).__name__}")
        if len(data) > MAX_ENCODED_BYTES:
            raise RankingsError(f"encoded rankings of {len(data)} bytes exceed the limit")
        try:
            fields = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several types for bad input
            raise RankingsError(f"not a msgpack document: {type(exc).__name__}: {exc}") from None
        return _from_fields(fields)

    def digest(self) -> str:
        return document_digest(self.to_bytes())

    def to_dict(self) -> dict[str, Any]:
        """For JSON output: every field, plus `digest` and each layer's `ranking`."""
        fields = self._fields()
        del fields["v"]
        fields["digest"] = self.digest()
        fields["rankings"] = {str(layer): self.ranking(layer) for layer in self.layers}
        return fields


def document_digest(data: bytes) -> str:
    """The digest of an encoded rankings document (of `to_bytes`: its canonical encoding)."""
    return hashlib.sha256(data).hexdigest()[:16]


def _fail(message: str) -> RankingsError:
    return RankingsError(f"malformed expert rankings: {message}")


def _int(fields: dict, name: str, low: int, high: int) -> int:
    value = fields.get(name)
    if type(value) is not int or not low <= value <= high:
        raise _fail(f"{name} must be an integer in [{low}, {high}], got {value!r:.80}")
    return value


def _float_row(value: Any, length: int, name: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise _fail(f"{name} must be a list of {length} numbers")
    row = []
    for v in value:
        if type(v) not in (int, float) or not 0.0 <= v <= 1.0:  # also rejects nan
            raise _fail(f"{name} holds {v!r:.80}, not a number in [0, 1]")
        row.append(float(v))
    return tuple(row)


def _table(value: Any, rows: int, columns: int, name: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, list) or len(value) != rows:
        raise _fail(f"{name} must be a list of {rows} rows")
    return tuple(_float_row(row, columns, f"{name}[{i}]") for i, row in enumerate(value))


def _from_fields(fields: Any) -> ExpertRankings:
    if not isinstance(fields, dict):
        raise _fail("the document is not a map")
    if fields.get("v") != FORMAT_VERSION:
        raise _fail(f"unknown format version {fields.get('v')!r:.40}")
    fingerprint, kind, layers = fields.get("fingerprint"), fields.get("kind"), fields.get("layers")
    if not isinstance(fingerprint, str):
        raise _fail("fingerprint must be a string")
    if not isinstance(kind, str):
        raise _fail("kind must be a string")
    if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
        raise _fail(f"layers must be a list of 1 to {MAX_LAYERS} indices")  # (before the tables)
    if not all(type(layer) is int for layer in layers):
        raise _fail("layers must be a list of integers")
    num_experts = _int(fields, "num_experts", 1, MAX_EXPERTS)
    if len(layers) * num_experts * num_experts > MAX_MATRIX_ENTRIES:
        raise _fail(f"{len(layers)} layers of {num_experts} experts exceed the size limit")
    n = len(layers)
    coselection = fields.get("coselection")
    if not isinstance(coselection, list) or len(coselection) != n:
        raise _fail(f"coselection must be a list of {n} matrices")
    rankings = ExpertRankings(
        fingerprint=fingerprint,
        kind=kind,
        layers=tuple(layers),
        num_experts=num_experts,
        gate_mass=_table(fields.get("gate_mass"), n, num_experts, "gate_mass"),
        selection=_table(fields.get("selection"), n, num_experts, "selection"),
        coselection=tuple(
            _table(m, num_experts, num_experts, f"coselection[{i}]")
            for i, m in enumerate(coselection)
        ),
        tokens=_int(fields, "tokens", 1, 2**62),
        prompts=_int(fields, "prompts", 1, 2**62),
    )
    _validate(rankings)
    return rankings


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _validate(r: ExpertRankings) -> None:
    """Checks what types alone do not: identifiers, layer order, sums and symmetry."""
    if not (len(r.fingerprint) <= 128 and _is_hex(r.fingerprint)):
        raise _fail("fingerprint must be 1 to 128 lowercase hex digits")
    if r.kind not in KINDS:
        raise _fail(f"kind must be one of {sorted(KINDS)}, got {r.kind!r:.40}")
    if not 0 < len(r.layers) <= MAX_LAYERS or r.layers[0] < 0:
        raise _fail(f"layers must be 1 to {MAX_LAYERS} non-negative indices")
    if any(a >= b for a, b in zip(r.layers, r.layers[1:], strict=False)):
        raise _fail("layers must be strictly increasing")
    if r.prompts > r.tokens:
        raise _fail("more prompts than tokens")
    for i, layer in enumerate(r.layers):
        if abs(math.fsum(r.gate_mass[i]) - 1.0) > SUM_TOLERANCE:
            raise _fail(f"gate mass of layer {layer} does not sum to 1")
        matrix = r.coselection[i]
        for a in range(r.num_experts):
            if matrix[a][a] != 0.0:
                raise _fail(f"coselection of layer {layer} has a non-zero diagonal")
            for b in range(a):
                if matrix[a][b] != matrix[b][a]:
                    raise _fail(f"coselection of layer {layer} is not symmetric")


# -- rank agreement ------------------------------------------------------------------------------


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank): Pearson correlation of the ranks.
    1.0 when both sequences are constant, 0.0 when only one is (no order to agree with)."""
    if len(a) != len(b):
        raise ValueError(f"sequences of different lengths: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("spearman of empty sequences")
    ra, rb = _average_ranks(a), _average_ranks(b)
    mean = (len(a) + 1) / 2
    da = [r - mean for r in ra]
    db = [r - mean for r in rb]
    va, vb = math.fsum(x * x for x in da), math.fsum(y * y for y in db)
    if va == 0 or vb == 0:
        return 1.0 if va == vb else 0.0
    return math.fsum(x * y for x, y in zip(da, db, strict=True)) / math.sqrt(va * vb)


def agreement(micro: ExpertRankings, full: ExpertRankings) -> dict[str, Any]:
    """How well one run predicts another: per-layer Spearman of gate mass, its mean, and the mean
    share of each layer's top quarter of experts (at least one) that both runs put there."""
    if micro.layers != full.layers or micro.num_experts != full.num_experts:
        raise ValueError("the rankings cover different layers or expert counts")
    if micro.fingerprint != full.fingerprint:
        log.warning("comparing rankings of two different checkpoints")
    quarter = max(1, micro.num_experts // 4)
    per_layer = []
    overlaps = []
    for i, layer in enumerate(micro.layers):
        per_layer.append(spearman(micro.gate_mass[i], full.gate_mass[i]))
        top_micro = set(micro.ranking(layer)[:quarter])
        top_full = set(full.ranking(layer)[:quarter])
        overlaps.append(len(top_micro & top_full) / quarter)
    return {
        "spearman": math.fsum(per_layer) / len(per_layer),
        "spearman_per_layer": per_layer,
        "top_quarter_overlap": math.fsum(overlaps) / len(overlaps),
        "top_quarter": quarter,
        "layers": len(per_layer),
    }


# -- calibration prompts -------------------------------------------------------------------------


def shipped_prompts() -> list[str]:
    """The prompts in `calibration_prompts.txt`, in order."""
    lines = CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    prompts, current = [], []
    for line in [*lines, "---"]:
        if line == "---":
            text = "\n".join(current).strip()
            if text:
                prompts.append(text)
            current = []
        else:
            current.append(line)
    return prompts


def builtin_conversations(count: int) -> list[list[dict[str, str]]]:
    """`count` chats (question and answer) from the built-in model's skills: skill after skill,
    training-style and held-out prompts alternating, deterministic."""
    from mesh_node.engine import builtin_skills

    rng = random.Random(BUILTIN_PROMPT_SEED)
    skills = list(builtin_skills.SKILLS)
    chats = []
    for i in range(count):
        held_out = (i // len(skills)) % 2 == 1
        example = builtin_skills.sample(skills[i % len(skills)], rng, held_out=held_out)
        chats.append(
            [
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.answer},
            ]
        )
    return chats


def calibration_sequences(
    folder: Path, fingerprint: str, prompts: int, max_tokens: int
) -> list[list[int]]:
    """Token ids of the calibration prompts for the checkpoint in `folder` (module docstring)."""
    from mesh_node.engine.catalog import BUILTIN_DIR
    from mesh_node.engine.tokenizer import Tokenizer

    if prompts < 1 or max_tokens < 1:
        raise ValueError("a calibration run needs at least one prompt of at least one token")
    tokenizer = Tokenizer(folder)
    if fingerprint == checkpoint_fingerprint(BUILTIN_DIR):
        rendered = [
            tokenizer.apply_chat_template(chat, add_generation_prompt=False)
            for chat in builtin_conversations(prompts)
        ]
    else:
        rendered = [_render(tokenizer, text) for text in shipped_prompts()[:prompts]]
    return [ids[-max_tokens:] for ids in rendered if ids]


def _render(tokenizer, text: str) -> list[int]:
    if tokenizer.has_chat_template:
        try:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}])
        except Exception as exc:  # templates can reject a lone user message; plain text then
            log.debug("chat template failed (%s); encoding the prompt as plain text", exc)
    return tokenizer.encode(text)


# -- measuring -----------------------------------------------------------------------------------


def _folder(model) -> Path:
    from mesh_node.engine.catalog import ResolvedModel, resolve_model

    if isinstance(model, ResolvedModel):
        return model.path
    if isinstance(model, Path):
        return model
    return resolve_model(model, allow_download=False).path


def analyze(
    model,
    kind: str = "micro",
    device: str = "cpu",
    dtype: str | None = None,
    *,
    prompts: int | None = None,
    max_tokens: int | None = None,
    by_layer: bool = False,
) -> ExpertRankings:
    """Measures a model's expert rankings. `model`: a `ResolvedModel`, a folder `Path`, or a
    `--model` string ("builtin", a folder, a cached repo id; never downloads). `prompts` and
    `max_tokens` default to the kind's (`KINDS`). `by_layer` loads one layer at a time (for a
    model larger than memory; slower)."""
    from mesh_node.engine.checkpoint import Checkpoint
    from mesh_node.engine.expert_usage import measure_expert_usage, measure_expert_usage_by_layer
    from mesh_node.engine.loading import load_model

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {sorted(KINDS)}")
    default_prompts, default_tokens = KINDS[kind]
    folder = _folder(model)
    checkpoint = Checkpoint.open(folder)
    args = checkpoint.args
    if args.moe is None or not any(args.is_sparse_layer(i) for i in range(args.num_layers)):
        raise NoExpertsError(f"{folder} holds a dense model ({args.architecture}): no experts")
    fingerprint = checkpoint_fingerprint(folder)
    sequences = calibration_sequences(
        folder, fingerprint, prompts or default_prompts, max_tokens or default_tokens
    )
    started = time.perf_counter()
    if by_layer:
        usage = measure_expert_usage_by_layer(checkpoint, sequences, dtype=dtype, device=device)
    else:
        longest = max(len(s) for s in sequences)
        loaded = load_model(checkpoint, dtype=dtype, device=device, max_seq_len=longest)
        usage = measure_expert_usage(loaded, sequences)
    log.info(
        "measured %s expert rankings of %s: %d prompts, %d tokens, %.2f s",
        kind,
        folder,
        len(sequences),
        usage.tokens,
        time.perf_counter() - started,
    )
    return ExpertRankings.from_usage(usage, fingerprint, kind, len(sequences))


# -- the cache -----------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$MESH_NODE_CACHE`, else `$XDG_CACHE_HOME/mesh-node`, else `~/.cache/mesh-node`."""
    override = os.environ.get("MESH_NODE_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mesh-node"


def cache_path(fingerprint: str, kind: str, cache_dir: Path | None = None) -> Path:
    if kind not in KINDS or not _is_hex(fingerprint):
        raise ValueError(f"bad rankings cache key {fingerprint!r:.80}/{kind!r:.20}")
    return (cache_dir or cache_root() / "rankings") / f"{fingerprint}-{kind}.msgpack"


def save_or_warn(rankings: ExpertRankings, cache_dir: Path | None = None) -> None:
    """`save`, but a cache that cannot be written only costs a warning: the measurement
    stands all the same (and is made again next time)."""
    try:
        save(rankings, cache_dir)
    except OSError as exc:
        log.warning("could not cache the expert rankings of %s: %s", rankings.fingerprint, exc)


def save(rankings: ExpertRankings, cache_dir: Path | None = None) -> Path:
    """Writes the rankings to the cache atomically (temporary file, then rename)."""
    path = cache_path(rankings.fingerprint, rankings.kind, cache_dir)
    write_atomically(path, rankings.to_bytes())
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Writes a cache file so that a concurrent reader sees the old file or the whole new one
    (a temporary file beside it, then a rename); makes its folder when missing. OSError when
    the cache cannot be written (nothing is left behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_cached(
    fingerprint: str, kind: str, cache_dir: Path | None = None
) -> ExpertRankings | None:
    """The cached rankings, or None when absent or unusable (corrupt: logged, left to be
    overwritten by the next `save`)."""
    path = cache_path(fingerprint, kind, cache_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read cached expert rankings %s: %s", path, exc)
        return None
    try:
        rankings = ExpertRankings.from_bytes(data)
    except RankingsError as exc:
        log.warning("ignoring corrupt cached expert rankings %s: %s", path, exc)
        return None
    if (rankings.fingerprint, rankings.kind) != (fingerprint, kind):
        log.warning("ignoring cached expert rankings %s: they are for another model or run", path)
        return None
    return rankings


def cached_or_analyze(
    model,
    kind: str = "micro",
    device: str = "cpu",
    dtype: str | None = None,
    *,
    refresh: bool = False,
    cache_dir: Path | None = None,
    by_layer: bool = False,
) -> tuple[ExpertRankings, bool]:
    """(rankings, came from the cache): the cached rankings of the model's checkpoint if any
    (and not `refresh`), else `analyze` (see there for `by_layer`) and save."""
    folder = _folder(model)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {sorted(KINDS)}")
    if not refresh:
        cached = load_cached(checkpoint_fingerprint(folder), kind, cache_dir)
        if cached is not None:
            return cached, True
    rankings = analyze(folder, kind, device, dtype, by_layer=by_layer)
    save_or_warn(rankings, cache_dir)
    return rankings, False
