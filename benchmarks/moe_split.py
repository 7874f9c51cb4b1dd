"""Splitting a MoE model over nodes: what each mode costs. One subcommand per claim.

    python benchmarks/moe_split.py speed [--models builtin olmoe] [--tokens 48] [--requests 5]
                                         [--layers 16] [--cores-per-node N]

`speed`: decode tokens/s through the OpenAI API of node processes on loopback: one node holding
every expert, then two and three nodes in expert-parallel mode (`--moe-split`, each offering
memory for about 1/n of the experts plus the hot replicas), for the built-in model and the
random-weight OLMoE-like model of benchmarks/engine.py. Beside each: remote expert calls per
token (from the host's dispatch counters), the share of them made on express lanes (sealed UDP
datagrams the engine thread sends itself, see mesh_node/transport/express.py), and the latency
floor they impose (calls per token x the small-message round trip to a node, measured in the
same run: on a lane where the calls take lanes, else over QUIC). A last row per model runs the
three nodes with `--no-express-lanes` (every call over QUIC), to show what the lanes give.
The one node keeps running beside each split configuration and the answers alternate between
them (one node, split, one node, ...), so each ratio compares rates taken in the same minutes
(a VM's speed drifts by 15% between configurations run one after another); the one-node row
gives the median of all its answers. Only one of the two decodes at a time.
Target: three-node expert-parallel decode at least 50% of the single-node rate.
`--cores-per-node N` pins node i to cores [iN, (i+1)N) (taskset, N intra-op threads) and this
process to the cores after them: one N-core machine holding everything versus two or three N-core
machines, on one machine with enough cores (the one node shares node 0's cores). Without it
every process shares every core.

    python benchmarks/moe_split.py quality [--model FOLDER] [--per-skill 50] [--shards 2 3 4]
                                           [--random-seeds 3] [--core-fraction 0.25]
                                           [--calibration 200]

`quality`: independent-shard mode (each shard: trunk + a core of the hottest experts + its own
experts, router restricted to them) on the built-in model, against the full model, in one run.
Rankings: gate mass over training-split calibration prompts (`measure_expert_usage`). Scores:
greedy exact match and teacher-forced answer perplexity on held-out prompts
(`mesh_node.engine.evaluation`). For each shard count and assignment:

- routed (headline): each prompt served by the shard `shard_for_session(prompt)` picks;
- shard mean: every shard on every prompt, averaged over the shards;
- loss: routed exact match relative to the full model, and routed perplexity / full perplexity.

Assignments: "ranked" (hot core, the rest dealt in snake order by rank), "random" (hot core, the
rest dealt in a seeded random order; averaged over `--random-seeds` seeds), and "no ranking"
(core and deal both from a seeded random ranking: what a split without usage data gets).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from mesh_node.engine import builtin_skills  # noqa: E402
from mesh_node.engine.catalog import resolve_model  # noqa: E402
from mesh_node.engine.evaluation import Quality, evaluate_quality  # noqa: E402
from mesh_node.placement.shard_quality import (  # noqa: E402
    expert_gate_mass,
    measure_shard_quality,
)


def _mean(qualities: list[Quality]) -> Quality:
    return Quality(
        prompts=qualities[0].prompts,
        exact_match=sum(q.exact_match for q in qualities) / len(qualities),
        perplexity=sum(q.perplexity for q in qualities) / len(qualities),
    )


def quality(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    resolved = resolve_model(args.model)
    path = Path(resolved.path)
    examples = builtin_skills.held_out_set(args.per_skill)
    full = evaluate_quality(path, examples=examples)
    gate_mass = expert_gate_mass(path, calibration=args.calibration)
    num_experts = len(next(iter(gate_mass.values())))

    def unranked(seed: int) -> dict[int, list[float]]:
        # a seeded random ranking: masses are a permutation of 0..E-1
        rng = random.Random(f"unranked {seed}")
        return {
            layer: [float(m) for m in rng.sample(range(num_experts), num_experts)]
            for layer in gate_mass
        }

    rows = []
    for shards in args.shards:
        variants = [("ranked", [("ranked", 0, gate_mass)])]
        seeds = range(args.random_seeds)
        variants.append(("random", [("random", s, gate_mass) for s in seeds]))
        variants.append(("no ranking", [("ranked", 0, unranked(s)) for s in seeds]))
        for label, runs in variants:
            measured = [
                measure_shard_quality(
                    path,
                    shards,
                    assignment=assignment,
                    core_fraction=args.core_fraction,
                    seed=seed,
                    examples=examples,
                    full=full,
                    gate_mass=mass,
                )[0]
                for assignment, seed, mass in runs
            ]
            routed = _mean([m.routed for m in measured])
            shard_mean = _mean([m.shard_mean for m in measured])
            rows.append((shards, label, len(runs), routed, shard_mean, measured))
            print(f"  measured {shards} shards, {label} ({time.perf_counter() - started:.0f}s)")

    f = full.overall
    print()
    print(
        f"built-in model ({resolved.name}), {f.prompts} held-out prompts, "
        f"core_fraction {args.core_fraction}, {args.calibration} calibration prompts, "
        f"{platform.machine()}, {time.perf_counter() - started:.0f}s"
    )
    print()
    print(
        "| split | assignment | exact match (routed) | perplexity (routed) | exact match "
        "(shard mean) | perplexity (shard mean) | exact match vs full | perplexity vs full |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| full model | - | {f.exact_match:.1%} | {f.perplexity:.3f} | {f.exact_match:.1%} | "
        f"{f.perplexity:.3f} | - | - |"
    )
    for shards, label, n, routed, shard_mean, _ in rows:
        name = label if n == 1 else f"{label} (mean of {n} seeds)"
        loss = 1 - routed.exact_match / f.exact_match
        print(
            f"| {shards} shards | {name} | {routed.exact_match:.1%} | {routed.perplexity:.3f} | "
            f"{shard_mean.exact_match:.1%} | {shard_mean.perplexity:.3f} | "
            f"-{loss:.1%} | {routed.perplexity / f.perplexity:.2f}x |"
        )
    print()
    print("exact match of each shard on all prompts (ranked):")
    for shards, label, _, _, _, measured in rows:
        if label == "ranked":
            per = ", ".join(f"{q.exact_match:.1%}" for q in measured[0].per_shard)
            print(f"- {shards} shards: {per}")
    return 0


# ---- speed -------------------------------------------------------------------------------------


async def _served(nodes, model: str, split: bool, timeout: float = 900.0):
    """The host, once it serves `model` and (split) every node holds its part of the plan."""
    async with asyncio.timeout(timeout):
        while True:
            documents = [await n.status() for n in nodes]
            ready = next((e["ready"] for e in documents[0]["hosting"] if e["model"] == model), [])
            held = True
            if split:
                sections = [
                    next((e for e in d["experts"] if e["model"] == model), {}) for d in documents
                ]
                held = all(s.get("agreed") for s in sections) and all(
                    s.get("held", {}).get(entry["node_id"], 0) == entry["bytes"]
                    for s in sections
                    for entry in s.get("nodes", [])
                )
            if ready and held:
                return next(n for n in nodes if str(n.node_id) == ready[0])
            await asyncio.sleep(0.5)  # polling other processes' status (bounded by timeout)


async def _decode_rate(api, model: str, tokens: int, prompt: str, seed: int = 0) -> float:
    """Tokens/s between the first and the last streamed token (prefill excluded). Sampled
    (temperature 1, seeded: every configuration decodes the same tokens), as text is: a
    random-weight model decoding greedily repeats one token, whose experts are then the same
    at every step, which no real model's traffic looks like."""
    stream = await api.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=tokens,
        temperature=1.0,
        seed=seed,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    if len(arrivals) < 2 or arrivals[-1] == arrivals[0]:  # (tokens that pile up share a chunk)
        raise SystemExit(f"the {tokens} tokens came in one piece: too few to time; raise --tokens")
    return (tokens - 1) / (arrivals[-1] - arrivals[0])


