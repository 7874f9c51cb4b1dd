#!/usr/bin/env python3
"""Gossip scaling: simulated meshes of 50, 200 and 1000 nodes (the real membership service
and the real authenticated transport, over the in-memory network, in virtual time).

    python benchmarks/gossip.py [--sizes 50 200 1000] [--latency 0.0005] [--seed 1]

For each size: start from a converged mesh (views pre-built, as if everyone had joined long
ago), then measure, in simulated seconds and in protocol rounds (probe intervals):
  * join: a new node joins through a random member; time until every node has it alive;
  * failure: a random node crashes; time until every other node has it dead;
  * steady state: gossip bytes sent per node per second over a quiet window.
Targets: join and failure times grow like log N; bytes per node stay flat as N grows.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from pathlib import Path

from mesh_node.identity import MeshSecret, new_mesh_id
from mesh_node.membership.claims import ALIVE, DEAD
from mesh_node.membership.swim import MembershipConfig
from mesh_node.transport import virtual_time
from mesh_node.transport.memory import MemoryNetwork

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.membership.mesh
from tests.membership.mesh import SimMesh

QUIET_WINDOW = 10.0  # simulated seconds of steady state to measure bytes over (periodic probes)


async def measure(size: int, latency: float, seed: int) -> dict[str, float]:
    # virtual time never lags, so the event-loop lag check would only burn simulation CPU
    config = MembershipConfig(lag_interval=0)
    network = MemoryNetwork(latency=latency)
    mesh = SimMesh(network, MeshSecret(new_mesh_id()), config, seed=seed)
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    await mesh.add_converged(size)
    # steady state: every node has probed every other once (one member a probe interval, in
    # turn), so the connections probes use are open; measured sooner, the window held the
    # handshakes of that first round (a mesh built converged has no connections yet)
    await asyncio.sleep(5 + size * config.probe_interval)

    # steady state: bytes per node per second
    before = sum(network.bytes_sent.values())
    await asyncio.sleep(QUIET_WINDOW)
    steady = (sum(network.bytes_sent.values()) - before) / size / QUIET_WINDOW

    # a join, known everywhere
    seed_node = rng.choice(mesh.nodes)
    started = loop.time()
    joiner = await mesh.add(seeds=[seed_node.address])
    join_time = await mesh.wait_for(
        lambda: all(n.status_of(joiner) == ALIVE for n in mesh.nodes), timeout=120
    )
    assert loop.time() - started >= join_time

    # a failure, detected everywhere
    await asyncio.sleep(5)
    victim = rng.choice(mesh.nodes)
    mesh.crash(victim)
    fail_time = await mesh.wait_for(
        lambda: all(n.status_of(victim) == DEAD for n in mesh.nodes), timeout=120
    )
    await mesh.stop()
    return {
        "join_s": join_time,
        "join_rounds": join_time / config.probe_interval,
        "fail_s": fail_time,
        "fail_rounds": fail_time / config.probe_interval,
        "bytes_per_node_s": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--latency", type=float, default=0.0005, help="one-way, seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        wall = time.perf_counter()
        result = virtual_time.run(measure(size, args.latency, args.seed))
        result["wall_s"] = time.perf_counter() - wall
        rows.append((size, result))
        print(
            f"N={size:5d}  join {result['join_s']:5.2f}s ({result['join_rounds']:4.1f} rounds)  "
            f"failure {result['fail_s']:5.2f}s ({result['fail_rounds']:4.1f} rounds)  "
            f"{result['bytes_per_node_s']:7.0f} B/node/s   [{result['wall_s']:.0f}s to simulate]",
            flush=True,
        )
    if len(rows) > 1:
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        log_ratio = math.log(n1) / math.log(n0)
        print(f"\nfrom N={n0} to N={n1}: log N grows {log_ratio:.2f}x;")
        print(f"  join time grows {r1['join_s'] / r0['join_s']:.2f}x")
        print(f"  failure time grows {r1['fail_s'] / r0['fail_s']:.2f}x")
        print(f"  bytes per node grow {r1['bytes_per_node_s'] / r0['bytes_per_node_s']:.2f}x")


if __name__ == "__main__":
    main()
