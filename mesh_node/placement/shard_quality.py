"""What independent-shard mode costs in answer quality, measured, for the user who opts in.

    quality = shard_quality_summary(None, num_shards=3)   # the built-in model; cached after once
    log.info(quality.describe())
    # independent-shard mode: 3 shards, exact-match 60.5% vs 98.5% full (perplexity 1.91 vs 1.01)

The measurement (`measure_shard_quality`): rank each layer's experts by gate mass (a shard node
passes the gate mass of the rankings it splits by, so the split measured is the one it loads;
else over calibration prompts: training-split chat turns, `measure_expert_usage`), split them
with `plan_shards`, load each shard as a node would (`LoadPlan(experts=plan.experts(s),
restrict_router=True)`), and score it with `mesh_node.engine.evaluation` on held-out prompts:
each shard on every prompt, and "routed": each prompt on the shard `shard_for_session` gives it
(the prompt text is the session key), which is what users of the mesh get and the headline figure.

Unlike the rest of placement this module runs the model (seconds for the built-in model on CPU,
one load and evaluation per shard), so `shard_quality_summary` keeps results in
`$XDG_CACHE_HOME/mesh-node/shard-quality/<key>.json` (default `~/.cache/...`), keyed by the model
files (names, sizes, modification times) and every parameter of the measurement (a gate mass
given included). The prompts are the built-in model's skills, so exact match is meaningful for
models trained on them; for other models pass prompts with exact answers (`examples`) to
`measure_shard_quality`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mesh_node.engine import builtin_skills
from mesh_node.engine.builtin_skills import Example
from mesh_node.engine.checkpoint import Checkpoint
from mesh_node.engine.evaluation import (
    DEFAULT_PER_SKILL,
    Quality,
    QualityReport,
    calibration_sequences,
    compute_threads,
    evaluate_quality,
    summarize,
)
from mesh_node.engine.expert_usage import measure_expert_usage
from mesh_node.engine.loading import LoadPlan, load_model, resolve_dtype
from mesh_node.engine.tokenizer import Tokenizer
from mesh_node.placement.rankings import cache_root, write_atomically
from mesh_node.placement.shards import ShardPlan, plan_shards, shard_for_session

log = logging.getLogger(__name__)

MEASUREMENT_VERSION = 1  # bump when what is measured changes: old cache entries are then unused
CALIBRATION_PROMPTS = 200


@dataclass(frozen=True)
class ShardQuality:
    model: str
    num_shards: int
    assignment: str
    core_fraction: float
    full: Quality  # the whole model
    routed: Quality  # each prompt on its rendezvous-hashed shard: what users get
    per_shard: tuple[Quality, ...]  # each shard on every prompt
    plan_fingerprint: str
    seconds: float  # how long the measurement took

    @property
    def shard_mean(self) -> Quality:
        """Each shard on all prompts, averaged over the shards."""
        n = len(self.per_shard)
        return Quality(
            prompts=self.per_shard[0].prompts,
            exact_match=sum(q.exact_match for q in self.per_shard) / n,
            perplexity=sum(q.perplexity for q in self.per_shard) / n,
        )

    @property
    def exact_match_loss(self) -> float:
        """Relative loss of routed exact match versus the full model (0.25: a quarter lower)."""
        return 1.0 - self.routed.exact_match / self.full.exact_match

    @property
    def perplexity_increase(self) -> float:
        """Relative increase of routed perplexity versus the full model (0.5: 1.5 times)."""
        return self.routed.perplexity / self.full.perplexity - 1.0

    def describe(self) -> str:
        return (
            f"independent-shard mode: {self.num_shards} shards, exact-match "
            f"{self.routed.exact_match:.1%} vs {self.full.exact_match:.1%} full (perplexity "
            f"{self.routed.perplexity:.2f} vs {self.full.perplexity:.2f}; measured on "
            f"{self.full.prompts} held-out prompts)"
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> ShardQuality:
        return cls(
            model=data["model"],
            num_shards=int(data["num_shards"]),
            assignment=data["assignment"],
            core_fraction=float(data["core_fraction"]),
            full=Quality(**data["full"]),
            routed=Quality(**data["routed"]),
            per_shard=tuple(Quality(**q) for q in data["per_shard"]),
            plan_fingerprint=data["plan_fingerprint"],
            seconds=float(data["seconds"]),
        )


def expert_gate_mass(
    path: str | Path, calibration: int = CALIBRATION_PROMPTS, seed: int = 7
) -> dict[int, list[float]]:
    """layer -> each expert's gate mass over `calibration` training-split prompts (whole model)."""
    model = load_model(path, device="cpu", max_seq_len=None)
    tokenizer = Tokenizer(path, extra_eos_ids=model.args.eos_token_ids)
    with compute_threads(model):
        usage = measure_expert_usage(model, calibration_sequences(tokenizer, calibration, seed))
    return {layer: usage.gate_mass[row].tolist() for row, layer in enumerate(usage.layers)}


def shard_ids(num_shards: int) -> list[str]:
    return [f"shard-{i}" for i in range(num_shards)]


def routed_quality(examples: Sequence[Example], per_shard: Sequence[QualityReport]) -> Quality:
    """Each example scored on the shard that `shard_for_session(example.prompt, ...)` picks."""
    ids = shard_ids(len(per_shard))
    scores = [
        per_shard[ids.index(shard_for_session(example.prompt, ids))].scores[i]
        for i, example in enumerate(examples)
    ]
    return summarize(scores)