async def _round_trip(mesh_id: str, node, samples: int = 300) -> tuple[float, float | None]:
    """p50 seconds of a small request/response (Ping) between this process and a node: over
    QUIC, and on an express lane (None when the node grants none)."""
    from mesh_node.protocol import REGISTRY
    from mesh_node.transport.errors import RemoteError
    from mesh_node.transport.express import SECRET_SIZE, ExpressClient
    from mesh_node.transport.messages import ExpressOpen, Ping
    from tests.processes.nodes import client_endpoint

    endpoint = client_endpoint(mesh_id)
    await endpoint.start()
    try:
        conn = await endpoint.connect(node.address, expect=node.node_id, timeout=10)
        times = []
        for seq in range(samples):
            started = time.perf_counter()
            await conn.request(Ping(seq), timeout=5)
            times.append(time.perf_counter() - started)
        quic = statistics.median(times[samples // 10 :])
        secret = os.urandom(SECRET_SIZE)
        try:
            grant = await conn.request(ExpressOpen(secret), timeout=5)
        except RemoteError:
            return quic, None
        lanes = ExpressClient(REGISTRY)
        lanes.add("node", (node.address[0], grant.port), grant.lane, secret)

        def on_lane() -> float:  # blocking, as an engine thread calls
            times = []
            for seq in range(samples):
                started = time.perf_counter()
                lanes.result(lanes.call("node", Ping(seq)), 1.0)
                times.append(time.perf_counter() - started)
            return statistics.median(times[samples // 10 :])

        try:
            return quic, await asyncio.to_thread(on_lane)
        finally:
            lanes.close()
    finally:
        await endpoint.close()


def _expert_bytes(folder: Path, dtype: str | None) -> tuple[int, int]:
    """(bytes of all routed experts, bytes of the trunk) as the nodes will load them."""
    from mesh_node.engine.checkpoint import Checkpoint
    from mesh_node.engine.loading import expert_nbytes, resolve_device, resolve_dtype

    args = Checkpoint.open(folder).args
    torch_dtype = resolve_dtype(dtype, args, resolve_device("cpu"))
    per_expert = expert_nbytes(args, torch_dtype)
    counts = args.parameter_count()
    experts = per_expert * args.moe.num_experts * len(args.sparse_layer_indices)
    itemsize = per_expert // (3 * args.hidden_size * args.moe.expert_intermediate_size)
    return experts, counts["trunk"] * itemsize


def _pinning(index: int, cores: int) -> dict:
    """NodeProcess.join arguments that give node `index` cores of its own (none when cores=0)."""
    if not cores:
        return {}
    first = index * cores
    return {
        "prefix": ("taskset", "-c", f"{first}-{first + cores - 1}"),
        "env": {"OMP_NUM_THREADS": str(cores)},
    }


class _Mesh:
    """Node processes serving one model, whole (one node) or split over `count` nodes, with an
    OpenAI client on the host; `async with` starts them and stops them."""

    def __init__(self, folder: Path, name: str, count: int, args, lanes: bool = True):
        self.folder, self.name, self.count, self.args, self.lanes = folder, name, count, args, lanes
        self.label = count if lanes or count == 1 else f"{count}, QUIC only"

    async def __aenter__(self) -> _Mesh:
        from mesh_node.identity import new_mesh_id
        from tests.processes.nodes import NodeProcess

        self.mesh_id = new_mesh_id()
        common = ["--model", str(self.folder), "--device", "cpu"]
        if self.count > 1:
            experts, trunk = _expert_bytes(self.folder, None)
            share = int(experts / self.count * 1.35) + trunk  # ~1/n of the experts, + replicas
            common += ["--moe-split", "--expert-memory", str(share)]
            if not self.lanes:
                common.append("--no-express-lanes")
        cores = self.args.cores_per_node
        self.nodes = [await NodeProcess.join(self.mesh_id, *common, **_pinning(0, cores))]
        try:
            seed = "{}:{}".format(*self.nodes[0].address)
            for i in range(1, self.count):
                self.nodes.append(
                    await NodeProcess.join(
                        self.mesh_id, "--peer", seed, *common, **_pinning(i, cores)
                    )
                )
            self.host = await _served(self.nodes, self.name, split=self.count > 1)
            self.api = openai.AsyncOpenAI(
                base_url=self.host.api_url, api_key="x", max_retries=0, timeout=600
            )
            await _decode_rate(self.api, self.name, 8, "warm up")
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.api.close()
        await self._stop()

    async def _stop(self) -> None:
        from tests.processes.nodes import stop_all

        await stop_all(self.nodes)

    async def rate(self, i: int) -> float:
        return await _decode_rate(self.api, self.name, self.args.tokens, f"request {i}", seed=i)

    async def remote_calls(self, what: str = "remote_calls") -> int:
        document = await self.host.status()
        section = next((e for e in document["experts"] if e["model"] == self.name), {})
        return section.get("dispatch", {}).get(what, 0)


async def _model_speed(folder: Path, name: str, args) -> list[dict]:
    """One node holding everything, then each split configuration beside it: their answers
    alternate (one node, split, one node, ...), so each split's ratio is to the one node's
    rate in the same minutes, whatever the machine's speed does between configurations. Only
    one mesh decodes at a time; with --cores-per-node the one node shares node 0's cores."""
    rows = []
    async with _Mesh(folder, name, 1, args) as single:
        quic_rtt, _ = await _round_trip(single.mesh_id, single.host)
        singles: list[float] = []
        for count, lanes in ((2, True), (3, True), (3, False)):
            async with _Mesh(folder, name, count, args, lanes) as split:
                before = await split.remote_calls()
                lane_before = await split.remote_calls("lane_calls")
                beside, rates = [], []
                for i in range(args.requests):
                    beside.append(await single.rate(i))
                    rates.append(await split.rate(i))
                calls = await split.remote_calls() - before
                on_lanes = await split.remote_calls("lane_calls") - lane_before
                split_quic, lane_rtt = await _round_trip(split.mesh_id, split.host)
            singles += beside
            tokens = args.requests * args.tokens
            per_token = calls / tokens
            lane_share = on_lanes / calls if calls else 0.0
            rtt = lane_rtt if lane_share > 0.5 and lane_rtt is not None else split_quic
            row = {
                "nodes": split.label,
                "rate": statistics.median(rates),
                "single": statistics.median(beside),
                "calls_per_token": per_token,
                "lane_share": lane_share,
                "rtt": rtt,
                "rtt_kind": "lane" if rtt is lane_rtt else "QUIC",
                "floor": per_token * rtt,
            }
            print(
                f"{name}: {row['nodes']} node(s) {row['rate']:.1f} tok/s, one node "
                f"{row['single']:.1f} tok/s in the same minutes, "
                f"{per_token:.2f} remote calls/token ({lane_share:.0%} on lanes)",
                flush=True,
            )
            rows.append(row)
    whole = statistics.median(singles)
    one = {"nodes": 1, "rate": whole, "single": whole, "calls_per_token": 0.0}
    one.update(lane_share=0.0, rtt=quic_rtt, rtt_kind="QUIC", floor=0.0)
    return [one, *rows]


def speed(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine import build_olmoe_like

    if args.cores_per_node:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 3 * args.cores_per_node + 1:
            raise SystemExit(
                f"--cores-per-node {args.cores_per_node} needs {3 * args.cores_per_node + 1} "
                f"cores (three nodes and this process); this machine has {len(available)}"
            )
        os.sched_setaffinity(0, available[3 * args.cores_per_node :])
    results: dict[str, list[dict]] = {}
    for which in args.models:
        scratch = tempfile.mkdtemp(prefix="moe-split-")
        try:
            if which == "builtin":
                folder, name = Path(resolve_model(None).path), "builtin"
            else:
                folder = Path(scratch) / "olmoe-like"
                started = time.perf_counter()
                build_olmoe_like(str(folder), args.layers)
                print(f"built the OLMoE-like checkpoint in {time.perf_counter() - started:.0f}s")
                name = folder.name  # a --model folder is served under its folder's name
            results[which] = asyncio.run(_model_speed(folder, name, args))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    cores = (
        f"{args.cores_per_node} cores pinned per node"
        if args.cores_per_node
        else f"all {os.cpu_count()} cores shared"
    )
    print(
        f"decode through the API, {args.tokens}-token answers, median of {args.requests} per "
        f"split configuration (of {3 * args.requests} for the one node, beside them); "
        f"{cores}, {platform.machine()}"
    )
    print(
        "| model | nodes | tokens/s | 1 node, same minutes | vs 1 node | remote calls/token | "
        "on lanes | round trip | latency floor/token | floor share of a token |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    met = True
    for which, rows in results.items():
        for row in rows:
            share = row["floor"] * row["rate"]
            print(
                f"| {which} | {row['nodes']} | {row['rate']:.1f} | {row['single']:.1f} | "
                f"{row['rate'] / row['single']:.2f} | "
                f"{row['calls_per_token']:.2f} | {row['lane_share']:.0%} | "
                f"{row['rtt'] * 1e3:.2f} ms ({row['rtt_kind']}) | "
                f"{row['floor'] * 1e3:.2f} ms | {share:.0%} |"
            )
        met &= rows[2]["rate"] / rows[2]["single"] >= 0.5
    print()
    print("target (3 nodes >= 50% of 1 node): " + ("met" if met else "MISSED"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quality", help="independent-shard mode vs the full model")
    q.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    q.add_argument("--per-skill", type=int, default=50, help="held-out prompts per skill")
    q.add_argument(
        "--shards", type=int, nargs="+", default=[2, 3, 4], help="shard counts to compare"
    )
    q.add_argument(
        "--core-fraction",
        type=float,
        default=0.25,
        help="share of each layer's experts every shard holds (the hottest)",
    )
    q.add_argument("--random-seeds", type=int, default=3, help="seeds for the random baselines")
    q.add_argument("--calibration", type=int, default=200, help="calibration prompts")
    q.set_defaults(run=quality)
    s = commands.add_parser("speed", help="expert-parallel decode speed over 1, 2, 3 nodes")
    s.add_argument(
        "--models",
        nargs="+",
        choices=["builtin", "olmoe"],
        default=["builtin", "olmoe"],
        help="models to measure (default: both)",
    )
    s.add_argument("--tokens", type=int, default=48, help="tokens per answer")
    s.add_argument(
        "--requests",
        type=int,
        default=5,
        help="answers per split configuration (the one node answers as many beside each)",
    )
    s.add_argument("--layers", type=int, default=16, help="layers of the OLMoE-like model")
    s.add_argument(
        "--cores-per-node",
        type=int,
        default=0,
        help="pin each node to this many cores of its own (default 0: all processes share all)",
    )
    s.set_defaults(run=speed)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