def measure_shard_quality(
    path: str | Path,
    num_shards: int,
    *,
    assignment: str = "ranked",
    core_fraction: float = 0.25,
    seed: int = 0,
    examples: Sequence[Example] | None = None,
    full: QualityReport | None = None,
    gate_mass: Mapping[int, Sequence[float]] | None = None,
    model_name: str | None = None,
) -> tuple[ShardQuality, ShardPlan, list[QualityReport]]:
    """Plans `num_shards` shards and scores each (see module doc). `full` and `gate_mass`, when
    given, are reused (a benchmark measures them once for many plans). Returns the summary, the
    plan, and each shard's per-prompt report."""
    started = time.perf_counter()
    path = Path(path)
    examples = list(examples or builtin_skills.held_out_set(DEFAULT_PER_SKILL))
    if full is None:
        full = evaluate_quality(path, examples=examples)
    if gate_mass is None:
        gate_mass = expert_gate_mass(path)
    args = Checkpoint.open(path).args
    if args.moe is None:
        raise ValueError(f"the model in {path} has no MoE layers: nothing to split into shards")
    plan = plan_shards(gate_mass, num_shards, core_fraction, assignment, seed, top_k=args.moe.top_k)
    reports = [
        evaluate_quality(
            path, LoadPlan(experts=plan.experts(s), restrict_router=True), examples=examples
        )
        for s in range(num_shards)
    ]
    quality = ShardQuality(
        model=model_name or path.name,
        num_shards=num_shards,
        assignment=assignment,
        core_fraction=core_fraction,
        full=full.overall,
        routed=routed_quality(examples, reports),
        per_shard=tuple(r.overall for r in reports),
        plan_fingerprint=plan.fingerprint,
        seconds=time.perf_counter() - started,
    )
    return quality, plan, reports


def measurement_bytes(folder: str | Path) -> int:
    """About the memory a measurement needs at its peak: the whole model in the dtype it is
    evaluated in (on the CPU), and a quarter more to work in."""
    args = Checkpoint.open(folder).args
    dtype = resolve_dtype(None, args, torch.device("cpu"))
    element = torch.empty((), dtype=dtype).element_size()
    return args.parameter_count()["total"] * element * 5 // 4


def cache_directory() -> Path:
    return cache_root() / "shard-quality"


def _cache_key(folder: Path, parameters: Mapping) -> str:
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".json", ".safetensors"))
    )
    text = json.dumps(
        {"version": MEASUREMENT_VERSION, "folder": str(folder.resolve()), "files": files}
        | dict(parameters),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def shard_quality_summary(
    model: str | Path | None = None,
    num_shards: int = 2,
    *,
    assignment: str = "ranked",
    core_fraction: float = 0.25,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    memory: int | None = None,
    gate_mass: Mapping[int, Sequence[float]] | None = None,
) -> ShardQuality:
    """The measured quality of independent-shard mode for `model` (None: the built-in model; a
    folder; a repo id in the local cache) split in `num_shards`: from the cache when this exact
    measurement was made before, else measured now (the caller runs it off the event loop) and
    cached. `describe()` gives the line to show the user. A measurement loads the whole model
    (to compare with): with `memory` (bytes free for it), one that needs more is refused with
    MemoryError instead of made. `gate_mass` (layer -> each expert's): the usage the split is
    planned from, as a shard node plans it (its rankings); by default the gate mass over
    CALIBRATION_PROMPTS prompts (`expert_gate_mass`), which may rank the experts otherwise."""
    from mesh_node.engine.catalog import resolve_model

    resolved = resolve_model(model)
    folder = Path(resolved.path)
    parameters = {
        "num_shards": num_shards,
        "assignment": assignment,
        "core_fraction": core_fraction,
        "seed": seed,
        "per_skill": DEFAULT_PER_SKILL,
        "calibration": CALIBRATION_PROMPTS,
    }
    if gate_mass is not None:
        parameters["gate_mass"] = sorted(
            (int(k), [float(m) for m in v]) for k, v in gate_mass.items()
        )
    path = Path(cache_dir or cache_directory()) / f"{_cache_key(folder, parameters)}.json"
    if not refresh and path.is_file():
        try:
            return ShardQuality.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged or unreadable entry: measure again and overwrite it
    if memory is not None:
        needed = measurement_bytes(folder)
        if needed > memory:
            raise MemoryError(
                f"measuring it loads the whole model ({needed / 2**30:.1f} GiB with room to "
                f"work), more than this node has free ({memory / 2**30:.1f} GiB); "
                "`benchmarks/moe_split.py quality` measures it on a larger machine"
            )
    quality, _, _ = measure_shard_quality(
        folder,
        num_shards,
        assignment=assignment,
        core_fraction=core_fraction,
        seed=seed,
        gate_mass=gate_mass,
        model_name=resolved.name,
    )
    try:
        write_atomically(path, json.dumps(quality.to_json(), indent=1).encode())
    except OSError as exc:  # (read-only, full): the figure stands, measured again next time
        log.warning("could not cache the shard mode's quality in %s: %s", path.parent, exc)
    return quality
